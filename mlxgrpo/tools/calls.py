"""Calling a tool: the error a refused or failed call raises, its one-line message, and the
time limit around each call. Below both the calculator and the registry of tools."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

MAX_MESSAGE_CHARS = 200  # a tool error is one short line for the model to read


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
