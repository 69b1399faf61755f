"""Reward functions: a registry of built-ins, user-code resolution and weighted scoring.

Signature of a reward function:
``fn(prompts, completions, answers, **columns) -> list[float | None]`` (None = not applicable).
Pure Python; importing this package does not import mlx or datasets.
"""

from mlxgrpo.rewards import gsm8k as _gsm8k  # noqa: F401  (registers the built-ins)
from mlxgrpo.rewards import synthetic as _synthetic  # noqa: F401
from mlxgrpo.rewards.gsm8k import (
    GSM8K_REWARDS,
    answers_match,
    extract_answer,
    normalize_number,
    parse_gsm8k_answer,
    scored_texts,
    xml_count_score,
)
from mlxgrpo.rewards.registry import (
    ResolvedReward,
    RewardFn,
    is_registered,
    list_rewards,
    register_reward,
    resolve_reward,
)
from mlxgrpo.rewards.reward_set import RewardFailure, RewardResult, RewardSet
from mlxgrpo.rewards.synthetic import char_match_score, char_overlap_score

__all__ = [
    "GSM8K_REWARDS",
    "ResolvedReward",
    "RewardFailure",
    "RewardFn",
    "RewardResult",
    "RewardSet",
    "answers_match",
    "char_match_score",
    "char_overlap_score",
    "extract_answer",
    "is_registered",
    "list_rewards",
    "normalize_number",
    "parse_gsm8k_answer",
    "register_reward",
    "resolve_reward",
    "scored_texts",
    "xml_count_score",
]
