"""Learning-rate schedules computed from the run's real number of updates.

The original computed its schedule from the full data set's length, so short runs
(`max_steps`, `max_train_samples`) never left warm-up. Here the schedule always spans exactly
the updates this run will make.
"""

from __future__ import annotations

import math


def warmup_updates(total_updates: int, warmup_ratio: float) -> int:
    return min(total_updates, round(total_updates * warmup_ratio))


def learning_rate_at(
    update: int, *, peak: float, total_updates: int, warmup_ratio: float, kind: str
) -> float:
    """LR for the 0-based `update`: linear warm-up to `peak`, then constant/linear/cosine decay.

    The last warm-up update runs at the peak; decay never quite reaches zero, so the final
    update still learns.
    """
    warm = warmup_updates(total_updates, warmup_ratio)
    if update < warm:
        return peak * (update + 1) / warm
    if kind == "constant":
        return peak
    progress = (update - warm) / max(1, total_updates - warm)
    if kind == "linear":
        return peak * (1.0 - progress)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")
