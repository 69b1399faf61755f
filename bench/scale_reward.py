"""The scale section's reward, shared by mlxgrpo and the peer (mlx-lm-lora) so both score alike.

A graded reward (share of distinct words in the completion) keeps a random-weight model's groups
from having all-equal rewards. The signature serves both callers: mlxgrpo passes
(prompts, completions, answers, **columns), mlx-lm-lora passes prompts=, completions=,
answer=, types=. It registers itself with mlx-lm-lora when that is importable (the peer's venv).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

try:
    from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function
except ImportError:  # mlxgrpo's environment: a plain function

    def register_reward_function(name: str | None = None) -> Callable[[Any], Any]:
        return lambda fn: fn


@register_reward_function()
def distinct_words(
    prompts: Sequence[str], completions: Sequence[str], answer: Any = None, **_: Any
) -> list[float]:
    """Distinct words / words in the completion (0 for an empty one)."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(len(set(words)) / len(words) if words else 0.0)
    return scores
