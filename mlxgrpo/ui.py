"""All console output: errors, tables, panels and progress (Rich).

Library code never prints; it returns values or calls a callback, and the CLI hands them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True, emoji=False)  # model text: ":x:" stays ":x:"
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def error(exc: Exception) -> None:
    """One red line naming the problem, with the fix after it when known."""
    problems = getattr(exc, "problems", None)
    message = getattr(exc, "message", str(exc))
    hint = getattr(exc, "hint", None)
    # Messages quote user text ([sections], paths, values): escaped, never read as markup.
    if problems:
        for problem in problems:
            err.print(f"[bold red]error:[/] {_escape(str(problem))}")
        if hint:
            err.print(f"[dim]hint: {_escape(hint)}[/]")
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
    table = Table(title=_escape(title), title_justify="left", header_style="bold")
    for header in headers:
        table.add_column(_escape(header), overflow="fold")
    for row in rows:
        table.add_row(*(_escape(str(cell)) for cell in row))
    out.print(table)


# Below this width a four-column key table wraps its meanings into narrow, unreadable strips.
_WIDE_TABLE_COLUMNS = 120


def described_keys(title: str, rows: Iterable[tuple[str, str, str, str]]) -> None:
    """(key, type, default, meaning) rows: a table on a wide terminal, else one block per key
    (key with its type and default, then the meaning wrapped at the terminal's full width)."""
    rows = list(rows)
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
        self.rewards: list[float | None] = []  # this session's reward_mean per update

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def on_start(self, info: dict[str, Any]) -> None:
        from rich.panel import Panel

        device = info.get("device", {})
        lines = [
            f"[bold]model[/]      {_escape(info['model'])} ({info['finetune']}"
            + (f" on {info['adapted_blocks']}" if info.get("adapted_blocks") else "")
            + f", {info['trainable_parameters']:,} trainable parameters)",
            f"[bold]data[/]       {_escape(info['dataset'])}; "
            f"rewards: {_escape(', '.join(info['rewards']))}",
            f"[bold]algorithm[/]  {info['loss_type']}, G = {info['num_generations']}, "
            f"{info['batch_size']} prompts per update, {info['total_updates']} updates",
            f"[bold]device[/]     {_escape(str(device.get('backend', '?')))}, "
            f"BLAS: {_escape(info['blas'])}",
            "[bold]precision[/]  " + _hanging(info.get("precision", "?"), indent=11),
            f"[bold]run[/]        {_escape(info['run_dir'])}",
        ]
        panel = Panel("\n".join(lines), title="mlxgrpo train", title_align="left", expand=False)
        err.print(panel, soft_wrap=False)  # wrap long lines inside the panel, never crop them
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
        self.rewards.append(m.get("reward_mean"))
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
        if len(self.rewards) > 1:
            err.print(reward_trend(self.rewards))


def _hanging(text: str, indent: int) -> str:
    """`text` wrapped to the console, continuation lines indented under the first (escaped)."""
    import textwrap

    lines = textwrap.wrap(text, width=max(30, err.width - indent - 6))
    return ("\n" + " " * indent).join(_escape(line) for line in lines)


_EVAL_KEYS = ("accuracy", "format_rate", "reward_mean", "completion_length_mean", "tokens_per_sec")


def reward_table(update: int, m: dict[str, Any]) -> Table:
    """The per-update reward table: each reward function, totals, and the health signals."""
    table = Table(title=f"update {update}", title_justify="left", header_style="bold")
    table.add_column("reward")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    for name, stats in m.get("rewards", {}).items():
        errors = m.get("reward_errors", {}).get(name)
        label = _escape(name) + (f" [red]({errors} errors)[/]" if errors else "")
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


# --- generation: infer and chat --------------------------------------------------------------


def stream_piece(text: str) -> None:
    """A piece of a streamed answer, as is, flushed at once."""
    out.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    out.file.flush()


def end_of_answer() -> None:
    out.print()
    out.file.flush()


def generation_stats(answer: Any, peak_bytes: int | None) -> None:
    """One dim stderr line: tokens, speed, finish reason, peak memory."""
    peak = f", peak memory {_size(peak_bytes)}" if peak_bytes else ""
    err.print(
        f"[dim]{answer.prompt_tokens} prompt + {answer.completion_tokens} generated tokens "
        f"({answer.finish_reason}), {answer.tokens_per_second:.1f} tok/s{peak}[/]"
    )


def batch_stats(count: int, tokens: int, seconds: float, peak_bytes: int | None, path: Any) -> None:
    speed = tokens / seconds if seconds > 0 else 0.0
    peak = f", peak memory {_size(peak_bytes)}" if peak_bytes else ""
    err.print(
        f"[green]✓[/] {count} answers, {tokens} tokens in {seconds:.1f}s "
        f"({speed:.1f} tok/s{peak}) → {_escape(str(path))}"
    )


class BatchProgress:
    """A progress bar over prompts (stderr); `advance(done, total)` is the library callback.
    `quiet` shows nothing (the ranks after the first of a launched run)."""

    def __init__(self, label: str, total: int | None = None, quiet: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{_escape(label)}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=quiet,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> BatchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def advance(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def add(self, count: int) -> None:
        self.progress.advance(self.task, count)


CHAT_HELP = (
    "/reset          forget the conversation\n"
    "/system TEXT    set the system message (and start over); /system alone clears it\n"
    "/help           this list\n"
    "/exit           leave (also Ctrl-D); Ctrl-C stops an answer"
)


def chat_banner(model: str, interactive: bool) -> None:
    if interactive:
        err.print(f"[bold]mlxgrpo chat[/] — {_escape(model)}. Type /help for commands.")


def chat_help() -> None:
    err.print(_escape(CHAT_HELP))


def chat_input(interactive: bool) -> str | None:
    """The next line the user typed; None at end of input (Ctrl-D or the end of a pipe)."""
    import sys

    if interactive:
        try:
            return _valid_text(out.input("[bold cyan]>>> [/]"))
        except EOFError:
            out.print()
            return None
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:  # read bytes: undecodable input is replaced, never a crash later
        data = buffer.readline()
        if data == b"":
            return None
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            _replaced_note()
            line = data.decode("utf-8", errors="replace")
        return line.rstrip("\n")
    line = sys.stdin.readline()
    return None if line == "" else _valid_text(line.rstrip("\n"))


def _valid_text(text: str) -> str:
    """`text` with the lone surrogates that stand for undecodable bytes made into U+FFFD, so
    tokenizers accept it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        _replaced_note()
        return text.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")


def _replaced_note() -> None:
    note("this line was not valid UTF-8; its undecodable bytes are replaced with \ufffd")


def chat_assistant_prefix(interactive: bool) -> None:
    if interactive:
        out.print("[bold green]assistant:[/] ", end="")


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
    table = Table(title=_escape(title), title_justify="left", header_style="bold")
    table.add_column("metric")
    for label, _ in runs:
        table.add_column(_escape(label), justify="right", overflow="fold")
    for key in keys:
        name = dict(_EVAL_COLUMNS).get(key, key)
        table.add_row(name, *(_eval_cell(key, m.get(key)) for _, m in runs))
    samples = runs[0][1].get("samples") if runs else None
    if samples is not None:
        table.caption = f"{samples} prompts"
    out.print(table)


def _eval_cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("tokens_per_sec", "completion_length_mean"):
        return f"{value:.1f}"
    return f"{value:.2f}" if key == "seconds" else _fmt(value)


# --- conversion -----------------------------------------------------------------------------------


def stage_status(text: str) -> Any:
    """A spinner with `text` on stderr; `.update(text)` moves it to the next stage."""
    return _EscapedStatus(text)


class _EscapedStatus:
    """Rich's status spinner, with every stage text (often a path) shown as plain text."""

    def __init__(self, text: str) -> None:
        self._status = err.status(_escape(text), spinner="dots")

    def __enter__(self) -> _EscapedStatus:
        self._status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._status.__exit__(*exc)

    def update(self, text: str) -> None:
        self._status.update(_escape(text))


def _size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def conversion_summary(title: str, summary: dict[str, Any]) -> None:
    """What a conversion or fuse produced: sizes, bits per weight, parameters, time."""
    table = Table(
        title=_escape(title), title_justify="left", header_style="bold", show_header=False
    )
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = []
    for key, label in _SUMMARY_ROWS:
        if summary.get(key) is None or (key in _ROWS_HIDDEN_WHEN_FALSY and not summary[key]):
            continue
        value = summary[key]
        if key.endswith("_bytes"):
            value = _size(value)
        elif key == "n_parameters":
            value = f"{value:,}"
        elif key == "bits_per_weight":
            value = f"{value:.2f}"
        elif key == "seconds":
            value = f"{value:.1f}"
        elif key == "quantization" and isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        rows.append((label, str(value)))
    for label, value in rows:
        table.add_row(label, _escape(value))
    out.print(table)


_ROWS_HIDDEN_WHEN_FALSY = ("skipped_layers", "dequantized")
_SUMMARY_ROWS = (
    ("source", "source"),
    ("adapters", "adapters"),
    ("step", "step"),
    ("model_file", "checkpoint"),
    ("tokenizer_file", "tokenizer"),
    ("output", "output"),
    ("n_parameters", "parameters"),
    ("dtype", "dtype"),
    ("quantization", "quantization"),
    ("quantized_layers", "quantized layers"),
    ("skipped_layers", "not quantized (width)"),
    ("fused_layers", "fused layers"),
    ("dequantized", "dequantized"),
    ("size_before_bytes", "size before"),
    ("size_after_bytes", "size after"),
    ("size_bytes", "size"),
    ("bits_per_weight", "bits per weight"),
    ("seconds", "seconds"),
)


# --- run viewers: plot --terminal, runs, completions ---------------------------------------------

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


def reward_trend(rewards: Sequence[float | None]) -> str:
    """`reward ▁▂▃▅▇█ 0.010 → 0.980`: the run's reward curve on one line (markup)."""
    known = [r for r in rewards if r is not None]
    if not known:
        return "[dim]reward: no values[/]"
    return f"[bold]reward[/] [cyan]{sparkline(known)}[/] {_fmt(known[0])} → {_fmt(known[-1])}"


def metric_sparklines(logs: Sequence[Any], metrics: Sequence[str]) -> None:
    """`plot --terminal`: one table per run; per metric a sparkline with min/max/last, and the
    eval points (diamonds in the PNG) as a row of their own."""
    # The sparkline gets what the other columns leave of the terminal (6 to 40 characters):
    # each column takes its text + 3 (padding, border): name, span (≤ 9), three numbers (≤ 8).
    width = max(6, min(40, out.width - max(len(m) for m in metrics) - 52))
    for log in logs:
        table = Table(title=f"curves: {_escape(log.name)}", title_justify="left")
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
                label = _escape(metric) if kind == "train" else "[cyan]  ↳ eval[/]"
                table.add_row(
                    label,
                    f"{xs[0]}–{xs[-1]}" if len(xs) > 1 else str(xs[0]),
                    f"[cyan]{sparkline(ys, width)}[/]",
                    _fmt(min(ys)),
                    _fmt(max(ys)),
                    f"[bold]{_fmt(ys[-1])}[/]",
                )
        out.print(table, soft_wrap=False)


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
    table = Table(title=_escape(title), title_justify="left", header_style="bold")
    table.add_column("run", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    # Two-line headers keep the table inside 80 columns.
    for header in ("updates", "last\nreward", "best\nreward", "best\neval", "wall\ntime"):
        table.add_column(header, justify="right")
    for run in runs:
        best = run["best_reward"]
        best_cell = "–" if best is None else f"{_fmt(best)} [dim]@{run['best_reward_update']}[/]"
        ev = run["best_eval"]
        eval_cell = "–"
        if ev is not None:
            short = {"reward_mean": "reward", "accuracy": "acc"}.get(ev["metric"], ev["metric"])
            eval_cell = f"{_fmt(ev['value'])} [dim]{_escape(short)} @{ev['update']}[/]"
        style = _STATUS_STYLE.get(run["status"], "")
        table.add_row(
            _escape(run["name"]),
            f"[{style}]{run['status']}[/]" if style else run["status"],
            str(run["updates"]),
            _fmt(run["last_reward"]),
            best_cell,
            eval_cell,
            _duration(run["wall_seconds"]),
        )
    out.print(table, soft_wrap=False)
    for run in runs:
        if run.get("problem"):
            err.print(f"[yellow]warning:[/] {_escape(run['name'])}: {_escape(run['problem'])}")


def completions_table(title: str, rows: Sequence[dict[str, Any]], prompt_width: int = 80) -> None:
    """`mlxgrpo completions`: prompt (shortened), completion, reward, advantage; one column per
    reward function when there are several."""
    functions = list(dict.fromkeys(k for r in rows for k in (r.get("rewards") or {})))
    table = Table(title=_escape(title), title_justify="left", header_style="bold", show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=2)
    table.add_column("completion", overflow="fold", ratio=3)
    table.add_column("reward", justify="right")
    if len(functions) > 1:
        for name in functions:
            table.add_column(_escape(name), justify="right")
    table.add_column("advantage", justify="right")
    for r in rows:
        cells = [
            _escape(_shorten(_prompt_text(r.get("prompt")), prompt_width)),
            _escape(str(r.get("completion", ""))),
            _fmt(r.get("reward")),
        ]
        if len(functions) > 1:
            cells += [_fmt((r.get("rewards") or {}).get(name)) for name in functions]
        cells.append(_fmt(r.get("advantage")))
        table.add_row(*cells)
    out.print(table, soft_wrap=False)


def _prompt_text(prompt: Any) -> str:
    """A logged prompt as text: a chat prompt (list of messages) shows its last message."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return "" if prompt is None else str(prompt)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
