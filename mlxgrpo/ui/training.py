"""The console view of a training run: header panel, progress bar, reward tables and trend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from mlxgrpo.ui import console
from mlxgrpo.ui.console import escape, fmt, sparkline


def memory_line(paths: dict[str, str]) -> str:
    """``tiled head ✓ · shared prompt ✗ (why) · ...`` from the run's memory-path report."""
    parts = [
        f"{escape(name)} ✓" if state == "on" else f"{escape(name)} ✗ ({escape(state[5:])})"
        for name, state in paths.items()
    ]
    return " · ".join(parts) or "?"


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
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console.err,
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
            f"[bold]model[/]      {escape(info['model'])} ({info['finetune']}"
            + (f" on {info['adapted_blocks']}" if info.get("adapted_blocks") else "")
            + f", {info['trainable_parameters']:,} trainable parameters)",
            f"[bold]data[/]       {escape(info['dataset'])}"
            + (f"; rewards: {escape(', '.join(info['rewards']))}" if info["rewards"] else ""),
            "[bold]algorithm[/]  " + _algorithm_line(info),
            f"[bold]device[/]     {escape(str(device.get('backend', '?')))}, "
            f"BLAS: {escape(info['blas'])}",
            "[bold]precision[/]  " + _hanging(info.get("precision", "?"), indent=11),
            "[bold]memory[/]     " + _hanging(memory_line(info.get("memory_paths", {})), indent=11),
            f"[bold]run[/]        {escape(info['run_dir'])}",
        ]
        panel = Panel("\n".join(lines), title="mlxgrpo train", title_align="left", expand=False)
        # Wrap long lines inside the panel, never crop them.
        console.err.print(panel, soft_wrap=False)
        self.every = int(info.get("logging_steps", 1)) or 1
        self.headline = "loss" if info.get("algorithm_type") == "sft" else "reward_mean"
        self.rewards = []  # a staged run starts each stage afresh
        self.progress.start()
        self.task = self.progress.add_task(
            "SFT" if self.headline == "loss" else "GRPO",
            total=info["total_updates"],
            completed=info.get("start_update", 0),
            status="",
        )

    def on_update(self, update: int, m: dict[str, Any]) -> None:
        sft = self.headline == "loss"
        if sft:
            status = f"loss {fmt(m['loss'])}  {m['train_tokens_per_sec']:.0f} tok/s"
        else:
            status = (
                f"reward {fmt(m['reward_mean'])}  kl {fmt(m.get('kl'))}  "
                f"{m['rollout_tokens_per_sec']:.0f} tok/s"
            )
        self.progress.update(self.task, completed=update, status=status)
        self.rewards.append(m.get(self.headline))
        if update % self.every == 0:
            self.progress.console.print(sft_table(update, m) if sft else reward_table(update, m))

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None: ...

    def on_eval(self, update: int, m: dict[str, Any]) -> None:
        parts = [f"{k} {fmt(v)}" for k, v in m.items() if k in _EVAL_KEYS or k.startswith("pass@")]
        self.progress.console.print(f"[cyan]eval @ {update}[/]  " + "  ".join(parts))

    def on_checkpoint(self, update: int, path: Any) -> None:
        self.progress.console.print(f"[dim]saved {escape(str(path))}[/]")

    def on_message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{escape(text)}[/]")

    def on_end(self, summary: dict[str, Any]) -> None:
        self.progress.stop()
        key = summary.get("headline", "reward_mean")
        first, last = summary[f"first_{key}"], summary[f"last_{key}"]
        label = "loss" if key == "loss" else "reward"
        verb = "stopped" if summary["interrupted"] else "finished"
        console.err.print(
            f"[green]✓[/] {verb} after {summary['updates']}/{summary['total_updates']} updates in "
            f"{summary['seconds']:.0f}s; {label} {fmt(first)} → {fmt(last)}; "
            f"run: {escape(summary['run_dir'])}"
        )
        if len(self.rewards) > 1:
            console.err.print(reward_trend(self.rewards, label))


def _hanging(text: str, indent: int) -> str:
    """`text` wrapped to the console, continuation lines indented under the first (escaped)."""
    import textwrap

    lines = textwrap.wrap(text, width=max(30, console.err.width - indent - 6))
    return ("\n" + " " * indent).join(escape(line) for line in lines)


_EVAL_KEYS = (
    "accuracy",
    "format_rate",
    "reward_mean",
    "completion_length_mean",
    "tokens_per_sec",
    "loss",
    "perplexity",
    "token_accuracy",
)


def reward_table(update: int, m: dict[str, Any]) -> Table:
    """The per-update reward table: each reward function, totals, and the health signals."""
    table = Table(title=f"update {update}", title_justify="left", header_style="bold")
    table.add_column("reward")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    for name, stats in m.get("rewards", {}).items():
        errors = m.get("reward_errors", {}).get(name)
        label = escape(name) + (f" [red]({errors} errors)[/]" if errors else "")
        table.add_row(label, fmt(stats["mean"]), fmt(stats["std"]))
    table.add_row("[bold]total[/]", fmt(m["reward_mean"]), fmt(m["reward_std"]), end_section=True)
    extras = [
        ("accuracy", m.get("accuracy")),
        (
            "completion length",
            f"{m['completion_length_mean']:.1f} "
            f"({m['completion_length_min']:.0f}–{m['completion_length_max']:.0f})",
        ),
        ("truncated", m.get("truncated_share")),
        ("zero-std groups", m.get("zero_std_groups")),
        ("clip low / high", f"{fmt(m.get('clip_low'))} / {fmt(m.get('clip_high'))}"),
        ("kl", m.get("kl")),
        ("entropy", m.get("entropy")),
        ("loss", m.get("policy_loss")),
        ("sft loss", m.get("sft_loss")),
        ("grad norm", m.get("grad_norm")),
        ("learning rate", m.get("learning_rate")),
    ]
    for label, value in extras:
        if value is not None:
            table.add_row(label, value if isinstance(value, str) else fmt(value), "")
    return table


def reward_trend(rewards: Sequence[float | None], label: str = "reward") -> str:
    """`reward ▁▂▃▅▇█ 0.010 → 0.980`: the run's reward (or loss) curve on one line (markup)."""
    known = [r for r in rewards if r is not None]
    if not known:
        return f"[dim]{label}: no values[/]"
    return f"[bold]{label}[/] [cyan]{sparkline(known)}[/] {fmt(known[0])} → {fmt(known[-1])}"


def sft_table(update: int, m: dict[str, Any]) -> Table:
    """The per-update table of a supervised fine-tuning run."""
    table = Table(title=f"update {update}", title_justify="left", header_style="bold")
    table.add_column("sft")
    table.add_column("value", justify="right")
    rows = [
        ("loss", fmt(m.get("loss"))),
        ("perplexity", fmt(m.get("perplexity"))),
        ("token accuracy", fmt(m.get("token_accuracy"))),
        ("target tokens", f"{m.get('target_tokens', 0):.0f}"),
        ("truncated examples", f"{m.get('truncated_examples', 0):.0f}"),
        ("grad norm", fmt(m.get("grad_norm"))),
        ("learning rate", fmt(m.get("learning_rate"))),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


def _algorithm_line(info: dict[str, Any]) -> str:
    """The header's algorithm line: GRPO's loss and group, or supervised fine-tuning."""
    tail = f"{info['total_updates']} updates"
    if info.get("algorithm_type") == "sft":
        return f"sft, {info['batch_size']} demonstrations per update, {tail}"
    loss = info["loss_type"]
    if info.get("algorithm_type") == "mix":
        loss = f"{loss} + {info.get('mix_sft_weight')} x sft"
    return (
        f"{loss}, G = {info['num_generations']}, "
        f"{info['batch_size']} prompts per update, {tail}"
        + _per_rollout(info.get("steps_per_generation", 1))
    )


def _per_rollout(steps: int) -> str:
    """', 4 per rollout' when one rollout feeds several optimizer steps."""
    return f", {steps} per rollout" if steps > 1 else ""
