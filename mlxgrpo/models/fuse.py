"""Fuse trained adapters into a standalone model directory (`mlxgrpo convert fuse`).

Shares the staging rules of `convert`: the fused model is written beside the output and moved
into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from mlxgrpo.models.convert import (
    StageCallback,
    StageWriter,
    check_dtype,
    model_facts,
    record_dtype,
    use_source_side_files,
    weight_bytes,
)
from mlxgrpo.models.loading import (
    check_adapter_dir,
    classify_model_spec,
    load_model_with_config,
    resolve_load_target,
)
from mlxgrpo.models.output_dir import check_output_dir, install, staging


def _fuse_layers(model: Any, dequantize: bool) -> int:
    """Fold every LoRA/DoRA layer into the layer it wraps; returns how many were fused."""
    from mlx.utils import tree_unflatten

    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def fuse_adapters(
    model: str,
    adapter_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    dequantize: bool = False,
    dtype: str | None = None,
    force: bool = False,
    on_stage: StageCallback | None = None,
) -> dict[str, Any]:
    """Fold the adapters in `adapter_dir` into `model` and save a standalone model directory.

    The checkpoint's dtypes are kept unless `dtype` is given. A quantized base stays quantized
    (each fused layer is re-quantized) unless `dequantize`, which dequantizes the whole model.
    Tokenizer files (HF files or nanochat's tokenizer.pkl) are copied from the base model.
    """
    stage = on_stage or (lambda _: None)
    started = time.perf_counter()
    dtype = check_dtype(dtype)
    adapters = check_adapter_dir(str(adapter_dir))  # also checks adapter_config.json
    base_target = resolve_load_target(model)
    is_local = classify_model_spec(model) != "hub"
    out = check_output_dir(output, force, [Path(base_target), adapters] if is_local else [adapters])

    from mlx_lm.utils import dequantize_model, hf_repo_to_path, save_config, save_model

    from mlxgrpo.models.loading import cast_floating_parameters, resolve_model_dtype

    stage(f"Loading {model} with adapters from {adapters}")
    with contextlib.redirect_stdout(StageWriter(stage)):
        loaded, _, config = load_model_with_config(model, adapter_path=str(adapters), dtype=dtype)
    source_dir = Path(base_target) if is_local else hf_repo_to_path(base_target)
    n_fused = _fuse_layers(loaded, dequantize)
    stage(f"Fused {n_fused} adapter layers")
    if dequantize:
        stage("Dequantizing")
        loaded = dequantize_model(loaded)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if dtype is not None:
        cast_floating_parameters(loaded, resolve_model_dtype(dtype))
    facts = model_facts(loaded)
    with staging(out) as staged:
        stage("Saving the fused model")
        save_model(staged, loaded, donate_model=False)
        keep_vision = "vision_tower" in getattr(loaded, "model", {})
        save_config(config, staged / "config.json", keep_vision_config=keep_vision)
        if facts["dtype"] is not None:
            record_dtype(staged / "config.json", facts["dtype"])
        copied = use_source_side_files(source_dir, staged)
        size_after = weight_bytes(staged)
        stage(f"Moving the model to {out}")
        install(staged, out)
    quant = config.get("quantization") or {}
    return {
        "source": model,
        "adapter_dir": str(adapters),
        "output": str(out),
        "size_before_bytes": weight_bytes(source_dir),
        "size_after_bytes": size_after,
        **facts,
        "quantization": {k: quant[k] for k in ("bits", "group_size", "mode") if k in quant} or None,
        "fused_layers": n_fused,
        "dequantized": dequantize,
        "copied_files": copied,
        "seconds": time.perf_counter() - started,
    }
