"""Log-probs of a frozen linear LM head, written out so its vocabulary-wide work is cheap on CPU.

With LoRA, DoRA or QLoRA the head ``z = f W^T (+ b)`` does not train, and position t's log-prob
``logp_t = z_t[y_t] - logsumexp(z_t)`` depends on its own features ``f_t`` only, with

    d logp_t / d f_t = (W[y_t] - softmax(z_t) W) / temperature.

So each chunk computes its logits once, the log-normaliser (and entropy) from one exponential
pass, and, when a gradient will be taken, that Jacobian row, from the unnormalised
exponentials: ``e W / sum(e)``. Nothing over the vocabulary is kept and nothing is recomputed.
The same numbers as autodiff through :mod:`~mlxgrpo.engine.logprobs`, with fewer passes over
[chunk, V] buffers, and on CPU those passes run on two streams
(:func:`~mlxgrpo.models.cpu_kernels.parallel_row_parts`): MLX runs elementwise ops on one core.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.engine.chunked_head import prepared_gradient, run_in_chunks
from mlxgrpo.models.cpu_kernels import exp, parallel_row_parts

# float32 [chunk, V] buffers one chunk holds at its peak: logits, shifted logits, the two
# halves' exponentials, their joined copy for the product and a temporary. (Counted 4, the
# 0.5B update's peak rose by two chunks' buffers, 170 MB.)
FROZEN_HEAD_BUFFERS = 6


def target_rows(head: Callable) -> Callable[[mx.array], mx.array] | None:
    """``y -> W[y]`` (float rows) for the heads this module handles, else None."""
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


def _row_statistics(with_entropy: bool) -> Callable:
    """``(z [C, V], y [C]) -> (logp, [entropy,] e, s)`` with e = exp(z - max) and s = sum(e)."""

    def stats(z: mx.array, y: mx.array) -> tuple[mx.array, ...]:
        shifted = z - mx.max(z, axis=-1, keepdims=True)
        e = exp(shifted)
        total = mx.sum(e, axis=-1, keepdims=True)
        log_total = mx.log(total)
        picked = mx.take_along_axis(shifted, y[:, None], axis=-1)
        out = [(picked - log_total).squeeze(-1)]
        if with_entropy:
            # H = log s - sum(e * shifted) / s; entries with e = 0 add nothing (and -inf * 0
            # would be NaN).
            weighted = mx.sum(mx.where(e > 0, e * shifted, 0.0), axis=-1, keepdims=True)
            out.append((log_total - weighted / total).squeeze(-1))
        return (*out, e, total)

    return stats


def frozen_head_logprobs(
    head: Callable,
    features: mx.array,
    targets: mx.array,
    *,
    step: int,
    with_entropy: bool,
    differentiable: bool,
    temperature: float,
) -> tuple[mx.array, ...]:
    """``(logp [P],)`` or ``(logp, entropy)`` of flat ``features`` [P, H], chunk by chunk.

    ``head`` must be one :func:`target_rows` accepts. When ``differentiable``, logp carries the
    gradient above; the entropy is a value (not differentiated).
    """
    rows_of = target_rows(head)
    if rows_of is None:
        raise ValueError("frozen_head_logprobs needs a plain or quantized linear head")
    positions = int(targets.shape[0])
    stats = _row_statistics(with_entropy)
    outputs = 2 if with_entropy else 1

    def chunk(params: dict, f: mx.array, lo: int, hi: int) -> list[mx.array]:
        y = targets[lo:hi]
        z = head(f).astype(mx.float32)
        if temperature != 1.0:
            z = z * (1.0 / temperature)
        parts = parallel_row_parts(stats, z, y)
        values = [mx.concatenate([p[i] for p in parts]) for i in range(outputs)]
        if not differentiable:
            return values
        # e W in one product (halves would stream the vocabulary's weights twice), through
        # the head's own transpose so that quantized heads work too.
        e = mx.concatenate([p[outputs] for p in parts]).astype(f.dtype)
        total = mx.concatenate([p[outputs + 1] for p in parts])
        spread = mx.vjp(head, [f], [e])[1][0] / total
        jacobian = (rows_of(y).astype(mx.float32) - spread) / temperature
        return [*values, jacobian]

    if not differentiable:
        return run_in_chunks(chunk, {}, features, positions, step)
    return prepared_gradient(chunk, positions, step)({}, features)
