"""Learning health: the failures GRPO users keep reporting, said once, with the likely cause
and the setting to change.

A run can finish every update and learn nothing. :class:`HealthWatch` reads each update's
metrics (and, for the adapters, the weights) and names such a run early:

- ``no_signal``: nearly every group's completions all got one reward, update after update;
- ``adapters_unmoved``: every LoRA B matrix still exactly zero after several updates;
- ``zero_gradient``: a gradient norm of exactly 0, update after update;
- ``clip_saturated``: nearly every token's ratio clipped, update after update;
- ``entropy_collapse``: the sampling entropy fell to about 0 within the first updates;
- ``mismatch_growing``: the sampler's and the trainer's log-probs drift apart.

Each warning is returned once per run (the trainer shows it and writes its key into that
update's ``health`` metric); none stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STREAK = 5  # updates a condition must hold in a row before it is named
NO_SIGNAL_SHARE = 0.9  # share of groups with a single reward
CLIP_SHARE = 0.8  # share of tokens clipped
EARLY_UPDATES = 10  # entropy collapse counts within these
COLLAPSED_ENTROPY = 0.05  # nats
MISMATCH_FLOOR = 1e-3  # a mean |log-prob gap| below this is float noise
MISMATCH_GROWTH = 10.0  # times its first value


@dataclass
class HealthWatch:
    """Feed it every update (:meth:`check`); it returns the warnings not yet given."""

    given: set[str] = field(default_factory=set)
    streaks: dict[str, int] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)

    def check(self, update: int, metrics: dict[str, Any], model: Any = None) -> dict[str, str]:
        """``{key: message}`` for the conditions that this update makes true for the first
        time in the run."""
        found = {}
        for key, message in self._conditions(update, metrics, model):
            if key not in self.given:
                self.given.add(key)
                found[key] = message
        return found

    def _streak(self, key: str, holds: bool) -> int:
        self.streaks[key] = self.streaks.get(key, 0) + 1 if holds else 0
        return self.streaks[key]

    def _conditions(self, update: int, m: dict[str, Any], model: Any) -> list[tuple[str, str]]:
        out = []
        if self._streak("no_signal", _number(m, "zero_std_groups") >= NO_SIGNAL_SHARE) >= STREAK:
            out.append(("no_signal", (
                f"trains but does not learn: {STREAK} updates in a row had "
                f"{NO_SIGNAL_SHARE:.0%}+ of their groups give every completion one reward, so "
                "their advantages are 0; raise rollout.temperature or rollout.num_generations, "
                "or use easier prompts (or an SFT warm-up) so that some completions succeed"
            )))  # fmt: skip
        stepped = not m.get("skipped") and not m.get("nonfinite_skipped")
        zero_grad = stepped and _number(m, "grad_norm", 1.0) == 0.0
        if self._streak("zero_gradient", zero_grad) >= STREAK:
            out.append(("zero_gradient", (
                f"the gradient norm was exactly 0 for {STREAK} updates in a row: nothing reaches "
                "the weights; check zero_std_groups, the reward functions' spread and "
                "finetune.lora_layers"
            )))  # fmt: skip
        clipped = _number(m, "clip_low") + _number(m, "clip_high")
        if self._streak("clip_saturated", clipped >= CLIP_SHARE) >= STREAK:
            out.append(("clip_saturated", (
                f"{clipped:.0%} of the tokens had their ratio clipped, {STREAK} updates in a "
                "row: each step moves the policy too far; lower optim.learning_rate or "
                "algorithm.num_iterations"
            )))  # fmt: skip
        out += self._entropy(update, m) + self._mismatch(m)
        if update >= STREAK and model is not None and self._adapters_unmoved(model):
            out.append(("adapters_unmoved", (
                f"after {update} updates every LoRA B matrix is still exactly zero: the "
                "adapters have not moved; check zero_std_groups, grad_norm and "
                "optim.learning_rate"
            )))  # fmt: skip
        return out

    def _adapters_unmoved(self, model: Any) -> bool:
        """Whether every LoRA B is still zero; checked until it has moved or been named once
        (it reads every adapter, so not on every update of a healthy run)."""
        if "adapters_unmoved" in self.given or self.first.get("adapters_moved"):
            return False
        unmoved = _adapters_unmoved(model)
        if not unmoved:
            self.first["adapters_moved"] = 1.0
        return unmoved

    def _entropy(self, update: int, m: dict[str, Any]) -> list[tuple[str, str]]:
        entropy = m.get("entropy")
        if not isinstance(entropy, int | float):
            return []
        self.first.setdefault("entropy", float(entropy))
        start = self.first["entropy"]
        if update <= EARLY_UPDATES and entropy < COLLAPSED_ENTROPY <= start:
            return [("entropy_collapse", (
                f"the sampling entropy fell from {start:.2f} to {entropy:.3f} by update "
                f"{update}: the policy turned near-deterministic early and will explore no "
                "more; lower optim.learning_rate, raise rollout.temperature or set "
                "algorithm.entropy_coeff"
            ))]  # fmt: skip
        return []

    def _mismatch(self, m: dict[str, Any]) -> list[tuple[str, str]]:
        gap = m.get("logprob_mismatch_mean")
        if not isinstance(gap, int | float):
            return []
        self.first.setdefault("mismatch", float(gap))
        start = max(self.first["mismatch"], 1e-12)
        if gap >= MISMATCH_FLOOR and gap >= MISMATCH_GROWTH * start:
            return [("mismatch_growing", (
                f"the sampler's and the trainer's log-probs drifted apart (mean gap "
                f"{start:.2g} at first, {gap:.2g} now): the rollout samples from another "
                "distribution than the one trained; set algorithm.rollout_correction (tis or "
                "mis) or remove what differs (rollout.repetition_penalty, a quantized model)"
            ))]  # fmt: skip
        return []


def _number(metrics: dict[str, Any], key: str, missing: float = 0.0) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else missing


def _adapters_unmoved(model: Any) -> bool:
    """True when the model has LoRA B matrices and every one of them is exactly zero."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    found = [v for name, v in tree_flatten(model.trainable_parameters()) if name.endswith("lora_b")]
    return bool(found) and all(not mx.any(v != 0).item() for v in found)
