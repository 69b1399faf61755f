"""Weights & Biases: the same scalars as TensorBoard, plus a table of sample completions.

The `wandb` module is handed in (imported by `build_sinks`), so a missing package is reported
once there and this module never imports it itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.sinks.names import scalars

RUN_ID_FILE = "wandb-run-id"  # in the run directory: a resumed training continues its W&B run


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))  # chat messages: the user's last turn
    return json.dumps(prompt, ensure_ascii=False, default=str)


class WandbSink(Callback):
    def __init__(
        self,
        wandb: Any,
        project: str,
        config: dict[str, Any],
        completions_every: int,
        note: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.wandb = wandb
        self.note = note
        self.project = project
        self.config = config
        self.completions_every = completions_every
        self.run: Any = None

    def on_start(self, info: dict[str, Any]) -> None:
        run_dir = Path(info["run_dir"])
        id_file = run_dir / RUN_ID_FILE
        resume: dict[str, Any] = {}
        if info.get("start_update", 0) > 0 and id_file.is_file():
            resume = {"id": id_file.read_text().strip(), "resume": "allow"}
        self.run = self.wandb.init(
            project=self.project,
            name=run_dir.name,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),  # offline runs land in <run>/wandb/
            config=self.config,
            # wandb's own console lines would bypass mlxgrpo's UI: one note below says where
            # the run went instead (WANDB_SILENT, when set, still decides).
            settings=self.wandb.Settings(silent=os.environ.get("WANDB_SILENT") or "true"),
            **resume,
        )
        from mlxgrpo import safe_io

        safe_io.write_text(id_file, self.run.id + "\n")
        if self.run.offline:
            where = Path(self.run.dir).parent
            self.note(f"W&B offline run in {where}; upload it later with: wandb sync {where}")
        else:
            self.note(f"W&B run: {self.run.url}")

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(metrics), step=update)

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None:
        every = self.completions_every
        if self.run is None or not every or update % every or not records:
            return
        reward_names = sorted({name for r in records for name in r.get("rewards", {})})
        columns = ["update", "prompt", "completion", "reward", "advantage", *reward_names]
        rows = [
            [
                update,
                _text(r.get("prompt")),
                r.get("completion", ""),
                r.get("reward"),
                r.get("advantage"),
                *(r.get("rewards", {}).get(name) for name in reward_names),
            ]
            for r in records
        ]
        table = self.wandb.Table(columns=columns, data=rows)
        self.run.log({"completions": table}, step=update)

    def on_eval(self, update: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(metrics, prefix="eval/"), step=update)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1 if summary.get("interrupted") else 0)

    def abort(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1)
