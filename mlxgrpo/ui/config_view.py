"""Tables and text of `mlxgrpo config`: key tables, value sources, TOML, validation results."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from mlxgrpo.ui import console
from mlxgrpo.ui.console import escape


def key_value_table(title: str, rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    for header in headers:
        table.add_column(escape(header), overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    console.out.print(table)


# Below this width a four-column key table wraps its meanings into narrow, unreadable strips.
_WIDE_TABLE_COLUMNS = 120


def described_keys(title: str, rows: Iterable[tuple[str, str, str, str]]) -> None:
    """(key, type, default, meaning) rows: a table on a wide terminal, else one block per key
    (key with its type and default, then the meaning wrapped at the terminal's full width)."""
    rows = list(rows)
    out = console.out
    if out.width >= _WIDE_TABLE_COLUMNS:
        key_value_table(title, rows, ("key", "type", "default", "meaning"))
        return
    from rich.padding import Padding
    from rich.text import Text

    out.print(Text(title, style="bold"))
    for key, type_name, default, meaning in rows:
        line = Text(key, style="bold")
        line.append(f"  {type_name}, default {default}", style="dim")
        out.print(line)
        # soft_wrap is on for this console (long paths stay copyable); meanings should wrap.
        out.print(Padding(Text(meaning), (0, 0, 1, 4)), soft_wrap=False)


def format_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_toml(data: dict[str, Any]) -> str:
    """TOML for a {section: {key: value}} mapping, and a staged config's ``stages`` list of
    {"name": ..., section: {key: value}} (``[[stages]]`` tables); unset (None) values are
    left out."""
    import tomli_w

    def sections(mapping: dict[str, Any]) -> dict[str, Any]:
        clean = {
            s: {k: v for k, v in d.items() if v is not None}
            for s, d in mapping.items()
            if isinstance(d, dict)
        }
        return {s: d for s, d in clean.items() if d}

    text = tomli_w.dumps(sections(data))
    for stage in data.get("stages") or []:  # [[stages]] tables, as a config file writes them
        text += "\n[[stages]]\n" + tomli_w.dumps({"name": stage["name"]})
        for section, values in sections(stage).items():
            body = tomli_w.dumps({section: values})
            text += "\n" + body.replace(f"[{section}]", f"[stages.{section}]", 1)
    return text


def sources_table(rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title="sources", title_justify="left", header_style="bold")
    for header in ("key", "value", "set by"):
        table.add_column(header, overflow="fold")
    for key, value, source in rows:
        style = "dim" if source == "default" else ""
        table.add_row(escape(key), escape(value), escape(source), style=style)
    console.err.print(table)


def validation_failure(path: str, problems: Sequence[str]) -> None:
    console.err.print(f"[bold red]✗[/] {escape(path)}: {len(problems)} problem(s)")
    for problem in problems:
        console.err.print(f"  [red]•[/] {escape(problem)}")
