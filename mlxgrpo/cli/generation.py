"""Options and setup shared by `mlxgrpo infer` and `mlxgrpo chat`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mlxgrpo.cli.common import load_config

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
NoChatTemplate = Annotated[
    bool,
    typer.Option("--no-chat-template", help="Feed the raw text (generate.chat_template = false)."),
]


def generation_flags(
    *,
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    no_chat_template: bool,
) -> dict[str, tuple[str, Any]]:
    """The flag layer of the config for a generation command."""
    return {
        "model.path": ("--model", model),
        "generate.system_prompt": ("--system", system),
        "generate.max_tokens": ("--max-tokens", max_tokens),
        "generate.temperature": ("--temperature", temperature),
        "generate.top_p": ("--top-p", top_p),
        "generate.top_k": ("--top-k", top_k),
        "generate.min_p": ("--min-p", min_p),
        "generate.repetition_penalty": ("--repetition-penalty", repetition_penalty),
        "generate.seed": ("--seed", seed),
        "generate.chat_template": ("--no-chat-template", False if no_chat_template else None),
    }


def load_for_generation(
    config: list[Path] | None,
    overrides: list[str] | None,
    flags: dict[str, tuple[str, Any]],
    adapter: str | None,
) -> tuple[Any, Any, Any, Any]:
    """(resolved config, model, tokenizer, generation options) for infer and chat."""
    from mlxgrpo.engine.checkpoint import resolve_adapter_source
    from mlxgrpo.inference import GenerationOptions
    from mlxgrpo.models.loading import load_model

    resolved = load_config(config, overrides, flags)
    cfg = resolved.config
    adapter_dir = adapter if adapter is not None else cfg.model.adapter_path
    if adapter_dir is not None:
        adapter_dir = str(resolve_adapter_source(adapter_dir, cfg.run.output_dir))
    model, tokenizer = load_model(
        cfg.model.path,
        adapter_path=adapter_dir,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    return resolved, model, tokenizer, GenerationOptions.from_config(cfg.generate)
