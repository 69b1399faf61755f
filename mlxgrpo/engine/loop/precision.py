"""The dtypes a run actually holds, for the run header: read off the arrays, not the config.

Policy (docs/architecture.md §8): frozen weights in the compute dtype (`model.dtype`; auto =
bfloat16 on a GPU, float32 on CPU); trainable parameters and so their optimizer state always
float32; full fine-tuning loads the whole model in float32 (its weights are the trainable
ones); log-probs and the loss are float32 whatever the weights are.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.models.finetune import is_quantized

_OPTIMIZER_SCALARS = ("step", "learning_rate")
_TRAINED = {"lora": "LoRA", "dora": "DoRA", "full": "all weights"}


def dtype_names(arrays: list[mx.array]) -> str:
    """'float32', or 'bfloat16/float32' when mixed; floating arrays only."""
    names = {str(a.dtype).removeprefix("mlx.core.") for a in arrays}
    names = {n for n in names if n.startswith(("float", "bfloat"))}
    return "/".join(sorted(names)) or "none"


def _quantization(model: nn.Module) -> str | None:
    kinds = {
        f"{m.bits}-bit {m.mode}" if getattr(m, "mode", "affine") != "affine" else f"{m.bits}-bit"
        for _, m in model.named_modules()
        if is_quantized(m)
    }
    return "/".join(sorted(kinds)) + " quantized" if kinds else None


def precision_report(
    model: nn.Module, optimizer: Any, finetune_type: str, ref_model: nn.Module | None = None
) -> dict[str, str]:
    """{weights, trainable, optimizer, log-probs[, reference]} dtypes of what the run holds.

    The optimizer must be initialised (`optimizer.init(model.trainable_parameters())`).
    """
    trainable = dict(tree_flatten(model.trainable_parameters()))
    frozen = [v for k, v in tree_flatten(model.parameters()) if k not in trainable]
    weights = dtype_names(frozen or list(trainable.values()))
    if (quantized := _quantization(model)) is not None:
        weights += f" ({quantized})"
    state = [v for k, v in tree_flatten(optimizer.state) if k not in _OPTIMIZER_SCALARS]
    # A two-token forward pass through the log-prob code the loss uses: its dtype is theirs.
    logp = sequence_logprobs(model, mx.array([[0, 0]]), 1)
    trained = _TRAINED.get(finetune_type, finetune_type)
    report = {
        "weights": weights,
        "trainable": f"{dtype_names(list(trainable.values()))} ({trained})",
        "optimizer": dtype_names(state),
        "log-probs": dtype_names([logp]),
    }
    if ref_model is not None:
        report["reference"] = dtype_names([v for _, v in tree_flatten(ref_model.parameters())])
    return report


def describe(report: dict[str, str]) -> str:
    """'weights bfloat16, trainable float32 (LoRA), optimizer float32, log-probs float32'."""
    return ", ".join(f"{key} {value}" for key, value in report.items())
