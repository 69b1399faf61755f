"""The task a config describes: its prompts, its rewards and how prompts become token ids.

Shared by `mlxgrpo train` (training and periodic evaluation) and `mlxgrpo eval`, so both see
the same prompts, the same system prompt and the same chat rendering. Both build one
:class:`Task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mlxgrpo.config import ResolvedConfig
from mlxgrpo.errors import ConfigError

if TYPE_CHECKING:
    from mlxgrpo.rewards import RewardSet


@dataclass(frozen=True)
class TextCodec:
    """Prompt encoder, completion decoder, the ids that end a completion, and the pad id."""

    encode: Callable[[Any], list[int]]
    decode: Callable[[list[int]], str]
    eos_ids: set[int]
    pad_id: int


@dataclass(frozen=True)
class Task:
    """A config's task: its training and eval prompts, its reward functions and, once the
    model's tokenizer is known, the rollout's tool runner and the text codec.

    Built in two steps. :meth:`load` checks the tools, reads the prompts and builds the
    rewards before any model loads, so bad data or a broken reward fails fast;
    :meth:`with_tokenizer` then adds what depends on the tokenizer (``tools`` and ``codec``
    are None until it has run).
    """

    resolved: ResolvedConfig
    # GRPO: Examples (prompts). SFT: Demonstrations, EncodedDemonstrations once the tokenizer
    # is known.
    train_examples: list[Any]
    eval_examples: list[Any]
    reward_set: RewardSet | None  # None for supervised fine-tuning
    tools: Any = None  # generation.tool_loop.ToolRunner when rollout.tools is set
    codec: TextCodec | None = None
    # algorithm.type = mix: the demonstrations of its SFT term (encoded with the tokenizer).
    demonstrations: list[Any] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        resolved: ResolvedConfig,
        *,
        train: bool = True,
        evaluate: bool = True,
        eval_limit: int | None = None,
    ) -> Task:
        """The task's prompts (the train split with `train`, at most `eval_limit` prompts of
        the eval split with `evaluate`; otherwise none) and its reward set."""
        if resolved.config.algorithm.type == "sft":
            train_demos = _load_demonstrations(resolved, "train") if train else []
            eval_demos = _load_demonstrations(resolved, "eval", eval_limit) if evaluate else []
            return cls(resolved, train_demos, eval_demos, None)
        check_tools(resolved)
        train_examples = _load_train_examples(resolved) if train else []
        eval_examples = _load_eval_examples(resolved, eval_limit) if evaluate else []
        demos = []
        if train and resolved.config.algorithm.type == "mix":
            demos = _load_demonstrations(resolved, "train", source=resolved.config.mix.dataset)
        return cls(
            resolved,
            train_examples,
            eval_examples,
            _build_reward_set(resolved),
            demonstrations=demos,
        )

    def with_tokenizer(self, tokenizer: Any) -> Task:
        """This task with the tool runner and text codec of `tokenizer` (and, for supervised
        fine-tuning, its demonstrations encoded)."""
        cfg = self.resolved.config
        if cfg.algorithm.type == "sft":
            codec = text_codec(tokenizer, cfg)
            encode = demonstration_encoder(tokenizer, cfg, codec)
            return replace(
                self,
                codec=codec,
                train_examples=[encode(d) for d in self.train_examples],
                eval_examples=[encode(d) for d in self.eval_examples],
            )
        tools = build_tool_runner(self.resolved, tokenizer)
        codec = text_codec(tokenizer, cfg, tools)
        encode = demonstration_encoder(tokenizer, cfg, codec)
        demos = [encode(d) for d in self.demonstrations]
        return replace(self, tools=tools, codec=codec, demonstrations=demos)


def demonstration_encoder(tokenizer: Any, cfg: Any, codec: TextCodec) -> Callable[[Any], Any]:
    """Demonstration -> EncodedDemonstration with the model's chat template and the [sft]
    settings; a demonstration without an end-of-sequence token gets the tokenizer's."""
    from functools import partial

    from mlxgrpo.data import encode_demonstration
    from mlxgrpo.models.tokenizer import render_prompt

    own = getattr(tokenizer, "eos_token_id", None)
    eos = own if isinstance(own, int) else min(codec.eos_ids)
    return partial(
        encode_demonstration,
        render=lambda messages, generation: render_prompt(
            tokenizer, messages, add_generation_prompt=generation
        ),
        encode_text=tokenizer.encode,
        eos_ids=codec.eos_ids,
        eos_id=eos,
        train_on_prompt=cfg.sft.train_on_prompt,
        max_length=cfg.sft.max_length,
    )


def _load_demonstrations(
    resolved: ResolvedConfig, which: str, limit: int | None = None, source: str = ""
) -> list:
    """The train split's demonstrations, or at most `limit` (default eval.samples) of the
    eval split's, in file order; from `source` when given, else from data.dataset."""
    from mlxgrpo.data import default_system_prompt, load_demonstrations

    cfg = resolved.config
    system = cfg.data.system_prompt
    if system is None:
        system = default_system_prompt(cfg.data.dataset)
    train = which == "train"
    return load_demonstrations(
        source or cfg.data.dataset,
        cfg.data.train_split if train else cfg.data.eval_split,
        system_prompt=system,
        subset=cfg.data.subset,
        prompt_field=cfg.data.prompt_field,
        completion_field=cfg.sft.completion_field,
        max_samples=(cfg.run.max_train_samples or None)
        if train
        else (limit if limit is not None else cfg.eval.samples),
        shuffle=cfg.data.shuffle if train else False,
        seed=cfg.run.seed,
        base_dir=resolved.base_dir(),
    )


def _loader_options(resolved: ResolvedConfig) -> dict[str, Any]:
    cfg = resolved.config
    return dict(
        subset=cfg.data.subset,
        prompt_field=cfg.data.prompt_field,
        answer_field=cfg.data.answer_field,
        seed=cfg.run.seed,
        base_dir=resolved.base_dir(),
    )


def _load_train_examples(resolved: ResolvedConfig) -> list:
    from mlxgrpo.data import load_examples

    cfg = resolved.config
    return load_examples(
        cfg.data.dataset,
        cfg.data.train_split,
        shuffle=cfg.data.shuffle,
        max_samples=cfg.run.max_train_samples or None,
        **_loader_options(resolved),
    )


def _load_eval_examples(resolved: ResolvedConfig, limit: int | None = None) -> list:
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


def _build_reward_set(resolved: ResolvedConfig) -> Any:
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


def build_tool_runner(resolved: ResolvedConfig, tokenizer: Any) -> Any:
    """The rollout's tool runner (generation.tool_loop.ToolRunner), None when rollout.tools is
    empty."""
    cfg = resolved.config.rollout
    if not cfg.tools:
        return None
    from mlxgrpo.generation.tool_loop import ToolRunner
    from mlxgrpo.models.tokenizer import decode as decode_ids
    from mlxgrpo.tools import resolve_tools
    from mlxgrpo.tools.formats import tool_format

    return ToolRunner(
        tool_format(tokenizer),
        resolve_tools(cfg.tools, resolved.base_dir()),
        lambda ids: decode_ids(tokenizer, ids, skip_special_tokens=True),
        max_calls=cfg.max_tool_calls,
        timeout_s=cfg.tool_timeout_s,
    )


def check_tools(resolved: ResolvedConfig, *, task: bool = True) -> None:
    """Before a model loads: every tool in rollout.tools can be loaded, and (with `task`) a
    synthetic tool task has its tool, without which no answer can be right."""
    from mlxgrpo.data import is_synthetic, parse_synthetic_spec
    from mlxgrpo.tools import resolve_tools

    dataset, tools = resolved.config.data.dataset, resolved.config.rollout.tools
    wants_tool = is_synthetic(dataset) and bool(parse_synthetic_spec(dataset)[1].get("tool"))
    if task and wants_tool and not tools:
        raise ConfigError(
            f"{dataset} is a tool task, but rollout.tools is empty",
            hint="set rollout.tools = ['calculator'] (configs/calculator_demo.toml does)",
        )
    resolve_tools(tools, resolved.base_dir())


def text_codec(tokenizer: Any, cfg: Any, tools: Any = None) -> TextCodec:
    """Chat-rendered prompts left-cut to rollout.max_prompt_length; completions decode without
    special tokens, so a reward never scores the letters of a token such as <|endoftext|>.
    With `tools` (a ToolRunner), a chat template lists them in the prompt, and a completion's
    text keeps its tool-call markers (a call's expression and its result stay apart)."""
    from mlxgrpo.data import build_messages, call_prefill, default_system_prompt
    from mlxgrpo.models.tokenizer import decode as decode_ids
    from mlxgrpo.models.tokenizer import eos_token_ids, render_prompt

    system = cfg.data.system_prompt
    if system is None:
        system = default_system_prompt(cfg.data.dataset)
    limit = cfg.rollout.max_prompt_length
    schemas = None
    if tools is not None and tools.format.kind == "chat-template":
        from mlxgrpo.tools.formats import tool_schemas

        schemas = tool_schemas(tools.tools)

    def encode(example: Any) -> list[int]:
        ids = render_prompt(tokenizer, build_messages(example, system), tools=schemas)
        ids += call_prefill(example, tools)
        return ids[-limit:]  # keep the end: it holds the question and the generation prompt

    def plain(ids: list[int]) -> str:
        return decode_ids(tokenizer, ids, skip_special_tokens=True)

    def decode(ids: list[int]) -> str:
        return plain(ids) if tools is None else tools.format.render(ids, plain)

    eos = eos_token_ids(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    return TextCodec(encode, decode, eos, pad if pad is not None else min(eos))
