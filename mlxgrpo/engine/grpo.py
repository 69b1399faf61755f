"""GRPO math: token log-probs, group advantages, KL estimators and the clipped policy loss.

Pure functions over ``mx.array``; nothing here loads models, prints or touches the filesystem.

Batch layout shared by the whole engine: a micro-batch is ``tokens`` [N, T] int32, right-padded;
each row is prompt ids, then completion ids (the EOS token kept as the last completion token when
generation stopped), then padding. ``completion_mask`` [N, T] float32 is 1.0 exactly at
completion-token positions. The log-prob of token t is predicted from position t - 1. Log-probs
are only computed for positions ``start .. T-1`` where ``start = min(prompt_lengths)``, so every
per-token array here is [N, T - start]; slice the mask with :func:`completion_slice`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.errors import ConfigError

ScaleMode = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo"]

SCALE_MODES: tuple[str, ...] = ("group", "batch", "none")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"Unknown {kind} {value!r}.",
            hint=f"Use one of: {', '.join(choices)}.",
        )


# --------------------------------------------------------------------------- log-probs


_LOG2E = 1.4426950408889634


def _exp(x: mx.array) -> mx.array:
    """exp(x). On CPU as 2**(x*log2 e): MLX's CPU pow is ~3x faster than its exp (bench/),
    with the same float32 accuracy, and the log-prob code is bound by exps over the vocab."""
    if mx.default_device() == mx.cpu:
        return mx.power(2.0, x * _LOG2E)
    return mx.exp(x)


def _logsumexp(z: mx.array) -> mx.array:
    """logsumexp over the last axis, via :func:`_exp` (``z`` float32)."""
    peak = mx.stop_gradient(mx.max(z, axis=-1, keepdims=True))
    peak = mx.where(mx.isinf(peak), 0.0, peak)  # all -inf rows stay -inf, +inf stays +inf
    return (peak + mx.log(mx.sum(_exp(z - peak), axis=-1, keepdims=True))).squeeze(-1)


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
    z = logits.astype(mx.float32)
    z = z - mx.max(z, axis=-1, keepdims=True)
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
    return picked - log_norm.squeeze(-1), entropy, probs


def _add_at_targets(grad: mx.array, targets: mx.array, d_logp: mx.array) -> mx.array:
    index = targets[..., None]
    at_target = mx.take_along_axis(grad, index, axis=-1) + d_logp[..., None]
    return mx.put_along_axis(grad, index, at_target, axis=-1)


@mx.custom_function
def _logp_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    return _logp_entropy_probs(logits, targets)


@_logp_entropy.vjp
def _logp_entropy_vjp(primals, cotangents, outputs):
    """d logp/dz = onehot - p; dH/dz = -p (log p + H), with log p = z - logsumexp(z)."""
    logits, targets = primals
    d_logp, d_entropy = cotangents[0], cotangents[1]
    logp, entropy, probs = outputs
    z = logits.astype(mx.float32)
    picked = mx.take_along_axis(z, targets[..., None], axis=-1)
    log_probs = z - (picked - logp[..., None])
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
        logp, entropy, _ = _logp_entropy(logits, targets)
        return logp, entropy
    logp, entropy, _ = _logp_entropy_value(logits, targets)
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


@overload
def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: Literal[False] = False,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> mx.array: ...


@overload
def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: Literal[True],
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[mx.array, mx.array]: ...


def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> mx.array | tuple[mx.array, mx.array]:
    """Per-token log-probs of ``tokens[:, start:]`` with the whole prompt in context.

    Runs the model once over ``tokens[:, :-1]`` (mlx-lm call convention) and keeps positions
    ``start-1 .. T-2`` (those predicting ``tokens[:, start:]``). For mlx-lm architectures whose
    output is just ``lm_head(model.model(x))`` (see :func:`split_lm_head`) the LM head only runs
    on those positions; other models run whole and are sliced. ``chunk_size`` projects and
    normalises that many positions at a time, so the float32 logits stay bounded; the results
    are identical.

    Returns logp [N, T-start] float32, or ``(logp, entropy)`` when ``with_entropy`` is true
    (``entropy_grad=False``: the entropy is a metric, not differentiated).
    """
    length = tokens.shape[1]
    if not 1 <= start < length:
        raise ValueError(f"start must be in [1, {length - 1}] for {length} tokens, got {start}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    split = split_lm_head(model)
    if split is None:
        features, head = model(tokens[:, :-1])[:, start - 1 :], None
    else:
        trunk, head = split
        features = trunk(tokens[:, :-1])[:, start - 1 :]
    targets = tokens[:, start:]
    step = chunk_size or targets.shape[1]
    logps: list[mx.array] = []
    entropies: list[mx.array] = []
    for lo in range(0, targets.shape[1], step):
        chunk_logits = features[:, lo : lo + step]
        if head is not None:
            chunk_logits = head(chunk_logits)
        chunk_targets = targets[:, lo : lo + step]
        if with_entropy:
            logp, entropy = token_logprobs_and_entropy(
                chunk_logits, chunk_targets, entropy_grad=entropy_grad
            )
            entropies.append(entropy)
        else:
            logp = token_logprobs(chunk_logits, chunk_targets)
        logps.append(logp)
    logp = logps[0] if len(logps) == 1 else mx.concatenate(logps, axis=1)
    if not with_entropy:
        return logp
    entropy = entropies[0] if len(entropies) == 1 else mx.concatenate(entropies, axis=1)
    return logp, entropy


# mlx-lm model modules whose Model.__call__ is exactly `head(self.model(inputs, cache))`, the
# head being `model.embed_tokens.as_linear` when embeddings are tied, else `lm_head`.
_PLAIN_HEAD_MODULES = frozenset(
    {"llama", "qwen2", "qwen3", "qwen3_moe", "olmo2", "smollm3", "phi3"}
)


def split_lm_head(model: nn.Module) -> tuple[Callable, Callable] | None:
    """``(trunk, head)`` with ``model(x) == head(trunk(x))``, or None when unknown.

    Lets callers apply the (vocabulary-sized, often dominant) LM head to the positions they
    need only. Looked up on every call, so swapped adapter modules are honoured.
    """
    package, _, name = type(model).__module__.rpartition(".")
    if package != "mlx_lm.models" or name not in _PLAIN_HEAD_MODULES:
        return None
    trunk = getattr(model, "model", None)
    if trunk is None:
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        return trunk, trunk.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return (trunk, head) if head is not None else None


# --------------------------------------------------------------------------- advantages


def _grouped(rewards: mx.array, group_size: int) -> mx.array:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be flat [B*G], got shape {rewards.shape}")
    if group_size < 1 or rewards.size % group_size != 0:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
    return rewards.astype(mx.float32).reshape(-1, group_size)


def group_advantages(
    rewards: mx.array,
    group_size: int,
    scale: ScaleMode = "group",
    eps: float = 1e-4,
) -> mx.array:
    """Group-relative advantages for flat rewards [B*G] whose groups are contiguous.

    - ``group``: ``(r - mean_g) / (std_g + eps)``
    - ``batch``: ``(r - mean_g) / (std_batch + eps)``, std over all B*G rewards
    - ``none``:  ``r - mean_g``

    Standard deviations are population std (ddof=0). Returns float32 [B*G]. A group whose
    rewards are all equal gets advantage 0 in every mode.
    """
    _check_choice("reward scaling", scale, SCALE_MODES)
    grouped = _grouped(rewards, group_size)
    centred = grouped - mx.mean(grouped, axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (mx.sqrt(mx.var(grouped, axis=1, keepdims=True)) + eps)
    elif scale == "batch":
        centred = centred / (mx.sqrt(mx.var(grouped)) + eps)
    return centred.reshape(-1)


def zero_std_group_mask(rewards: mx.array, group_size: int, atol: float = 1e-6) -> mx.array:
    """Bool [B]: true for groups whose G rewards are all equal (within ``atol``).

    Such groups have zero advantage and teach nothing. ``mx.repeat(mask, group_size)`` gives
    the per-sequence mask.
    """
    grouped = _grouped(rewards, group_size)
    spread = mx.max(grouped, axis=1) - mx.min(grouped, axis=1)
    return spread <= atol


def mask_truncated_advantages(advantages: mx.array, truncated: mx.array) -> mx.array:
    """Zero the advantage of completions that hit the token limit (``truncated`` bool [B*G])."""
    return mx.where(truncated, mx.zeros_like(advantages), advantages)


# --------------------------------------------------------------------------- KL


def kl_per_token(logp: mx.array, ref_logp: mx.array, estimator: KLEstimator = "k3") -> mx.array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    - ``k1``: ``logp - ref`` (unbiased, can be negative)
    - ``k2``: ``0.5 * (logp - ref)**2``
    - ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0)
    """
    _check_choice("KL estimator", estimator, KL_ESTIMATORS)
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff * diff
    # expm1 keeps precision when ref ~ logp; the clamp only removes rounding below zero.
    return mx.maximum(mx.expm1(-diff) + diff, 0.0)


# --------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossNorm:
    """Normalisers describing the WHOLE update (all micro-batches of one optimizer step).

    :func:`policy_loss` divides each micro-batch's summed token losses by these totals, so the
    micro-batch losses (and gradients) simply add up to the loss of the update computed in one
    go:

    - ``grpo``/``gspo``: sum_i (sum_t l_t / |o_i|) / ``num_sequences``
    - ``dr_grpo``: sum l / (``num_sequences`` * ``max_new_tokens``)
    - ``dapo``: sum l / ``num_tokens``
    - ``bnpo``: (sum l / sum m of this micro-batch) / ``num_microbatches`` (bnpo is defined per
      micro-batch; with equal micro-batches this is the mean of the micro-batch losses)
    """

    num_sequences: int
    num_tokens: int
    num_microbatches: int
    max_new_tokens: int

    @classmethod
    def for_update(cls, masks: Sequence[mx.array], max_new_tokens: int) -> LossNorm:
        """Build from the completion masks ([N_k, *]) of every micro-batch of the update."""
        if len(masks) == 0:
            raise ValueError("an update needs at least one micro-batch mask")
        num_tokens = sum(int(round(mx.sum(m).item())) for m in masks)
        return cls(
            num_sequences=sum(int(m.shape[0]) for m in masks),
            num_tokens=num_tokens,
            num_microbatches=len(masks),
            max_new_tokens=max_new_tokens,
        )


def _log_ratios(
    logp: mx.array, old_logp: mx.array, mask: mx.array, sequence_level: bool
) -> mx.array:
    """Per-token log importance ratios; for GSPO the (value) sequence ratio on every token."""
    log_ratio = logp - old_logp
    if not sequence_level:
        return log_ratio
    lengths = mx.maximum(mx.sum(mask, axis=1), 1.0)
    seq_log_ratio = mx.sum(log_ratio * mask, axis=1) / lengths
    # GSPO-token form: value s_i on every token, gradient s_i * d logp_t (then averaged per
    # sequence, which equals d s_i).
    return mx.stop_gradient(seq_log_ratio)[:, None] + logp - mx.stop_gradient(logp)


def _aggregate(token_loss: mx.array, mask: mx.array, loss_type: str, norm: LossNorm) -> mx.array:
    """This micro-batch's contribution to the update's loss (see :class:`LossNorm`)."""
    masked = token_loss * mask
    if loss_type in ("grpo", "gspo"):
        lengths = mx.maximum(mx.sum(mask, axis=1), 1.0)
        return mx.sum(mx.sum(masked, axis=1) / lengths) / norm.num_sequences
    if loss_type == "bnpo":
        return mx.sum(masked) / mx.maximum(mx.sum(mask), 1.0) / norm.num_microbatches
    if loss_type == "dr_grpo":
        return mx.sum(masked) / (norm.num_sequences * norm.max_new_tokens)
    return mx.sum(masked) / max(norm.num_tokens, 1)


def _token_share(values: mx.array, mask: mx.array, norm: LossNorm) -> mx.array:
    """Masked sum / all completion tokens of the update: sums over micro-batches to the mean."""
    return mx.stop_gradient(mx.sum(values * mask) / max(norm.num_tokens, 1))


def _validate_loss_inputs(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array
) -> None:
    if logp.ndim != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {logp.shape}, old_logp {old_logp.shape} and mask {mask.shape} "
            "must share one [N, L] shape"
        )
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be [N]={logp.shape[0]}, got {advantages.shape}")


def policy_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    *,
    norm: LossNorm,
    loss_type: LossType = "grpo",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coeff: float = 0.0,
    ref_logp: mx.array | None = None,
    kl_estimator: KLEstimator = "k3",
    entropy: mx.array | None = None,
    entropy_coeff: float = 0.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped GRPO-family policy loss for one micro-batch.

    Per token: ``r = exp(logp - old_logp)``, ``surrogate = min(r*A, clip(r, 1-eps_low,
    1+eps_high)*A)``, ``l = -(surrogate - kl_coeff*KL) - entropy_coeff*H``. ``gspo`` replaces
    ``r`` by the sequence ratio ``exp(mean_t(logp - old_logp))`` (clipped per sequence).

    Shapes: ``logp``, ``old_logp``, ``mask``, ``ref_logp``, ``entropy`` [N, L] (the mask sliced
    with :func:`completion_slice`); ``advantages`` [N]. ``old_logp=None`` means on-policy
    (``num_iterations = 1``): the stop-gradient of ``logp``, so the ratio is exactly 1.

    Returns ``(loss, metrics)``. ``loss`` is this micro-batch's contribution to the update's
    loss as normalised by ``norm``: summing it over the update's micro-batches gives the loss of
    the whole update. ``metrics`` (stop-gradient scalars) follow the same rule, each being this
    micro-batch's share of a mean over all completion tokens of the update, so they too are
    summed over micro-batches: ``clip_low`` (ratio < 1-eps_low with A < 0), ``clip_high``
    (ratio > 1+eps_high with A > 0), ``ratio``, plus ``kl`` when ``ref_logp`` is given and
    ``entropy`` when ``entropy`` is given.
    """
    _check_choice("loss type", loss_type, LOSS_TYPES)
    _check_choice("KL estimator", kl_estimator, KL_ESTIMATORS)
    if old_logp is None:
        old_logp = logp
    _validate_loss_inputs(logp, old_logp, advantages, mask)
    if kl_coeff != 0.0 and ref_logp is None:
        raise ValueError("kl_coeff != 0 needs ref_logp")
    if entropy_coeff != 0.0 and entropy is None:
        raise ValueError("entropy_coeff != 0 needs entropy")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.astype(mx.float32)
    old_logp = mx.stop_gradient(old_logp)

    ratio = mx.exp(_log_ratios(logp, old_logp, mask, sequence_level=loss_type == "gspo"))
    adv = advantages.astype(mx.float32)[:, None]
    surrogate = mx.minimum(ratio * adv, mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    token_loss = -surrogate

    metrics: dict[str, mx.array] = {
        "clip_low": _token_share((ratio < 1.0 - eps_low) & (adv < 0), mask, norm),
        "clip_high": _token_share((ratio > 1.0 + eps_high) & (adv > 0), mask, norm),
        "ratio": _token_share(ratio, mask, norm),
    }
    if ref_logp is not None:
        kl = kl_per_token(logp, mx.stop_gradient(ref_logp), kl_estimator)
        token_loss = token_loss + kl_coeff * kl
        metrics["kl"] = _token_share(kl, mask, norm)
    if entropy is not None:
        token_loss = token_loss - entropy_coeff * entropy
        metrics["entropy"] = _token_share(entropy, mask, norm)
    return _aggregate(token_loss, mask, loss_type, norm), metrics
