"""The harness's Rich table: figures, ratios and the targets they are checked against."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if roll := result.get("rollout"):
        s = roll["settings"]
        where = f"B={s['prompts']}, G={s['num_generations']}, {s['max_new_tokens']} new tokens"
        rows += [
            ("rollout (a) one stream_generate per sample", _tps(roll["single"]), where),
            ("rollout (b) batch_generate, prompts x G", _tps(roll["batch_generate"]), where),
            ("rollout (c) mlxgrpo generate_groups", _tps(roll["mlxgrpo"]), where),
            ("  (c) / (a)", f"{roll['ratio_vs_single']:.2f}x", "target >= 8x"),
            ("  (c) / (b)", f"{roll['ratio_vs_batch_generate']:.2f}x", "target >= 1.3x"),
            *_tool_loop_rows(roll, where),
        ]
    if step := result.get("train_step"):
        s = step["settings"]
        where = f"{s['rows']} rows x {s['sequence_length']} tokens"
        rows += [
            ("fp32 matmul 1024^2", f"{step['matmul_1024_gflops']:.0f} GFLOP/s", "same run"),
            (
                "fp32 matmul at model shapes",
                f"{step['matmul_mlp_shape_gflops']:.0f} / "
                f"{step['matmul_head_shape_gflops']:.0f} GFLOP/s",
                "MLP up / LM head",
            ),
        ]
        for kind, label in (("full", "full fine-tuning, 6PT"), ("lora", "LoRA, 4PT")):
            f = step[kind]
            rows.append(
                (
                    f"train step ({label})",
                    f"{f['tokens_per_sec']:.0f} tok/s, {f['gflops']:.0f} GFLOP/s",
                    f"{where}; {f['share_of_matmul_1024']:.0%} of matmul rate",
                )
            )
    if mem := result.get("memory"):
        s = mem["settings"]
        where = f"B={s['batch_size']}, G={s['num_generations']}, {s['max_new_tokens']} tokens"
        rows += [
            ("peak memory, LoRA update", f"{mem['lora']['peak_memory_gb']:.3f} GB", where),
            ("peak memory, LoRA + KL update", f"{mem['lora_kl']['peak_memory_gb']:.3f} GB", where),
            ("  KL / no KL", f"{mem['kl_memory_ratio']:.3f}x", "target <= 1.15x"),
            (
                "seconds per update (bench model)",
                f"{mem['lora']['seconds_per_update']:.2f} s",
                f"rollout {mem['lora']['rollout_seconds']:.2f} s, "
                f"train {mem['lora']['train_seconds']:.2f} s",
            ),
        ]
    if demo := result.get("demo_update"):
        rows.append(
            (
                "seconds per update (configs/demo.toml)",
                f"{demo['seconds_per_update']:.3f} s",
                f"rollout {demo['rollout_seconds']:.3f} s, train {demo['train_seconds']:.3f} s",
            )
        )
    return rows


def _tool_loop_rows(roll: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
    """Reference files from before the tool loop have no (d)."""
    if "mlxgrpo_tools" not in roll:
        return []
    return [
        ("rollout (d) (c) with the tool loop, no call", _tps(roll["mlxgrpo_tools"]), where),
        ("  (d) / (c)", f"{roll['tool_loop_ratio']:.2f}x", "target >= 0.95x"),
    ]


def _tps(figure: dict[str, Any]) -> str:
    return f"{figure['tokens_per_sec']:.0f} tok/s"


def _figure_table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    """The figure / value / note table both reports print."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    for row in rows:
        table.add_row(*row)
    return table


def print_report(result: dict[str, Any], out: Path | None) -> None:
    # A pipe gets Rich's default 80 columns, too narrow for the notes.
    console = Console(width=max(Console().width, 120))
    model = result["model"]
    env = result["environment"]
    title = (
        f"mlxgrpo bench: {model['name']} ({model['parameters'] / 1e6:.1f}M parameters, "
        f"vocab {model['vocab']}, {model['dtype']}), {env['backend']} / {env['blas']}, "
        f"{env['cpu_count']} cores, median of {result['repeats']}"
    )
    console.print(_figure_table(title, _rows(result)))
    if result.get("quick"):
        console.print(
            "  [dim]--quick: a smoke run on the tiny model; the targets are set for the full run[/]"
        )
    for name, target in result["targets"].items():
        mark = "[green]met[/]" if target["met"] else "[red]not met[/]"
        console.print(f"  {name}: {target['value']:.3f} (target {target['target']}) {mark}")
    if out is not None:
        console.print(f"results: {out}")


def _scale_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for key, entry in result["shapes"].items():
        m, ours = entry["model"], entry["mlxgrpo"]
        rows.append(
            (
                f"[bold]{key}[/] ({m.get('model_type', 'qwen2')}): {m['parameters']:,} parameters",
                _gb(m["weights_bytes"] / 1e9),
                f"weights (float32); prompts of {entry['prompt_tokens']} tokens",
            )
        )
        bounded = entry.get("mlxgrpo_rollout_rows")
        runs = (
            ("mlxgrpo", ours),
            ("mlxgrpo, no replay", entry.get("mlxgrpo_without_replay")),
            (f"mlxgrpo, rollout.max_rows={(bounded or {}).get('max_rows')}", bounded),
            ("mlx-lm-lora", entry.get("peer")),
        )
        for name, run in runs:
            if run is None:
                continue
            lengths = [u.get("completion_length_mean") for u in run["updates"]]
            made = (
                f"; {statistics.median(lengths):.0f} tokens/completion"
                if None not in lengths
                else ""
            )
            rows.append(
                (
                    f"  {name} peak memory / update",
                    _gb(run["peak_memory_gb"]),
                    f"{run['peak_over_weights']:.2f}x weights"
                    + (" (it holds 2 copies of them)" if name == "mlx-lm-lora" else ""),
                )
            )
            split = (
                f"rollout {run['rollout_seconds']:.1f} s, train {run['train_seconds']:.1f} s"
                if "rollout_seconds" in run
                else "its own per-iteration timer"
            )
            rows.append(
                (f"  {name} seconds / update", f"{run['seconds_per_update']:.1f} s", split + made)
            )
            if paths := run.get("memory_paths"):
                off = [f"{k} ({v[5:]})" for k, v in paths.items() if v != "on"]
                rows.append(
                    (
                        f"  {name} memory paths",
                        f"{sum(v == 'on' for v in paths.values())} of {len(paths)} on",
                        "off: " + "; ".join(off) if off else ", ".join(paths),
                    )
                )
        if vs := entry.get("vs_peer"):
            rows.append(
                ("  mlxgrpo / peer peak", f"{vs['peak_mlxgrpo_over_peer']:.2f}x", "target <= 0.5x")
            )
            rows.append(
                (
                    "  peer / mlxgrpo seconds",
                    f"{vs['seconds_peer_over_mlxgrpo']:.2f}x",
                    "target >= 4x",
                )
            )
        if error := entry.get("peer_error"):
            rows.append(("  mlx-lm-lora", "failed", error))
    if prod := result.get("prod_micro_batch"):
        rows.append(
            (
                f"prod micro-batch peak ({prod['shape']})",
                _gb(prod["peak_memory_gb"]),
                f"{prod['peak_over_weights']:.2f}x weights; {prod['rows']} rows x "
                f"({prod['prompt_tokens']} + {prod['completion_tokens']}) tokens, "
                f"{prod['seconds']:.1f} s",
            )
        )
    return rows


def _gb(value: float) -> str:
    return f"{value:.2f} GB" if value >= 0.1 else f"{value * 1e3:.1f} MB"  # --quick's tiny shapes


def print_scale_report(result: dict[str, Any], out: Path | None) -> None:
    console = Console(width=max(Console().width, 120))
    s, env = result["settings"], result["environment"]
    title = (
        f"mlxgrpo scale bench: LoRA r{s['lora_rank']} on all blocks, G={s['generations']}, "
        f"{s['prompts_per_update']} prompts/update, {s['max_new_tokens']} new tokens, "
        f"{s['micro_batches']} micro-batches, KL {s['kl_coeff']}; {env['backend']} / "
        f"{env['blas']}, {env['cpu_count']} cores, median of {result['repeats']}"
    )
    console.print(_figure_table(title, _scale_rows(result)))
    for key, entry in result["shapes"].items():
        if settings := entry.get("engine_settings"):
            console.print(f"  [dim]{key} engine settings: {settings}[/]")
    if result.get("quick"):
        console.print("  [dim]--quick: tiny shapes; the targets are set for the full run[/]")
    for name, target in result["targets"].items():
        mark = "[green]met[/]" if target["met"] else "[red]not met[/]"
        console.print(
            f"  {name}: {target['value']:.3f} (target {target['target']}; {target['what']}) {mark}"
        )
    if out is not None:
        console.print(f"results: {out}")


def print_learning_report(result: dict[str, Any], out: Path | None) -> None:
    console = Console(width=max(Console().width, 100))
    learning = result["learning"]
    title = (
        f"mlxgrpo learning table: {learning['updates']} updates, medians over "
        f"{learning['seeds']} seeds; threshold {learning['threshold']} (mean of "
        f"{learning['window']} consecutive updates)"
    )
    table = Table(title=title, title_justify="left")
    for column in ("loss (advantages)", "updates to threshold", "first reward", "final reward"):
        table.add_column(column, justify="left" if column == "loss (advantages)" else "right")
    for name, row in learning["losses"].items():
        reached = row["median_updates_to_threshold"]
        table.add_row(
            name,
            "not reached" if reached is None else f"{reached:g}",
            f"{row['median_first_reward']:.3f}",
            f"{row['median_final_reward']:.3f}",
        )
    console.print(table)
    if out is not None:
        console.print(f"results: {out}")


def print_distributed_report(result: dict[str, Any], out: Path | None) -> None:
    console = Console(width=max(Console().width, 120))
    d, model, env = result["distributed"], result["model"], result["environment"]
    s, one, two = d["settings"], d["one_rank"], d["two_ranks"]
    title = (
        f"mlxgrpo data parallelism on one machine: {model['name']} ({model['parameters']:,} "
        f"parameters), B={s['batch_size']} G={s['num_generations']} {s['max_new_tokens']} new "
        f"tokens; {env['backend']} / {env['blas']}, {env['cpu_count']} cores; medians over "
        f"{s['runs_per_layout']} runs x {s['updates_per_run'] - 1} updates"
    )
    rows = [
        ("1 process: seconds per update", f"{one['seconds_per_update']:.2f} s",
         f"rollout {one['rollout_seconds']:.2f} s, train {one['train_seconds']:.2f} s"),
        ("2 ranks (mlx.launch, ring): seconds per update", f"{two['seconds_per_update']:.2f} s",
         f"rollout {two['rollout_seconds']:.2f} s, train {two['train_seconds']:.2f} s"),
        ("speed-up, 2 ranks vs 1", f"{d['speedup_two_vs_one']:.2f}x",
         f"the ranks share {env['cpu_count']} cores: "
         f"{s['blas_threads_per_rank']['2']} BLAS thread(s) each"),
        ("time in collectives, 2 ranks", f"{two['comm_seconds']:.3f} s",
         f"{two['comm_share_of_update']:.1%} of an update (data moved + waiting for the peer)"),
        ("same rewards in both layouts", "yes" if d["same_rewards"] else "NO",
         "same seed and global batch"),
    ]  # fmt: skip
    console.print(_figure_table(title, rows))
    if out is not None:
        console.print(f"results: {out}")


def print_sft_report(result: dict[str, Any], out: Path | None) -> None:
    console = Console(width=max(Console().width, 110))
    s, ours, env = result["settings"], result["mlxgrpo"], result["environment"]
    title = (
        f"mlxgrpo supervised fine-tuning at the {result['shape']} shape: batches of "
        f"{s['batch_size']} demonstrations ({ours['target_tokens']:.0f} target tokens), LoRA r"
        f"{s['lora_rank']} on every block; {env['backend']} / {env['blas']}; medians over "
        f"{len(ours['steps'])} steps after a warm-up; weights {result['weights_gb']:.2f} GB"
    )
    table = Table(title=title, title_justify="left")
    for column in (
        "trainer",
        "s / step",
        "target tokens / s",
        "peak GB",
        "peak / weights",
        "vs us",
    ):
        table.add_column(column, justify="left" if column == "trainer" else "right")
    weights = result["weights_gb"]
    table.add_row(
        "mlxgrpo sft",
        f"{ours['seconds_per_step']:.2f}",
        f"{ours['tokens_per_sec']:.0f}",
        f"{ours['peak_memory_gb']:.2f}",
        f"{ours['peak_memory_gb'] / weights:.2f}x",
        "",
    )
    plain = result.get("mlxgrpo_no_checkpointing")
    if plain is not None:
        table.add_row(
            "mlxgrpo sft, no ckpt",
            f"{plain['seconds_per_step']:.2f}",
            f"{plain['tokens_per_sec']:.0f}",
            f"{plain['peak_memory_gb']:.2f}",
            f"{plain['peak_memory_gb'] / weights:.2f}x",
            "",
        )
    for label, name in (
        ("peer", "mlx_lm lora"),
        ("peer_grad_checkpoint", "mlx_lm lora, grad ckpt"),
    ):
        peer = result.get(label)
        if peer is None:
            continue
        table.add_row(
            name,
            f"{peer['seconds_per_step']:.2f}",
            f"{peer['tokens_per_sec']:.0f}",
            f"{peer['peak_memory_gb']:.2f}",
            f"{peer['peak_memory_gb'] / weights:.2f}x",
            f"{peer['speed_ratio']:.2f}x as fast, {peer['memory_ratio']:.2f}x the memory",
        )
    console.print(table)
    if out is not None:
        console.print(f"results: {out}")
