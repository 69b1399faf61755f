"""One supervised fine-tuning update (``algorithm.type = "sft"``): a batch of encoded
demonstrations, split into micro-batches, the loss of :mod:`~mlxgrpo.engine.loss.sft`
accumulated over them, and one optimizer step (docs/architecture.md §3).

The memory techniques are GRPO's: the blocks are checkpointed as ``finetune.grad_checkpoint``
says, and the LM head runs in tiles on the target positions only
(:func:`~mlxgrpo.engine.memory.lm_head.sequence_logprobs` with a mask), so a demonstration's
prompt costs the trunk's pass but no head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxgrpo.data import EncodedDemonstration
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.microbatch import plan_microbatches
from mlxgrpo.engine.loop.training_pass import step
from mlxgrpo.engine.loop.update import UpdateResult
from mlxgrpo.engine.loss.sft import sft_loss
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.engine.memory.recompute import checkpointed_blocks


def padded_batch(demos: Sequence[EncodedDemonstration], pad_id: int) -> tuple[mx.array, mx.array]:
    """``(tokens, targets)`` [N, T]: the demonstrations right-padded to the longest, and 1
    where a token trains (never at padding)."""
    width = max(len(d.ids) for d in demos)
    tokens = np.full((len(demos), width), pad_id, dtype=np.int32)
    targets = np.zeros((len(demos), width), dtype=np.float32)
    for row, demo in enumerate(demos):
        tokens[row, : len(demo.ids)] = demo.ids
        targets[row, : len(demo.targets)] = demo.targets
    return mx.array(tokens), mx.array(targets)


def demonstration_logprobs(
    model: nn.Module, tokens: mx.array, targets: mx.array, chunk_size: int | None = None
) -> mx.array:
    """[N, T-1]: the log-prob of each target token given the tokens before it (0 where the
    token does not train)."""
    return sequence_logprobs(model, tokens, 1, mask=targets, chunk_size=chunk_size)


def sft_update(
    ctx: UpdateContext, demos: Sequence[EncodedDemonstration], seed: int, lr: float
) -> UpdateResult:
    """Learn from one batch of demonstrations; returns the update's metrics: ``loss`` (mean
    negative log-likelihood per target token), ``perplexity``, ``target_tokens``,
    ``truncated_examples``, ``grad_norm`` and the timing and memory figures."""
    started = time.perf_counter()
    mx.random.seed(seed)  # dropout is a function of (run seed, update)
    ctx.optimizer.learning_rate = lr
    chunks = plan_microbatches(
        list(range(len(demos))),
        [len(d.ids) for d in demos],
        parts=ctx.optim.gradient_accumulation_steps,
        max_tokens=ctx.optim.max_tokens_per_microbatch,
    )
    batches = [padded_batch([demos[i] for i in c], ctx.codec.pad_id) for c in chunks if c]
    update_tokens = sum(d.trained for d in demos)
    chunk_size = ctx.finetune.lm_head_chunk or None

    def loss_of(tokens: mx.array, targets: mx.array):
        logp = demonstration_logprobs(ctx.model, tokens, targets, chunk_size)
        return sft_loss(logp, targets[:, 1:], max(update_tokens, 1))

    value_and_grad = nn.value_and_grad(ctx.model, loss_of)
    grads, loss_sum, nll = None, 0.0, 0.0
    for tokens, targets in batches:
        with checkpointed_blocks(ctx.model, ctx.finetune.grad_checkpoint):
            (loss, metrics), g = value_and_grad(tokens, targets)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, metrics, grads)
        loss_sum += loss.item()
        nll += metrics["nll_sum"].item()
    grad_norm, applied = step(ctx, grads, loss_sum)
    seconds = time.perf_counter() - started
    mean_nll = nll / max(update_tokens, 1)
    tokens_run = sum(int(t.size) for t, _ in batches)
    return UpdateResult(
        {
            "loss": mean_nll,
            "perplexity": math.exp(min(mean_nll, 700.0)),
            "target_tokens": float(update_tokens),
            "truncated_examples": float(sum(d.truncated for d in demos)),
            "grad_norm": grad_norm,
            "nonfinite_skipped": float(not applied),
            "micro_batches": float(len(batches)),
            "learning_rate": lr,
            "train_tokens_per_sec": tokens_run / seconds if seconds > 0 else 0.0,
            "train_seconds": seconds,
            "step_seconds": seconds,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
    )


def validation_loss(
    model: nn.Module,
    demos: Sequence[EncodedDemonstration],
    pad_id: int,
    batch_size: int,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mean negative log-likelihood per target token of held-out demonstrations, and its
    perplexity, ``batch_size`` demonstrations at a time, without gradients."""
    nll, tokens = 0.0, 0
    for begin in range(0, len(demos), batch_size):
        part = demos[begin : begin + batch_size]
        ids, targets = padded_batch(part, pad_id)
        logp = demonstration_logprobs(model, ids, targets, chunk_size)
        nll -= mx.sum(logp * targets[:, 1:]).item()
        tokens += sum(d.trained for d in part)
    mean = nll / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "target_tokens": tokens}
