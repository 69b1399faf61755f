"""`mlxgrpo completions`: the logged completions of one update, best or worst first."""

from __future__ import annotations

from typing import Annotated

import typer

from mlxgrpo.cli.common import ConfigFiles, Overrides, load_config
from mlxgrpo.errors import ConfigError


def completions(
    run: Annotated[
        str,
        typer.Argument(
            help="Run directory, run name under run.output_dir, or `last`.", show_default=False
        ),
    ],
    update: Annotated[
        int | None,
        typer.Option("--update", "-u", help="Update to show. Default: the last logged."),
    ] = None,
    top: Annotated[
        int | None, typer.Option("--top", min=1, help="Only the K highest rewards, best first.")
    ] = None,
    worst: Annotated[
        int | None, typer.Option("--worst", min=1, help="Only the K lowest rewards, worst first.")
    ] = None,
    config: ConfigFiles = None,
    set_: Overrides = None,
) -> None:
    """Show prompt, completion, reward and advantage of one update's samples.

    Needs a run trained with --set logging.log_completions=true.
    """
    from mlxgrpo import runlog, ui

    if top is not None and worst is not None:
        raise ConfigError("--top and --worst exclude each other", hint="pass one of them")
    output_dir = load_config(config, set_, check_paths=False).config.run.output_dir
    run_dir = runlog.resolve_run(run, output_dir)
    order = "top" if top is not None else "worst" if worst is not None else None
    skipped: list[str] = []
    records = runlog.load_completions(run_dir, skipped)
    for line in skipped:
        ui.note(line)
    shown, rows = runlog.completions_of_update(
        records, update, order, top if top is not None else worst
    )
    label = {"top": f", top {len(rows)}", "worst": f", worst {len(rows)}"}.get(order or "", "")
    ui.completions_table(f"{run_dir.name}: update {shown}{label}", rows)
