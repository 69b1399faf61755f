"""`mlxgrpo doctor`: report the MLX device, the BLAS in use and a measured matmul rate; with a
model (`--model`, or a config's model.path), also the memory techniques a run of it would use."""

from __future__ import annotations

import json

import typer

from mlxgrpo import ui
from mlxgrpo.cli.common import ConfigFiles, Overrides, load_config


def doctor(
    json_output: bool = typer.Option(
        False, "--json", help="Print the report as one JSON object instead of a table."
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Also say which memory techniques training this model would use, and why any "
        "is off (model.path; with -c/--set, that run's settings).",
    ),
    config: ConfigFiles = None,
    overrides: Overrides = None,
) -> None:
    """Check the MLX setup: device, BLAS (Linux CPU), matmul speed, memory, package versions."""
    from mlxgrpo.backend import environment_report  # imports mlx when it runs, not at startup

    report = environment_report()
    if model is not None or config:
        from mlxgrpo.engine.loop.inspect import planned_memory_paths

        resolved = load_config(config, overrides, {"model.path": ("--model", model)})
        report["model"] = resolved.config.model.path
        report["memory_paths"] = planned_memory_paths(resolved)
    if json_output:
        ui.raw(json.dumps(report, indent=2) + "\n")
    else:
        ui.doctor_report(report)
