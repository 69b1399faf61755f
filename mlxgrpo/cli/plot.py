"""`mlxgrpo plot`: training curves of one or more runs, as a PNG or in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlxgrpo.cli.common import ConfigFiles, Overrides, load_config

Runs = Annotated[
    list[str],
    typer.Argument(
        help="Run directories, run names under run.output_dir, or `last`.", show_default=False
    ),
]


def plot(
    runs: Runs,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Image to write (.png, .svg or .pdf).")
    ] = Path("plot.png"),
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="Comma-separated metrics, e.g. reward,kl,entropy (`reward` finds reward_mean). "
            "Default: reward_mean, and kl, entropy, completion_length_mean when logged.",
            show_default=False,
        ),
    ] = None,
    terminal: Annotated[
        bool,
        typer.Option("--terminal", "-t", help="Sparklines in the terminal instead of an image."),
    ] = False,
    config: ConfigFiles = None,
    set_: Overrides = None,
) -> None:
    """Plot training curves: one panel per metric, runs overlaid, eval points as diamonds."""
    from mlxgrpo import runlog, ui

    output_dir = load_config(config, set_, check_paths=False).config.run.output_dir
    run_dirs = [runlog.resolve_run(spec, output_dir) for spec in runs]
    names = runlog.display_names(run_dirs)
    logs = [runlog.load_metrics(path, name) for path, name in zip(run_dirs, names, strict=True)]
    for log in logs:
        for skipped in log.skipped:
            ui.note(skipped)
    requested = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    chosen = runlog.pick_metrics(logs, requested)
    if terminal:
        ui.metric_sparklines(logs, chosen)
        return
    from mlxgrpo import plotting

    plotting.require_matplotlib()  # before any work: the missing extra is the likeliest error
    figure = plotting.build_figure(logs, chosen)
    written = plotting.save_figure(figure, output.expanduser())
    ui.success(f"{len(chosen)} metric(s) of {len(logs)} run(s) → {written}")
