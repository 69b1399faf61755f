"""One way to parse the JSON, JSON Lines and TOML the program reads, with limits.

Python's parsers recurse once per level of nesting: an array nested a few thousand deep ends
in a RecursionError, far from the input that caused it. Everything mlxgrpo reads from a user,
a model directory, a run directory or a model's output (configs, ``--set`` values, data files,
``config.json``, adapter configs, checkpoints, logs, tool calls) goes through this module,
which measures nesting and size before the parser runs and names the source and line when
the input is too deep, too large or not valid. Limits are generous for real files
(:data:`MAX_DEPTH` levels, :data:`MAX_BYTES` per text) and fixed, so a hostile file costs a
scan, never a crash.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from mlxgrpo.errors import MlxgrpoError

MAX_DEPTH = 64  # levels of arrays and objects (tables); real configs and data use < 10
MAX_BYTES = 64 * 1024 * 1024  # one JSON text, JSON line or TOML file

# What the depth scan reads: strings (skipped whole, escapes included; for TOML also its
# multi-line and literal strings and its comments), brackets and line ends.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}\n]', re.DOTALL)
_TOML_TOKENS = re.compile(
    r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*|[\[\]{}\n]'
)


class ParseError(MlxgrpoError):
    """Input that cannot be parsed (invalid, too deep or too large): exit code 2.

    ``source`` names where it came from (a path, ``path:line``, ``--set key``), ``problem``
    says what is wrong without the source, for callers that phrase their own message."""

    exit_code = 2

    def __init__(self, source: str, problem: str, hint: str | None = None) -> None:
        super().__init__(f"{source}: {problem}", hint=hint)
        self.source = source
        self.problem = problem


def _deepest(text: str, tokens: re.Pattern[str], limit: int) -> tuple[int, int] | None:
    """``(depth, line)`` where the nesting of ``text`` first goes past ``limit`` (None when it
    never does). Brackets inside strings (and TOML comments) do not count."""
    if text.count("[") + text.count("{") <= limit:
        return None
    depth, line = 0, 1
    for match in tokens.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return depth, line
        elif token in "]}":
            depth = max(0, depth - 1)
        else:  # a line end, or a string or comment skipped whole
            line += token.count("\n")
    return None


def _check_size(size: int, source: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise ParseError(
            source,
            f"is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB that mlxgrpo reads "
            "as one JSON or TOML text",
            hint="check that this is the file you meant; split data over several lines",
        )


def _too_deep(source: str, depth_line: tuple[int, int], limit: int) -> ParseError:
    _, line = depth_line
    return ParseError(
        source,
        f"nests arrays or objects more than {limit} levels deep (line {line})",
        hint=f"flatten it; mlxgrpo reads at most {limit} levels",
    )


def json_text(
    text: str | bytes,
    source: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_bytes: int = MAX_BYTES,
) -> Any:
    """The value of one JSON text from ``source``; :class:`ParseError` when it is too large,
    too deep or not JSON."""
    _check_size(len(text), source, max_bytes)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(source, f"is not UTF-8 text (byte {exc.start})") from None
    if (deep := _deepest(text, _JSON_TOKENS, max_depth)) is not None:
        raise _too_deep(source, deep, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(source, f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:  # a limit above what this interpreter's stack holds
        raise _too_deep(source, (max_depth, 1), max_depth) from None


def read_text(path: Path, source: str | None = None, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of ``path``, checked for size first (OSError passes through)."""
    source = source or str(path)
    _check_size(path.stat().st_size, source, max_bytes)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ParseError(
            source,
            f"is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})",
            hint="save it as UTF-8",
        ) from None


def json_file(path: Path, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """The value of the JSON file ``path`` (OSError passes through for the caller to word)."""
    text = read_text(path, max_bytes=max_bytes)
    return json_text(text, str(path), max_depth=max_depth, max_bytes=max_bytes)


def toml_text(text: str, source: str, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The table of one TOML text; :class:`ParseError` when it is too deep or not TOML."""
    _check_size(len(text), source, MAX_BYTES)
    if (deep := _deepest(text, _TOML_TOKENS, max_depth)) is not None:
        raise _too_deep(source, deep, max_depth)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ParseError(
            source, f"invalid TOML: {exc}", hint="fix the syntax at that line"
        ) from None
    except RecursionError:
        raise _too_deep(source, (max_depth, 1), max_depth) from None


def toml_file(path: Path, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The table of the TOML file ``path`` (OSError passes through)."""
    return toml_text(read_text(path), str(path), max_depth=max_depth)
