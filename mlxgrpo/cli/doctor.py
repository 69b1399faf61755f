"""`mlxgrpo doctor`: report the MLX device, the BLAS in use and a measured matmul rate."""

from __future__ import annotations

import json

import typer

from mlxgrpo import ui


def doctor(
    json_output: bool = typer.Option(
        False, "--json", help="Print the report as one JSON object instead of a table."
    ),
) -> None:
    """Check the MLX setup: device, BLAS (Linux CPU), matmul speed, memory, package versions."""
    from mlxgrpo.backend import environment_report  # imports mlx when it runs, not at startup

    report = environment_report()
    if json_output:
        ui.raw(json.dumps(report, indent=2) + "\n")
    else:
        ui.doctor_report(report)
