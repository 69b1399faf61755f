"""Data parallelism on one machine (`bench/run.py --distributed`): the same GRPO updates in one
process and in 2 ranks started by `mlx.launch --backend ring` over loopback.

Both runs train the same config and seed on the same global batch (each rank takes half of
its prompts), through the real `mlxgrpo train` entry point. The figures are medians over the
updates after the first (a warm-up): seconds per update, and the share of a 2-rank update
that rank 0 spends in collectives (`comm_seconds`: gradients, metrics and records moved, and
the wait for the slower rank). The runs alternate, one-process first, `repeats` times each.

On one machine the ranks share its cores (each rank gets cores / ranks BLAS threads), so 2
ranks are not expected to be faster here; the point is the overhead that data parallelism
adds at a given shape.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def _settings(model: str, *, batch: int, group: int, max_new_tokens: int, updates: int):
    return [
        f"model.path={model}",
        "data.dataset=synthetic:repeat?letters=x",
        "finetune.type=lora",
        "finetune.lora_layers=-1",
        f"rollout.num_generations={group}",
        f"rollout.max_new_tokens={max_new_tokens}",
        "rollout.temperature=1.0",
        f"optim.batch_size={batch}",
        "optim.gradient_accumulation_steps=1",
        "optim.learning_rate=1e-4",
        f"run.max_steps={updates}",
        "run.resume=never",
        "checkpoint.save_steps=0",
        "logging.log_completions=false",
    ]


def blas_threads(ranks: int) -> int:
    """BLAS threads per rank: the ranks split this machine's cores instead of each taking all
    of them (oversubscribed, a rank's BLAS threads would wait on the other rank's)."""
    return max(1, (os.cpu_count() or 1) // ranks)


def _train(out: Path, sets: list[str], ranks: int) -> list[dict[str, Any]]:
    """One `mlxgrpo train` run; its train records from metrics.jsonl (rank 0 writes them)."""
    cmd = [sys.executable, "-m", "mlxgrpo", "train", "-o", str(out), "--run-name", "r"]
    for item in sets:
        cmd += ["--set", item]
    if ranks > 1:
        cmd = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--", *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    env["OPENBLAS_NUM_THREADS"] = str(blas_threads(ranks))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = (out / "r" / "metrics.jsonl").read_text().splitlines() if done.returncode == 0 else []
    records = [json.loads(line) for line in lines if '"train"' in line]
    if done.returncode != 0 or not records:
        raise RuntimeError(f"{ranks}-rank run failed: {done.stderr.strip()[-1500:]}")
    return records


def measure_distributed(
    model: str, *, batch: int, group: int, max_new_tokens: int, updates: int, repeats: int
) -> dict[str, Any]:
    sets = _settings(
        model, batch=batch, group=group, max_new_tokens=max_new_tokens, updates=updates
    )
    runs: dict[int, list[list[dict[str, Any]]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="mlxgrpo-bench-dist-") as tmp:
        for repeat in range(repeats):
            for ranks in (1, 2):
                runs[ranks].append(_train(Path(tmp) / f"{ranks}-{repeat}", sets, ranks))
    one = [u for run in runs[1] for u in run[1:]]  # the first update of each run warms up
    two = [u for run in runs[2] for u in run[1:]]

    def median(records: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in records)

    comm_share = [r["comm_seconds"] / r["step_seconds"] for r in two]
    return {
        "settings": {
            "model": model,
            "batch_size": batch,
            "num_generations": group,
            "max_new_tokens": max_new_tokens,
            "updates_per_run": updates,
            "runs_per_layout": repeats,
            "blas_threads_per_rank": {"1": blas_threads(1), "2": blas_threads(2)},
        },
        "one_rank": {
            "seconds_per_update": median(one, "step_seconds"),
            "rollout_seconds": median(one, "rollout_seconds"),
            "train_seconds": median(one, "train_seconds"),
        },
        "two_ranks": {
            "seconds_per_update": median(two, "step_seconds"),
            "rollout_seconds": median(two, "rollout_seconds"),
            "train_seconds": median(two, "train_seconds"),
            "comm_seconds": median(two, "comm_seconds"),
            "comm_share_of_update": statistics.median(comm_share),
        },
        "speedup_two_vs_one": median(one, "step_seconds") / median(two, "step_seconds"),
        # Same seed, same global batch: the two layouts sampled the same completions.
        "same_rewards": [r["reward_mean"] for r in runs[1][0]]
        == [r["reward_mean"] for r in runs[2][0]],
    }
