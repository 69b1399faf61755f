"""Which weights train (LoRA, DoRA or all), and the reference policy for the KL term.

With adapters, the reference is the same model with its adapters taken out for one forward
pass: no second copy of the weights. With full fine-tuning it is a frozen copy, loaded once.
Trainable parameters are float32 whatever the compute dtype (bfloat16 master weights round
small updates away); their gradients and optimizer state follow them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxgrpo.errors import ConfigError
from mlxgrpo.models.batch_masks import fit_batch_masks
from mlxgrpo.models.blocks import architecture, complete_module_state


def num_blocks(model: nn.Module) -> int:
    return len(model.layers)


# Architectures whose forward pass reads some linear layers' weights directly (so a LoRA
# wrapper there breaks it): their default LoRA targets leave those layers out.
LORA_EXCLUDED: dict[str, tuple[str, ...]] = {
    "gemma3n": ("altup.prediction_coefs", "altup.correction_coefs"),
}


def _default_targets(model: nn.Module, excluded: tuple[str, ...]) -> list[str]:
    """mlx-lm's default LoRA targets (every linear or embedding layer in the blocks) less
    ``excluded``; a layer already wrapped in an adapter counts under its own name."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    kinds += (nn.Embedding, nn.QuantizedEmbedding)
    found: set[str] = set()
    for block in model.layers:
        named = list(block.named_modules())
        wrapped = {name for name, module in named if "lora_a" in module}
        found |= wrapped
        found |= {
            name
            for name, module in named
            if (hasattr(module, "to_lora") or isinstance(module, kinds))
            and not any(name.startswith(w + ".") for w in wrapped)
        }
    return sorted(found - set(excluded))


def lora_parameters(finetune: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """mlx-lm's `lora_parameters` for the [finetune] section (also saved in adapter_config);
    ``model``: the model they are for, whose architecture may narrow the default targets
    (:data:`LORA_EXCLUDED`)."""
    params: dict[str, Any] = {
        "rank": finetune.lora_rank,
        "scale": finetune.lora_scale,
        "dropout": finetune.lora_dropout,
    }
    if finetune.target_modules:
        params["keys"] = list(finetune.target_modules)
    elif model is not None and (excluded := LORA_EXCLUDED.get(architecture(model))):
        params["keys"] = _default_targets(model, excluded)
    return params


def prepare_trainable(model: nn.Module, finetune: Any) -> int:
    """Freeze the base, insert adapters (or unfreeze all); returns the trainable parameter count.

    A model that arrives with adapters (model.adapter_path) keeps training those adapters.
    """
    complete_module_state(model)
    fit_batch_masks(model)
    if _adapter_modules(model):
        if finetune.type == "full":
            raise ConfigError(
                "model.adapter_path cannot be combined with finetune.type = full",
                hint="fuse the adapters into the model first (mlx_lm.fuse), or train them as lora",
            )
        model.freeze()
        model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    elif finetune.type == "full":
        _refuse_quantized_full(model)
        model.unfreeze()
    else:
        blocks = num_blocks(model)
        layers = blocks if finetune.lora_layers < 0 else finetune.lora_layers
        if layers > blocks:
            raise ConfigError(
                f"finetune.lora_layers = {layers} but the model has {blocks} blocks",
                hint=f"use at most {blocks}, or -1 for all",
            )
        model.freeze()
        linear_to_lora_layers(
            model, layers, lora_parameters(finetune, model), use_dora=finetune.type == "dora"
        )
        _check_adapter_widths(model, finetune.type)
    _trainable_to_float32(model)
    count = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if count == 0:
        raise ConfigError(
            "no trainable parameters: finetune.target_modules matched no layer",
            hint="leave target_modules empty for mlx-lm's defaults, or name modules such as "
            "self_attn.q_proj",
        )
    return count


def is_quantized(module: nn.Module) -> bool:
    """A quantized layer keeps `scales` beside its packed integer weight."""
    return "scales" in module


def _refuse_quantized_full(model: nn.Module) -> None:
    quantized = [name for name, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise ConfigError(
            f"finetune.type = full cannot train a quantized model ({len(quantized)} quantized "
            f"layers, e.g. {quantized[-1]})",
            hint="use finetune.type = lora or dora (QLoRA), or convert the model without -q",
        )


def _input_width(layer: nn.Module) -> int:
    width = layer.weight.shape[-1]
    return width * 32 // layer.bits if is_quantized(layer) else width


def _check_adapter_widths(model: nn.Module, kind: str) -> None:
    """mlx-lm's DoRA computes a 3- or 6-bit layer's input width as in · (32 // bits), which is
    wrong; refuse here rather than fail inside the first forward pass."""
    for name, adapter, base in _adapter_modules(model):
        if not isinstance(adapter, (LoRALinear, DoRALinear)):
            continue  # embeddings and expert layers lay their matrices out differently
        if adapter.lora_a.shape[0] != _input_width(base):
            bits = getattr(base, "bits", None)
            raise ConfigError(
                f"mlx-lm builds {kind} layers of the wrong width for {name}"
                + (f" ({bits}-bit quantized)" if bits else ""),
                hint="use finetune.type = lora, or a model quantized to 2, 4 or 8 bits",
            )


def _trainable_to_float32(model: nn.Module) -> None:
    """Cast trainable parameters to float32 (adapters loaded from a half-precision file, or
    full fine-tuning of a model loaded in another dtype)."""
    updates = [
        (name, value.astype(mx.float32))
        for name, value in tree_flatten(model.trainable_parameters())
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != mx.float32
    ]
    if updates:
        model.load_weights(updates, strict=False)


def _adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, adapter module, wrapped base module) for every LoRA/DoRA layer in the model."""
    found = []
    for name, module in model.named_modules():
        base = getattr(module, "linear", None)
        if base is None:
            base = getattr(module, "embedding", None)
        if base is not None and hasattr(module, "lora_a"):
            found.append((name, module, base))
    return found


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily swap each adapter layer for the base layer it wraps (exact reference)."""
    swaps = _adapter_modules(model)
    if not swaps:
        yield
        return
    model.update_modules(tree_unflatten([(name, base) for name, _, base in swaps]))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten([(name, adapter) for name, adapter, _ in swaps]))


def model_source(model_cfg: Any) -> dict[str, Any]:
    """Where the weights come from, besides ``model.path``: adapters to load, remote code."""
    return dict(adapter_path=model_cfg.adapter_path, trust_remote_code=model_cfg.trust_remote_code)


def load_policy(model_cfg: Any, finetune: Any, seed: int | None = None) -> tuple[Any, Any, int]:
    """``(model, tokenizer, trainable parameter count)``: the model a run trains, loaded and
    prepared as `mlxgrpo train` does (``model_cfg``, ``finetune``: the config's sections).

    Full fine-tuning trains every weight, so all are float32 masters (bfloat16 would round
    small updates away). Loading may draw from MLX's generator (the first build of a builtin
    model initialises a module), so with ``seed`` the generator is seeded again before the
    adapters are made: they start the same whether or not loading drew.
    """
    from mlxgrpo.backend import seed_everything
    from mlxgrpo.models.loading import load_model

    dtype = "float32" if finetune.type == "full" else model_cfg.dtype
    model, tokenizer = load_model(model_cfg.path, dtype=dtype, **model_source(model_cfg))
    if seed is not None:
        seed_everything(seed)
    return model, tokenizer, prepare_trainable(model, finetune)
