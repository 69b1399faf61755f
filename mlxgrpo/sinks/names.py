"""Metric names for the external sinks: our metrics.jsonl keys, renamed as TRL names them.

One table, `TRL_NAMES`, maps a flattened metrics.jsonl key to the name TensorBoard and W&B show.
Nested dicts flatten with "/" (`rewards: {fn: {mean, std}}` becomes `rewards/<fn>/mean` and
`rewards/<fn>/std`, TRL's names already); keys TRL has no name for keep ours. Eval metrics get
the same names under `eval/`.
"""

from __future__ import annotations

import math
from typing import Any

TRL_NAMES: dict[str, str] = {
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "zero_std_groups": "frac_reward_zero_std",
    "kl": "kl",
    "entropy": "entropy",
    "clip_low": "clip_ratio/low_mean",
    "clip_high": "clip_ratio/high_mean",
    "completion_length_mean": "completions/mean_length",
    "completion_length_min": "completions/min_length",
    "completion_length_max": "completions/max_length",
    "truncated_share": "completions/clipped_ratio",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "policy_loss": "loss",
}


def _flatten(metrics: dict[str, Any], parent: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{parent}/{key}" if parent else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of one metrics record, under their logged names."""
    out: dict[str, float] = {}
    for key, value in _flatten(metrics).items():
        # bools and strings are not curves; NaN/inf are written as null to metrics.jsonl too.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        out[prefix + TRL_NAMES.get(key, key)] = float(value)
    return out
