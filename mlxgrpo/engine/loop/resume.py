"""Resuming a run from a checkpoint: which one, whether it fits this run's settings, and
loading it into the training session (docs/architecture.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mlxgrpo.engine.io.callbacks import Callback, truncate_jsonl
from mlxgrpo.errors import ConfigError
from mlxgrpo.safe_io import io_errors


def check_resume_target(resume: str) -> None:
    """Fail on a run.resume path that is no checkpoint before the model loads or a run
    directory is made (which checkpoint `auto` picks is :func:`resume_session`'s business)."""
    if resume in ("auto", "never"):
        return
    from mlxgrpo.engine.io.checkpoint import STATE_FILE

    path = Path(resume).expanduser()
    hint = "use auto, never, or a checkpoints/step-NNNNNN directory"
    if not path.is_dir():
        what = "a file, not a checkpoint directory" if path.exists() else "no such directory"
        raise ConfigError(f"run.resume = '{resume}': {what}", hint=hint)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"run.resume = '{resume}': not a complete mlxgrpo checkpoint (no {STATE_FILE})",
            hint=hint,
        )


def resume_session(session: Any, cb: Callback) -> None:
    """Load the checkpoint ``run.resume`` names into the session (a trainer Session): its
    weights, optimizer state, data position, update count and entropy weight; ``auto`` takes
    the newest valid one, skipping and naming broken ones, or starts afresh."""
    from mlxgrpo.engine.io.checkpoint import (
        apply_checkpoint,
        newest_valid_checkpoint,
        read_checkpoint,
    )

    resume = session.resolved.config.run.resume
    if resume == "never":
        return
    finetune_type = session.resolved.config.finetune.type
    dist = session.dist
    if resume == "auto":
        # Broken checkpoints (a kill, a full disk) are skipped and named, not fatal.
        # Rank 0 picks; the others load the very checkpoint it named ("" = none).
        loaded = (
            newest_valid_checkpoint(session.run_dir, finetune_type, cb.on_message)
            if dist.is_main
            else None
        )
        chosen = dist.broadcast_text(str(loaded.path) if loaded is not None else "")
        if chosen and loaded is None:
            loaded = read_checkpoint(Path(chosen), finetune_type)
        if loaded is None:
            if not dist.is_main:
                return
            # Nothing to resume, so this run starts at update 0: the records of an earlier
            # attempt killed before its first checkpoint would otherwise be doubled.
            for name in ("metrics.jsonl", "completions.jsonl"):
                with io_errors(session.run_dir / name, "remove"):
                    (session.run_dir / name).unlink(missing_ok=True)
            return
        path = loaded.path
    else:
        path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"run.resume = '{resume}': no such checkpoint directory",
            hint="use auto, never, or a checkpoints/step-NNNNNN directory",
        )
    if resume != "auto":
        loaded = read_checkpoint(path, finetune_type)
    _check_identity(session, loaded.path, loaded.state, cb)
    state = apply_checkpoint(loaded, session.model, session.optimizer, finetune_type)
    session.stream.load_state(state["data"])
    if session.demonstrations is not None and isinstance(state.get("demonstrations"), dict):
        session.demonstrations.load_state(state["demonstrations"])
    session.start_update = int(state["update"])
    steps = session.resolved.config.optim.steps_per_generation
    if session.start_update % steps:
        raise ConfigError(
            f"checkpoint {path} is at update {session.start_update}, inside a rollout of "
            f"optim.steps_per_generation = {steps} updates",
            hint="resume with the steps_per_generation it was written with, or pick a "
            "checkpoint at a multiple of it",
        )
    control = session.entropy_control
    if control is not None and isinstance(state.get("entropy_coeff"), int | float):
        control.coeff = float(state["entropy_coeff"])  # the weight its next update used
        session.ctx.algorithm = replace(session.ctx.algorithm, entropy_coeff=control.coeff)
    if not dist.is_main:
        return
    for name in ("metrics.jsonl", "completions.jsonl"):
        truncate_jsonl(session.run_dir / name, session.start_update)
    cb.on_message(f"resumed from {path} at update {session.start_update}")


def _check_identity(session: Any, path: Path, state: dict[str, Any], cb: Callback) -> None:
    """Refuse to resume a checkpoint written with other model, finetune or data settings
    (listing them) unless run.resume_despite_changes; then name them."""
    from mlxgrpo.engine.io.run_identity import identity_changes, run_identity

    cfg = session.resolved.config
    saved = state.get("identity")
    changes = identity_changes(saved if isinstance(saved, dict) else {}, run_identity(cfg))
    if not changes:
        return
    listed = "; ".join(changes)
    if not cfg.run.resume_despite_changes:
        raise ConfigError(
            f"checkpoint {path} was written with other settings ({listed})",
            hint="resume with those settings, start a new run (run.resume=never or another "
            "run.run_name), or set run.resume_despite_changes=true to resume anyway",
        )
    cb.on_message(f"resuming {path} despite changed settings: {listed}")
