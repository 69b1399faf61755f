"""Advantage estimators beside GRPO's, and the per-function reward aggregation.

Pure float64 math over the update's per-completion rewards (groups of ``G`` contiguous, as
the whole engine lays them out). Each estimator follows the definition verl gives it for an
outcome reward (one scalar per completion, its tokens all sharing it):

- ``grpo``: :func:`~mlxgrpo.engine.loss.grpo.group_advantages` (with ``scale_rewards``).
- ``rloo`` (leave-one-out, Ahmadian et al. 2024): ``r_i - mean of the other G - 1``, which is
  ``G / (G - 1) * (r_i - mean_g)``; a group of one keeps ``r_i``.
- ``reinforce_pp`` (REINFORCE++, Hu 2025, discount 1): ``r_i`` whitened over the update's
  completion tokens (:func:`token_whiten`), no group baseline.
- ``reinforce_pp_baseline``: ``r_i - mean_g``, then whitened the same way.
- ``opo`` (optimal baseline, Hao et al. 2025): ``r_i - sum_g(len_j r_j) / sum_g(len_j)``, the
  group mean weighted by completion length; a group of one keeps ``r_i``.

:func:`normalize_then_sum` is GDPO's aggregation (TRL's ``multi_objective_aggregation``): each
reward function normalised within its group before the weighted sum, then the sum normalised
over the update. Standard deviations here are population ones (ddof 0), as in
``group_advantages``; the whitening's variance is the unbiased token variance verl uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from mlxgrpo.config.choices import ADVANTAGE_ESTIMATORS, AdvantageEstimator

WHITEN_EPS = 1e-8  # inside the square root, as verl's masked_whiten
NORMALIZE_EPS = 1e-4  # added to a standard deviation, as group_advantages and TRL


def _groups(rewards: Sequence[float], group: int) -> np.ndarray:
    values = np.asarray(rewards, dtype=np.float64)
    if values.ndim != 1 or group < 1 or values.size % group:
        raise ValueError(f"{values.size} rewards do not split into groups of {group}")
    return values.reshape(-1, group)


def token_whiten(values: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Per-completion ``values`` whitened over all completion tokens: each completion counts
    once per token (``lengths``), the variance is unbiased over the token count."""
    weights = np.asarray(lengths, dtype=np.float64)
    tokens = weights.sum()
    if tokens < 2:
        return values - values.mean() if values.size else values
    mean = (weights * values).sum() / tokens
    variance = (weights * (values - mean) ** 2).sum() / tokens * tokens / (tokens - 1)
    return (values - mean) / np.sqrt(variance + WHITEN_EPS)


def estimate(
    rewards: Sequence[float],
    group: int,
    estimator: AdvantageEstimator,
    lengths: Sequence[int],
) -> np.ndarray:
    """Float64 advantages [N] of ``estimator`` (not ``grpo``, which keeps its own function)."""
    grouped = _groups(rewards, group)
    if len(lengths) != grouped.size:
        raise ValueError(f"{len(lengths)} lengths for {grouped.size} rewards")
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if estimator == "rloo":
        out = grouped if group == 1 else centred * group / (group - 1)
    elif estimator == "reinforce_pp":
        out = token_whiten(grouped.reshape(-1), lengths)
    elif estimator == "reinforce_pp_baseline":
        out = token_whiten(centred.reshape(-1), lengths)
    elif estimator == "opo":
        weights = np.asarray(lengths, dtype=np.float64).reshape(grouped.shape)
        totals = weights.sum(axis=1, keepdims=True)
        baseline = (weights * grouped).sum(axis=1, keepdims=True) / np.maximum(totals, 1e-12)
        out = grouped if group == 1 else grouped - baseline
    else:
        raise ValueError(f"advantage estimator {estimator!r} is not one of {ADVANTAGE_ESTIMATORS}")
    return np.asarray(out, dtype=np.float64).reshape(-1)


def normalize_then_sum(
    values: Mapping[str, Sequence[float | None]],
    weights: Mapping[str, float],
    group: int,
) -> np.ndarray:
    """GDPO advantages [N]: every reward function's values normalised within their group
    (``(v - mean_g) / (std_g + eps)``, a missing value (None) left out of the group's
    statistics and adding 0), summed with the functions' weights, and that sum normalised
    over the update."""
    total = None
    for name, raw in values.items():
        grouped = _groups([np.nan if v is None else v for v in raw], group)
        with warnings.catch_warnings():  # a group with no value at all stays NaN, adding 0
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(grouped, axis=1, keepdims=True)
            std = np.sqrt(np.nanmean((grouped - mean) ** 2, axis=1, keepdims=True))
        z = (grouped - mean) / (std + NORMALIZE_EPS)
        part = weights[name] * np.nan_to_num(z, nan=0.0).reshape(-1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("normalize_then_sum needs at least one reward function")
    return (total - total.mean()) / (total.std() + NORMALIZE_EPS)


def degenerate_groups(values: Mapping[str, Sequence[float | None]], group: int) -> list[bool]:
    """Per group: true when every reward function gave all its completions the same value
    (the groups from which ``normalize_then_sum`` learns nothing)."""
    flags = None
    for raw in values.values():
        grouped = _groups([np.nan if v is None else v for v in raw], group)
        with warnings.catch_warnings():  # an all-None group has no spread
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = np.nanmax(grouped, axis=1) - np.nanmin(grouped, axis=1)
        same = ~(np.nan_to_num(spread, nan=0.0) > 1e-6)
        flags = same if flags is None else flags & same
    return [] if flags is None else flags.tolist()
