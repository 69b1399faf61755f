"""One GRPO generation: rollout, rewards and advantages (:func:`sample_generation`), then
the training pass of each of its optimizer steps (:func:`train_step`,
:mod:`~mlxgrpo.engine.loop.training_pass`), one by default; what they log is in
:mod:`~mlxgrpo.engine.loop.update_metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxgrpo import distributed
from mlxgrpo.data import Example
from mlxgrpo.engine.loop import dynamic_sampling
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.dynamic_sampling import ScoredRollout
from mlxgrpo.engine.loop.microbatch import generation_shares
from mlxgrpo.engine.loop.training_pass import learn, old_logprobs
from mlxgrpo.engine.loop.update_metrics import (
    advantage_metrics,
    completion_metrics,
    completion_records,
    reward_metrics,
    tool_metrics,
)
from mlxgrpo.engine.loss import advantages as estimators
from mlxgrpo.engine.loss import grpo
from mlxgrpo.evaluation import score_completions
from mlxgrpo.generation.rollout import Rollout, SamplingConfig, generate_groups
from mlxgrpo.models.tokenizer import strip_eos
from mlxgrpo.rewards import RewardResult, RewardSet

if TYPE_CHECKING:
    from mlxgrpo.config.schema import AlgorithmConfig


@dataclass
class UpdateResult:
    metrics: dict[str, Any]
    completions: list[dict[str, Any]] = field(default_factory=list)
    reward_errors: dict[str, str] = field(default_factory=dict)
    # Reward functions that failed on every batch scored in this update -> the last message.
    reward_failures: dict[str, str] = field(default_factory=dict)


@dataclass
class Generation:
    """One rollout, scored, with its advantages, split into the optimizer steps it feeds
    (``optim.steps_per_generation``; one step by default)."""

    sample: ScoredRollout  # everything sampled (logged)
    trained: ScoredRollout  # the groups the steps train on
    advantages: list[float]  # per trained completion (local numbering)
    shares: list[list[int]]  # per step, the kept completions it trains on
    olds: list[list[mx.array] | None]  # per step, its old log-probs (None: its own first pass)
    metrics: dict[str, Any]  # the rollout's figures, logged with every step
    completions: list[dict[str, Any]]
    reward_errors: dict[str, str]
    reward_failures: dict[str, str]
    seconds: float  # sampling, scoring and advantages
    comm_before: float  # this rank's time in collectives when the generation began


def run_update(
    ctx: UpdateContext,
    examples: Sequence[Example],
    seed: int,
    lr: float,
    more_examples: Callable[[], Sequence[Example] | None] | None = None,
) -> UpdateResult:
    """Sample, score and learn from one batch of prompts (a run with one optimizer step per
    rollout); returns the update's metrics. See :func:`sample_generation`."""
    if ctx.optim.steps_per_generation != 1:
        raise ValueError("run_update takes one step per rollout; use sample_generation")
    return train_step(ctx, sample_generation(ctx, examples, seed, more_examples), 0, seed, lr)


def sample_generation(
    ctx: UpdateContext,
    examples: Sequence[Example],
    seed: int,
    more_examples: Callable[[], Sequence[Example] | None] | None = None,
) -> Generation:
    """Sample and score the prompts (all ranks'), take the advantages over all of them and
    split the kept completions into the generation's steps; before any step, the policy's
    log-probs of the later steps' shares (their old policy).

    With ``algorithm.dynamic_sampling``, ``more_examples()`` supplies further batches of
    prompts (None when the data ran out) until the generation holds enough informative groups.
    """
    started, dist = time.perf_counter(), ctx.dist
    comm_before = dist.comm_seconds
    mx.random.seed(seed)  # dropout and sampling are a function of (run seed, update)
    # Several ranks: this rank's contiguous share; sampling is keyed by global prompt index.
    local, offset = dist.shard(examples)
    scored_parts: list[RewardResult] = []
    sample = _sample(ctx, local, seed, offset, scored_parts)
    sample, trained, trained_groups, extra = _fill(ctx, sample, seed, more_examples, scored_parts)
    # Advantages from the whole generation's rewards (batch-scaled std is global), then ours.
    rows = distributed.global_rows(dist, trained)
    group = ctx.rollout.num_generations
    all_advantages, all_keep = advantages_and_keep(
        rows.rewards, rows.truncated, ctx.algorithm, group, rows.lengths, rows.scored
    )
    advantages, keep = distributed.local_part(rows, len(trained.rewards), all_advantages, all_keep)
    shown = rows if trained is sample else distributed.global_rows(dist, sample)
    if sample is not trained:  # learn() consumes the records; no other copy may keep them
        sample.rollout.activations = None
    steps = ctx.optim.steps_per_generation
    shares = generation_shares(keep, group, steps, rows.offset // group)
    # Taken before the first step moves the weights (which also ends the records' validity).
    olds = [None] + [old_logprobs(ctx, trained.rollout, share) for share in shares[1:]]
    rollout = sample.rollout
    [(rollout_rate, rollout_seconds)] = distributed.global_rates(
        dist, [(rollout.generated_tokens, rollout.seconds)]
    )
    metrics = {
        **reward_metrics(shown.scored, shown.rewards, group),
        **advantage_metrics(all_advantages, all_keep),
        **completion_metrics(shown.lengths, shown.truncated),
        **tool_metrics(dist, sample.rollout),
        **extra,
        "rollout_tokens_per_sec": rollout_rate,
        "rollout_seconds": rollout_seconds,
    }
    per_row = _sampled_advantages(advantages, trained_groups, len(sample.rewards), group)
    records = distributed.join_records(dist, completion_records(sample, per_row))
    errors = {name: f.first_message for name, f in sample.scored.errors.items() if f.count == 1}
    failures = distributed.common_failures(dist, _failed_every_call(scored_parts))
    seconds = time.perf_counter() - started
    return Generation(
        sample,
        trained,
        advantages,
        shares,
        olds,
        metrics,
        records,
        errors,
        failures,
        seconds,
        comm_before,
    )


def train_step(
    ctx: UpdateContext,
    gen: Generation,
    step: int,
    seed: int,
    lr: float,
    extra: Callable[[], tuple[Any, float, dict[str, float]]] | None = None,
):
    """The ``step``-th optimizer step of ``gen`` at learning rate ``lr`` (``seed``: the
    update's, for dropout; ``extra``: another loss term, see
    :func:`~mlxgrpo.engine.loop.training_pass.learn`); its result carries the generation's
    rollout figures, and the first step also its completions and reward errors."""
    started, dist = time.perf_counter(), ctx.dist
    comm_before = gen.comm_before if step == 0 else dist.comm_seconds
    mx.random.seed(seed)  # the training pass's dropout does not depend on the extra draws
    ctx.optimizer.learning_rate = lr
    train_metrics, trained_tokens = learn(
        ctx, gen.trained.rollout, gen.advantages, gen.shares[step], gen.olds[step], extra
    )
    train_seconds = time.perf_counter() - started
    [(train_rate, train_seconds)] = distributed.global_rates(
        dist, [(trained_tokens, train_seconds)]
    )
    metrics = {
        **gen.metrics,
        **train_metrics,
        "learning_rate": lr,
        "train_tokens_per_sec": train_rate,
        "train_seconds": train_seconds,
        "step_seconds": time.perf_counter() - started + (gen.seconds if step == 0 else 0.0),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    if len(gen.shares) > 1:
        metrics["generation_step"] = step
    if dist.active:  # rank 0's time in collectives this update (data moved, peers waited for)
        metrics["comm_seconds"] = dist.comm_seconds - comm_before
    if step:
        return UpdateResult(metrics)
    return UpdateResult(metrics, gen.completions, gen.reward_errors, gen.reward_failures)


def _fill(
    ctx: UpdateContext,
    sample: ScoredRollout,
    seed: int,
    more_examples: Callable[[], Sequence[Example] | None] | None,
    scored_parts: list[RewardResult],
) -> tuple[ScoredRollout, ScoredRollout, list[int], dict[str, float]]:
    """(sampled, trained, trained groups, metrics): with ``algorithm.dynamic_sampling``, the
    rollouts drawn until the update holds enough informative groups; else ``sample`` itself."""
    algo = ctx.algorithm
    if not (algo.dynamic_sampling and more_examples is not None):
        return sample, sample, list(range(sample.num_groups)), {}

    def draw(k: int) -> ScoredRollout | None:
        batch = more_examples()
        if batch is None:
            return None
        return _sample(ctx, batch, dynamic_sampling.draw_seed(seed, k), 0, scored_parts)

    filled = dynamic_sampling.fill(
        sample,
        draw,
        batch_size=ctx.optim.batch_size * ctx.optim.steps_per_generation,
        max_extra_draws=algo.max_resample_batches,
    )
    extra = {
        "sampling_draws": float(filled.draws),
        "trained_groups": float(len(filled.trained_groups)),
    }
    return filled.sampled, filled.trained, filled.trained_groups, extra


def _sampled_advantages(
    advantages: list[float], trained_groups: list[int], rows: int, group: int
) -> list[float]:
    """Per sampled completion, its advantage: every sampled completion is logged, and those of
    groups the update did not train on carry advantage 0."""
    per_row = [0.0] * rows
    for position, g in enumerate(trained_groups):
        for j in range(group):
            per_row[g * group + j] = advantages[position * group + j]
    return per_row


def _failed_every_call(parts: Sequence[RewardResult]) -> dict[str, str]:
    """Reward functions that failed on each batch scored in an update -> their last message."""
    names = set.intersection(*(set(p.errors) for p in parts))
    return {name: parts[-1].errors[name].last_message for name in sorted(names)}


def _sample(
    ctx: UpdateContext,
    examples: Sequence[Example],
    seed: int,
    prompt_offset: int,
    scored_parts: list[RewardResult],
) -> ScoredRollout:
    """Roll out and score one batch of prompts (the first is the update's prompt_offset-th);
    its reward result joins ``scored_parts``."""
    prompts = [ctx.codec.encode(ex) for ex in examples]
    rollout = _rollout(ctx, prompts, seed, prompt_offset)
    texts = [ctx.codec.decode(strip_eos(ids, ctx.codec.eos_ids)) for ids in rollout.completion_ids]
    scored = _score(ctx.reward_set, examples, rollout, texts)
    scored_parts.append(scored)
    budget = ctx.rollout.max_new_tokens
    rewards = _with_overlong_penalty(scored.totals, rollout, ctx.algorithm, budget)
    return ScoredRollout(list(examples), rollout, texts, scored, rewards)


def _rollout(
    ctx: UpdateContext, prompts: list[list[int]], seed: int, prompt_offset: int = 0
) -> Rollout:
    r = ctx.rollout
    sampling = SamplingConfig.from_section(r)
    return generate_groups(
        ctx.model,
        prompts,
        num_generations=r.num_generations,
        max_new_tokens=r.max_new_tokens,
        sampling=sampling,
        eos_token_ids=ctx.codec.eos_ids,
        stop_strings=r.stop or None,
        decode=ctx.codec.decode if r.stop else None,
        seed=seed,
        record_logprobs=True,
        record_entropies=ctx.algorithm.top_entropy_quantile < 1.0,
        prompt_offset=prompt_offset,
        tools=ctx.tools,
        record_activations=ctx.replays_rollout,
        max_rows=r.max_rows,
    )


def _score(reward_set: RewardSet, examples, rollout: Rollout, texts: list[str]) -> RewardResult:
    return score_completions(reward_set, [examples[i] for i in rollout.prompt_index], texts)


def _with_overlong_penalty(
    totals: Sequence[float], rollout: Rollout, algo: AlgorithmConfig, budget: int
) -> list[float]:
    """DAPO's soft overlong punishment: a linear penalty through the last `buffer` tokens of
    the ``budget`` (rollout.max_new_tokens)."""
    if algo.overlong_penalty <= 0:
        return list(totals)
    buffer = algo.overlong_buffer or max(1, budget // 4)
    free = budget - buffer
    return [
        total - algo.overlong_penalty * min(1.0, max(0, len(ids) - free) / buffer)
        for total, ids in zip(totals, rollout.completion_ids, strict=True)
    ]


def advantages_and_keep(
    rewards: list[float],
    truncated: list[bool],
    algo: AlgorithmConfig,
    group: int,
    lengths: list[int] | None = None,
    scored: RewardResult | None = None,
) -> tuple[list[float], list[int]]:
    """Per-completion advantages (groups of ``group`` = rollout.num_generations completions)
    and the indices of the completions that train. ``lengths`` (completion tokens) serve the
    estimators that weigh by length, ``scored`` (each function's values) the per-function
    aggregation."""
    r = mx.array(rewards, dtype=mx.float32)
    zero_std = grpo.zero_std_group_mask(r, group).tolist()
    if algo.reward_aggregation == "normalize_then_sum":
        if scored is None:
            raise ValueError("normalize_then_sum needs each reward function's values")
        values = {name: scored.values[name] for name in scored.names}
        weights = dict(zip(scored.names, scored.weights, strict=True))
        adv = mx.array(estimators.normalize_then_sum(values, weights, group), dtype=mx.float32)
        zero_std = estimators.degenerate_groups(values, group)
    elif algo.advantage_estimator != "grpo":
        counts = lengths if lengths is not None else [1] * len(rewards)
        estimated = estimators.estimate(rewards, group, algo.advantage_estimator, counts)
        adv = mx.array(estimated, dtype=mx.float32)
    else:
        adv = grpo.group_advantages(r, group, scale=algo.scale_rewards)
    if algo.mask_truncated_completions:
        adv = grpo.mask_truncated_advantages(adv, mx.array(truncated))
    # Filtered completions leave the update entirely: no policy or KL term, and they do not
    # count in the loss normalisers (a zero advantage alone would still dilute them).
    keep = [
        i
        for i in range(len(rewards))
        if not (algo.filter_zero_std_groups and zero_std[i // group])
        and not (algo.mask_truncated_completions and truncated[i])
    ]
    return adv.tolist(), keep
