"""One GRPO update: rollout, rewards, advantages, then the clipped policy loss with accumulation.

DESIGN §4.1. Old log-probs are never computed by a separate model: for num_iterations = 1 the
ratio is exactly 1 (stop-gradient of the current log-probs); for more passes the first pass's
log-probs, taken before any optimizer step of this update, serve as the old policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxgrpo.data import Example
from mlxgrpo.engine import distributed, dynamic_sampling, grpo
from mlxgrpo.engine.checkpointing import checkpointed_blocks
from mlxgrpo.engine.finetune import adapters_disabled
from mlxgrpo.engine.microbatch import plan_microbatches
from mlxgrpo.engine.rollout import MicroBatch, Rollout, SamplingConfig, generate_groups
from mlxgrpo.errors import TrainingDivergedError
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
    tools: Any = None  # engine.tools.ToolRunner when rollout.tools is set
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # size 1: one process
    _value_and_grad: Callable[..., Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._value_and_grad = nn.value_and_grad(self.model, self._loss)

    def loss_and_grad(
        self, batch: MicroBatch, advantages, old_logp, ref_logp, norm, policy_mask=None
    ):
        """``((loss, (metrics, logp)), grads)`` of one micro-batch (see :meth:`_loss`).

        With ``finetune.grad_checkpoint`` the blocks recompute their activations in the
        backward pass, which runs inside this call: the context spans all of it.
        """
        with checkpointed_blocks(self.model, self.cfg.finetune.grad_checkpoint):
            return self._value_and_grad(batch, advantages, old_logp, ref_logp, norm, policy_mask)

    def _loss(self, batch: MicroBatch, advantages, old_logp, ref_logp, norm, policy_mask):
        algo, mask = self.cfg.algorithm, batch.completion_mask
        # The entropy is always reported; it is differentiated only when it is in the loss.
        logp, entropy = grpo.sequence_logprobs(
            self.model,
            batch.tokens,
            batch.start,
            with_entropy=True,
            entropy_grad=algo.entropy_coeff != 0,
            chunk_size=self.cfg.finetune.lm_head_chunk or None,
            mask=mask,
            prompt_lengths=batch.prompt_lengths,
            temperature=trainer_temperature(self.cfg),
        )
        loss, metrics = grpo.policy_loss(
            logp,
            old_logp,
            advantages,
            grpo.completion_slice(mask, batch.start),
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


def trainer_temperature(cfg: Any) -> float:
    """The temperature of the trainer's log-probs: the rollout's (1 for greedy rollouts)."""
    return cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0


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
    mx.random.seed(seed)  # the training pass's dropout does not depend on the extra draws
    ctx.optimizer.learning_rate = lr
    train_started = time.perf_counter()
    train_metrics, trained_tokens = _learn(ctx, trained.rollout, advantages, keep)
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
        **_reward_metrics(shown.scored, shown.rewards, group),
        **_advantage_metrics(all_advantages, all_keep),
        **_completion_metrics(shown.lengths, shown.truncated),
        **_tool_metrics(dist, sample.rollout),
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
    records = distributed.join_records(dist, _completion_records(sample, per_row))
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
    sampling = SamplingConfig(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        min_p=r.min_p,
        repetition_penalty=r.repetition_penalty,
    )
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


def _learn(ctx: UpdateContext, rollout: Rollout, advantages: list[float], keep: list[int]):
    """Gradient passes over the kept completions; returns (metrics, tokens processed)."""
    cfg, dist = ctx.cfg, ctx.dist
    # Every rank takes the same branch: a rank with nothing to train still joins the sums.
    if not dist.sum_floats([len(keep)])[0]:
        return {"skipped": 1.0, "nonfinite_skipped": 0.0, "policy_loss": 0.0, "grad_norm": 0.0}, 0
    lengths = [
        len(rollout.prompt_ids[p]) + len(c)
        for p, c in zip(rollout.prompt_index, rollout.completion_ids, strict=True)
    ]
    chunks = plan_microbatches(
        keep,
        lengths,
        parts=cfg.optim.gradient_accumulation_steps,
        max_tokens=cfg.optim.max_tokens_per_microbatch,
    )
    chunks = [c for c in chunks if c]  # none at all on a rank that kept nothing
    batches = [rollout.training_batch(c, pad_id=ctx.codec.pad_id) for c in chunks]
    advs = [mx.array([advantages[i] for i in c], dtype=mx.float32) for c in chunks]
    norm = distributed.global_norm(dist, _local_norm(batches, cfg.rollout.max_new_tokens))
    policy_masks = _top_entropy_masks(batches, cfg.algorithm.top_entropy_quantile)
    refs = [_reference_logprobs(ctx, b) for b in batches] if cfg.algorithm.kl_coeff > 0 else None
    olds: list[mx.array | None] = [None] * len(batches)
    totals: dict[str, float] = {}
    mismatch = _Mismatch()
    passes, nonfinite = cfg.algorithm.num_iterations, False
    for iteration in range(passes):
        loss_sum, grads, metrics_sum = 0.0, None, {}
        for k, batch in enumerate(batches):
            (loss, (metrics, logp)), g = ctx.loss_and_grad(
                batch, advs[k], olds[k], refs[k] if refs else None, norm, policy_masks[k]
            )
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if passes > 1 and olds[k] is None:
                olds[k] = logp
            mx.eval(loss, metrics, grads, *(o for o in olds if o is not None))
            if iteration == 0:
                mismatch.add(logp, batch)
            loss_sum += loss.item()
            for name, value in metrics.items():
                metrics_sum[name] = metrics_sum.get(name, 0.0) + value.item()
        # Each rank's loss and metrics are its shares of the global ones (global normalisers).
        grads = dist.sum_gradients(_zero_grads(ctx) if grads is None else grads)
        loss_sum, metrics_sum = _summed(dist, loss_sum, metrics_sum)
        grad_norm, applied = _step(ctx, grads, loss_sum)
        for name, value in {"policy_loss": loss_sum, "grad_norm": grad_norm, **metrics_sum}.items():
            totals[name] = totals.get(name, 0.0) + value / passes
        if not applied:
            # Later passes would start from the same weights and meet the same NaN/inf.
            nonfinite = True
            passes = iteration + 1
            break
    tokens = sum(int(b.tokens.size) for b in batches) * passes
    return {
        "skipped": 0.0,
        "nonfinite_skipped": float(nonfinite),
        "micro_batches": dist.sum_floats([len(batches)])[0],
        **totals,
        **mismatch.metrics(dist),
    }, tokens


def _local_norm(batches: list[MicroBatch], max_new_tokens: int) -> grpo.LossNorm:
    if not batches:  # this rank kept nothing; the other ranks' counts make the normaliser
        return grpo.LossNorm(0, 0, 0, max_new_tokens)
    return grpo.LossNorm.for_update([b.completion_mask for b in batches], max_new_tokens)


def _zero_grads(ctx: UpdateContext) -> Any:
    return tree_map(mx.zeros_like, ctx.model.trainable_parameters())


def _summed(dist: distributed.Dist, loss: float, metrics: dict[str, float]):
    if not dist.active:
        return loss, metrics
    # JSON, not a fixed vector: a rank that kept no completion has no metric names at all.
    parts = dist.gather_json({"loss": loss, "metrics": metrics})
    names = sorted({n for p in parts for n in p["metrics"]})
    summed = {n: sum(p["metrics"].get(n, 0.0) for p in parts) for n in names}
    return sum(p["loss"] for p in parts), summed


class _Mismatch:
    """|sampler log-prob - trainer log-prob| over the completion tokens of the first pass."""

    def __init__(self) -> None:
        self.total, self.largest, self.tokens = 0.0, 0.0, 0

    def add(self, logp: mx.array, batch: MicroBatch) -> None:
        if batch.sampler_logp is None:
            return
        mask = grpo.completion_slice(batch.completion_mask, batch.start)
        gap = mx.abs(logp - batch.sampler_logp) * mask
        self.total += mx.sum(gap).item()
        self.largest = max(self.largest, mx.max(gap).item())
        self.tokens += int(mx.sum(mask).item())

    def metrics(self, dist: distributed.Dist | None = None) -> dict[str, float]:
        if dist is not None and dist.active:
            parts = dist.gather_floats([self.total, self.largest, self.tokens])
            self.total = sum(p[0] for p in parts)
            self.largest = max(p[1] for p in parts)
            self.tokens = int(sum(p[2] for p in parts))
        if not self.tokens:
            return {}
        return {
            "logprob_mismatch_mean": self.total / self.tokens,
            "logprob_mismatch_max": self.largest,
        }


def _top_entropy_masks(batches: list[MicroBatch], quantile: float) -> list[mx.array | None]:
    """Per micro-batch, 1.0 at the completion tokens whose entropy is in the update's top
    ``quantile`` share (the threshold taken over every trained token, whatever the split)."""
    if quantile >= 1.0:
        return [None] * len(batches)
    masks = [grpo.completion_slice(b.completion_mask, b.start) for b in batches]
    entropies = [b.sampler_entropy for b in batches]
    if any(h is None for h in entropies):
        raise ValueError("the top-entropy mask needs a rollout that recorded entropies")
    kept = np.concatenate(
        [np.asarray(h)[np.asarray(m) > 0] for h, m in zip(entropies, masks, strict=True)]
    )
    threshold = grpo.entropy_threshold(kept, quantile)
    # Compared in float64, as the threshold was taken, so no token flips on rounding.
    return [
        mx.array(np.asarray(h, dtype=np.float64) >= threshold, dtype=mx.float32) * m
        for h, m in zip(entropies, masks, strict=True)
    ]


def _reference_logprobs(ctx: UpdateContext, batch: MicroBatch) -> mx.array:
    options = dict(
        mask=batch.completion_mask,
        chunk_size=ctx.cfg.finetune.lm_head_chunk or None,
        differentiable=False,
        prompt_lengths=batch.prompt_lengths,
        temperature=trainer_temperature(ctx.cfg),
    )
    if ctx.ref_model is not None:
        ref = grpo.sequence_logprobs(ctx.ref_model, batch.tokens, batch.start, **options)
    else:
        # The graph captures the base layers' weights, so it may run after the swap back.
        with adapters_disabled(ctx.model):
            ref = grpo.sequence_logprobs(ctx.model, batch.tokens, batch.start, **options)
    ref = mx.stop_gradient(ref)
    mx.eval(ref)
    return ref


def _step(ctx: UpdateContext, grads: Any, loss: float) -> tuple[float, bool]:
    """Clip and apply ``grads``; returns (gradient norm, whether the step was applied).

    A NaN/inf loss or gradient norm skips the step before the optimizer sees it, so neither the
    weights nor the optimizer's moments take in the non-finite values.
    """
    import mlx.optimizers as optim

    limit = ctx.cfg.optim.max_grad_norm
    grads, norm = optim.clip_grad_norm(grads, limit if limit > 0 else math.inf)
    norm_value = norm.item()  # the gradients are evaluated already: a cheap reduction
    if not (math.isfinite(norm_value) and math.isfinite(loss)):
        return norm_value, False
    ctx.optimizer.update(ctx.model, grads)
    finite = all_finite(ctx.model.trainable_parameters())
    mx.eval(ctx.model.parameters(), ctx.optimizer.state, finite)
    if not finite.item():
        # Finite gradients, yet the step overflowed (a learning rate near float max); the old
        # weights are gone (keeping them would double the memory of full fine-tuning).
        lr = float(ctx.optimizer.learning_rate)
        raise TrainingDivergedError(
            "an optimizer step turned the trainable weights into NaN/inf "
            f"(gradient norm {norm_value:.3g}, learning rate {lr:g})",
            hint="lower optim.learning_rate; resume from an earlier checkpoint if there is one",
        )
    return norm_value, True


def all_finite(params: Any) -> mx.array:
    """A lazy scalar: True when every array in the parameter tree is free of NaN and inf."""
    from mlx.utils import tree_flatten

    checks = [mx.all(mx.isfinite(p)) for _, p in tree_flatten(params)]
    return mx.all(mx.stack(checks)) if checks else mx.array(True)


def _stats(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _reward_metrics(scored: RewardResult, rewards, group: int) -> dict[str, Any]:
    mean, std = _stats(rewards)
    out: dict[str, Any] = {"reward_mean": mean, "reward_std": std}
    per_fn = {}
    for name in scored.names:
        per_fn[name] = {"mean": scored.mean(name), "std": scored.std(name)}
    out["rewards"] = per_fn
    from mlxgrpo.evaluation import accuracy

    if (share := accuracy(scored)) is not None:
        out["accuracy"] = share
    flat = grpo.zero_std_group_mask(mx.array(rewards, dtype=mx.float32), group)
    out["zero_std_groups"] = mx.mean(flat.astype(mx.float32)).item()
    out["reward_errors"] = {n: f.count for n, f in scored.errors.items()}
    return out


def _advantage_metrics(advantages: list[float], keep: list[int]) -> dict[str, float]:
    kept = [advantages[i] for i in keep]
    mean, std = _stats(kept)
    return {
        "advantage_mean": mean,
        "advantage_std": std,
        "advantage_abs_max": max((abs(a) for a in kept), default=0.0),
        "trained_share": len(keep) / max(1, len(advantages)),
    }


def _completion_metrics(lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    return {
        "completion_length_mean": sum(lengths) / len(lengths),
        "completion_length_min": float(min(lengths)),
        "completion_length_max": float(max(lengths)),
        "truncated_share": sum(truncated) / len(lengths),
    }


def _tool_metrics(dist: distributed.Dist, rollout: Rollout) -> dict[str, float]:
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


def _completion_records(sample, advantages: list[float]) -> list[dict]:
    records = []
    rollout, scored = sample.rollout, sample.scored
    for i, text in enumerate(sample.texts):
        ex = sample.examples[rollout.prompt_index[i]]
        records.append(
            {
                "prompt": ex.prompt,
                "answer": ex.answer,
                "completion": text,
                "rewards": {n: scored.values[n][i] for n in scored.names},
                "reward": sample.rewards[i],
                "advantage": advantages[i],
                "truncated": rollout.truncated[i],
            }
        )
        if rollout.tool_calls is not None:
            records[-1]["tool_calls"] = [c.as_record() for c in rollout.tool_calls[i]]
    return records
