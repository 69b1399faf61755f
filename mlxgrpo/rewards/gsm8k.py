"""Built-in GSM8K rewards: the original project's values, scored on what the model produced.

If the rollout pre-fills the start of the assistant turn (for example with ``<reasoning>``), pass
that text as the ``completion_prefix`` column: these rewards score ``prefix + completion``, so a
perfect answer earns the format rewards whether or not part of it was pre-filled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mlxgrpo.rewards.registry import register_reward

CORRECTNESS_VALUE = 2.0
INT_VALUE = 0.5
STRICT_FORMAT_VALUE = 0.5
SOFT_FORMAT_VALUE = 0.5
XML_PAIR_VALUE = 0.25
XML_TRAILING_PENALTY = 0.001

GSM8K_REWARDS: tuple[str, ...] = ("correctness", "int", "strict_format", "soft_format", "xmlcount")

_STRICT_FORMAT = re.compile(r"^\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_REASONING_PAIR = re.compile(r"<reasoning>.*?</reasoning>", re.DOTALL)
_ANSWER_PAIR = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_INTEGER = re.compile(r"^[+-]?\d+$")
_NUMBER_NOISE = re.compile(r"[,$\s]")


def parse_gsm8k_answer(text: str) -> str | None:
    """Gold value of a GSM8K solution: the text after ``####``, commas removed; None if absent."""
    if "####" not in text:
        return None
    return text.split("####")[-1].replace(",", "").strip()


def extract_answer(text: str) -> str | None:
    """Text inside the last ``<answer>…</answer>`` pair, stripped; None when there is none."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def normalize_number(text: str) -> str:
    """Drop thousands separators, dollar signs and whitespace: ``"$1,000 "`` → ``"1000"``."""
    return _NUMBER_NOISE.sub("", text)


def answers_match(predicted: str, gold: str) -> bool:
    """Numeric equality after normalisation (``"5.0" == "5"``); plain text equality otherwise."""
    left, right = normalize_number(predicted), normalize_number(gold)
    if not left or not right:
        return False
    try:
        return float(left) == float(right)
    except ValueError:
        return left == right


def scored_texts(completions: Sequence[str], completion_prefix: Any = None) -> list[str]:
    """Completions with the pre-filled prefix put back in front (one prefix, or one per item)."""
    if completion_prefix is None:
        return list(completions)
    if isinstance(completion_prefix, str):
        return [completion_prefix + c for c in completions]
    prefixes = list(completion_prefix)
    if len(prefixes) != len(completions):
        raise ValueError(
            f"completion_prefix has {len(prefixes)} entries for {len(completions)} completions"
        )
    return [(p or "") + c for p, c in zip(prefixes, completions, strict=True)]


def _gold_value(answer: str | None) -> str | None:
    if answer is None:
        return None
    text = str(answer)
    parsed = parse_gsm8k_answer(text)
    return parsed if parsed is not None else text.strip()


@register_reward(
    "correctness",
    "2.0 when the last <answer> equals the gold number (after stripping , $ spaces)",
    aliases=("correctness_reward_func",),
)
def correctness(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    completion_prefix: Any = None,
    **_: Any,
) -> list[float | None]:
    scores: list[float | None] = []
    for text, answer in zip(scored_texts(completions, completion_prefix), answers, strict=True):
        gold = _gold_value(answer)
        if gold is None:
            scores.append(None)
            continue
        predicted = extract_answer(text)
        matched = predicted is not None and answers_match(predicted, gold)
        scores.append(CORRECTNESS_VALUE if matched else 0.0)
    return scores


@register_reward("int", "0.5 when the last <answer> is an integer", aliases=("int_reward_func",))
def integer_answer(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    completion_prefix: Any = None,
    **_: Any,
) -> list[float | None]:
    scores: list[float | None] = []
    for text in scored_texts(completions, completion_prefix):
        predicted = extract_answer(text)
        is_int = predicted is not None and bool(_INTEGER.match(normalize_number(predicted)))
        scores.append(INT_VALUE if is_int else 0.0)
    return scores


@register_reward(
    "strict_format",
    "0.5 when the whole text is <reasoning>…</reasoning> <answer>…</answer>",
    aliases=("strict_format_reward_func",),
)
def strict_format(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    completion_prefix: Any = None,
    **_: Any,
) -> list[float | None]:
    texts = scored_texts(completions, completion_prefix)
    return [STRICT_FORMAT_VALUE if _STRICT_FORMAT.match(t) else 0.0 for t in texts]


@register_reward(
    "soft_format",
    "0.5 when the text contains <reasoning>…</reasoning> <answer>…</answer>",
    aliases=("soft_format_reward_func",),
)
def soft_format(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    completion_prefix: Any = None,
    **_: Any,
) -> list[float | None]:
    texts = scored_texts(completions, completion_prefix)
    return [SOFT_FORMAT_VALUE if _SOFT_FORMAT.search(t) else 0.0 for t in texts]


def xml_count_score(text: str) -> float:
    """+0.25 per tag pair, -0.001 per character after the last ``</answer>``.

    Trailing whitespace is not counted: a final newline before EOS is not "text after the answer".
    """
    score = 0.0
    if _REASONING_PAIR.search(text):
        score += XML_PAIR_VALUE
    if _ANSWER_PAIR.search(text):
        score += XML_PAIR_VALUE
    end = text.rfind("</answer>")
    if end >= 0:
        trailing = text[end + len("</answer>") :].rstrip()
        score -= XML_TRAILING_PENALTY * len(trailing)
    return score


@register_reward(
    "xmlcount",
    "+0.25 per <reasoning>/<answer> pair, -0.001 per character after </answer>",
    aliases=("xmlcount_reward_func",),
)
def xmlcount(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str | None],
    completion_prefix: Any = None,
    **_: Any,
) -> list[float | None]:
    return [xml_count_score(t) for t in scored_texts(completions, completion_prefix)]
