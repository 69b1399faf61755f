"""Token log-probs and entropies from logits: the float32 math under the GRPO loss.

Pure functions over ``mx.array``. Log-probs are ``z[target] - logsumexp(z)`` in float32; a full
[..., V] log-softmax is never kept. :mod:`mlxgrpo.engine.memory.lm_head` applies them to a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

# On CPU as 2**(x*log2 e): the log-prob code is bound by exps over the vocabulary.
from mlxgrpo.models.cpu_kernels import exp as _exp


def _logsumexp(z: mx.array) -> mx.array:
    """logsumexp over the last axis, via :func:`_exp` (``z`` float32)."""
    peak = mx.stop_gradient(mx.max(z, axis=-1, keepdims=True))
    peak = mx.where(mx.isinf(peak), 0.0, peak)  # all -inf rows stay -inf, +inf stays +inf
    return (peak + mx.log(mx.sum(_exp(z - peak), axis=-1, keepdims=True))).squeeze(-1)


def tempered(logits: mx.array, temperature: float) -> mx.array:
    """float32 ``logits / temperature``: the one expression the sampler and the trainer share,
    so that their log-probs of a token agree to the last bit of the scaling."""
    scores = logits.astype(mx.float32)
    return scores if temperature == 1.0 else scores * (1.0 / temperature)


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """Log-probability of ``targets`` under ``logits``: ``z[target] - logsumexp(z)``.

    ``logits`` [..., V] may be any float dtype; the result [...] is always float32. Only the
    per-position log-normaliser is kept, never a full [..., V] log-softmax.
    """
    # The gather is exact in the input dtype; only the logsumexp needs float32.
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    log_norm = _logsumexp(logits.astype(mx.float32))
    return picked.astype(mx.float32) - log_norm


def _logp_entropy_probs(logits: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    """(logp, entropy, probs, peak, log_norm): the last three are kept for the backward pass."""
    z = logits.astype(mx.float32)
    peak = mx.max(z, axis=-1, keepdims=True)
    z = z - peak
    # One exp pass serves the normaliser, the entropy and (kept for the backward pass) the
    # probabilities: exp is the costly op on CPU.
    e = _exp(z)
    total = mx.sum(e, axis=-1, keepdims=True)
    log_norm = mx.log(total)
    probs = e / total
    # 0 * (-inf) would be NaN for masked-out vocabulary entries; they contribute nothing.
    weighted = mx.where(probs > 0, probs * z, 0.0)
    entropy = log_norm.squeeze(-1) - mx.sum(weighted, axis=-1)
    picked = mx.take_along_axis(z, targets[..., None], axis=-1).squeeze(-1)
    return picked - log_norm.squeeze(-1), entropy, probs, peak, log_norm


def _add_at_targets(grad: mx.array, targets: mx.array, d_logp: mx.array) -> mx.array:
    index = targets[..., None]
    at_target = mx.take_along_axis(grad, index, axis=-1) + d_logp[..., None]
    return mx.put_along_axis(grad, index, at_target, axis=-1)


@mx.custom_function
def _logp_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    return _logp_entropy_probs(logits, targets)


@_logp_entropy.vjp
def _logp_entropy_vjp(primals, cotangents, outputs):
    """d logp/dz = onehot - p; dH/dz = -p (log p + H).

    log p is rebuilt as the forward pass had it, ``(z - peak) - log_norm``: rebuilding it from
    the unshifted logits (``z - logsumexp(z)``) cancels two large numbers and loses digits when
    logits are large.
    """
    logits, targets = primals
    d_logp, d_entropy = cotangents[0], cotangents[1]
    _, entropy, probs, peak, log_norm = outputs
    log_probs = (logits.astype(mx.float32) - peak) - log_norm
    spread = mx.where(probs > 0, log_probs + entropy[..., None], 0.0)
    grad = -probs * (d_logp[..., None] + d_entropy[..., None] * spread)
    grad = _add_at_targets(grad, targets, d_logp)
    return grad.astype(logits.dtype), mx.zeros_like(targets)


@mx.custom_function
def _logp_entropy_value(logits: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    return _logp_entropy_probs(logits, targets)


@_logp_entropy_value.vjp
def _logp_entropy_value_vjp(primals, cotangents, outputs):
    """Only logp is differentiated: d logp/dz = onehot - p."""
    logits, targets = primals
    d_logp = cotangents[0]
    grad = _add_at_targets(-outputs[2] * d_logp[..., None], targets, d_logp)
    return grad.astype(logits.dtype), mx.zeros_like(targets)


def token_logprobs_and_entropy(
    logits: mx.array, targets: mx.array, entropy_grad: bool = True
) -> tuple[mx.array, mx.array]:
    """Like :func:`token_logprobs`, plus the entropy of each position's distribution.

    ``H = logsumexp(z) - sum(softmax(z) * z)``, computed in float32 on max-shifted logits so
    large-magnitude logits do not cancel catastrophically. Returns ``(logp, entropy)``, both
    float32 with shape ``targets.shape``. The gradient is hand-written: one exp pass in all,
    the probabilities being kept for the backward pass. With ``entropy_grad=False`` the entropy
    is a stop-gradient value (a metric) and the backward pass skips its term.
    """
    if entropy_grad:
        logp, entropy, *_ = _logp_entropy(logits, targets)
        return logp, entropy
    logp, entropy, *_ = _logp_entropy_value(logits, targets)
    return logp, mx.stop_gradient(entropy)


def first_completion_position(prompt_lengths: Sequence[int]) -> int:
    """``start`` for a micro-batch: the shortest prompt length (the first completion position)."""
    if len(prompt_lengths) == 0:
        raise ValueError("prompt_lengths is empty")
    start = int(min(prompt_lengths))
    if start < 1:
        raise ValueError(f"every prompt needs at least one token (shortest has {start})")
    return start


def completion_slice(x: mx.array, start: int) -> mx.array:
    """Align a [N, T] array (e.g. ``completion_mask``) with the [N, T - start] log-probs."""
    return x[:, start:]
