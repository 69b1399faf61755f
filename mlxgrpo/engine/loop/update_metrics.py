"""What one update logs: reward, advantage, length and tool figures, and the completion records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from mlxgrpo import distributed
from mlxgrpo.engine.loss import grpo
from mlxgrpo.evaluation import accuracy, completion_record
from mlxgrpo.generation.rollout import Rollout
from mlxgrpo.rewards import RewardResult


def _stats(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def reward_metrics(scored: RewardResult, rewards, group: int) -> dict[str, Any]:
    mean, std = _stats(rewards)
    out: dict[str, Any] = {"reward_mean": mean, "reward_std": std}
    per_fn = {}
    for name in scored.names:
        per_fn[name] = {"mean": scored.mean(name), "std": scored.std(name)}
    out["rewards"] = per_fn
    if (share := accuracy(scored)) is not None:
        out["accuracy"] = share
    flat = grpo.zero_std_group_mask(mx.array(rewards, dtype=mx.float32), group)
    out["zero_std_groups"] = mx.mean(flat.astype(mx.float32)).item()
    out["reward_errors"] = {n: f.count for n, f in scored.errors.items()}
    return out


def advantage_metrics(advantages: list[float], keep: list[int]) -> dict[str, float]:
    kept = [advantages[i] for i in keep]
    mean, std = _stats(kept)
    return {
        "advantage_mean": mean,
        "advantage_std": std,
        "advantage_abs_max": max((abs(a) for a in kept), default=0.0),
        "trained_share": len(keep) / max(1, len(advantages)),
    }


def completion_metrics(lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    return {
        "completion_length_mean": sum(lengths) / len(lengths),
        "completion_length_min": float(min(lengths)),
        "completion_length_max": float(max(lengths)),
        "truncated_share": sum(truncated) / len(lengths),
    }


def tool_metrics(dist: distributed.Dist, rollout: Rollout) -> dict[str, float]:
    """Tool calls per completion, failed calls per completion, and the share of completions
    that call a tool at least once (over all ranks)."""
    if rollout.tool_calls is None:
        return {}
    calls = rollout.tool_calls
    made, failed, using, count = dist.sum_floats(
        [
            sum(len(c) for c in calls),
            sum(not call.ok for c in calls for call in c),
            sum(bool(c) for c in calls),
            len(calls),
        ]
    )
    return {
        "tool_calls_mean": made / count,
        "tool_errors_mean": failed / count,
        "tool_use_share": using / count,
    }


def completion_records(sample, advantages: list[float]) -> list[dict]:
    """One record per sampled completion (``sample``: a ScoredRollout), as completions.jsonl
    holds them: the shared record, then its advantage, truncation and any tool calls."""
    records = []
    rollout, scored = sample.rollout, sample.scored
    for i, text in enumerate(sample.texts):
        ex = sample.examples[rollout.prompt_index[i]]
        fields: dict[str, Any] = {"advantage": advantages[i], "truncated": rollout.truncated[i]}
        if rollout.tool_calls is not None:
            fields["tool_calls"] = [c.as_record() for c in rollout.tool_calls[i]]
        records.append(completion_record(ex, text, scored, i, sample.rewards[i], **fields))
    return records
