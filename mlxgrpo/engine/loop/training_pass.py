"""The training pass of one GRPO update: micro-batches, the update's loss normalisers, the KL
reference log-probs, gradient accumulation over the passes, and the optimizer step
(docs/architecture.md §3).

Old log-probs are never computed by a separate model: for num_iterations = 1 the
ratio is exactly 1 (stop-gradient of the current log-probs); for more passes the first pass's
log-probs, taken before any optimizer step of this update, serve as the old policy. With
several optimizer steps per rollout (``optim.steps_per_generation``), the steps after the first
take theirs from one pass of the policy before the first step (:func:`old_logprobs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from mlxgrpo import distributed
from mlxgrpo.engine.loop.context import UpdateContext, trainer_temperature
from mlxgrpo.engine.loop.microbatch import plan_microbatches
from mlxgrpo.engine.loss import grpo
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.engine.memory.recompute import checkpointed_blocks
from mlxgrpo.errors import TrainingDivergedError
from mlxgrpo.generation.logprobs import completion_slice
from mlxgrpo.generation.recording import GatheredActivations
from mlxgrpo.generation.rollout import MicroBatch, Rollout
from mlxgrpo.models.finetune import adapters_disabled


def learn(
    ctx: UpdateContext,
    rollout: Rollout,
    advantages: list[float],
    keep: list[int],
    olds: list[mx.array] | None = None,
    extra: Callable[[], tuple[Any, float, dict[str, float]]] | None = None,
):
    """Gradient passes over the kept completions; returns (metrics, tokens processed).

    ``olds``: per micro-batch (:func:`micro_batches`), the old policy's log-probs, for a step
    taken after the weights moved away from the rollout's (a later step of one generation,
    :func:`old_logprobs`); None: the first pass of this step gives them. ``extra``: another
    loss term each pass adds, as ``() -> (grads, loss, metrics)`` at the pass's weights (the
    SFT term of ``algorithm.type = "mix"``); its metrics are logged beside the policy's."""
    algo, dist = ctx.algorithm, ctx.dist
    # Every rank takes the same branch: a rank with nothing to train still joins the sums.
    if not dist.sum_floats([len(keep)])[0]:
        return {"skipped": 1.0, "nonfinite_skipped": 0.0, "policy_loss": 0.0, "grad_norm": 0.0}, 0
    chunks = micro_batches(ctx, rollout, keep)
    if olds is not None and len(olds) != len(chunks):
        raise ValueError(f"{len(olds)} old log-prob arrays for {len(chunks)} micro-batches")
    batches = [rollout.training_batch(c, pad_id=ctx.codec.pad_id) for c in chunks]
    advs = [mx.array([advantages[i] for i in c], dtype=mx.float32) for c in chunks]
    norm = distributed.global_norm(dist, _local_norm(batches, ctx.rollout.max_new_tokens))
    policy_masks = _top_entropy_masks(batches, algo.top_entropy_quantile)
    refs = [reference_logprobs(ctx, b) for b in batches] if algo.kl_coeff > 0 else None
    if olds is not None:  # the weights are no longer the rollout's: nothing to replay
        rollout.activations = None
    known = _replay_inputs(rollout, chunks)
    old: list[mx.array | None] = [None] * len(batches) if olds is None else list(olds)
    totals: dict[str, float] = {}
    mismatch = _Mismatch()
    passes, nonfinite = algo.num_iterations, False
    for iteration in range(passes):
        loss_sum, grads, metrics_sum = 0.0, None, {}
        for k, batch in enumerate(batches):
            (loss, (metrics, logp)), g = ctx.loss_and_grad(
                batch,
                advs[k],
                old[k],
                refs[k] if refs else None,
                norm,
                policy_masks[k],
                known[k] if iteration == 0 else None,
            )
            known[k] = None  # the first iteration only: the weights change after it
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if passes > 1 and old[k] is None:
                old[k] = logp
            mx.eval(loss, metrics, grads, *(o for o in old if o is not None))
            if iteration == 0:
                mismatch.add(logp, batch)
            loss_sum += loss.item()
            for name, value in metrics.items():
                metrics_sum[name] = metrics_sum.get(name, 0.0) + value.item()
        # Each rank's loss and metrics are its shares of the global ones (global normalisers).
        grads = dist.sum_gradients(_zero_grads(ctx) if grads is None else grads)
        loss_sum, metrics_sum = _summed(dist, loss_sum, metrics_sum)
        extra_loss = 0.0
        if extra is not None:
            extra_grads, extra_loss, extra_metrics = extra()
            grads = tree_map(mx.add, grads, extra_grads)
            metrics_sum.update(extra_metrics)
        grad_norm, applied = step(ctx, grads, loss_sum + extra_loss)
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


def micro_batches(ctx: UpdateContext, rollout: Rollout, keep: list[int]) -> list[list[int]]:
    """The kept completions' micro-batches (none at all on a rank that kept nothing)."""
    lengths = [
        len(rollout.prompt_ids[p]) + len(c)
        for p, c in zip(rollout.prompt_index, rollout.completion_ids, strict=True)
    ]
    chunks = plan_microbatches(
        keep,
        lengths,
        parts=ctx.optim.gradient_accumulation_steps,
        max_tokens=ctx.optim.max_tokens_per_microbatch,
    )
    return [c for c in chunks if c]


def old_logprobs(ctx: UpdateContext, rollout: Rollout, keep: list[int]) -> list[mx.array]:
    """Per micro-batch of ``keep``, the policy's log-probs now, without gradient: taken before
    a generation's first optimizer step, they are the old policy of its later steps. Where the
    rollout recorded its blocks' outputs they stand in for the trunk (the same weights)."""
    records = rollout.activations
    olds = []
    for chunk in micro_batches(ctx, rollout, keep):
        batch = rollout.training_batch(chunk, pad_id=ctx.codec.pad_id)
        width = max(len(rollout.completion_ids[i]) for i in chunk)
        known = records.gathered(chunk, width) if records is not None else None
        with checkpointed_blocks(ctx.model, ctx.finetune.grad_checkpoint):
            logp = sequence_logprobs(
                ctx.model,
                batch.tokens,
                batch.start,
                mask=batch.completion_mask,
                chunk_size=ctx.finetune.lm_head_chunk or None,
                differentiable=False,
                prompt_lengths=batch.prompt_lengths,
                temperature=trainer_temperature(ctx.rollout),
                known=known,
            )
        logp = mx.stop_gradient(logp)
        mx.eval(logp)
        olds.append(logp)
    return olds


def _replay_inputs(rollout: Rollout, chunks: list[list[int]]) -> list[GatheredActivations | None]:
    """Per micro-batch, the rollout's block outputs at its rows, which stand in for the
    policy's forward pass until the first optimizer step (engine.memory.replay). The rollout's
    records are consumed: each micro-batch's copy goes once it has been used."""
    records, rollout.activations = rollout.activations, None
    if records is None:
        return [None] * len(chunks)
    widths = [max(len(rollout.completion_ids[i]) for i in c) for c in chunks]
    return [records.gathered(c, w) for c, w in zip(chunks, widths, strict=True)]


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
        mask = completion_slice(batch.completion_mask, batch.start)
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
    masks = [completion_slice(b.completion_mask, b.start) for b in batches]
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


def reference_logprobs(ctx: UpdateContext, batch: MicroBatch) -> mx.array:
    options = dict(
        mask=batch.completion_mask,
        chunk_size=ctx.finetune.lm_head_chunk or None,
        differentiable=False,
        prompt_lengths=batch.prompt_lengths,
        temperature=trainer_temperature(ctx.rollout),
    )
    if ctx.ref_model is not None:
        ref = sequence_logprobs(ctx.ref_model, batch.tokens, batch.start, **options)
    else:
        # The graph captures the base layers' weights, so it may run after the swap back.
        with adapters_disabled(ctx.model):
            ref = sequence_logprobs(ctx.model, batch.tokens, batch.start, **options)
    ref = mx.stop_gradient(ref)
    mx.eval(ref)
    return ref


def step(ctx: UpdateContext, grads: Any, loss: float) -> tuple[float, bool]:
    """Clip and apply ``grads``; returns (gradient norm, whether the step was applied).

    A NaN/inf loss or gradient norm skips the step before the optimizer sees it, so neither the
    weights nor the optimizer's moments take in the non-finite values.
    """
    import mlx.optimizers as optim

    limit = ctx.optim.max_grad_norm
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
