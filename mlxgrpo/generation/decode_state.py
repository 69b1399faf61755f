"""The state of a batched decode and the steps on it that the plain and the tool loop share.

:class:`DecodeBatch` holds the rows still decoding, their caches and the tokens drawn but not
yet read back. :func:`first_step` repeats each prompt's cache G times and samples every
completion's first token; :func:`queue_next_token` runs one decode step and queues its sample;
:func:`drop_finished_rows` shrinks the batch once enough rows have stopped. The plain loop
(:mod:`~mlxgrpo.generation.rollout`) and the tool loop (:mod:`~mlxgrpo.generation.tool_loop`)
both drive them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.errors import MlxgrpoError
from mlxgrpo.generation.recording import ActivationRecorder
from mlxgrpo.generation.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    mark_seen,
    prompt_presence,
    sample_recorded,
    sample_tokens,
)
from mlxgrpo.generation.stop_rules import StopTracker
from mlxgrpo.models.blocks import architecture

# Drop finished rows from the decode batch once at least this share of it is finished.
COMPACT_FINISHED_SHARE = 0.25


def select_rows(cache: list[Any], rows: mx.array) -> None:
    """Keep (and repeat) batch rows of every layer cache, in the order given."""
    for c in cache:
        c.filter(rows)


@dataclass
class DecodeBatch:
    """The rows being decoded right now and their on-device state."""

    rows: list[int]
    tokens: mx.array
    cache: list[Any]
    seen: mx.array | None = None
    pending: list[mx.array] = field(default_factory=list)
    # Record each sampled token's log-prob (and entropy) with it: None = record nothing.
    record_entropy: bool | None = None
    pending_stats: list[mx.array] = field(default_factory=list)
    recorder: ActivationRecorder | None = None  # records the blocks' outputs of each step

    def sample(self, logits: mx.array, key: mx.array | None, sampling: SamplingConfig) -> None:
        """Draw the next token of every row (and its statistics, when recording)."""
        if self.record_entropy is None:
            self.tokens = sample_tokens(logits, key, sampling)
            mx.async_eval(self.tokens)
            return
        self.tokens, stats = sample_recorded(logits, key, sampling, self.record_entropy)
        self.pending_stats.append(stats)
        mx.async_eval(self.tokens, stats)

    def take_window(self) -> tuple[mx.array, mx.array | None]:
        """The pending steps' tokens [rows, steps] and stats [rows, steps, k] (queued)."""
        tokens = mx.stack(self.pending, axis=1)
        stats = mx.stack(self.pending_stats, axis=1) if self.pending_stats else None
        mx.async_eval(tokens, *([] if stats is None else [stats]))
        self.pending, self.pending_stats = [], []
        return tokens, stats

    def keep(self, positions: list[int]) -> None:
        """Keep only the rows at ``positions`` (in that order), on device and on the host."""
        index = mx.array(positions, dtype=mx.int32)
        select_rows(self.cache, index)
        self.rows = [self.rows[p] for p in positions]
        self.tokens = self.tokens[index]
        self.pending = [t[index] for t in self.pending]
        self.pending_stats = [t[index] for t in self.pending_stats]
        if self.seen is not None:
            self.seen = self.seen[index]


def first_step(
    prompts: list[list[int]],
    num_generations: int,
    cache: list[Any],
    logits: mx.array,
    sampling: SamplingConfig,
    step_keys: mx.array | None,
    record_entropy: bool | None,
    recorder: ActivationRecorder | None = None,
) -> DecodeBatch:
    """Repeat each prompt's cache and logits G times and sample every completion's first token.

    ``record_entropy`` as :attr:`DecodeBatch.record_entropy`; ``recorder`` records the blocks'
    outputs at every later step."""
    group_rows = mx.repeat(mx.arange(len(prompts), dtype=mx.int32), num_generations)
    select_rows(cache, group_rows)
    logits = logits[group_rows]
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = prompt_presence(prompts, logits.shape[-1])[group_rows]
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    key = None if step_keys is None else step_keys[:, 0]
    rows = list(range(len(prompts) * num_generations))
    placeholder = mx.zeros((len(rows),), dtype=mx.uint32)  # sample() sets the first tokens
    batch = DecodeBatch(
        rows=rows,
        tokens=placeholder,
        cache=cache,
        seen=seen,
        record_entropy=record_entropy,
        recorder=recorder,
    )
    batch.sample(logits, key, sampling)
    batch.pending = [batch.tokens]
    return batch


def batched_step(model: nn.Module, inputs: mx.array, cache: list[Any]) -> mx.array:
    """``model(inputs, cache=cache)`` on a batched (merged, left-padded) cache.

    Such a cache gives each row its own position (an array offset). An architecture whose
    forward pass cannot read that (gpt_bigcode computes learned positions from one offset)
    fails here, and the user gets one line that says so instead of a traceback."""
    try:
        return model(inputs, cache=cache)
    except (TypeError, ValueError) as e:
        name = architecture(model) or type(model).__name__
        detail = str(e).splitlines()[0] if str(e) else ""
        raise MlxgrpoError(
            f"{name} cannot decode a batch: its forward pass does not take the batched cache's "
            f"per-row positions ({type(e).__name__}: {detail})",
            hint="use a model architecture that mlx-lm's batch_generate supports",
        ) from e


def queue_next_token(
    model: nn.Module, batch: DecodeBatch, sampling: SamplingConfig, key: mx.array | None
) -> None:
    """Run one decode step on the batch's current tokens and queue the next token's sample."""
    inputs = batch.tokens
    if batch.recorder is not None:
        batch.recorder.arm([[row] for row in batch.rows])
    logits = batched_step(model, inputs[:, None], batch.cache)[:, -1, :]
    if batch.seen is not None:
        batch.seen = mark_seen(batch.seen, inputs)
        logits = apply_repetition_penalty(logits, batch.seen, sampling.repetition_penalty)
    batch.sample(logits, key, sampling)


def drop_finished_rows(batch: DecodeBatch, tracker: StopTracker) -> bool:
    """Shrink the batch when enough rows finished; False when none is left to decode."""
    active = [i for i, row in enumerate(batch.rows) if not tracker.finished(row)]
    if not active:
        return False
    if len(batch.rows) - len(active) >= COMPACT_FINISHED_SHARE * len(batch.rows):
        batch.keep(active)
    return True
