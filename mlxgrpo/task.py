"""The task a config describes: its prompts, its rewards and how prompts become token ids.

Shared by `mlxgrpo train` (training and periodic evaluation) and `mlxgrpo eval`, so both see
the same prompts, the same system prompt and the same chat rendering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxgrpo.config import ResolvedConfig


@dataclass(frozen=True)
class TextCodec:
    """Prompt encoder, completion decoder, the ids that end a completion, and the pad id."""

    encode: Callable[[Any], list[int]]
    decode: Callable[[list[int]], str]
    eos_ids: set[int]
    pad_id: int


def _loader_options(resolved: ResolvedConfig) -> dict[str, Any]:
    cfg = resolved.config
    return dict(
        subset=cfg.data.subset,
        prompt_field=cfg.data.prompt_field,
        answer_field=cfg.data.answer_field,
        seed=cfg.run.seed,
        base_dir=resolved.base_dir(),
    )


def load_train_examples(resolved: ResolvedConfig) -> list:
    from mlxgrpo.data import load_examples

    cfg = resolved.config
    return load_examples(
        cfg.data.dataset,
        cfg.data.train_split,
        shuffle=cfg.data.shuffle,
        max_samples=cfg.run.max_train_samples or None,
        **_loader_options(resolved),
    )


def load_eval_examples(resolved: ResolvedConfig, limit: int | None = None) -> list:
    """The eval split, in file order, at most `limit` (default eval.samples) prompts."""
    from mlxgrpo.data import load_examples

    cfg = resolved.config
    return load_examples(
        cfg.data.dataset,
        cfg.data.eval_split,
        shuffle=False,
        max_samples=limit if limit is not None else cfg.eval.samples,
        **_loader_options(resolved),
    )


def build_reward_set(resolved: ResolvedConfig) -> Any:
    from mlxgrpo.data import default_rewards
    from mlxgrpo.rewards import RewardSet

    cfg = resolved.config
    functions = list(cfg.rewards.functions) or default_rewards(cfg.data.dataset)
    return RewardSet(
        functions,
        list(cfg.rewards.weights) or None,
        base_dir=resolved.base_dir(),
        timeout_s=cfg.rewards.timeout_s,
    )


def text_codec(tokenizer: Any, cfg: Any) -> TextCodec:
    """Chat-rendered prompts left-cut to rollout.max_prompt_length; completions decode without
    special tokens, so a reward never scores the letters of a token such as <|endoftext|>."""
    from mlxgrpo.data import build_messages, default_system_prompt
    from mlxgrpo.models.tokenizer import decode as decode_ids
    from mlxgrpo.models.tokenizer import eos_token_ids, render_prompt

    system = cfg.data.system_prompt
    if system is None:
        system = default_system_prompt(cfg.data.dataset)
    limit = cfg.rollout.max_prompt_length

    def encode(example: Any) -> list[int]:
        ids = render_prompt(tokenizer, build_messages(example, system))
        return ids[-limit:]  # keep the end: it holds the question and the generation prompt

    def decode(ids: list[int]) -> str:
        return decode_ids(tokenizer, ids, skip_special_tokens=True)

    eos = eos_token_ids(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    return TextCodec(encode, decode, eos, pad if pad is not None else min(eos))
