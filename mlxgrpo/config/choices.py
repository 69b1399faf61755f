"""The named choices of the GRPO algorithm, spelled out once.

Each is a ``Literal`` type (for signatures) and the tuple of its values (for checks, the schema's
``choices`` and the benches), the tuple derived from the type. Pure Python: the config tooling and
the engine's loss both read it, and nothing here imports mlx.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "REWARD_AGGREGATIONS",
    "AdvantageEstimator",
    "RewardAggregation",
    "IMPORTANCE_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "ROLLOUT_CORRECTIONS",
    "SCALE_MODES",
    "ImportanceLevel",
    "KLEstimator",
    "LossType",
    "RolloutCorrection",
    "ScaleMode",
]

ScaleMode = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3", "k3_is"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo"]
ImportanceLevel = Literal["token", "sequence"]
RolloutCorrection = Literal["none", "tis", "mis", "reject"]
AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "opo"]
RewardAggregation = Literal["sum_then_normalize", "normalize_then_sum"]

SCALE_MODES: tuple[str, ...] = get_args(ScaleMode)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IMPORTANCE_LEVELS: tuple[str, ...] = get_args(ImportanceLevel)
ROLLOUT_CORRECTIONS: tuple[str, ...] = get_args(RolloutCorrection)
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
REWARD_AGGREGATIONS: tuple[str, ...] = get_args(RewardAggregation)
