"""`mlxgrpo convert`: Hugging Face → MLX, nanochat → MLX, and fusing adapters into a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mlxgrpo.cli import generation as g
from mlxgrpo.cli.common import ConfigFiles, Overrides, adapter_dir, load_config

app = typer.Typer(
    help="Convert models to MLX and fuse adapters into a model.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Output = Annotated[
    Path, typer.Option("--output", "-o", help="Directory to write (must not exist).")
]
Force = Annotated[
    bool, typer.Option("--force", help="Replace an existing output once the new one is complete.")
]
Dtype = Annotated[
    str | None,
    typer.Option("--dtype", help="Weight dtype: float16, bfloat16 or float32.", show_default=False),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


def _run(title: str, first_stage: str, work: Any, json_output: bool) -> int:
    """Run a conversion with a spinner that follows its stages, then show its summary."""
    from mlxgrpo import ui

    with ui.stage_status(first_stage) as status:
        summary = work(lambda stage: status.update(stage))
    if json_output:
        ui.raw(json.dumps(summary, default=str) + "\n")
    else:
        ui.conversion_summary(title, summary)
    return 0


@app.command("hf-model")
def hf_model(
    output: Output,
    source: Annotated[
        str | None,
        typer.Argument(
            help="Hub id or local Hugging Face model directory; default: model.path.",
            show_default=False,
        ),
    ] = None,
    config: ConfigFiles = None,
    set_: Overrides = None,
    dtype: Dtype = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize weights.")] = False,
    bits: Annotated[
        int | None, typer.Option("--bits", help="Bits per weight: 2, 3, 4, 6 or 8 (implies -q).")
    ] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="Weights per quantization group.")
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="Quantization mode: affine or mxfp4.")
    ] = "affine",
    force: Force = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code.")
    ] = False,
    json_output: JsonOutput = False,
) -> int:
    """Convert a Hugging Face model to MLX, optionally quantized; loads with mlx_lm.load."""
    from mlxgrpo.errors import ConfigError
    from mlxgrpo.models.convert import convert_hf_model

    resolved = load_config(config, set_, {"model.path": ("SOURCE", source)})
    if "model.path" not in resolved.changed_keys():
        raise ConfigError(
            "no model to convert",
            hint="give SOURCE (a hub id or a local directory) or set model.path in a config",
        )
    cfg = resolved.config
    source = cfg.model.path
    trust_remote_code = trust_remote_code or cfg.model.trust_remote_code

    wants_quantization = quantize or bits is not None or group_size is not None or mode != "affine"
    quantize_bits = (bits or 4) if wants_quantization else None

    def work(on_stage):
        return convert_hf_model(
            source,
            output,
            dtype=dtype,
            quantize_bits=quantize_bits,
            group_size=group_size,
            mode=mode,
            force=force,
            trust_remote_code=trust_remote_code,
            on_stage=on_stage,
        )

    return _run("convert hf-model", f"converting {source}", work, json_output)


@app.command("nanochat")
def nanochat(
    source: Annotated[
        Path, typer.Argument(help="nanochat checkpoint dir (model_<step>.pt, meta_<step>.json).")
    ],
    output: Output,
    step: Annotated[
        int | None, typer.Option("--step", help="Checkpoint step; default: the newest.")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", help="tokenizer.pkl; default: found beside the checkpoints."),
    ] = None,
    dtype: Dtype = None,
    force: Force = False,
    json_output: JsonOutput = False,
) -> int:
    """Convert a nanochat checkpoint (no torch needed) to an MLX model directory."""
    from mlxgrpo.models.nanochat import convert_nanochat

    def work(on_stage):
        return convert_nanochat(
            source,
            output,
            step=step,
            tokenizer_path=tokenizer,
            dtype=dtype or "float32",
            force=force,
            on_stage=on_stage,
        )

    return _run("convert nanochat", f"reading {source}", work, json_output)


@app.command("fuse")
def fuse(
    output: Output,
    config: ConfigFiles = None,
    set_: Overrides = None,
    model: g.Model = None,
    adapter: g.Adapter = None,
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Write full-precision weights.")
    ] = False,
    dtype: Dtype = None,
    force: Force = False,
    json_output: JsonOutput = False,
) -> int:
    """Fuse trained adapters into a standalone model directory (loads with mlx_lm.load)."""
    from mlxgrpo.errors import ConfigError
    from mlxgrpo.models.fuse import fuse_adapters

    resolved = load_config(config, set_, {"model.path": ("--model", model)})
    cfg = resolved.config
    adapters = adapter_dir(adapter, cfg)
    if adapters is None:
        raise ConfigError("no adapters to fuse", hint="pass --adapter DIR (or a run dir, or last)")

    def work(on_stage):
        return fuse_adapters(
            cfg.model.path,
            adapters,
            output,
            dequantize=dequantize,
            dtype=dtype,
            force=force,
            on_stage=on_stage,
        )

    return _run("convert fuse", f"fusing {adapters}", work, json_output)
