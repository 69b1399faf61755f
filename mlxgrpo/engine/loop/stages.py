"""Staged runs: a config's ``[[stages]]`` run in order in one run directory, each stage in a
directory of its own and from the weights the stage before it ended with (docs/architecture.md
§3). The usual pair: a supervised warm-up (``algorithm.type = "sft"``), then GRPO.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mlxgrpo.config import ResolvedConfig


def stage_config(
    stage: ResolvedConfig, run_dir: Path, previous_final: Path | None, resume: str
) -> ResolvedConfig:
    """The stage's config as it runs: in ``run_dir/<stage name>``, resumed there when the
    whole run resumes (``resume = "auto"``), and starting from ``previous_final`` (the stage
    before it's final/: its adapters, or its whole model with full fine-tuning)."""
    if stage.stage is None:
        raise ValueError("stage_config takes one of a staged config's stages")
    cfg = stage.config
    run = replace(
        cfg.run,
        output_dir=str(run_dir),
        run_name=stage.stage,
        resume="auto" if resume == "auto" else "never",
    )
    model = cfg.model
    if previous_final is not None:
        if cfg.finetune.type == "full":
            model = replace(model, path=str(previous_final))
        else:
            model = replace(model, adapter_path=str(previous_final))
    return replace(stage, config=replace(cfg, run=run, model=model))


def finished_stage(run_dir: Path, name: str) -> Path | None:
    """The final/ directory of a stage that finished in an earlier attempt, or None."""
    final = run_dir / name / "final"
    return final if (final / "training.json").is_file() else None
