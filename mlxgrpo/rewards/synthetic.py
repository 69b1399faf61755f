"""Dense rewards for the embedded synthetic tasks (and simple exact matching).

Dense means partial credit in [0, 1], so even a tiny random model gets a reward signal that
varies within a group — the condition for GRPO to learn anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mlxgrpo.rewards.registry import register_reward


def char_match_score(completion: str, target_chars: str) -> float:
    """Share of the completion's characters that belong to ``target_chars`` (0 when empty)."""
    text = completion.strip()
    if not text:
        return 0.0
    allowed = set(target_chars)
    return sum(ch in allowed for ch in text) / len(text)


def char_overlap_score(completion: str, target: str) -> float:
    """Position-wise matching characters over the longer of the two strings (1.0 = exact)."""
    text = completion.strip()
    longest = max(len(text), len(target))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(text, target, strict=False)) / longest


@register_reward(
    "char_match",
    "share of completion characters equal to the target letter(s) in the answer (0..1)",
)
def char_match(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    **_: Any,
) -> list[float | None]:
    return [
        None if answer is None else char_match_score(completion, str(answer))
        for completion, answer in zip(completions, answers, strict=True)
    ]


@register_reward(
    "char_overlap",
    "position-wise character overlap with the answer over the longer length (0..1)",
)
def char_overlap(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    **_: Any,
) -> list[float | None]:
    return [
        None if answer is None else char_overlap_score(completion, str(answer))
        for completion, answer in zip(completions, answers, strict=True)
    ]


@register_reward("exact_match", "1.0 when the stripped completion equals the answer")
def exact_match(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    **_: Any,
) -> list[float | None]:
    return [
        None if answer is None else float(completion.strip() == str(answer).strip())
        for completion, answer in zip(completions, answers, strict=True)
    ]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number_score(completion: str, answer: str) -> float:
    """1.0 when the completion's last number equals the answer (commas ignored), else 0.0."""
    numbers = _NUMBER.findall(completion)
    return float(bool(numbers) and numbers[-1].replace(",", "") == answer.replace(",", "").strip())


@register_reward(
    "final_number",
    "1.0 when the last number in the completion (a tool's result counts) equals the answer",
)
def final_number(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    **_: Any,
) -> list[float | None]:
    return [
        None if answer is None else final_number_score(completion, str(answer))
        for completion, answer in zip(completions, answers, strict=True)
    ]
