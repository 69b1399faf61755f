"""Checkpoints: written under a temporary name and renamed, so a crash never leaves half of one.

Layout of `checkpoints/step-000050/`:
- LoRA/DoRA: `adapters.safetensors` + `adapter_config.json` (mlx-lm's adapter format, so
  `mlx_lm.generate --adapter-path` and `mlx_lm.fuse` read it as it is);
- full fine-tuning: `model.safetensors` (every parameter);
- `optimizer.safetensors` (the optimizer state) and `trainer_state.json` (update count, data
  cursor, seed, and the list of files above); `trainer_state.json` is written last and marks the
  checkpoint complete. A checkpoint is valid only if every file it lists is there and loads
  (`read_checkpoint`); `--resume auto` takes the newest valid one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxgrpo import parsing, safe_io
from mlxgrpo.engine.io.run_identity import weights_mismatch
from mlxgrpo.errors import MlxgrpoError
from mlxgrpo.safe_io import atomic_write, io_errors, make_temp_dir

STATE_FILE = "trainer_state.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
PREFIX = "step-"


def checkpoint_name(update: int) -> str:
    return f"{PREFIX}{update:06d}"


def adapter_config(finetune: Any, num_layers: int, model: Any = None) -> dict[str, Any]:
    """adapter_config.json in the form mlx-lm's `load_adapters` expects (``model``: the model
    the adapters belong to, whose architecture may narrow the default targets)."""
    from mlxgrpo.models.finetune import lora_parameters

    return {
        "fine_tune_type": finetune.type,
        "num_layers": num_layers if finetune.lora_layers < 0 else finetune.lora_layers,
        "lora_parameters": lora_parameters(finetune, model),
    }


def _save_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    # Through our own exclusive temporary: MLX would follow a symlink and report OS errors as
    # a bare RuntimeError.
    with atomic_write(path, binary=True) as fh:
        mx.save_safetensors(fh, arrays)


def _weights_files(finetune_type: str) -> list[str]:
    if finetune_type == "full":
        return [FULL_WEIGHTS]
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]


def write_weights(
    directory: Path, model: nn.Module, finetune_type: str, config: dict | None
) -> None:
    """Trainable weights: adapters (+ their config) for LoRA/DoRA, every parameter for full."""
    with io_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    if finetune_type == "full":
        _save_arrays(directory / FULL_WEIGHTS, dict(tree_flatten(model.parameters())))
        return
    _save_arrays(directory / ADAPTER_WEIGHTS, dict(tree_flatten(model.trainable_parameters())))
    safe_io.write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def save_checkpoint(
    run_dir: Path,
    update: int,
    model: nn.Module,
    optimizer: Any,
    state: dict[str, Any],
    *,
    finetune_type: str,
    adapter_cfg: dict | None,
    keep_last: int = 0,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically and prune old ones; returns its path."""
    final = run_dir / "checkpoints" / checkpoint_name(update)
    tmp = make_temp_dir(final)  # named with our pid: a later start removes it if we are killed
    try:
        write_weights(tmp, model, finetune_type, adapter_cfg)
        _save_arrays(tmp / OPTIMIZER_STATE, dict(tree_flatten(optimizer.state)))
        files = [*_weights_files(finetune_type), OPTIMIZER_STATE]
        state = {
            **state,
            "update": update,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": files,  # what must be present and load for the checkpoint to be valid
        }
        safe_io.write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        with io_errors(final):
            if final.exists():  # a re-run of the same update replaces the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in _step_dirs(run_dir) if (p / STATE_FILE).is_file()]


def _step_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


_STEP_RE = re.compile(rf"^{PREFIX}\d+$")


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class InvalidCheckpoint(MlxgrpoError):
    """A checkpoint directory that is incomplete or damaged; `problem` says what is wrong."""

    def __init__(self, path: Path, problem: str, hint: str | None = None) -> None:
        super().__init__(
            f"checkpoint '{path}' is not usable: {problem}",
            hint=hint
            or "resume from another checkpoint, or use --resume auto for the newest valid one",
        )
        self.path = path
        self.problem = problem


class CheckpointMismatch(InvalidCheckpoint):
    """A complete checkpoint written for another finetune type: not damage, so a resume
    stops at it instead of skipping to an older one."""


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]
    weights: dict[str, mx.array]
    optimizer: dict[str, mx.array]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_checkpoint(path: Path, finetune_type: str) -> LoadedCheckpoint:
    """Read every file a checkpoint lists; raises InvalidCheckpoint naming the first problem."""

    def bad(problem: str) -> InvalidCheckpoint:
        return InvalidCheckpoint(path, problem)

    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise bad(f"it has no {STATE_FILE} (it was never completed)")
    try:
        state = parsing.json_file(state_file)
    except parsing.ParseError as exc:
        raise bad(f"{STATE_FILE} is corrupt ({exc.problem})") from exc
    except OSError as exc:
        raise bad(f"{STATE_FILE} is corrupt ({_first_line(exc)})") from exc
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("update"), int)
        or ("data" not in state)
    ):
        raise bad(f"{STATE_FILE} lacks the update count or data position")
    wanted = FULL_WEIGHTS if finetune_type == "full" else ADAPTER_WEIGHTS
    other = ADAPTER_WEIGHTS if finetune_type == "full" else FULL_WEIGHTS
    # Checkpoints from before the "files" list: what this finetune type writes.
    files = state.get("files") or [*_weights_files(finetune_type), OPTIMIZER_STATE]
    if not isinstance(files, list) or not all(
        isinstance(name, str) and name and "/" not in name and name != ".." for name in files
    ):
        raise bad(f"{STATE_FILE} has a malformed file list")
    if wanted not in files or (not (path / wanted).exists() and (path / other).is_file()):
        raise CheckpointMismatch(
            path,
            f"it has no {wanted}; it was saved with another finetune.type",
            hint="resume with the finetune.type the checkpoint was written with",
        )
    arrays: dict[str, dict[str, mx.array]] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise bad(f"{name} is missing")
        try:
            if name.endswith(".safetensors"):
                arrays[name] = mx.load(str(file))
            else:
                parsing.json_file(file)
        except parsing.ParseError as exc:
            raise bad(f"{name} does not load ({exc.problem})") from exc
        except (OSError, RuntimeError, ValueError) as exc:  # MLX reports damage as RuntimeError
            raise bad(f"{name} does not load ({_first_line(exc)})") from exc
    return LoadedCheckpoint(path, state, arrays[wanted], arrays.get(OPTIMIZER_STATE, {}))


def newest_valid_checkpoint(
    run_dir: Path, finetune_type: str, on_skip: Callable[[str], None]
) -> LoadedCheckpoint | None:
    """The newest checkpoint that loads completely; each newer broken one is reported."""
    for path in reversed(_step_dirs(run_dir)):
        try:
            return read_checkpoint(path, finetune_type)
        except CheckpointMismatch:
            raise
        except InvalidCheckpoint as exc:
            on_skip(f"skipped checkpoint {path}: {exc.problem}")
    return None


def apply_checkpoint(
    loaded: LoadedCheckpoint, model: nn.Module, optimizer: Any, finetune_type: str
) -> dict:
    """Restore weights and optimizer state in place; returns the saved trainer state.

    The checkpoint must hold exactly the weights this run trains (every parameter for full
    fine-tuning, the adapters otherwise), each with the model's shape: an InvalidCheckpoint
    names the first difference, so nothing is ever loaded in part."""
    expected = model.parameters() if finetune_type == "full" else model.trainable_parameters()
    problem = weights_mismatch(loaded.weights, dict(tree_flatten(expected)))
    if problem is not None:
        raise InvalidCheckpoint(
            loaded.path,
            f"its weights do not fit this run's model: {problem}",
            hint="resume with the finetune settings it was written with, or start a new run "
            "(run.resume=never or another run.run_name)",
        )
    model.load_weights(list(loaded.weights.items()), strict=False)  # checked just above
    optimizer.state = tree_unflatten(list(loaded.optimizer.items()))
    mx.eval(model.parameters(), optimizer.state)
    return loaded.state


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, finetune_type: str) -> dict:
    """Restore weights and optimizer state in place; returns the saved trainer state."""
    return apply_checkpoint(read_checkpoint(path, finetune_type), model, optimizer, finetune_type)


LAST_RUN = "last"


def _run_adapters(run_dir: Path) -> Path | None:
    """A run's adapters: `final/` when training finished, else its newest checkpoint."""
    final = run_dir / "final"
    if (final / ADAPTER_WEIGHTS).is_file():
        return final
    latest = latest_checkpoint(run_dir)
    return latest if latest is not None and (latest / ADAPTER_WEIGHTS).is_file() else None


def resolve_adapter_source(spec: str, output_dir: str) -> Path:
    """An adapter directory from what a user may point at.

    `spec` is an adapter directory itself, a run directory (its `final/` or newest checkpoint),
    a staged run (its latest stage's), or `last`: the most recently modified run under
    `output_dir` (a stage of a staged run included) that has adapters.
    """
    from mlxgrpo.errors import ConfigError
    from mlxgrpo.runlog import runs_under, stage_runs

    if spec == LAST_RUN:
        root = Path(output_dir).expanduser()
        runs = runs_under(root)
        found = [(p.stat().st_mtime, a) for p in runs if (a := _run_adapters(p)) is not None]
        if not found:
            raise ConfigError(
                f"no run with adapters under '{root}' (run.output_dir)",
                hint="train first, or point --adapter at an adapter directory",
            )
        return max(found)[1]
    path = Path(spec).expanduser()
    if (path / ADAPTER_WEIGHTS).is_file() or not path.is_dir():
        return path  # an adapter dir, or a missing path that the loader reports clearly
    stages = [a for stage in stage_runs(path) if (a := _run_adapters(stage)) is not None]
    if stages:
        return stages[-1]
    adapters = _run_adapters(path)
    if adapters is not None:
        return adapters
    if (path / FULL_WEIGHTS).is_file() or (path / "config.json").is_file():
        raise ConfigError(
            f"'{spec}' holds a full model, not adapters",
            hint=f"load it as the model instead: -m {spec}",
        )
    return path
