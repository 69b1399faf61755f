"""`mlxgrpo train`: resolve the config, run the GRPO engine, render progress."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlxgrpo.cli.common import ConfigFiles, Overrides, load_config


def train(
    config: ConfigFiles = None,
    set_: Overrides = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="model.path")] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="run.output_dir")
    ] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="run.run_name")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="run.max_steps")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="run.seed")] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="run.resume: auto, never or a checkpoint dir")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary object at the end.")
    ] = False,
) -> int:
    """Fine-tune a model with GRPO. Ctrl-C finishes the current update, saves and exits 130."""
    flags = {
        "model.path": ("--model", model),
        "run.output_dir": ("--output-dir", str(output_dir) if output_dir else None),
        "run.run_name": ("--run-name", run_name),
        "run.max_steps": ("--max-steps", max_steps),
        "run.seed": ("--seed", seed),
        "run.resume": ("--resume", resume),
    }
    resolved = load_config(config, set_, flags)
    from mlxgrpo import distributed, ui
    from mlxgrpo.engine.loop.trainer import train as run_training
    from mlxgrpo.sinks import build_sinks

    stop = _GracefulStop()
    # What reward functions and tools print goes to stderr: stdout holds only the summary.
    if not distributed.init().is_main:
        # Under mlx.launch only rank 0 shows progress and feeds the sinks; the others are quiet.
        with stop, contextlib.redirect_stdout(sys.stderr):
            summary = run_training(resolved, [], should_stop=stop.requested)
        return 130 if summary["interrupted"] else 0
    with ui.TrainProgress() as progress:
        # TensorBoard / W&B, as [logging] asks; their problems arrive as one-line warnings.
        sinks = build_sinks(resolved.config, warn=progress.on_message)
        with stop, contextlib.redirect_stdout(sys.stderr):
            summary = run_training(resolved, [progress, *sinks], should_stop=stop.requested)
    if json_output:
        ui.raw(json.dumps(summary) + "\n")
    return 130 if summary["interrupted"] else 0


class _GracefulStop:
    """First Ctrl-C asks the loop to stop after the current update; a second one aborts."""

    def __init__(self) -> None:
        self.count = 0
        self.previous = None

    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        from mlxgrpo import ui

        ui.note("stopping after this update (Ctrl-C again to abort without saving)")

    def __enter__(self) -> _GracefulStop:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)
