"""Turning raw layer values (TOML values, `--set` text, env text) into typed field values."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any

from mlxgrpo import parsing
from mlxgrpo.config.schema import FieldSpec
from mlxgrpo.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", ""}


# The largest integer any setting takes unless its own range says otherwise: counts, sizes and
# seeds beyond it are typing mistakes, and MLX (int32 shapes, 64-bit seeds) cannot hold some.
INT_CEILING = 2**31 - 1


class ValueProblem(ValueError):
    """A value that does not fit its field; the message says what was expected."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        name = f"a list of {item.__name__}s"
    else:
        name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[base]
    return f"{name} (or unset)" if optional else name


def parse_cli_text(spec: FieldSpec, text: str) -> Any:
    """Interpret `--set key=TEXT` for a field: TOML literal when it parses, raw text otherwise.

    String fields keep the text as typed (so run_name=2024 stays "2024") unless it is quoted.
    """
    base, _ = _unwrap_optional(spec.type)
    stripped = text.strip()
    if base is str and not (
        stripped[:1] in "\"'" and stripped[-1:] == stripped[:1] and len(stripped) > 1
    ):
        return text
    try:
        return parsing.toml_text(f"v = {stripped}", f"--set {spec.key}")["v"]
    except parsing.ParseError as exc:
        if "levels deep" in exc.problem:  # not text that merely is not TOML
            raise ConfigError(str(exc.source) + ": " + exc.problem, hint=exc.hint) from None
        return text


def coerce(spec: FieldSpec, value: Any) -> Any:
    """Return `value` converted to the field's type, or raise ValueProblem."""
    base, optional = _unwrap_optional(spec.type)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ValueProblem(f"expected {type_name(spec.type)}, got nothing")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value
        if isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(items, list):
            items = [items]  # a lone value is a one-item list
        return [_coerce_scalar(item, v) for v in items]
    return _coerce_scalar(base, value)


def _coerce_scalar(tp: type, value: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueProblem(f"expected a boolean (true/false, 1/0, yes/no, on/off), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueProblem(f"expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer too large for any float
                raise ValueProblem(f"expected a finite number, got {value}") from None
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ValueProblem(f"expected a number, got {value!r}")
        # NaN passes every min/max comparison and inf overflows the math: neither is a setting.
        if not math.isfinite(number):
            raise ValueProblem(f"expected a finite number, got {number!r}; give a real value")
        return number
    if tp is str:
        if isinstance(value, str):
            try:  # undecodable bytes (argv, environment) arrive as lone surrogates
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueProblem("is not valid UTF-8 text; pass it as UTF-8") from None
            return value
        raise ValueProblem(f"expected a string, got {value!r} (quote it in TOML)")
    raise ValueProblem(f"unsupported field type {tp!r}")


def check_bounds(spec: FieldSpec, value: Any) -> None:
    """Raise ValueProblem when a typed value is outside the field's choices or range, or is
    not the single directory name a path_component field needs."""
    if value is None:
        return
    if spec.path_component:
        problem = path_component_problem(value)
        if problem:
            raise ValueProblem(problem)
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(str(c) for c in spec.choices)
        close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
        extra = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueProblem(f"must be one of {allowed}, got {value!r}{extra}")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, int) and spec.max is None and v > INT_CEILING:
            raise ValueProblem(f"must be at most {INT_CEILING} (2**31 - 1), got {v}")
        if spec.min is not None and v < spec.min:
            raise ValueProblem(f"must be at least {spec.min:g}, got {v!r}")
        if spec.max is not None and v > spec.max:
            raise ValueProblem(f"must be at most {spec.max:g}, got {v!r}")
        if spec.gt is not None and v <= spec.gt:
            raise ValueProblem(f"must be greater than {spec.gt:g}, got {v!r}")


def path_component_problem(name: str) -> str | None:
    """Why `name` is not one directory name inside its parent (None when it is, or is empty)."""
    fix = "use a plain name such as exp-1 (set run.output_dir for the parent folder)"
    if name == "":
        return None  # empty = the field's documented default (a timestamp)
    if not name.strip():
        return f"is blank; {fix}, or leave it empty for a timestamp"
    if name in (".", ".."):
        return f"'{name}' is not a directory name; {fix}"
    # Both separators on every platform: a name must mean the same directory everywhere.
    if "/" in name or "\\" in name:
        return f"must be one directory name, not a path; {fix}"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"contains a control character (NUL, newline, tab, ...); {fix}"
    return None


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None
