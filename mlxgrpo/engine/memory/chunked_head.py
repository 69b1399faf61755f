"""An LM head + log-prob function applied in chunks of positions, one chunk in memory at a time.

Both functions here wrap ``run(params, features [C, H], lo, hi) -> (logp [C], ...)``, the chunk
being positions ``lo:hi`` (see :mod:`mlxgrpo.engine.memory.lm_head`), in a custom function
whose chunks
are chained in the graph (``mx.depends``: a chunk starts after the previous one's results
exist), so at most one chunk's
[C, V] logits, probabilities and gradients exist at a time. Unchained, MLX would schedule every
chunk's buffers at once and chunking would save nothing. (Evaluating chunk by chunk inside the
gradient transform is no alternative: MLX keeps the whole graph of arrays evaluated during a
trace, which would keep every transformer block's activations too.)

- :func:`recomputing`: the backward pass recomputes each chunk's logits (any head, trainable
  or not: its weight gradients are accumulated chunk by chunk).
- :func:`gradient_in_forward`: for a frozen head, each position's log-prob depends on its own
  features only, so the forward pass also computes ``d logp_t / d features_t`` [C, H] and keeps
  that instead of the logits; the backward pass is a scaling. Same FLOPs as plain autodiff,
  a fraction of its memory, and no recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def flat_params(params: Any) -> tuple[tuple[str, ...], tuple[mx.array, ...]]:
    """(names, arrays) of a parameter tree, for functions that take arrays only (mx.vjp)."""
    return tuple(zip(*tree_flatten(params), strict=True)) or ((), ())


def rebuilt_params(names: tuple[str, ...], values: Any, params: Any) -> Any:
    """The tree ``params`` with ``values`` in place of its arrays (itself when it has none)."""
    return tree_unflatten(list(zip(names, values, strict=True))) if names else params


def _bounds(size: int, step: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


def _after(x: mx.array, previous: list[mx.array]) -> mx.array:
    """``x``, but computed only once ``previous`` (the last chunk's results) exist."""
    return mx.depends(x, previous) if previous else x


def run_in_chunks(run: Callable, params: Any, features: mx.array, positions: int, step: int):
    """``run(params, features[lo:hi], lo, hi)`` chunk after chunk (each starts once the last
    one's results exist), its outputs concatenated."""
    pieces: list[tuple[mx.array, ...]] = []
    for lo, hi in _bounds(positions, step):
        chunk = _after(features[lo:hi], list(pieces[-1]) if pieces else [])
        pieces.append(tuple(run(params, chunk, lo, hi)))
    return tuple(mx.concatenate(parts) for parts in zip(*pieces, strict=True))


def recomputing(run: Callable, positions: int, step: int) -> Callable:
    """``(params, features) -> outputs of run``; the backward pass recomputes every chunk.

    Any position-wise ``run`` fits: the MLP chunking of :mod:`~mlxgrpo.engine.memory.recompute`
    uses it too.
    """

    @mx.custom_function
    def chunked(params: Any, features: mx.array) -> tuple[mx.array, ...]:
        return run_in_chunks(run, params, features, positions, step)

    @chunked.vjp
    def chunked_vjp(primals, cotangents, outputs):
        params, features = primals
        names, values = flat_params(params)
        d_values: list[mx.array] | None = None
        d_features = []
        for lo, hi in _bounds(positions, step):

            def chunk(f: mx.array, *values: mx.array, lo: int = lo, hi: int = hi):
                return run(rebuilt_params(names, values, params), f, lo, hi)

            previous = d_features[-1:] + (d_values or [])
            primals = [_after(features[lo:hi], previous), *values]
            _, grads = mx.vjp(chunk, primals, [c[lo:hi] for c in cotangents])
            if d_values is not None:
                grads = [grads[0], *(a + b for a, b in zip(d_values, grads[1:], strict=True))]
            g_features, *d_values = grads
            d_features.append(g_features)
        return rebuilt_params(names, d_values or [], {}), mx.concatenate(d_features)

    return chunked


def gradient_in_forward(run: Callable, positions: int, step: int, run_outputs: int) -> Callable:
    """``(params, features) -> outputs of run`` (``run_outputs`` of them) for a frozen head
    whose only differentiated output is the first (logp): the others are returned as values."""

    def with_jacobian(params: Any, features: mx.array, lo: int, hi: int):
        def chunk(f: mx.array) -> tuple[mx.array, ...]:
            return run(params, f, lo, hi)

        # Position t's log-prob depends on features row t alone, so the gradient of their sum
        # holds every row's own d logp_t / d f_t. The other outputs get zero cotangents.
        shape = (hi - lo,)
        cotangents = [mx.ones(shape, mx.float32)] + [mx.zeros(shape, mx.float32)] * (
            run_outputs - 1
        )
        outputs, (jacobian,) = mx.vjp(chunk, [features], cotangents)
        return (*outputs, jacobian)

    return prepared_gradient(with_jacobian, positions, step)


def prepared_gradient(run_with_jacobian: Callable, positions: int, step: int) -> Callable:
    """``(params, features) -> outputs`` for a ``run`` whose last output is each position's
    ``d logp_t / d f_t`` [C, H]: the backward pass is that Jacobian scaled by the first output's
    cotangent (the other outputs are values, and the Jacobian is not returned)."""

    @mx.custom_function
    def chunked(params: Any, features: mx.array) -> tuple[mx.array, ...]:
        return run_in_chunks(run_with_jacobian, params, features, positions, step)

    @chunked.vjp
    def chunked_vjp(primals, cotangents, outputs):
        return {}, cotangents[0][:, None] * outputs[-1]

    def apply(params: Any, features: mx.array) -> tuple[mx.array, ...]:
        *values, _ = chunked(params, features)
        return (values[0], *(mx.stop_gradient(v) for v in values[1:]))

    return apply
