"""DAPO's dynamic sampling: an update keeps drawing prompts until it holds enough informative
groups, those whose G rewards are not all equal (a group without spread has zero advantage and
teaches nothing, yet it dilutes the loss normalisers).

The first rollout is the update's own batch; each extra rollout takes the next batch of the data
stream (so the data cursor, saved in checkpoints, stays exact across resumes) and samples with a
seed derived from the update's seed and the draw's number. The update then trains on the first
``batch_size`` informative groups in drawing order; the rest are dropped, as in DAPO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlxgrpo.engine.loss import grpo
from mlxgrpo.generation.rollout import Rollout, join_rollouts
from mlxgrpo.rewards import RewardResult


@dataclass
class ScoredRollout:
    """One rollout with everything scored about it (completions flat, groups contiguous)."""

    examples: list[Any]  # the prompts' examples
    rollout: Rollout
    texts: list[str]  # decoded completions
    scored: RewardResult
    rewards: list[float]  # totals after any overlong penalty

    @property
    def num_groups(self) -> int:
        return len(self.rollout.prompt_ids)


def draw_seed(update_seed: int, draw: int) -> int:
    """The sampling seed of extra draw ``draw`` (1, 2, ...) of an update."""
    return (update_seed * 1_000_033 + draw * 104_729 + 11) % (2**31 - 1)


def informative_groups(rewards: Sequence[float], group: int) -> list[int]:
    """Indices of the groups whose rewards differ (the complement of
    :func:`~mlxgrpo.engine.loss.grpo.zero_std_group_mask`, the advantages' own test)."""
    if not rewards:
        return []
    zero_std = grpo.zero_std_group_mask(mx.array(list(rewards), dtype=mx.float32), group)
    return [g for g, flat in enumerate(zero_std.tolist()) if not flat]


def select_groups(part: ScoredRollout, groups: Sequence[int]) -> ScoredRollout:
    """The part of ``part`` made of ``groups`` (in that order)."""
    group = part.rollout.num_generations
    rows = [g * group + j for g in groups for j in range(group)]
    scored = part.scored
    return ScoredRollout(
        examples=[part.examples[g] for g in groups],
        rollout=part.rollout.take_groups(groups),
        texts=[part.texts[i] for i in rows],
        scored=RewardResult(
            names=scored.names,
            weights=scored.weights,
            totals=[scored.totals[i] for i in rows],
            values={n: [v[i] for i in rows] for n, v in scored.values.items()},
            errors=scored.errors,
        ),
        rewards=[part.rewards[i] for i in rows],
    )


def concatenate(parts: Sequence[ScoredRollout]) -> ScoredRollout:
    """One ScoredRollout holding ``parts`` one after another (timings and counts summed)."""
    if len(parts) == 1:
        return parts[0]
    errors: dict[str, Any] = {}
    for p in parts:
        for name, failure in p.scored.errors.items():
            errors.setdefault(name, failure)
    return ScoredRollout(
        examples=[e for p in parts for e in p.examples],
        rollout=join_rollouts([p.rollout for p in parts]),
        texts=[t for p in parts for t in p.texts],
        scored=RewardResult(
            names=parts[0].scored.names,
            weights=parts[0].scored.weights,
            totals=[t for p in parts for t in p.scored.totals],
            values={
                n: [v for p in parts for v in p.scored.values[n]] for n in parts[0].scored.names
            },
            errors=errors,
        ),
        rewards=[r for p in parts for r in p.rewards],
    )


@dataclass
class Filled:
    """What dynamic sampling drew (``sampled``) and what the update trains on (``trained``)."""

    sampled: ScoredRollout
    trained: ScoredRollout
    draws: int  # rollouts drawn, the update's own included
    trained_groups: list[int]  # indices into sampled's groups


def fill(
    first: ScoredRollout,
    draw: Callable[[int], ScoredRollout | None],
    *,
    batch_size: int,
    max_extra_draws: int,
) -> Filled:
    """Draw (``draw(k)`` for k = 1, 2, ...; None when the data ran out) until ``batch_size``
    informative groups are held or ``max_extra_draws`` extra rollouts were drawn."""
    group = first.rollout.num_generations
    parts, chosen = [first], []
    offset = 0
    while True:
        part = parts[-1]
        for g in informative_groups(part.rewards, group):
            if len(chosen) < batch_size:
                chosen.append(offset + g)
        offset += part.num_groups
        if len(chosen) >= batch_size or len(parts) > max_extra_draws:
            break
        extra = draw(len(parts))
        if extra is None:
            break
        parts.append(extra)
    sampled = concatenate(parts)
    if not chosen:  # nothing informative anywhere: the update's own batch, as without
        chosen = list(range(first.num_groups))
    return Filled(sampled, select_groups(sampled, chosen), len(parts), chosen)
