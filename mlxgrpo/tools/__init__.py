"""Tools a model may call while it generates: the built-in calculator and user functions.

A tool is a plain Python function from text to text. `rollout.tools` names them like reward
functions: a built-in name (`calculator`), `'path/to/file.py:function'` or
`'package.module:function'`. How a model writes a call and reads its result depends on its
tokenizer (:mod:`mlxgrpo.tools.formats`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlxgrpo.errors import ConfigError

MAX_MESSAGE_CHARS = 200  # a tool error is one short line for the model to read


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[[str], str]
    description: str = ""


def builtin_tools() -> dict[str, Tool]:
    from mlxgrpo.tools.calculator import calculator

    return {
        "calculator": Tool(
            "calculator",
            calculator,
            "arithmetic and str.count on literals, as nanochat's engine allows",
        )
    }


def resolve_tools(specs: Sequence[str], base_dir: str | Path | None = None) -> list[Tool]:
    """The tools `specs` name, in order; ConfigError for an unknown or unloadable one."""
    from mlxgrpo.rewards.registry import load_callable

    builtins = builtin_tools()
    tools: list[Tool] = []
    for raw in specs:
        spec = raw.strip()
        if spec in builtins:
            tools.append(builtins[spec])
        elif ":" in spec:
            name, fn = load_callable(spec, "Tool", base_dir)
            doc = (fn.__doc__ or "").strip().splitlines()
            tools.append(Tool(name, fn, doc[0] if doc else ""))
        else:
            raise ConfigError(
                f"unknown tool {spec!r} in rollout.tools",
                hint=f"built-in tools: {', '.join(sorted(builtins))}; or give "
                "'path/to/file.py:function' or 'package.module:function'",
            )
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"rollout.tools names a tool twice: {', '.join(names)}",
            hint="each tool's function name must be unique",
        )
    return tools


class ToolError(Exception):
    """A tool call was refused or failed; the message is one short line."""


def run_with_timeout(fn: Callable[[str], str], argument: str, timeout_s: float) -> str:
    """Call ``fn(argument)`` in a daemon thread and return its text within ``timeout_s`` seconds.

    Raises ToolError on timeout, when ``fn`` raises (naming the exception's type and message) and
    when it returns something other than a str. A thread cannot be killed, so one that times out
    runs on in the background; daemon=True keeps it from holding the process open at exit.
    """
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    returned: list[object] = []
    raised: list[BaseException] = []

    def call() -> None:
        try:
            returned.append(fn(argument))
        except BaseException as error:  # anything, so the caller hears of it instead of a hang
            raised.append(error)

    worker = threading.Thread(target=call, name="mlxgrpo-tool-call", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ToolError(f"timed out after {timeout_s:g} s")
    if raised:
        error = raised[0]
        detail = one_line(str(error))
        if isinstance(error, ToolError):
            raise ToolError(detail) from error
        raise ToolError(
            f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        ) from error
    if not returned:
        raise ToolError("tool finished without a result")
    value = returned[0]
    if not isinstance(value, str):
        raise ToolError(f"tool returned {type(value).__name__}, expected str")
    return value


def one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."
