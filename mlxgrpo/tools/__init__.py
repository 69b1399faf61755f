"""Tools a model may call while it generates: the built-in calculator and user functions.

A tool is a plain Python function from text to text. `rollout.tools` names them like reward
functions: a built-in name (`calculator`), `'path/to/file.py:function'` or
`'package.module:function'`. How a model writes a call and reads its result depends on its
tokenizer (:mod:`mlxgrpo.tools.formats`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlxgrpo.errors import ConfigError
from mlxgrpo.tools.calls import MAX_MESSAGE_CHARS, ToolError, one_line, run_with_timeout

__all__ = [
    "MAX_MESSAGE_CHARS",
    "Tool",
    "ToolError",
    "builtin_tools",
    "one_line",
    "resolve_tools",
    "run_with_timeout",
]


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
