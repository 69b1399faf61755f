"""The two consoles and what every view shares: markup escaping, number formatting, messages.

Model text goes through these consoles verbatim (``emoji=False``: ":x:" stays ":x:"). Views
print through ``console.out`` and ``console.err`` looked up at call time, so a test that
redirects output replaces them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True, emoji=False)  # model text: ":x:" stays ":x:"
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def visible(text: str, keep_lines: bool = False) -> str:
    """``text`` with every control or invisible formatting character written as its Python
    escape (a newline as ``\\n``, ESC as ``\\x1b``): a path or value cannot start a forged
    second line or move the cursor. ``keep_lines`` keeps newlines and tabs (model text)."""
    kept = "\n\t" if keep_lines else ""
    if text.isprintable() and not kept:
        return text
    return "".join(
        ch if ch.isprintable() or ch == " " or ch in kept else repr(ch)[1:-1] for ch in text
    )


def escape(text: str, keep_lines: bool = False) -> str:
    """``text`` as plain text inside Rich markup (user text: [sections], paths, values):
    markup escaped, control characters shown (:func:`visible`); emoji codes stay as typed
    because both consoles have ``emoji=False``."""
    from rich.markup import escape as rich_escape

    return rich_escape(visible(text, keep_lines))


def fmt(value: Any, digits: int = 3) -> str:
    """A metric for a table cell: floats to ``digits`` places (tiny or huge ones in e-notation),
    None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def human_size(n_bytes: int | None) -> str:
    """Bytes in the largest binary unit that is at least one (``1.5 GiB``); None as a dash."""
    if n_bytes is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 40) -> str:
    """Values as block characters, low to high; longer series are averaged into `width` bins."""
    points = [float(v) for v in values if v is not None]
    if not points:
        return ""
    if len(points) > width:  # bin means keep the shape; taking every n-th point would alias
        edges = [round(i * len(points) / width) for i in range(width + 1)]
        points = [sum(points[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False)]
    low, high = min(points), max(points)
    if high == low:
        return _BLOCKS[3] * len(points)  # flat: mid-height, so a constant 1.0 is not "zero"
    scale = (len(_BLOCKS) - 1) / (high - low)
    return "".join(_BLOCKS[round((p - low) * scale)] for p in points)


# --- messages --------------------------------------------------------------------------------


def error(exc: Exception) -> None:
    """One red line naming the problem, with the fix after it when known."""
    problems = getattr(exc, "problems", None)
    message = getattr(exc, "message", str(exc))
    hint = getattr(exc, "hint", None)
    # Messages quote user text ([sections], paths, values): escaped, never read as markup.
    if problems:
        for problem in problems:
            err.print(f"[bold red]error:[/] {escape(str(problem))}")
        if hint:
            err.print(f"[dim]hint: {escape(hint)}[/]")
        return
    line = f"[bold red]error:[/] {escape(message)}"
    if hint:
        line += f" [dim]— {escape(hint)}[/]"
    err.print(line)


def internal_error(exc: BaseException) -> None:
    err.print(
        f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(str(exc))} "
        "[dim]— this is a bug in mlxgrpo or an unexpected input; rerun with --debug for the "
        "traceback[/]"
    )


def interrupted() -> None:
    err.print("[yellow]interrupted[/]")


def note(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")


def success(message: str) -> None:
    err.print(f"[green]✓[/] {escape(message)}")


def raw(text: str) -> None:
    """Machine-readable output (TOML, JSON): stdout, no markup, no wrapping."""
    out.print(text, markup=False, highlight=False, soft_wrap=True, end="")


def stage_status(text: str) -> Any:
    """A spinner with `text` on stderr; `.update(text)` moves it to the next stage."""
    return _EscapedStatus(text)


class _EscapedStatus:
    """Rich's status spinner, with every stage text (often a path) shown as plain text."""

    def __init__(self, text: str) -> None:
        self._status = err.status(escape(text), spinner="dots")

    def __enter__(self) -> _EscapedStatus:
        self._status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._status.__exit__(*exc)

    def update(self, text: str) -> None:
        self._status.update(escape(text))
