"""One supervised fine-tuning update (``algorithm.type = "sft"``): a batch of encoded
demonstrations, split into micro-batches, the loss of :mod:`~mlxgrpo.engine.loss.sft`
accumulated over them, and one optimizer step (docs/architecture.md §3).

The memory techniques are GRPO's: the blocks are checkpointed as ``finetune.grad_checkpoint``
says, and the LM head runs in tiles on the target positions only
(:func:`~mlxgrpo.engine.memory.lm_head.sequence_logprobs` with a mask), so a demonstration's
prompt costs the trunk's pass but no head. With ``sft.packing``, short demonstrations share
rows without attending to each other (:mod:`~mlxgrpo.engine.memory.packing`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from mlxgrpo.engine.memory.lm_head import sequence_logprobs, split_lm_head
from mlxgrpo.engine.memory.packing import pack, packing_blocker
from mlxgrpo.engine.memory.recompute import checkpointed_blocks


@dataclass(frozen=True)
class Row:
    """One row of a batch: a demonstration, or several packed ones (``segments``: each
    position's demonstration)."""

    ids: list[int]
    targets: list[int]
    segments: list[int]


def rows_of(demos: Sequence[EncodedDemonstration], capacity: int | None) -> list[Row]:
    """The batch's rows: one per demonstration, or with a ``capacity`` packed up to that many
    tokens (:func:`~mlxgrpo.engine.memory.packing.pack`). A packed demonstration's first token
    never trains (it would be predicted from the one before it)."""
    if capacity is None:
        return [Row(d.ids, d.targets, [0] * len(d.ids)) for d in demos]
    rows = []
    for members in pack([len(d.ids) for d in demos], capacity):
        ids: list[int] = []
        targets: list[int] = []
        segments: list[int] = []
        for segment, i in enumerate(members):
            ids += demos[i].ids
            targets += [0, *demos[i].targets[1:]]
            segments += [segment] * len(demos[i].ids)
        rows.append(Row(ids, targets, segments))
    return rows


def padded_batch(rows: Sequence[Row], pad_id: int) -> tuple[mx.array, mx.array, np.ndarray]:
    """``(tokens, targets, segments)`` [N, T]: the rows right-padded to the longest, 1 where
    a token trains (never at padding), and each position's segment (each padding position
    a segment of its own, so that it sees nothing but itself)."""
    width = max(len(r.ids) for r in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
    targets = np.zeros((len(rows), width), dtype=np.float32)
    segments = np.tile(-1 - np.arange(width), (len(rows), 1))
    for row, r in enumerate(rows):
        tokens[row, : len(r.ids)] = r.ids
        targets[row, : len(r.targets)] = r.targets
        segments[row, : len(r.ids)] = r.segments
    return mx.array(tokens), mx.array(targets), segments


def demonstration_logprobs(
    model: nn.Module,
    tokens: mx.array,
    targets: mx.array,
    chunk_size: int | None = None,
    segments: np.ndarray | None = None,
) -> tuple[mx.array, mx.array]:
    """``(logp, top)`` [N, T-1]: the log-prob of each target token given the tokens before it
    in its row's segment, and 1.0 where it is the model's top token (both 0 where the token
    does not train); ``segments`` None: one demonstration a row."""
    logp, top = sequence_logprobs(
        model, tokens, 1, mask=targets, chunk_size=chunk_size, segments=segments, with_top=True
    )
    return logp, top


def packing_capacity(model: nn.Module, sft: Any) -> int | None:
    """Row capacity for packed demonstrations (``sft``: the config's [sft] section), or None
    when they train one per row: packing is off, or the model cannot pack
    (:func:`~mlxgrpo.engine.memory.packing.packing_blocker`)."""
    if not sft.packing:
        return None
    split = split_lm_head(model)
    blocked = packing_blocker(model, split[0] if split is not None else None)
    return sft.max_length if blocked is None else None


@dataclass
class SftGradients:
    """The summed gradient of a batch of demonstrations' loss, and its figures."""

    grads: Any
    loss: float  # the (weighted) loss, as differentiated
    nll: float  # the summed negative log-likelihood of the target tokens
    correct: float  # target tokens that were the model's top token
    target_tokens: int
    rows: int
    micro_batches: int
    tokens_run: int  # tokens through the trunk, padding included

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return figures(self.nll, self.correct, self.target_tokens, prefix)


def figures(nll: float, correct: float, tokens: int, prefix: str = "") -> dict[str, float]:
    """Loss (mean negative log-likelihood per target token), perplexity, token accuracy and
    target tokens, each name after ``prefix``."""
    mean = nll / max(tokens, 1)
    return {
        f"{prefix}loss": mean,
        f"{prefix}perplexity": math.exp(min(mean, 700.0)),
        f"{prefix}token_accuracy": correct / max(tokens, 1),
        f"{prefix}target_tokens": float(tokens),
    }


def sft_gradients(
    ctx: UpdateContext,
    demos: Sequence[EncodedDemonstration],
    capacity: int | None = None,
    weight: float = 1.0,
) -> SftGradients:
    """The gradient of ``weight`` x the mean negative log-likelihood of the demonstrations'
    target tokens, accumulated over micro-batches (packed into rows of ``capacity`` tokens
    when given, see :func:`packing_capacity`)."""
    rows = rows_of(demos, capacity)
    chunks = plan_microbatches(
        list(range(len(rows))),
        [len(r.ids) for r in rows],
        parts=ctx.optim.gradient_accumulation_steps,
        max_tokens=ctx.optim.max_tokens_per_microbatch,
    )
    batches = [padded_batch([rows[i] for i in c], ctx.codec.pad_id) for c in chunks if c]
    update_tokens = sum(sum(r.targets[1:]) for r in rows)
    chunk_size = ctx.finetune.lm_head_chunk or None

    def loss_of(tokens: mx.array, targets: mx.array, segments: np.ndarray | None):
        logp, top = demonstration_logprobs(ctx.model, tokens, targets, chunk_size, segments)
        loss, metrics = sft_loss(logp, targets[:, 1:], max(update_tokens, 1))
        return weight * loss, {**metrics, "correct": mx.sum(top)}

    value_and_grad = nn.value_and_grad(ctx.model, loss_of)
    grads, loss_sum, nll, correct = None, 0.0, 0.0, 0.0
    for tokens, targets, segments in batches:
        with checkpointed_blocks(ctx.model, ctx.finetune.grad_checkpoint):
            packed = segments if capacity is not None else None
            (loss, metrics), g = value_and_grad(tokens, targets, packed)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, metrics, grads)
        loss_sum += loss.item()
        nll += metrics["nll_sum"].item()
        correct += metrics["correct"].item()
    tokens_run = sum(int(t.size) for t, _, _ in batches)
    return SftGradients(
        grads, loss_sum, nll, correct, update_tokens, len(rows), len(batches), tokens_run
    )


def sft_update(
    ctx: UpdateContext,
    demos: Sequence[EncodedDemonstration],
    seed: int,
    lr: float,
    capacity: int | None = None,
) -> UpdateResult:
    """Learn from one batch of demonstrations (:func:`sft_gradients`, then one optimizer
    step); returns the update's metrics: ``loss`` (mean negative log-likelihood per target
    token), ``perplexity``, ``target_tokens``, ``truncated_examples``, ``rows``,
    ``grad_norm`` and the timing and memory figures."""
    started = time.perf_counter()
    mx.random.seed(seed)  # dropout is a function of (run seed, update)
    ctx.optimizer.learning_rate = lr
    found = sft_gradients(ctx, demos, capacity)
    grad_norm, applied = step(ctx, found.grads, found.loss)
    seconds = time.perf_counter() - started
    return UpdateResult(
        {
            **found.metrics(),
            "truncated_examples": float(sum(d.truncated for d in demos)),
            "rows": float(found.rows),
            "grad_norm": grad_norm,
            "nonfinite_skipped": float(not applied),
            "micro_batches": float(found.micro_batches),
            "learning_rate": lr,
            "train_tokens_per_sec": found.tokens_run / seconds if seconds > 0 else 0.0,
            "train_seconds": seconds,
            "step_seconds": seconds,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
    )


def mix_term(
    ctx: UpdateContext,
    demos: Sequence[EncodedDemonstration],
    weight: float,
    capacity: int | None = None,
) -> Callable[[], tuple[Any, float, dict[str, float]]]:
    """For ``algorithm.type = "mix"``: the SFT term a GRPO pass adds to its gradient
    (:func:`~mlxgrpo.engine.loop.training_pass.learn`'s ``extra``), taken at the weights of the
    pass that calls it: ``(grads, weighted loss, {"sft_loss", "sft_perplexity",
    "sft_target_tokens"})``."""

    def term() -> tuple[Any, float, dict[str, float]]:
        found = sft_gradients(ctx, demos, capacity, weight)
        return found.grads, found.loss, found.metrics("sft_")

    return term


def validation_loss(
    model: nn.Module,
    demos: Sequence[EncodedDemonstration],
    pad_id: int,
    batch_size: int,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mean negative log-likelihood per target token of held-out demonstrations, its
    perplexity and the token accuracy, ``batch_size`` demonstrations at a time, without
    gradients."""
    nll, correct, tokens = 0.0, 0.0, 0
    for begin in range(0, len(demos), batch_size):
        part = demos[begin : begin + batch_size]
        ids, targets, _ = padded_batch(rows_of(part, None), pad_id)
        logp, top = demonstration_logprobs(model, ids, targets, chunk_size)
        nll -= mx.sum(logp * targets[:, 1:]).item()
        correct += mx.sum(top).item()
        tokens += sum(d.trained for d in part)
    return figures(nll, correct, tokens)
