"""Options and setup shared by `mlxgrpo infer` and `mlxgrpo chat`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mlxgrpo.cli.common import adapter_dir, load_config

Model = Annotated[str | None, typer.Option("--model", "-m", help="model.path", show_default=False)]
Adapter = Annotated[
    str | None,
    typer.Option(
        "--adapter",
        "-a",
        help="Adapters to apply: an adapter dir, a run dir, or 'last' (newest run).",
        show_default=False,
    ),
]
System = Annotated[str | None, typer.Option("--system", help="generate.system_prompt")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="generate.max_tokens")]
Temperature = Annotated[
    float | None, typer.Option("--temperature", "-t", help="generate.temperature (0 = greedy)")
]
TopP = Annotated[float | None, typer.Option("--top-p", help="generate.top_p")]
TopK = Annotated[int | None, typer.Option("--top-k", help="generate.top_k")]
MinP = Annotated[float | None, typer.Option("--min-p", help="generate.min_p")]
RepetitionPenalty = Annotated[
    float | None, typer.Option("--repetition-penalty", help="generate.repetition_penalty")
]
Seed = Annotated[int | None, typer.Option("--seed", help="generate.seed")]
Tools = Annotated[
    list[str] | None,
    typer.Option(
        "--tool",
        metavar="NAME",
        help="rollout.tools: a tool the answers may call (calculator, file.py:function); "
        "repeat for several. Default: the config's, as training used them.",
        show_default=False,
    ),
]
NoChatTemplate = Annotated[
    bool,
    typer.Option("--no-chat-template", help="Feed the raw text (generate.chat_template = false)."),
]


# A generation command's parameter → (the config key it sets, the flag as typed).
_FLAG_KEYS = {
    "model": ("model.path", "--model"),
    "system": ("generate.system_prompt", "--system"),
    "max_tokens": ("generate.max_tokens", "--max-tokens"),
    "temperature": ("generate.temperature", "--temperature"),
    "top_p": ("generate.top_p", "--top-p"),
    "top_k": ("generate.top_k", "--top-k"),
    "min_p": ("generate.min_p", "--min-p"),
    "repetition_penalty": ("generate.repetition_penalty", "--repetition-penalty"),
    "seed": ("generate.seed", "--seed"),
}


def generation_flags(params: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """The flag layer of the config, from a generation command's parameters (by name)."""
    flags = {key: (flag, params[name]) for name, (key, flag) in _FLAG_KEYS.items()}
    no_template = params["no_chat_template"]
    flags["generate.chat_template"] = ("--no-chat-template", False if no_template else None)
    flags["rollout.tools"] = ("--tool", list(params["tool"]) if params["tool"] else None)
    return flags


def load_for_generation(
    config: list[Path] | None,
    overrides: list[str] | None,
    flags: dict[str, tuple[str, Any]],
    adapter: str | None,
) -> tuple[Any, Any, Any, Any, Any]:
    """(resolved config, model, tokenizer, generation options, tool runner or None) for infer
    and chat; the tools are `rollout.tools`, so a trained model calls what it was trained with."""
    from mlxgrpo.inference import GenerationOptions
    from mlxgrpo.models.loading import load_model
    from mlxgrpo.task import build_tool_runner, check_tools

    resolved = load_config(config, overrides, flags)
    cfg = resolved.config
    check_tools(resolved, task=False)  # a bad --tool fails before the model loads
    model, tokenizer = load_model(
        cfg.model.path,
        adapter_path=adapter_dir(adapter, cfg),
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    tools = build_tool_runner(resolved, tokenizer)
    return resolved, model, tokenizer, GenerationOptions.from_config(cfg.generate), tools
