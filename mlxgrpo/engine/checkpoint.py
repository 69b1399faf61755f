"""Checkpoints: written under a temporary name and renamed, so a crash never leaves half of one.

Layout of `checkpoints/step-000050/`:
- LoRA/DoRA: `adapters.safetensors` + `adapter_config.json` (mlx-lm's adapter format, so
  `mlx_lm.generate --adapter-path` and `mlx_lm.fuse` read it as it is);
- full fine-tuning: `model.safetensors` (every parameter);
- `optimizer.safetensors` (the optimizer state) and `trainer_state.json` (update count, data
  cursor, seed); `trainer_state.json` is written last and marks the checkpoint complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxgrpo.errors import MlxgrpoError

STATE_FILE = "trainer_state.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
PREFIX = "step-"


def checkpoint_name(update: int) -> str:
    return f"{PREFIX}{update:06d}"


def adapter_config(finetune: Any, num_layers: int) -> dict[str, Any]:
    """adapter_config.json in the form mlx-lm's `load_adapters` expects."""
    from mlxgrpo.engine.finetune import lora_parameters

    return {
        "fine_tune_type": finetune.type,
        "num_layers": num_layers if finetune.lora_layers < 0 else finetune.lora_layers,
        "lora_parameters": lora_parameters(finetune),
    }


def write_weights(
    directory: Path, model: nn.Module, finetune_type: str, config: dict | None
) -> None:
    """Trainable weights: adapters (+ their config) for LoRA/DoRA, every parameter for full."""
    directory.mkdir(parents=True, exist_ok=True)
    if finetune_type == "full":
        mx.save_safetensors(str(directory / FULL_WEIGHTS), dict(tree_flatten(model.parameters())))
        return
    mx.save_safetensors(
        str(directory / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters()))
    )
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


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
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(update)
    tmp = root / f".tmp-{checkpoint_name(update)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(tmp, model, finetune_type, adapter_cfg)
    mx.save_safetensors(str(tmp / OPTIMIZER_STATE), dict(tree_flatten(optimizer.state)))
    state = {**state, "update": update, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():  # a re-run of the same update replaces the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, finetune_type: str) -> dict:
    """Restore weights and optimizer state in place; returns the saved trainer state."""
    if not (path / STATE_FILE).is_file():
        raise MlxgrpoError(
            f"{path} is not a complete mlxgrpo checkpoint (no {STATE_FILE})",
            hint="point run.resume at a checkpoints/step-NNNNNN directory",
        )
    weights_file = path / (FULL_WEIGHTS if finetune_type == "full" else ADAPTER_WEIGHTS)
    if not weights_file.is_file():
        raise MlxgrpoError(
            f"{path} has no {weights_file.name}; it was saved with another finetune.type",
            hint="resume with the finetune.type the checkpoint was written with",
        )
    model.load_weights(list(mx.load(str(weights_file)).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_STATE)).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / STATE_FILE).read_text())


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
    or `last`: the most recently modified run under `output_dir` that has adapters.
    """
    from mlxgrpo.errors import ConfigError

    if spec == LAST_RUN:
        root = Path(output_dir).expanduser()
        runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
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
    adapters = _run_adapters(path)
    if adapters is not None:
        return adapters
    if (path / FULL_WEIGHTS).is_file() or (path / "config.json").is_file():
        raise ConfigError(
            f"'{spec}' holds a full model, not adapters",
            hint=f"load it as the model instead: -m {spec}",
        )
    return path
