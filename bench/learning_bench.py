"""The learning table (`bench/run.py --learning`): every loss type on one offline task a tiny
model can learn, same seeds and budget, so a regression in any of them shows up as a number.

Task: `synthetic:repeat?letters=xyz` on the built-in tiny Qwen2 (random init). The prompt says
which of three letters to repeat and the reward is the share of characters equal to it, so a
completion earns partial credit and groups have a reward spread. Two optimisation passes per
rollout (`algorithm.num_iterations = 2`), so the second pass is off-policy and the losses'
ratio handling (clip, soft gate, clipped weight, sequence ratio) matters.

Beside the loss types, rows for the other advantage estimators, for GDPO's per-function
aggregation and for two optimizer steps per rollout (each with the grpo loss). For each row
and seed: the updates needed for the mean reward of 4 consecutive updates to reach the
threshold, and the mean reward of the last 4 updates. The table reports medians over the
seeds.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

from mlxgrpo.config import resolve_config
from mlxgrpo.config.choices import ADVANTAGE_ESTIMATORS, LOSS_TYPES
from mlxgrpo.engine.io.callbacks import Callback

TASK = [
    "model.path=builtin:tiny-qwen2",
    "data.dataset=synthetic:repeat?letters=xyz",
    "finetune.type=lora",
    "finetune.lora_rank=8",
    "finetune.lora_scale=20",
    "finetune.lora_layers=-1",
    "rollout.num_generations=8",
    "rollout.max_new_tokens=12",
    "rollout.temperature=1.0",
    "algorithm.num_iterations=2",
    "algorithm.clip_eps_high=0.28",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "optim.max_grad_norm=1.0",
    "optim.batch_size=4",
    "optim.gradient_accumulation_steps=1",
    "run.resume=never",
    "checkpoint.save_steps=0",
    "logging.jsonl=false",
    "logging.log_completions=false",
]
THRESHOLD = 0.25
WINDOW = 4


class _Rewards(Callback):
    def __init__(self) -> None:
        self.rewards: list[float] = []

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        self.rewards.append(float(metrics["reward_mean"]))


def updates_to_threshold(rewards: list[float], threshold: float, window: int) -> int | None:
    """First update count at which the mean of the last ``window`` rewards reaches threshold."""
    for end in range(window, len(rewards) + 1):
        if statistics.fmean(rewards[end - window : end]) >= threshold:
            return end
    return None


# Row name -> the settings it adds to TASK: every loss type, then every advantage estimator
# and aggregation other than the defaults (with the grpo loss).
ROWS: dict[str, list[str]] = {
    **{loss: [f"algorithm.loss_type={loss}"] for loss in LOSS_TYPES},
    **{
        f"grpo, {name} advantages": [f"algorithm.advantage_estimator={name}"]
        for name in ADVANTAGE_ESTIMATORS
        if name != "grpo"
    },
    "grpo, normalize_then_sum": ["algorithm.reward_aggregation=normalize_then_sum"],
    # Half the rollouts: each of 8 prompts feeds 2 optimizer steps.
    "grpo, 2 steps per rollout": ["optim.steps_per_generation=2"],
}


def run_one(row: list[str], seed: int, updates: int) -> dict[str, Any]:
    from mlxgrpo.engine.loop.trainer import train

    with tempfile.TemporaryDirectory(prefix="mlxgrpo-learning-") as tmp:
        sets = [
            *TASK,
            *row,
            f"run.seed={seed}",
            f"run.max_steps={updates}",
            f"run.output_dir={tmp}",
            "run.run_name=learn",
        ]
        probe = _Rewards()
        train(resolve_config((), sets, environ={}), [probe])
    rewards = probe.rewards
    return {
        "seed": seed,
        "rewards": rewards,
        "updates_to_threshold": updates_to_threshold(rewards, THRESHOLD, WINDOW),
        "final_reward": statistics.fmean(rewards[-WINDOW:]),
    }


def _median_or_none(values: list[int | None]) -> float | None:
    """Median where runs that never reached the threshold count as infinitely slow."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    middle = ordered[len(ordered) // 2] if len(ordered) % 2 else None
    if len(ordered) % 2 == 0:
        low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
        middle = None if low is None or high is None else (low + high) / 2
    return None if middle is None else float(middle)


def measure_learning(seeds: int, updates: int) -> dict[str, Any]:
    table = {}
    for name, row in ROWS.items():
        runs = [run_one(row, seed, updates) for seed in range(seeds)]
        first = [statistics.fmean(r["rewards"][:WINDOW]) for r in runs]
        table[name] = {
            "runs": runs,
            "median_updates_to_threshold": _median_or_none(
                [r["updates_to_threshold"] for r in runs]
            ),
            "median_first_reward": statistics.median(first),
            "median_final_reward": statistics.median(r["final_reward"] for r in runs),
        }
    return {
        "task": TASK,
        "threshold": THRESHOLD,
        "window": WINDOW,
        "seeds": seeds,
        "updates": updates,
        "losses": table,
    }
