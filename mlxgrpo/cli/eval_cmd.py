"""`mlxgrpo eval`: accuracy, format rate and pass@k of a model (and adapters) on a task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlxgrpo.cli import generation as g
from mlxgrpo.cli.common import ConfigFiles, Overrides, adapter_dir, load_config
from mlxgrpo.errors import ConfigError
from mlxgrpo.safe_io import atomic_write


def eval_(
    config: ConfigFiles = None,
    set_: Overrides = None,
    model: g.Model = None,
    adapter: g.Adapter = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="data.dataset: gsm8k, a local file/dir, synthetic:…"),
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="data.eval_split")] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="eval.samples: prompts to evaluate")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="eval.max_new_tokens")
    ] = None,
    pass_k: Annotated[int | None, typer.Option("--pass-k", "-k", help="eval.pass_k")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="eval.temperature (for pass@k)")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="run.seed")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Generations per decode batch.")
    ] = 16,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also evaluate the model without adapters.")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write per-sample results (JSONL).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
) -> int:
    """Evaluate a model: greedy accuracy (pass@1), sampled pass@k, format rate, length, speed.

    `mlxgrpo eval -c configs/prod.toml --adapter last` evaluates what `train` trained.
    """
    from mlxgrpo import distributed, ui
    from mlxgrpo.evaluation import evaluate_config

    if output is not None and output.exists() and not force:
        raise ConfigError(f"output '{output}' already exists", hint="pass --force to replace it")
    flags = {
        "model.path": ("--model", model),
        "data.dataset": ("--dataset", dataset),
        "data.eval_split": ("--split", split),
        "eval.samples": ("--limit", limit),
        "eval.max_new_tokens": ("--max-tokens", max_tokens),
        "eval.pass_k": ("--pass-k", pass_k),
        "eval.temperature": ("--temperature", temperature),
        "run.seed": ("--seed", seed),
    }
    resolved = load_config(config, set_, flags)
    cfg = resolved.config
    adapters = adapter_dir(adapter, cfg)
    # Under mlx.launch the ranks share the prompts; rank 0 alone shows and writes the results.
    main = distributed.init().is_main
    with ui.BatchProgress("eval", quiet=not main) as progress:
        runs = evaluate_config(
            resolved,
            adapter_dir=adapters,
            compare_base=compare_base,
            batch_size=batch_size,
            on_start=progress.set_total,
            on_batch=progress.add,
        )
    if main:
        _report(runs, cfg, adapters, output, json_output)
    return 0


def _report(runs, cfg, adapters: str | None, output: Path | None, json_output: bool) -> None:
    """Rank 0's part: the per-sample records to `output`, then a table or one JSON object."""
    from mlxgrpo import ui

    if output is not None:
        _write_records(output, runs)
    results = [
        {
            "label": label,
            "model": cfg.model.path,
            "adapters": adapters if label == "adapters" else None,
            **result.metrics,
        }
        for label, result in runs
    ]
    if json_output:
        split = cfg.data.eval_split
        ui.raw(json.dumps({"dataset": cfg.data.dataset, "split": split, "results": results}) + "\n")
        return
    rows = [(_display_name(r), r) for r in results]
    ui.eval_table(f"eval: {cfg.data.dataset} ({cfg.data.eval_split})", rows)
    if output is not None:
        ui.note(f"per-sample results: {output}")


def _write_records(path: Path, runs) -> None:
    # A fresh exclusive temporary renamed into place: never writes through a planted symlink.
    with atomic_write(path) as fh:
        for label, result in runs:
            for record in result.records:
                fh.write(json.dumps({"model": label, **record}, ensure_ascii=False) + "\n")


def _display_name(result: dict) -> str:
    if result["adapters"]:
        return f"{result['model']} + {result['adapters']}"
    return f"{result['model']} (base)" if result["label"] == "base" else result["model"]
