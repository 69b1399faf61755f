"""Results on the console: evaluation tables and the run viewers (`plot --terminal`, `runs`,
`completions`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from mlxgrpo.ui import console
from mlxgrpo.ui.console import escape, fmt, sparkline

# --- evaluation --------------------------------------------------------------------------------

_EVAL_COLUMNS = (
    ("accuracy", "accuracy (pass@1)"),
    ("format_rate", "format rate"),
    ("reward_mean", "mean reward"),
    ("completion_length_mean", "mean length (tokens)"),
    ("truncated_share", "truncated"),
    ("tokens_per_sec", "tok/s"),
    ("seconds", "seconds"),
)


def eval_table(title: str, runs: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """One column per evaluated model (base, adapters, ...), one row per metric."""
    keys = [k for k, _ in _EVAL_COLUMNS if any(k in m for _, m in runs)]
    keys += sorted({k for _, m in runs for k in m if k.startswith("pass@")})
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    table.add_column("metric")
    for label, _ in runs:
        table.add_column(escape(label), justify="right", overflow="fold")
    for key in keys:
        name = dict(_EVAL_COLUMNS).get(key, key)
        table.add_row(name, *(_eval_cell(key, m.get(key)) for _, m in runs))
    samples = runs[0][1].get("samples") if runs else None
    if samples is not None:
        table.caption = f"{samples} prompts"
    console.out.print(table)


def _eval_cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("tokens_per_sec", "completion_length_mean"):
        return f"{value:.1f}"
    return f"{value:.2f}" if key == "seconds" else fmt(value)


# --- run viewers: plot --terminal, runs, completions ---------------------------------------------


def metric_sparklines(logs: Sequence[Any], metrics: Sequence[str]) -> None:
    """`plot --terminal`: one table per run; per metric a sparkline with min/max/last, and the
    eval points (diamonds in the PNG) as a row of their own."""
    # The sparkline gets what the other columns leave of the terminal (6 to 40 characters):
    # each column takes its text + 3 (padding, border): name, span (≤ 9), three numbers (≤ 8).
    width = max(6, min(40, console.out.width - max(len(m) for m in metrics) - 52))
    for log in logs:
        table = Table(title=f"curves: {escape(log.name)}", title_justify="left")
        table.add_column("metric", no_wrap=True, header_style="bold")
        table.add_column("updates", no_wrap=True, header_style="bold")
        table.add_column("trend", no_wrap=True, header_style="bold")
        for header in ("min", "max", "last"):
            table.add_column(header, justify="right", no_wrap=True, header_style="bold")
        for metric in metrics:
            for kind in ("train", "eval"):
                xs, ys = log.series(metric, kind=kind)
                if not ys:
                    continue
                label = escape(metric) if kind == "train" else "[cyan]  ↳ eval[/]"
                table.add_row(
                    label,
                    f"{xs[0]}–{xs[-1]}" if len(xs) > 1 else str(xs[0]),
                    f"[cyan]{sparkline(ys, width)}[/]",
                    fmt(min(ys)),
                    fmt(max(ys)),
                    f"[bold]{fmt(ys[-1])}[/]",
                )
        console.out.print(table, soft_wrap=False)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


_STATUS_STYLE = {"finished": "green", "stopped": "yellow", "crashed": "red"}


def runs_table(title: str, runs: Sequence[dict[str, Any]]) -> None:
    """`mlxgrpo runs`: one row per run directory, oldest first."""
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    table.add_column("run", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    # Two-line headers keep the table inside 80 columns.
    for header in ("updates", "last\nreward", "best\nreward", "best\neval", "wall\ntime"):
        table.add_column(header, justify="right")
    for run in runs:
        best = run["best_reward"]
        best_cell = "–" if best is None else f"{fmt(best)} [dim]@{run['best_reward_update']}[/]"
        ev = run["best_eval"]
        eval_cell = "–"
        if ev is not None:
            short = {"reward_mean": "reward", "accuracy": "acc"}.get(ev["metric"], ev["metric"])
            eval_cell = f"{fmt(ev['value'])} [dim]{escape(short)} @{ev['update']}[/]"
        style = _STATUS_STYLE.get(run["status"], "")
        table.add_row(
            escape(run["name"]),
            f"[{style}]{run['status']}[/]" if style else run["status"],
            str(run["updates"]),
            fmt(run["last_reward"]),
            best_cell,
            eval_cell,
            _duration(run["wall_seconds"]),
        )
    console.out.print(table, soft_wrap=False)
    for run in runs:
        for problem in [run["problem"]] if run.get("problem") else run.get("skipped") or []:
            console.err.print(f"[yellow]warning:[/] {escape(run['name'])}: {escape(problem)}")


def completions_table(title: str, rows: Sequence[dict[str, Any]], prompt_width: int = 80) -> None:
    """`mlxgrpo completions`: prompt (shortened), completion, reward, advantage; one column per
    reward function when there are several."""
    functions = list(dict.fromkeys(k for r in rows for k in (r.get("rewards") or {})))
    table = Table(title=escape(title), title_justify="left", header_style="bold", show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=2)
    table.add_column("completion", overflow="fold", ratio=3)
    table.add_column("reward", justify="right")
    if len(functions) > 1:
        for name in functions:
            table.add_column(escape(name), justify="right")
    table.add_column("advantage", justify="right")
    for r in rows:
        cells = [
            escape(_shorten(_prompt_text(r.get("prompt")), prompt_width)),
            escape(str(r.get("completion", "")), keep_lines=True),
            fmt(r.get("reward")),
        ]
        if len(functions) > 1:
            cells += [fmt((r.get("rewards") or {}).get(name)) for name in functions]
        cells.append(fmt(r.get("advantage")))
        table.add_row(*cells)
    console.out.print(table, soft_wrap=False)


def _prompt_text(prompt: Any) -> str:
    """A logged prompt as text: a chat prompt (list of messages) shows its last message."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return "" if prompt is None else str(prompt)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
