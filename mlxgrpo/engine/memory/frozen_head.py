"""Log-probs of a frozen linear LM head, written out so its vocabulary-wide work is cheap on CPU.

With LoRA, DoRA or QLoRA the head ``z = f W^T (+ b)`` does not train, and position t's log-prob
``logp_t = z_t[y_t] - logsumexp(z_t)`` depends on its own features ``f_t`` only, with

    d logp_t / d f_t = (W[y_t] - softmax(z_t) W) / temperature.

So each chunk of positions computes its logits once, the log-normaliser (and entropy) from one
exponential pass, and, when a gradient will be taken, that Jacobian row, from the unnormalised
exponentials: ``e W / sum(e)``. Nothing over the vocabulary is kept and nothing is recomputed.
The same numbers as autodiff through :mod:`~mlxgrpo.generation.logprobs`, with fewer passes over
[chunk, V] buffers, and on CPU those passes run on two streams
(:func:`~mlxgrpo.models.cpu_kernels.parallel_row_parts`): MLX runs elementwise ops on one core.

A chunk of positions walks the vocabulary in tiles, keeping a running maximum, normaliser,
entropy sum and ``e W`` per position (rescaled when the maximum rises, as flash attention does
for its softmax). Memory then bounds the tile, not the number of positions, and the chunks can
stay long: on two CPU cores the head's matrix products ran at ~130 GFLOP/s with 92 positions
and ~200 with 256 or more (measured at Qwen2.5-0.5B's widths).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.engine.memory.chunked_head import prepared_gradient, run_in_chunks
from mlxgrpo.models.cpu_kernels import exp, joined_row_parts, parallel_row_parts
from mlxgrpo.models.heads import LogitMap, head_linear, head_logit_map

# float32 [positions, tile] buffers one tile holds at its peak: logits, shifted logits, the
# two halves' exponentials, their joined copy for the product and a temporary.
FROZEN_TILE_BUFFERS = 6
# Positions per chunk when not configured: long enough for full-speed matrix products, short
# enough that the [positions, hidden] running sums stay small.
FROZEN_HEAD_POSITIONS = 512
# Memory one tile's buffers may take.
FROZEN_TILE_BUDGET_BYTES = 48 * 2**20


def tile_entries(positions: int, budget_bytes: int | None = None) -> int:
    """Vocabulary entries per tile so that one tile's float32 buffers stay within the budget
    (None: :data:`FROZEN_TILE_BUDGET_BYTES`)."""
    budget = FROZEN_TILE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (FROZEN_TILE_BUFFERS * 4 * max(1, positions)))


def target_rows(head: Callable) -> Callable[[mx.array], mx.array] | None:
    """``y -> W[y]`` (float rows) for the heads this module handles, else None: linear ones,
    plain or quantized, with any :class:`~mlxgrpo.models.heads.LogitMap` around them."""
    head = head_linear(head)
    owner = getattr(head, "__self__", head)
    name = getattr(head, "__name__", "")
    if isinstance(owner, (nn.Embedding, nn.QuantizedEmbedding)) and name == "as_linear":
        return owner  # an embedding lookup is the row of the tied head
    if type(owner) is nn.Linear:
        return lambda y: owner.weight[y]
    if type(owner) is nn.QuantizedLinear:

        def dequantized(y: mx.array) -> mx.array:
            biases = owner.get("biases")
            return mx.dequantize(
                owner["weight"][y],
                scales=owner["scales"][y],
                biases=biases[y] if biases is not None else None,
                group_size=owner.group_size,
                bits=owner.bits,
                mode=owner.mode,
            )

        return dequantized
    return None


def tile_head(head: Callable) -> Callable[[mx.array, int, int], mx.array]:
    """``(f, lo, hi) -> head(f)[:, lo:hi]``, computed from the vocabulary rows lo:hi alone.

    ``head`` must be one :func:`target_rows` accepts (its logit map is not applied here).
    Slicing rows of a row-major weight (or of a quantized one's packed weight, scales and
    biases) is a view, not a copy.
    """
    owner = getattr(head_linear(head), "__self__", head_linear(head))
    bias = owner.get("bias") if type(owner) in (nn.Linear, nn.QuantizedLinear) else None
    if isinstance(owner, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        biases = owner.get("biases")

        def product(f: mx.array, lo: int, hi: int) -> mx.array:
            return mx.quantized_matmul(
                f,
                owner["weight"][lo:hi],
                scales=owner["scales"][lo:hi],
                biases=biases[lo:hi] if biases is not None else None,
                transpose=True,
                group_size=owner.group_size,
                bits=owner.bits,
                mode=owner.mode,
            )

    else:

        def product(f: mx.array, lo: int, hi: int) -> mx.array:
            return f @ owner.weight[lo:hi].T

    if bias is None:
        return product
    return lambda f, lo, hi: product(f, lo, hi) + bias[lo:hi]


def _tile_statistics(with_entropy: bool) -> Callable:
    """``(z [C, T], y [C]) -> (peak, s, picked, [w,] e)`` of one tile: its maximum, e =
    exp(z - peak), s = sum(e), the logit of y when y falls in the tile (else 0) and, for the
    entropy, w = sum(e * (z - peak)). ``y`` is relative to the tile."""

    def stats(z: mx.array, y: mx.array) -> tuple[mx.array, ...]:
        peak = mx.max(z, axis=-1, keepdims=True)
        shifted = z - peak
        e = exp(shifted)
        inside = (y >= 0) & (y < z.shape[-1])
        column = mx.clip(y, 0, z.shape[-1] - 1)[:, None]
        picked = mx.where(inside, mx.take_along_axis(z, column, axis=-1).squeeze(-1), 0.0)
        out = [peak.squeeze(-1), mx.sum(e, axis=-1), picked]
        if with_entropy:
            # entries with e = 0 add nothing (and -inf * 0 would be NaN)
            out.append(mx.sum(mx.where(e > 0, e * shifted, 0.0), axis=-1))
        return (*out, e)

    return stats


class _Running:
    """Per-position sums over the tiles seen so far, relative to their running maximum."""

    def __init__(self) -> None:
        self.peak: mx.array | None = None
        self.total = self.weighted = self.spread = None
        self.picked: mx.array | None = None

    def add(self, peak, total, picked, weighted=None, spread=None) -> None:
        self.picked = picked if self.picked is None else self.picked + picked
        if self.peak is None:
            self.peak, self.total, self.weighted, self.spread = peak, total, weighted, spread
            return
        new_peak = mx.maximum(self.peak, peak)
        old_scale, tile_scale = mx.exp(self.peak - new_peak), mx.exp(peak - new_peak)
        if weighted is not None:
            # sum e (z - m) moves by (m_old - m_new) * sum e when the reference m moves
            self.weighted = old_scale * (self.weighted + (self.peak - new_peak) * self.total) + (
                tile_scale * (weighted + (peak - new_peak) * total)
            )
        if spread is not None:
            self.spread = old_scale[:, None] * self.spread + tile_scale[:, None] * spread
        self.total = old_scale * self.total + tile_scale * total
        self.peak = new_peak

    def arrays(self) -> list[mx.array]:
        parts = [self.peak, self.total, self.picked, self.weighted, self.spread]
        return [p for p in parts if p is not None]


def _finished(running: _Running, with_entropy: bool, with_top: bool) -> list[mx.array]:
    """Once every tile is in: the log-probs, and the entropies and top-token flags (1.0 where
    the target's logit is the highest, ties included) when asked."""
    log_total = mx.log(running.total)
    values = [(running.picked - running.peak) - log_total]
    if with_entropy:
        values.append(log_total - running.weighted / running.total)
    if with_top:
        values.append((running.picked >= running.peak).astype(mx.float32))
    return values


def _mapped(z: mx.array, logit_map: LogitMap) -> tuple[mx.array, mx.array | None]:
    """The map's logits ``u`` of raw float32 logits ``z``, and ``du/dz`` (None when 1)."""
    scale, cap = logit_map.logit_scale(), logit_map.softcap
    if scale != 1.0:
        z = z * scale
    if cap is None:
        return z, (None if scale == 1.0 else mx.full(z.shape, scale, dtype=z.dtype))
    t = mx.tanh(z / cap)
    return t * cap, scale * (1.0 - t * t)


def _target_slope(picked: mx.array, logit_map: LogitMap, temperature: float) -> mx.array | float:
    """``du/dz`` at the target, from its tempered mapped logit ``picked`` (``u / T``)."""
    scale, cap = logit_map.logit_scale(), logit_map.softcap
    if cap is None:
        return scale
    t = picked * (temperature / cap)
    return scale * (1.0 - t * t)


def frozen_head_logprobs(
    head: Callable,
    features: mx.array,
    targets: mx.array,
    *,
    step: int,
    with_entropy: bool,
    differentiable: bool,
    temperature: float,
    tile: int | None = None,
    with_top: bool = False,
) -> tuple[mx.array, ...]:
    """``(logp [P],)`` or ``(logp, entropy)`` (with ``with_top``, then 1.0 where the target's
    logit is the highest, ties included) of flat ``features`` [P, H], ``step`` positions
    at a time, each chunk walking the vocabulary ``tile`` entries at a time (None: from
    :data:`FROZEN_TILE_BUDGET_BYTES`).

    ``head`` must be one :func:`target_rows` accepts. When ``differentiable``, logp carries the
    gradient above; the entropy is a value (not differentiated). A head's logit map
    (:class:`~mlxgrpo.models.heads.LogitMap`) is applied tile by tile: with ``u = g(z)`` the
    gradient is ``(g'(z_y) W[y] - sum_v softmax(u / T)_v g'(z_v) W_v) / T``.
    """
    rows_of = target_rows(head)
    if rows_of is None:
        raise ValueError("frozen_head_logprobs needs a plain or quantized linear head")
    logit_map = head_logit_map(head)
    divisor = logit_map.input_divisor
    positions = int(targets.shape[0])
    linear = head_linear(head)
    owner = getattr(linear, "__self__", linear)
    vocab = int(owner["weight"].shape[0])
    width = tile or tile_entries(min(step, positions))
    if tile is None and logit_map.softcap is not None:  # one more buffer: the slopes
        width = max(1, width * FROZEN_TILE_BUFFERS // (FROZEN_TILE_BUFFERS + 1))
    bounds = [(lo, min(lo + width, vocab)) for lo in range(0, vocab, width)]
    tile_logits = tile_head(head)

    def logits_of(x: mx.array, lo: int, hi: int) -> mx.array:
        return tile_logits(x if divisor is None else x / divisor, lo, hi)

    stats = _tile_statistics(with_entropy)

    def chunk(params: dict, f: mx.array, lo: int, hi: int) -> list[mx.array]:
        y = targets[lo:hi]
        running = _Running()
        for start, end in bounds:
            # a tile starts once the last one is folded in: one tile's buffers at a time
            tile_input = mx.depends(f, running.arrays()) if running.peak is not None else f
            z, slope = _mapped(logits_of(tile_input, start, end).astype(mx.float32), logit_map)
            if temperature != 1.0:
                z = z * (1.0 / temperature)
            peak, total, picked, *rest = joined_row_parts(parallel_row_parts(stats, z, y - start))
            weighted = rest[0] if with_entropy else None
            spread = None
            if differentiable:
                # e g'(z) W in one product over the tile's rows of W
                e = rest[-1] if slope is None else rest[-1] * slope
                spread = mx.vjp(
                    lambda x, s=start, t=end: logits_of(x, s, t), [f], [e.astype(f.dtype)]
                )[1][0]
            running.add(peak, total, picked, weighted, spread)
        values = _finished(running, with_entropy, with_top)
        if not differentiable:
            return values
        softmax_w = running.spread / running.total[:, None]
        direct = rows_of(y).astype(mx.float32)
        if divisor is not None:
            direct = direct / divisor
        if not logit_map.is_identity():
            slope_y = _target_slope(running.picked, logit_map, temperature)
            direct = direct * (slope_y[:, None] if isinstance(slope_y, mx.array) else slope_y)
        jacobian = (direct - softmax_w) / temperature
        return [*values, jacobian]

    if not differentiable:
        return run_in_chunks(chunk, {}, features, positions, step)
    return prepared_gradient(chunk, positions, step)({}, features)
