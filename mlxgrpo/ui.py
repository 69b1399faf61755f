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


def doctor_report(report: dict[str, Any]) -> None:
    """`mlxgrpo doctor` table; the BLAS row turns red with the fix when it is the slow one."""
    device, blas = report["device"], report["blas"]
    backend = device["default_device"]
    if device["backend"] != backend:
        backend += f" ({device['backend']})"
    if device.get("device_name"):
        backend += f", {device['device_name']}"
    blas_cell = _escape(blas["name"] + (f" — {blas['path']}" if blas.get("path") else ""))
    if not blas["fast"]:
        blas_cell = f"[red]{blas_cell}[/]"
        if blas.get("hint"):
            blas_cell += f"\n[red]{_escape(blas['hint'])}[/]"
    if blas.get("warning"):
        blas_cell += f"\n[yellow]{_escape(blas['warning'])}[/]"
    gflops = report.get("matmul_fp32_1024_gflops")
    memory = f"RAM {_gib(device.get('system_ram_bytes'))}, {device.get('cpu_count')} CPUs"
    if device.get("device_memory_bytes"):
        memory += f"; device {_gib(device['device_memory_bytes'])}"
    if device.get("max_recommended_working_set_bytes"):
        memory += f" (recommended working set {_gib(device['max_recommended_working_set_bytes'])})"
    rows = [
        ("mlxgrpo", _escape(report["mlxgrpo_version"])),
        ("Python", _escape(report["python"])),
        ("platform", _escape(report["platform"])),
        ("MLX", _escape(str(report["mlx_version"]))),
        ("device", _escape(backend)),
        ("default dtype", _escape(report["default_dtype"])),
        ("BLAS", blas_cell),
        ("fp32 1024² matmul", "not measured" if gflops is None else f"{gflops:.1f} GFLOP/s"),
        ("memory", _escape(memory)),
    ]
    rows += [
        (_escape(name), _escape(version or "not installed"))
        for name, version in report["packages"].items()
    ]
    table = Table(title="mlxgrpo doctor", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    out.print(table)


def _gib(n_bytes: int | None) -> str:
    return "unknown" if not n_bytes else f"{n_bytes / 2**30:.1f} GiB"


# --- training ------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10**-digits or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


class TrainProgress:
    """Console view of a training run: header panel, progress bar, periodic reward tables.

    Implements the engine's callback hooks by name; everything goes to stderr so `--json`
    leaves stdout to the summary.
    """

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]GRPO[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=err,
            transient=False,
        )
        self.task = None
        self.every = 1

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def on_start(self, info: dict[str, Any]) -> None:
        from rich.panel import Panel

        device = info.get("device", {})
        lines = [
            f"[bold]model[/]      {_escape(info['model'])} ({info['finetune']}, "
            f"{info['trainable_parameters']:,} trainable parameters)",
            f"[bold]data[/]       {_escape(info['dataset'])}; "
            f"rewards: {_escape(', '.join(info['rewards']))}",
            f"[bold]algorithm[/]  {info['loss_type']}, G = {info['num_generations']}, "
            f"{info['batch_size']} prompts per update, {info['total_updates']} updates",
            f"[bold]device[/]     {_escape(str(device.get('backend', '?')))}, "
            f"BLAS: {_escape(info['blas'])}",
            f"[bold]run[/]        {_escape(info['run_dir'])}",
        ]
        err.print(Panel("\n".join(lines), title="mlxgrpo train", title_align="left", expand=False))
        self.every = int(info.get("logging_steps", 1)) or 1
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=info["total_updates"], completed=info.get("start_update", 0), status=""
        )

    def on_update(self, update: int, m: dict[str, Any]) -> None:
        status = (
            f"reward {_fmt(m['reward_mean'])}  kl {_fmt(m.get('kl'))}  "
            f"{m['rollout_tokens_per_sec']:.0f} tok/s"
        )
        self.progress.update(self.task, completed=update, status=status)
        if update % self.every == 0:
            self.progress.console.print(reward_table(update, m))

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None: ...

    def on_eval(self, update: int, m: dict[str, Any]) -> None:
        parts = [f"{k} {_fmt(v)}" for k, v in m.items() if k in _EVAL_KEYS or k.startswith("pass@")]
        self.progress.console.print(f"[cyan]eval @ {update}[/]  " + "  ".join(parts))

    def on_checkpoint(self, update: int, path: Any) -> None:
        self.progress.console.print(f"[dim]saved {_escape(str(path))}[/]")

    def on_message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{_escape(text)}[/]")

    def on_end(self, summary: dict[str, Any]) -> None:
        self.progress.stop()
        first, last = summary["first_reward_mean"], summary["last_reward_mean"]
        verb = "stopped" if summary["interrupted"] else "finished"
        err.print(
            f"[green]✓[/] {verb} after {summary['updates']}/{summary['total_updates']} updates in "
            f"{summary['seconds']:.0f}s; reward {_fmt(first)} → {_fmt(last)}; "
            f"run: {_escape(summary['run_dir'])}"
        )


_EVAL_KEYS = ("accuracy", "format_rate", "reward_mean", "completion_length_mean", "tokens_per_sec")


def reward_table(update: int, m: dict[str, Any]) -> Table:
    """The per-update reward table: each reward function, totals, and the health signals."""
    table = Table(title=f"update {update}", title_justify="left", header_style="bold")
    table.add_column("reward")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    for name, stats in m.get("rewards", {}).items():
        errors = m.get("reward_errors", {}).get(name)
        label = name + (f" [red]({errors} errors)[/]" if errors else "")
        table.add_row(label, _fmt(stats["mean"]), _fmt(stats["std"]))
    table.add_row("[bold]total[/]", _fmt(m["reward_mean"]), _fmt(m["reward_std"]), end_section=True)
    extras = [
        ("accuracy", m.get("accuracy")),
        (
            "completion length",
            f"{m['completion_length_mean']:.1f} "
            f"({m['completion_length_min']:.0f}–{m['completion_length_max']:.0f})",
        ),
        ("truncated", m.get("truncated_share")),
        ("zero-std groups", m.get("zero_std_groups")),
        ("clip low / high", f"{_fmt(m.get('clip_low'))} / {_fmt(m.get('clip_high'))}"),
        ("kl", m.get("kl")),
        ("entropy", m.get("entropy")),
        ("loss", m.get("policy_loss")),
        ("grad norm", m.get("grad_norm")),
        ("learning rate", m.get("learning_rate")),
    ]
    for label, value in extras:
        if value is not None:
            table.add_row(label, value if isinstance(value, str) else _fmt(value), "")
    return table
