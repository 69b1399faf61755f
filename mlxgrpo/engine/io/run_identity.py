"""What a checkpoint was trained as, so that a resume can check it continues the same run.

A checkpoint's trainable state only means something for the settings that shaped it (what is
trained, on which model) and its data position only for the stream it counts in (dataset,
split, fields, seed, shuffling). :func:`run_identity` records those settings in every
checkpoint; :func:`identity_changes` lists what a resuming configuration changed. The trainer
refuses such a resume unless ``run.resume_despite_changes`` is set, and then names the
changes; the weights themselves are checked against the model in any case
(:func:`weights_mismatch`), so nothing is loaded partly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Dotted config keys that define a checkpoint's trainable state and its data stream.
IDENTITY_KEYS = (
    "model.path",
    "model.adapter_path",
    "finetune.type",
    "finetune.lora_rank",
    "finetune.lora_scale",
    "finetune.lora_layers",
    "finetune.target_modules",
    "data.dataset",
    "data.subset",
    "data.train_split",
    "data.prompt_field",
    "data.answer_field",
    "data.shuffle",
    "run.seed",
    "run.max_train_samples",
)


def run_identity(config: Any) -> dict[str, Any]:
    """The values of :data:`IDENTITY_KEYS` in ``config`` (a resolved mlxgrpo config)."""
    identity = {}
    for key in IDENTITY_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        identity[key] = list(value) if isinstance(value, tuple | list) else value
    return identity


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for every identity key whose value differs (keys a checkpoint
    from an older mlxgrpo did not record are not compared)."""
    changes = []
    for key in IDENTITY_KEYS:
        if key in saved and saved[key] != current.get(key):
            changes.append(f"{key}: {saved[key]!r} -> {current.get(key)!r}")
    return changes


def weights_mismatch(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Why the checkpoint's arrays ``saved`` cannot be the model's trainable weights
    ``expected`` (both name -> array), or None when every name and shape agrees."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(expected)} trainable arrays are "
                         f"not in it (first: {missing[0]})")  # fmt: skip
        if extra:
            parts.append(f"{len(extra)} of its arrays are not trainable here "
                         f"(first: {extra[0]})")  # fmt: skip
        return "; ".join(parts)
    for name, value in expected.items():
        if tuple(saved[name].shape) != tuple(value.shape):
            return (
                f"{name} has shape {tuple(saved[name].shape)} in it, {tuple(value.shape)} "
                "in the model"
            )
    return None
