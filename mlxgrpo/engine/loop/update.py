"""One GRPO update: rollout, rewards and advantages, then the training pass
(:mod:`~mlxgrpo.engine.loop.training_pass`); what it logs is in
:mod:`~mlxgrpo.engine.loop.update_metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo import distributed
from mlxgrpo.data import Example
from mlxgrpo.engine.loop import dynamic_sampling
from mlxgrpo.engine.loop.training_pass import learn, trainer_temperature
from mlxgrpo.engine.loop.update_metrics import (
    advantage_metrics,
    completion_metrics,
    completion_records,
    reward_metrics,
    tool_metrics,
)
from mlxgrpo.engine.loss import grpo
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.engine.memory.recompute import checkpointed_blocks
from mlxgrpo.engine.memory.replay import replay_applies
from mlxgrpo.generation.logprobs import completion_slice
from mlxgrpo.generation.rollout import MicroBatch, Rollout, SamplingConfig, generate_groups
from mlxgrpo.models.tokenizer import strip_eos
from mlxgrpo.rewards import RewardResult, RewardSet
from mlxgrpo.task import TextCodec


@dataclass
class UpdateContext:
    """Everything an update needs that stays the same across updates."""

    model: nn.Module
    cfg: Any  # mlxgrpo.config.Config
    reward_set: RewardSet
    optimizer: Any
    codec: TextCodec  # prompt encoder, decoder, EOS ids, pad id
    ref_model: nn.Module | None = None  # full fine-tuning with KL only
    tools: Any = None  # generation.tool_loop.ToolRunner when rollout.tools is set
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # size 1: one process
    _value_and_grad: Callable[..., Any] = field(init=False, repr=False)
    # Whether rollouts record the blocks' outputs for the training pass (engine.memory.replay).
    replays_rollout: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._value_and_grad = nn.value_and_grad(self.model, self._loss)
        self.replays_rollout = replay_applies(self.model, self.cfg, self.tools)

    def loss_and_grad(
        self, batch: MicroBatch, advantages, old_logp, ref_logp, norm, policy_mask=None, known=None
    ):
        """``((loss, (metrics, logp)), grads)`` of one micro-batch (see :meth:`_loss`).

        With ``finetune.grad_checkpoint`` the blocks recompute their activations in the
        backward pass, which runs inside this call: the context spans all of it. ``known``:
        the rollout's block outputs at these rows (``GatheredActivations``,
        :mod:`~mlxgrpo.engine.memory.replay`), valid only while the weights are the rollout's.
        """
        with checkpointed_blocks(self.model, self.cfg.finetune.grad_checkpoint):
            return self._value_and_grad(
                batch, advantages, old_logp, ref_logp, norm, policy_mask, known
            )

    def _loss(self, batch: MicroBatch, advantages, old_logp, ref_logp, norm, policy_mask, known):
        algo, mask = self.cfg.algorithm, batch.completion_mask
        # The entropy is always reported; it is differentiated only when it is in the loss.
        logp, entropy = sequence_logprobs(
            self.model,
            batch.tokens,
            batch.start,
            with_entropy=True,
            entropy_grad=algo.entropy_coeff != 0,
            chunk_size=self.cfg.finetune.lm_head_chunk or None,
            mask=mask,
            prompt_lengths=batch.prompt_lengths,
            temperature=trainer_temperature(self.cfg),
            known=known,
        )
        loss, metrics = grpo.policy_loss(
            logp,
            old_logp,
            advantages,
            completion_slice(mask, batch.start),
            norm=norm,
            loss_type=algo.loss_type,
            clip_eps=algo.clip_eps,
            clip_eps_high=algo.clip_eps_high,
            kl_coeff=algo.kl_coeff,
            ref_logp=ref_logp,
            kl_estimator=algo.kl_estimator,
            entropy=entropy,
            entropy_coeff=algo.entropy_coeff,
            importance_sampling_level=algo.importance_sampling_level,
            sapo_tau_pos=algo.sapo_tau_pos,
            sapo_tau_neg=algo.sapo_tau_neg,
            sampler_logp=batch.sampler_logp,
            rollout_correction=algo.rollout_correction,
            rollout_correction_cap=algo.rollout_correction_cap,
            rollout_correction_level=algo.rollout_correction_level,
            policy_mask=policy_mask,
        )
        return loss, (metrics, mx.stop_gradient(logp))


@dataclass
class UpdateResult:
    metrics: dict[str, Any]
    completions: list[dict[str, Any]] = field(default_factory=list)
    reward_errors: dict[str, str] = field(default_factory=dict)
    # Reward functions that failed on every batch scored in this update -> the last message.
    reward_failures: dict[str, str] = field(default_factory=dict)


def run_update(
    ctx: UpdateContext,
    examples: Sequence[Example],
    seed: int,
    lr: float,
    more_examples: Callable[[], Sequence[Example] | None] | None = None,
) -> UpdateResult:
    """Sample, score and learn from one batch of prompts; returns the update's metrics.

    With ``algorithm.dynamic_sampling``, ``more_examples()`` supplies further batches of
    prompts (None when the data ran out) until the update holds enough informative groups.
    """
    cfg, started, dist = ctx.cfg, time.perf_counter(), ctx.dist
    comm_before = dist.comm_seconds
    mx.random.seed(seed)  # dropout and sampling are a function of (run seed, update)
    # Several ranks: this rank's contiguous share; sampling is keyed by global prompt index.
    local, offset = dist.shard(examples)
    sample = _sample(ctx, local, seed, offset)
    scored_parts = [sample.scored]
    extra: dict[str, float] = {}
    trained_groups = list(range(sample.num_groups))
    if cfg.algorithm.dynamic_sampling and more_examples is not None:

        def draw(k: int) -> dynamic_sampling.ScoredRollout | None:
            batch = more_examples()
            if batch is None:
                return None
            part = _sample(ctx, batch, dynamic_sampling.draw_seed(seed, k))
            scored_parts.append(part.scored)
            return part

        filled = dynamic_sampling.fill(
            sample,
            draw,
            batch_size=cfg.optim.batch_size,
            max_extra_draws=cfg.algorithm.max_resample_batches,
        )
        sample, trained, trained_groups = filled.sampled, filled.trained, filled.trained_groups
        extra = {
            "sampling_draws": float(filled.draws),
            "trained_groups": float(len(trained_groups)),
        }
    else:
        trained = sample
    # Advantages from the whole update's rewards (batch-scaled std is global), then our rows.
    rows = distributed.global_rows(dist, trained)
    all_advantages, all_keep = _advantages(rows.rewards, rows.truncated, cfg)
    advantages, keep = distributed.local_part(rows, len(trained.rewards), all_advantages, all_keep)
    shown = rows if trained is sample else distributed.global_rows(dist, sample)
    if sample is not trained:  # learn() consumes the records; no other copy may keep them
        sample.rollout.activations = None
    mx.random.seed(seed)  # the training pass's dropout does not depend on the extra draws
    ctx.optimizer.learning_rate = lr
    train_started = time.perf_counter()
    train_metrics, trained_tokens = learn(ctx, trained.rollout, advantages, keep)
    train_seconds = time.perf_counter() - train_started
    rollout, group = sample.rollout, cfg.rollout.num_generations
    # Tokens summed over ranks, seconds of the slowest: the throughput of the whole run.
    (rollout_rate, rollout_seconds), (train_rate, train_seconds) = distributed.global_rates(
        dist,
        [
            (rollout.generated_tokens, rollout.seconds),
            (trained_tokens, train_seconds),
        ],
    )
    metrics = {
        **reward_metrics(shown.scored, shown.rewards, group),
        **advantage_metrics(all_advantages, all_keep),
        **completion_metrics(shown.lengths, shown.truncated),
        **tool_metrics(dist, sample.rollout),
        **train_metrics,
        **extra,
        "learning_rate": lr,
        "rollout_tokens_per_sec": rollout_rate,
        "rollout_seconds": rollout_seconds,
        "train_tokens_per_sec": train_rate,
        "train_seconds": train_seconds,
        "step_seconds": time.perf_counter() - started,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    if dist.active:  # rank 0's time in collectives this update (data moved, peers waited for)
        metrics["comm_seconds"] = dist.comm_seconds - comm_before
    # Every sampled completion is logged; those of groups the update did not train on carry
    # advantage 0.
    per_row = [0.0] * len(sample.rewards)
    for position, g in enumerate(trained_groups):
        for j in range(group):
            per_row[g * group + j] = advantages[position * group + j]
    records = distributed.join_records(dist, completion_records(sample, per_row))
    errors = {name: f.first_message for name, f in sample.scored.errors.items() if f.count == 1}
    failures = distributed.common_failures(dist, _failed_every_call(scored_parts))
    return UpdateResult(metrics, records, errors, failures)


def _failed_every_call(parts: Sequence[RewardResult]) -> dict[str, str]:
    """Reward functions that failed on each batch scored in an update -> their last message."""
    names = set.intersection(*(set(p.errors) for p in parts))
    return {name: parts[-1].errors[name].last_message for name in sorted(names)}


def _sample(ctx: UpdateContext, examples: Sequence[Example], seed: int, prompt_offset: int = 0):
    """Roll out and score one batch of prompts (the first is the update's prompt_offset-th)."""
    prompts = [ctx.codec.encode(ex) for ex in examples]
    rollout = _rollout(ctx, prompts, seed, prompt_offset)
    texts = [ctx.codec.decode(strip_eos(ids, ctx.codec.eos_ids)) for ids in rollout.completion_ids]
    scored = _score(ctx.reward_set, examples, rollout, texts)
    rewards = _with_overlong_penalty(scored.totals, rollout, ctx.cfg)
    return dynamic_sampling.ScoredRollout(list(examples), rollout, texts, scored, rewards)


def _rollout(
    ctx: UpdateContext, prompts: list[list[int]], seed: int, prompt_offset: int = 0
) -> Rollout:
    r = ctx.cfg.rollout
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
        record_entropies=ctx.cfg.algorithm.top_entropy_quantile < 1.0,
        prompt_offset=prompt_offset,
        tools=ctx.tools,
        record_activations=ctx.replays_rollout,
    )


def _score(reward_set: RewardSet, examples, rollout: Rollout, texts: list[str]) -> RewardResult:
    from mlxgrpo.evaluation import score_completions

    return score_completions(reward_set, [examples[i] for i in rollout.prompt_index], texts)


def _with_overlong_penalty(totals: Sequence[float], rollout: Rollout, cfg: Any) -> list[float]:
    """DAPO's soft overlong punishment: a linear penalty through the last `buffer` tokens."""
    algo, budget = cfg.algorithm, cfg.rollout.max_new_tokens
    if algo.overlong_penalty <= 0:
        return list(totals)
    buffer = algo.overlong_buffer or max(1, budget // 4)
    free = budget - buffer
    return [
        total - algo.overlong_penalty * min(1.0, max(0, len(ids) - free) / buffer)
        for total, ids in zip(totals, rollout.completion_ids, strict=True)
    ]


def _advantages(rewards: list[float], truncated: list[bool], cfg: Any):
    """Per-completion advantages and the indices of the completions that train."""
    algo, group = cfg.algorithm, cfg.rollout.num_generations
    r = mx.array(rewards, dtype=mx.float32)
    adv = grpo.group_advantages(r, group, scale=algo.scale_rewards)
    if algo.mask_truncated_completions:
        adv = grpo.mask_truncated_advantages(adv, mx.array(truncated))
    zero_std = grpo.zero_std_group_mask(r, group).tolist()
    # Filtered completions leave the update entirely: no policy or KL term, and they do not
    # count in the loss normalisers (a zero advantage alone would still dilute them).
    keep = [
        i
        for i in range(len(rewards))
        if not (algo.filter_zero_std_groups and zero_std[i // group])
        and not (algo.mask_truncated_completions and truncated[i])
    ]
    return adv.tolist(), keep
