"""GRPO math: group advantages, KL estimators and the clipped policy loss.

Pure functions over ``mx.array``; nothing here loads models, prints or touches the filesystem.
The token log-probs live in :mod:`~mlxgrpo.generation.logprobs` (math) and
:mod:`~mlxgrpo.engine.memory.lm_head` (applied to a model).

Batch layout shared by the whole engine: a micro-batch is ``tokens`` [N, T] int32, right-padded;
each row is prompt ids, then completion ids (the EOS token kept as the last completion token when
generation stopped), then padding. ``completion_mask`` [N, T] float32 is 1.0 exactly at
completion-token positions. The log-prob of token t is predicted from position t - 1. Log-probs
are only computed for positions ``start .. T-1`` where ``start = min(prompt_lengths)``, so every
per-token array here is [N, T - start]; slice the mask with
:func:`~mlxgrpo.generation.logprobs.completion_slice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlxgrpo.config.choices import (
    IMPORTANCE_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    ROLLOUT_CORRECTIONS,
    SCALE_MODES,
    ImportanceLevel,
    KLEstimator,
    LossType,
    RolloutCorrection,
    ScaleMode,
)
from mlxgrpo.errors import ConfigError

__all__ = [
    "LossNorm",
    "entropy_threshold",
    "group_advantages",
    "kl_per_token",
    "mask_truncated_advantages",
    "off_policy_mask",
    "policy_loss",
    "rollout_correction_factor",
    "sapo_gate",
    "zero_std_group_mask",
]


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"Unknown {kind} {value!r}.",
            hint=f"Use one of: {', '.join(choices)}.",
        )


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


def kl_per_token(
    logp: mx.array,
    ref_logp: mx.array,
    estimator: KLEstimator = "k3",
    ratio: mx.array | None = None,
) -> mx.array:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    - ``k1``: ``logp - ref`` (unbiased, can be negative)
    - ``k2``: ``0.5 * (logp - ref)**2``
    - ``k3``: ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0)
    - ``k3_is``: ``k3`` times the importance ratio ``ratio`` (pi / pi_old, with its gradient):
      TRL's bias-corrected KL (``use_bias_correction_kl``) for tokens sampled from pi_old
    """
    _check_choice("KL estimator", estimator, KL_ESTIMATORS)
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff * diff
    # expm1 keeps precision when ref ~ logp; the clamp only removes rounding below zero.
    k3 = mx.maximum(mx.expm1(-diff) + diff, 0.0)
    if estimator == "k3_is":
        if ratio is None:
            raise ValueError("the k3_is KL estimator needs the importance ratio")
        return k3 * ratio
    return k3


# --------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossNorm:
    """Normalisers describing the WHOLE update (all micro-batches of one optimizer step).

    :func:`policy_loss` divides each micro-batch's summed token losses by these totals, so the
    micro-batch losses (and gradients) simply add up to the loss of the update computed in one
    go:

    - ``grpo``/``gspo``/``sapo``: sum_i (sum_t l_t / |o_i|) / ``num_sequences``
    - ``dr_grpo``: sum l / (``num_sequences`` * ``max_new_tokens``)
    - ``dapo``/``cispo``: sum l / ``num_tokens``
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
    if loss_type in ("grpo", "gspo", "sapo"):
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


def _sequence_sums(values: mx.array, mask: mx.array) -> mx.array:
    """Per-row masked sums, broadcast back over the row's tokens."""
    return mx.sum(values * mask, axis=1, keepdims=True) * mx.ones_like(values)


def rollout_correction_factor(
    old_logp: mx.array,
    sampler_logp: mx.array,
    mask: mx.array,
    *,
    kind: RolloutCorrection,
    cap: float,
    level: ImportanceLevel = "token",
    low: float = 0.0,
) -> tuple[mx.array, mx.array]:
    """``(factor, corrected)`` [N, L] for a sampler that differs from the trainer.

    The weight is ``w = pi_old / pi_sampler`` per token (``level="token"``) or the product
    over the sequence (``"sequence"``, the same value on every token of a row). With the
    bounds ``[low, cap]``:

    - ``tis`` (truncated importance sampling): ``clip(w, low, cap)``;
    - ``mis`` (masked importance sampling, as the paper that named it and TRL's ``*_mask``
      modes define it): ``w`` inside the bounds, 0 outside;
    - ``reject``: 1 inside the bounds, 0 outside (rejection without a weight).

    ``corrected`` marks where a bound acted. Both are constants for autodiff.
    """
    _check_choice("rollout correction", kind, ROLLOUT_CORRECTIONS)
    _check_choice("importance-sampling level", level, IMPORTANCE_LEVELS)
    log_w = mx.stop_gradient(old_logp) - sampler_logp
    if level == "sequence":
        log_w = _sequence_sums(log_w, mask)
    w = mx.exp(log_w)  # may overflow to inf: every rule clamps or masks it past the cap
    corrected = (w > cap) | (w < low)
    if kind == "tis":
        factor = mx.clip(w, low, cap)
    elif kind == "mis":
        factor = mx.where(corrected, 0.0, w)
    elif kind == "reject":
        factor = (~corrected).astype(mx.float32)
    else:
        factor, corrected = mx.ones_like(w), mx.zeros(w.shape, dtype=mx.bool_)
    return mx.stop_gradient(factor), corrected


def entropy_threshold(entropies: Any, quantile: float) -> float:
    """The entropy at or above which a token is in the top ``quantile`` share of ``entropies``.

    ``quantile`` 0.2 keeps the highest-entropy 20% ("Beyond the 80/20 rule", Wang et al.
    2025); 1.0 keeps every token. Linear interpolation between order statistics (numpy's
    default), so exactly the tokens with ``entropy >= threshold`` are kept.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    values = np.asarray(entropies, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return 0.0
    if quantile >= 1.0:
        return float(values.min())
    return float(np.quantile(values, 1.0 - quantile))


def sapo_gate(ratio: mx.array, advantages: mx.array, tau_pos: float, tau_neg: float) -> mx.array:
    """SAPO's soft gate ``sigmoid(tau (r - 1)) * 4 / tau``, tau by the advantage's sign.

    Its slope at r = 1 is 1, so on-policy it gives the plain policy gradient; away from 1 it
    fades smoothly instead of stopping at a clip boundary.
    """
    tau = mx.where(advantages > 0, tau_pos, tau_neg)
    return mx.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


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
    importance_sampling_level: ImportanceLevel = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    sampler_logp: mx.array | None = None,
    rollout_correction: RolloutCorrection = "none",
    rollout_correction_cap: float = 2.0,
    rollout_correction_level: ImportanceLevel = "token",
    policy_mask: mx.array | None = None,
    rollout_correction_min: float = 0.0,
    delta: float | None = None,
    off_policy_mask_threshold: float | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """GRPO-family policy loss for one micro-batch: ``(loss, metrics)``.

    Per token, with ``r = exp(logp - old_logp)`` and ``A`` the advantage, the policy term is
    ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`` for the clipped losses (``grpo``, ``bnpo``,
    ``dr_grpo``, ``dapo``, ``gspo``; the unclipped ``r`` capped at ``delta`` when given, as
    INTELLECT-2's two-sided clip), ``-sg(min(r, 1+eps_high)) * A * logp`` for ``cispo``
    (MiniMax-M1: no token loses its gradient) and ``-sapo_gate(r) * A`` for ``sapo``.
    ``importance_sampling_level="sequence"`` (always for ``gspo``) uses the sequence ratio
    ``exp(mean_t(logp - old_logp))`` with the GSPO-token gradient. The rollout correction
    (:func:`rollout_correction_factor`), ``policy_mask`` (e.g. the top-entropy tokens) and the
    off-policy sequence mask (:func:`off_policy_mask`) act on the policy term only; then
    ``+ kl_coeff * KL - entropy_coeff * H`` over every token.

    Shapes: ``logp``, ``old_logp``, ``mask``, ``ref_logp``, ``entropy``, ``sampler_logp``,
    ``policy_mask`` [N, L] (the mask sliced with
    :func:`~mlxgrpo.generation.logprobs.completion_slice`); ``advantages`` [N].
    ``old_logp=None`` means on-policy: the stop-gradient of ``logp`` (ratio exactly 1).

    ``loss`` is this micro-batch's share of the update's loss as normalised by ``norm``, so the
    micro-batches' losses add up to the update's. ``metrics`` (stop-gradient scalars) add up the
    same way, each a share of a mean over the update's completion tokens: ``clip_low`` (ratio <
    1-eps_low with A < 0), ``clip_high`` (ratio > 1+eps_high with A > 0; for ``cispo`` any
    ratio above its cap), ``ratio``, and ``kl``, ``entropy``, ``rollout_corrected``,
    ``policy_tokens``, ``off_policy_masked`` where they apply.
    """
    _check_loss_choices(loss_type, kl_estimator, importance_sampling_level)
    old_logp = logp if old_logp is None else old_logp
    _validate_loss_inputs(logp, old_logp, advantages, mask)
    _require_inputs(kl_coeff, ref_logp, entropy_coeff, entropy, rollout_correction, sampler_logp)
    mask, old_logp = mask.astype(mx.float32), mx.stop_gradient(old_logp)
    sequence_level = importance_sampling_level == "sequence" or loss_type == "gspo"
    ratio = mx.exp(_log_ratios(logp, old_logp, mask, sequence_level=sequence_level))
    clips, taus = (clip_eps, clip_eps_high, delta), (sapo_tau_pos, sapo_tau_neg)
    pg, clipped_low, clipped_high = _policy_term(loss_type, logp, ratio, advantages, clips, taus)
    metrics: dict[str, mx.array] = {
        "clip_low": _token_share(clipped_low, mask, norm),
        "clip_high": _token_share(clipped_high, mask, norm),
        "ratio": _token_share(ratio, mask, norm),
    }
    bounds = (rollout_correction_min, rollout_correction_cap)
    pg = _masked_policy_term(
        pg,
        (logp, old_logp, sampler_logp, advantages, mask),
        (rollout_correction, bounds, rollout_correction_level),
        policy_mask,
        off_policy_mask_threshold,
        (norm, metrics),
    )
    kl = None
    if ref_logp is not None:
        kl = kl_per_token(logp, mx.stop_gradient(ref_logp), kl_estimator, ratio)
    token_loss = _with_regularisers(pg, kl, kl_coeff, entropy, entropy_coeff, mask, norm, metrics)
    return _aggregate(token_loss, mask, loss_type, norm), metrics


def _masked_policy_term(
    pg: mx.array,
    arrays: tuple[mx.array, mx.array, mx.array | None, mx.array, mx.array],
    correction: tuple[RolloutCorrection, tuple[float, float], ImportanceLevel],
    policy_mask: mx.array | None,
    off_policy_threshold: float | None,
    report: tuple[LossNorm, dict[str, mx.array]],
) -> mx.array:
    """``pg`` with the rollout correction, ``policy_mask`` and the off-policy sequence mask
    applied (each where set), their shares recorded in the metrics. ``arrays`` is ``(logp,
    old_logp, sampler_logp, advantages, mask)``, ``report`` is ``(norm, metrics)``."""
    logp, old_logp, sampler_logp, advantages, mask = arrays
    norm, metrics = report
    if correction[0] != "none":
        assert sampler_logp is not None
        pg = _rollout_corrected(pg, old_logp, sampler_logp, mask, norm, correction, metrics)
    if policy_mask is not None:
        pg = pg * mx.stop_gradient(policy_mask.astype(mx.float32))
        metrics["policy_tokens"] = _token_share(policy_mask, mask, norm)
    if off_policy_threshold is not None:
        sampled = old_logp if sampler_logp is None else sampler_logp
        kept = off_policy_mask(logp, sampled, advantages, mask, off_policy_threshold)
        pg = pg * kept
        metrics["off_policy_masked"] = _token_share(1.0 - kept, mask, norm)
    return pg


def _check_loss_choices(loss_type: str, kl_estimator: str, importance_level: str) -> None:
    _check_choice("loss type", loss_type, LOSS_TYPES)
    _check_choice("KL estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("importance-sampling level", importance_level, IMPORTANCE_LEVELS)


def _require_inputs(
    kl_coeff: float,
    ref_logp: mx.array | None,
    entropy_coeff: float,
    entropy: mx.array | None,
    rollout_correction: str,
    sampler_logp: mx.array | None,
) -> None:
    """Each optional input that a setting of :func:`policy_loss` relies on is given."""
    if kl_coeff != 0.0 and ref_logp is None:
        raise ValueError("kl_coeff != 0 needs ref_logp")
    if entropy_coeff != 0.0 and entropy is None:
        raise ValueError("entropy_coeff != 0 needs entropy")
    if rollout_correction != "none" and sampler_logp is None:
        raise ValueError("a rollout correction needs sampler_logp")


def _policy_term(
    loss_type: str,
    logp: mx.array,
    ratio: mx.array,
    advantages: mx.array,
    clip: tuple[float, float | None, float | None],
    sapo_taus: tuple[float, float],
) -> tuple[mx.array, mx.array, mx.array]:
    """``(pg, clipped_low, clipped_high)`` [N, L]: the loss type's policy term per token (see
    :func:`policy_loss`) and where its clip acted. ``clip`` is ``(clip_eps, clip_eps_high,
    delta)``, the upper range None for the lower one, delta None for no cap."""
    eps_low, delta = clip[0], clip[2]
    eps_high = eps_low if clip[1] is None else clip[1]
    adv = advantages.astype(mx.float32)[:, None]
    if loss_type == "cispo":
        pg = -mx.stop_gradient(mx.minimum(ratio, 1.0 + eps_high)) * adv * logp
        return pg, mx.zeros(ratio.shape, dtype=mx.bool_), ratio > 1.0 + eps_high
    if loss_type == "sapo":
        unclipped = mx.zeros(ratio.shape, dtype=mx.bool_)
        return -sapo_gate(ratio, adv, *sapo_taus) * adv, unclipped, unclipped
    unclipped = ratio if delta is None else mx.minimum(ratio, delta)
    pg = -mx.minimum(unclipped * adv, mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    return pg, (ratio < 1.0 - eps_low) & (adv < 0), (ratio > 1.0 + eps_high) & (adv > 0)


def off_policy_mask(
    logp: mx.array,
    sampler_logp: mx.array,
    advantages: mx.array,
    mask: mx.array,
    threshold: float,
) -> mx.array:
    """DeepSeek-V3.2's off-policy sequence mask [N, 1] (TRL's ``off_policy_mask_threshold``):
    0 for a completion with a negative advantage whose mean per-token ``sampler_logp - logp``
    (how far the policy drifted from what sampled it) exceeds ``threshold``, else 1. A
    constant for autodiff."""
    drift = mx.stop_gradient(sampler_logp - logp) * mask
    mean = mx.sum(drift, axis=1, keepdims=True) / mx.maximum(mx.sum(mask, axis=1, keepdims=True), 1)
    keep = (advantages[:, None] >= 0) | (mean <= threshold)
    return mx.stop_gradient(keep.astype(mx.float32))


def _rollout_corrected(
    pg: mx.array,
    old_logp: mx.array,
    sampler_logp: mx.array,
    mask: mx.array,
    norm: LossNorm,
    correction: tuple[RolloutCorrection, tuple[float, float], ImportanceLevel],
    metrics: dict[str, mx.array],
) -> mx.array:
    """``pg`` times the rollout correction's factor; records ``rollout_corrected`` in
    ``metrics``. ``correction`` is ``(kind, (low, cap), level)``."""
    kind, (low, cap), level = correction
    factor, corrected = rollout_correction_factor(
        old_logp, sampler_logp, mask, kind=kind, cap=cap, level=level, low=low
    )
    metrics["rollout_corrected"] = _token_share(corrected, mask, norm)
    return pg * factor


def _with_regularisers(
    pg: mx.array,
    kl: mx.array | None,
    kl_coeff: float,
    entropy: mx.array | None,
    entropy_coeff: float,
    mask: mx.array,
    norm: LossNorm,
    metrics: dict[str, mx.array],
) -> mx.array:
    """The per-token loss: ``pg + kl_coeff*kl - entropy_coeff*entropy`` (each term when given);
    records ``kl`` and ``entropy`` in ``metrics``."""
    token_loss = pg
    if kl is not None:
        token_loss = token_loss + kl_coeff * kl
        metrics["kl"] = _token_share(kl, mask, norm)
    if entropy is not None:
        token_loss = token_loss - entropy_coeff * entropy
        metrics["entropy"] = _token_share(entropy, mask, norm)
    return token_loss
