"""Faster exp, SwiGLU and attention for MLX's CPU backend (docs/architecture.md §8).

MLX's CPU backend evaluates ``exp`` and ``sigmoid`` one element at a time on one core (about
10 and 15 ns per float32 here), while ``power(2, x)`` runs about 2.5-3x faster with the same
float32 accuracy. At Qwen2.5-0.5B's shape a GRPO update spent ~13 s of ~100 in SwiGLU alone,
and a decode step ~1.5 ms per layer in the fused attention's generic CPU fallback.

- :func:`exp` and :func:`swiglu` (hand-written gradient) use ``power`` on CPU.
- :func:`decode_attention` (one query per row against a KV cache) and
  :func:`sequence_attention` (prefill and training, hand-written gradient) replace the fused
  attention's generic CPU fallback.
- :func:`parallel_row_parts` runs row-wise work on two CPU streams: MLX runs an elementwise
  op on one core, however many the machine has (the LM head and the sampler use it).
- :func:`use_cpu_kernels` points a loaded mlx-lm model's MLP and attention classes at them:
  each class gets a copy of its own ``__call__`` whose globals name these functions instead
  of mlx-lm's ``swiglu`` and ``scaled_dot_product_attention``. The model code stays mlx-lm's.

Every function here falls back to MLX's own on other devices, so a GPU run is unchanged.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.models.class_swap import subclass_with_call

LOG2E = 1.4426950408889634

# Below this many elements an op is too short for a second stream to pay for itself.
PARALLEL_MIN_ELEMENTS = 1 << 18
_streams: list[Any] = []


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def parallel_row_parts(fn: Callable[..., tuple[mx.array, ...]], *arrays: mx.array) -> list:
    """``[fn(first rows), fn(other rows)]``, computed on two CPU streams; ``[fn(*arrays)]``
    where a split does not pay (GPUs, one-core machines, inputs under
    :data:`PARALLEL_MIN_ELEMENTS`).

    MLX's CPU backend runs each elementwise op on one core (BLAS alone uses them all), so
    row-wise work split over two streams takes about half the time on a multi-core CPU.
    ``fn`` must treat rows independently.
    """
    rows = arrays[0].shape[0]
    if (
        not on_cpu()
        or rows < 2
        or arrays[0].size < PARALLEL_MIN_ELEMENTS
        or (os.cpu_count() or 1) < 2
    ):
        return [fn(*arrays)]
    if not _streams:
        _streams.extend(mx.new_stream(mx.cpu) for _ in range(2))
    half = rows // 2
    parts = []
    for stream, (lo, hi) in zip(_streams, ((0, half), (half, rows)), strict=True):
        with mx.stream(stream):
            parts.append(fn(*(a[lo:hi] for a in arrays)))
    return parts


def joined_row_parts(parts: list[tuple[mx.array, ...]]) -> tuple[mx.array, ...]:
    """The outputs of :func:`parallel_row_parts`, each with its row parts joined again
    (lazily: an output nobody reads is never computed)."""
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(mx.concatenate(pieces) for pieces in zip(*parts, strict=True))


def exp(x: mx.array) -> mx.array:
    """exp(x), as ``2 ** (x * log2 e)`` on CPU: ~3x faster there, same float32 accuracy."""
    return mx.power(2.0, x * LOG2E) if on_cpu() else mx.exp(x)


def _sigmoid(x: mx.array) -> mx.array:
    # 2 ** (-x log2 e) overflows to inf for x < -88 and underflows to 0 for x > 88: exactly
    # the limits 0 and 1 that sigmoid rounds to there.
    return mx.reciprocal(1.0 + mx.power(2.0, x * -LOG2E))


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return gate * _sigmoid(gate) * up


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    """d/dgate = up * s * (1 + gate * (1 - s)) with s = sigmoid(gate); d/dup = silu(gate)."""
    gate, up = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * up * (s + silu * (1.0 - s)), cotangent * silu


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, the gated MLP activation of Llama/Qwen-style models."""
    if on_cpu():
        return _swiglu(gate, up)
    return nn.silu(gate) * up


def _expanded_mask(mask: Any, batch: int, kv_heads: int, repeats: int) -> Any:
    """A [B, 1|H, L, S] attention mask laid out as the grouped scores [B, KV, rep, L, S]."""
    if mask is None or not isinstance(mask, mx.array) or mask.ndim != 4:
        return mask
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, repeats, *mask.shape[2:])


def decode_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | None,
) -> mx.array:
    """Grouped-query attention of few queries against a KV cache, softmax through :func:`exp`.

    ``queries`` [B, H, L, D], ``keys`` [B, KV, S, D], ``values`` [B, KV, S, Dv] (Dv may
    differ from D, as in MLA); ``mask`` None, or a boolean (True = attend) or additive array
    broadcastable to [B, H, L, S]. Returns [B, H, L, Dv].
    """
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    repeats = heads // kv_heads
    grouped = (queries * scale).reshape(batch, kv_heads, repeats, length, dim)
    scores = grouped @ keys[:, :, None].swapaxes(-1, -2)
    mask = _expanded_mask(mask, batch, kv_heads, repeats)
    if isinstance(mask, mx.array):
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    peak = mx.max(scores, axis=-1, keepdims=True)
    weights = exp(scores - peak)
    weights = weights / mx.sum(weights, axis=-1, keepdims=True)
    out = weights.astype(values.dtype) @ values[:, :, None]
    return out.reshape(batch, heads, length, values.shape[-1])


def _probabilities_attention(mask: Any) -> Callable:
    """``(scaled queries, keys, values, bias) -> (output, probabilities)`` with a gradient
    that reuses the probabilities. A boolean ``mask`` is applied inside; an additive one comes
    in as ``bias``, an input with its own gradient (MLA passes its positional scores that way,
    so they must be differentiated); without one, ``bias`` is a zero and gets none."""
    keep = mask if isinstance(mask, mx.array) and mask.dtype == mx.bool_ else None
    additive = isinstance(mask, mx.array) and mask.dtype != mx.bool_

    @mx.custom_function
    def attend(queries: mx.array, keys: mx.array, values: mx.array, bias: mx.array):
        batch, heads, length, dim = queries.shape
        kv_heads = keys.shape[1]
        grouped = queries.reshape(batch, kv_heads, heads // kv_heads, length, dim)
        scores = grouped @ keys[:, :, None].swapaxes(-1, -2)
        if keep is not None:
            # The float minimum, as MLX's own fallback: a fully masked row stays finite.
            scores = mx.where(keep, scores, mx.finfo(scores.dtype).min)
        if additive:
            scores = scores + bias
        weights = exp(scores - mx.max(scores, axis=-1, keepdims=True))
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
        out = weights.astype(values.dtype) @ values[:, :, None]
        return out.reshape(batch, heads, length, values.shape[-1]), weights

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        # The probabilities are an output only for this: their own cotangent is ignored.
        queries, keys, values, bias = primals
        weights = outputs[1]
        batch, heads, length, dim = queries.shape
        kv_heads = keys.shape[1]
        groups = (batch, kv_heads, heads // kv_heads, length)
        grouped = queries.reshape(*groups, dim)
        grad_out = cotangents[0].reshape(*groups, values.shape[-1])  # MLA: Dv may differ
        grad_values = (weights.swapaxes(-1, -2) @ grad_out).sum(axis=2)
        grad_weights = grad_out @ values[:, :, None].swapaxes(-1, -2)
        grad_scores = weights * (
            grad_weights - mx.sum(grad_weights * weights, axis=-1, keepdims=True)
        )
        grad_queries = (grad_scores @ keys[:, :, None]).reshape(queries.shape)
        grad_keys = (grad_scores.swapaxes(-1, -2) @ grouped).sum(axis=2)
        grad_bias = _summed_to(grad_scores, bias.shape) if additive else mx.zeros_like(bias)
        return grad_queries, grad_keys, grad_values, grad_bias.astype(bias.dtype)

    return attend


def _summed_to(grad: mx.array, shape: tuple[int, ...]) -> mx.array:
    """``grad`` summed over the axes that ``shape`` broadcast over (the gradient of a
    broadcast)."""
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra > 0 else grad
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def sequence_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | str | None,
) -> mx.array:
    """Grouped-query attention of many queries (prefill, training), softmax through :func:`exp`.

    ``queries`` [B, H, L, D], ``keys``/``values`` [B, KV, S, D]; ``mask`` None, ``"causal"``
    (aligned to the last keys, as MLX's), or a boolean (True = attend) or additive array of
    2 or 4 dimensions broadcastable to [B, H, L, S]. Its gradient reuses the forward pass's
    probabilities instead of differentiating MLX's generic CPU fallback: about 1.5x faster
    forward and backward at the training shapes of Qwen2.5-0.5B, 1.75x forward only.
    """
    batch, heads, length, _ = queries.shape
    if isinstance(mask, str):
        keys_length = keys.shape[2]
        offset = keys_length - length
        mask = mx.arange(length)[:, None] + offset >= mx.arange(keys_length)[None]
    mask = _expanded_mask(mask, batch, keys.shape[1], heads // keys.shape[1])
    additive = isinstance(mask, mx.array) and mask.dtype != mx.bool_
    bias = mask if additive else mx.zeros((), dtype=queries.dtype)
    out, _ = _probabilities_attention(mask)(queries * scale, keys, values, bias)
    return out


def _attention_router(original: Callable) -> Callable:
    """mlx-lm's ``scaled_dot_product_attention`` signature: on CPU, single-query decode steps
    take :func:`decode_attention` and longer queries :func:`sequence_attention`; quantized
    caches, attention sinks, unusual masks and GPUs the original."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if (
            on_cpu()
            and sinks is None
            and not hasattr(cache, "bits")
            and queries.shape[1] % keys.shape[1] == 0
        ):
            if queries.shape[2] == 1 and (mask is None or isinstance(mask, mx.array)):
                return decode_attention(queries, keys, values, scale, mask)
            if (
                mask is None
                or (isinstance(mask, str) and mask == "causal")
                or (isinstance(mask, mx.array) and mask.ndim in (2, 4))
            ):
                return sequence_attention(queries, keys, values, scale, mask)
        if sinks is None:
            return original(queries, keys, values, cache, scale=scale, mask=mask)
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    return scaled_dot_product_attention


def _rebound_call(cls: type) -> Callable | None:
    """``cls.__call__`` with mlx-lm's swiglu / attention globals replaced, or None."""
    call = cls.__dict__.get("__call__")
    if not isinstance(call, types.FunctionType):
        return None
    names = set(call.__code__.co_names)
    replaced: dict[str, Any] = {}
    g = call.__globals__
    if "swiglu" in names and g.get("swiglu") is _mlx_lm_swiglu():
        replaced["swiglu"] = swiglu
    attention = g.get("scaled_dot_product_attention")
    if "scaled_dot_product_attention" in names and attention is _mlx_lm_attention():
        replaced["scaled_dot_product_attention"] = _attention_router(attention)
    if not replaced:
        return None
    rebound = types.FunctionType(
        call.__code__, {**g, **replaced}, call.__name__, call.__defaults__, call.__closure__
    )
    rebound.__kwdefaults__ = call.__kwdefaults__
    return rebound


def _mlx_lm_swiglu() -> Any:
    from mlx_lm.models import activations

    return getattr(activations, "swiglu", None)


def _mlx_lm_attention() -> Any:
    from mlx_lm.models import base

    return getattr(base, "scaled_dot_product_attention", None)


def _fast_call(cls: type) -> Callable | None:
    """The ``__call__`` of ``cls``'s CPU subclass, None when the class stays."""
    return _rebound_call(cls) if cls.__module__.startswith("mlx_lm.models.") else None


def _fast_class(cls: type) -> type | None:
    """The class to switch ``cls`` to, None when it stays (a switched class stays too)."""
    fast = subclass_with_call(cls, "Cpu", _fast_call)
    return fast if fast is not cls else None


def use_cpu_kernels(model: nn.Module) -> int:
    """Point the model's mlx-lm MLP and attention modules at this module's functions.

    Only classes whose ``__call__`` calls mlx-lm's own ``swiglu`` or
    ``scaled_dot_product_attention`` change (Llama, Qwen2/3, OLMo 2, Phi-3, ...); others are
    left alone. Safe to call twice. Returns the number of modules changed.
    """
    changed = 0
    for _, module in model.named_modules():
        fast = _fast_class(type(module))
        if fast is not None:
            module.__class__ = fast
            changed += 1
    return changed
