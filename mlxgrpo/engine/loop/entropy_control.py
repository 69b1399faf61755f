"""Adaptive entropy control: the entropy bonus's coefficient steered toward a target entropy.

A fixed ``entropy_coeff`` is either too weak to stop an entropy collapse or strong enough to
blow the entropy up later. With ``algorithm.entropy_target`` set, the coefficient starts at
``entropy_coeff`` and after every update moves by ``entropy_coeff_step``: up when the update's
mean token entropy was below the target, down otherwise, kept within ``[entropy_coeff_min,
entropy_coeff_max]`` (the adaptive entropy control of Skywork-OR1, applied every update). The
coefficient is part of a checkpoint's state, so a resumed run continues with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EntropyControl:
    coeff: float
    target: float
    step: float
    low: float
    high: float

    @classmethod
    def from_config(cls, algo: Any) -> EntropyControl | None:
        """The controller ``[algorithm]`` asks for, or None without an entropy target."""
        if algo.entropy_target is None:
            return None
        return cls(
            coeff=algo.entropy_coeff,
            target=algo.entropy_target,
            step=algo.entropy_coeff_step,
            low=algo.entropy_coeff_min,
            high=algo.entropy_coeff_max,
        )

    def after(self, entropy: float) -> float:
        """The coefficient for the next update, given this update's mean token entropy."""
        moved = self.coeff + self.step if entropy < self.target else self.coeff - self.step
        self.coeff = min(self.high, max(self.low, moved))
        return self.coeff
