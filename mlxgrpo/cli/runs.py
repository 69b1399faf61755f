"""`mlxgrpo runs`: the runs under a directory, with status, progress and rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mlxgrpo.cli.common import ConfigFiles, Overrides, load_config


def runs(
    directory: Annotated[
        Path | None,
        typer.Argument(help="Directory holding runs. Default: run.output_dir.", show_default=False),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON, not a table.")] = False,
    config: ConfigFiles = None,
    set_: Overrides = None,
) -> None:
    """List runs: status (finished, stopped, crashed), updates, rewards, best eval, wall time.

    finished = has final/; stopped = no final/, newest checkpoint at the last logged update
    (what Ctrl-C leaves); crashed = no final/ and no checkpoint, or updates after the newest one.
    """
    from mlxgrpo import runlog, ui

    if directory is None:
        directory = Path(load_config(config, set_, check_paths=False).config.run.output_dir)
    root = directory.expanduser()
    summaries = [
        {**runlog.summarize_run(path), "name": runlog.run_label(path, root)}
        for path in runlog.list_runs(root)
    ]
    if json_output:
        ui.raw(json.dumps(summaries, indent=2) + "\n")
    elif not summaries:
        ui.note(f"no runs under {root}")
    else:
        ui.runs_table(f"runs in {root}", summaries)
