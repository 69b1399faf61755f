"""All console output: errors, tables, panels and progress (Rich).

Library code never prints; it returns values or calls a callback, and the CLI hands them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def error(exc: Exception) -> None:
    """One red line naming the problem, with the fix after it when known."""
    problems = getattr(exc, "problems", None)
    message = getattr(exc, "message", str(exc))
    hint = getattr(exc, "hint", None)
    if problems:
        for problem in problems:
            err.print(f"[bold red]error:[/] {problem}", markup=True)
        if hint:
            err.print(f"[dim]hint: {hint}[/]")
        return
    line = f"[bold red]error:[/] {_escape(message)}"
    if hint:
        line += f" [dim]— {_escape(hint)}[/]"
    err.print(line)


def internal_error(exc: BaseException) -> None:
    err.print(
        f"[bold red]error:[/] {_escape(type(exc).__name__)}: {_escape(str(exc))} "
        "[dim]— this is a bug in mlxgrpo or an unexpected input; rerun with --debug for the "
        "traceback[/]"
    )


def interrupted() -> None:
    err.print("[yellow]interrupted[/]")


def note(message: str) -> None:
    err.print(f"[dim]{_escape(message)}[/]")


def success(message: str) -> None:
    err.print(f"[green]✓[/] {_escape(message)}")


def raw(text: str) -> None:
    """Machine-readable output (TOML, JSON): stdout, no markup, no wrapping."""
    out.print(text, markup=False, highlight=False, soft_wrap=True, end="")


def key_value_table(title: str, rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(_escape(str(cell)) for cell in row))
    out.print(table)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def format_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """TOML for a {section: {key: value}} mapping; unset (None) values are left out."""
    import tomli_w

    clean = {s: {k: v for k, v in d.items() if v is not None} for s, d in data.items()}
    return tomli_w.dumps({s: d for s, d in clean.items() if d})


def sources_table(rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title="sources", title_justify="left", header_style="bold")
    for header in ("key", "value", "set by"):
        table.add_column(header, overflow="fold")
    for key, value, source in rows:
        style = "dim" if source == "default" else ""
        table.add_row(_escape(key), _escape(value), _escape(source), style=style)
    err.print(table)


def validation_failure(path: str, problems: Sequence[str]) -> None:
    err.print(f"[bold red]✗[/] {_escape(path)}: {len(problems)} problem(s)")
    for problem in problems:
        err.print(f"  [red]•[/] {_escape(problem)}")
