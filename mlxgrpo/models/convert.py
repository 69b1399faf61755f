"""Convert Hugging Face models to MLX (dtype, quantization); the staging rules `fuse` shares.

Conversions write into a temporary directory beside the output and move it into place only
when it is complete, so a failed run never leaves half a model and `force` never loses the old
one before the new one exists. mlx-lm prints while it works; its lines are captured and passed
on through `on_stage`. Results are plain summary dicts for the CLI to render.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.loading import (
    check_local_model_dir,
    check_model_files,
    classify_model_spec,
    read_json_object,
    resolve_load_target,
)
from mlxgrpo.models.output_dir import check_output_dir, install, staging

StageCallback = Callable[[str], None]

ALLOWED_BITS = (2, 3, 4, 6, 8)
ALLOWED_DTYPES = ("float16", "bfloat16", "float32")
QUANT_MODES = ("affine", "mxfp4")
AFFINE_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# mxfp4 has one layout: 4-bit floats sharing one 8-bit scale per 32 weights.
MXFP4_BITS, MXFP4_GROUP_SIZE = 4, 32
# Files of a model directory that fuse rewrites or that belong to another format; everything
# else at the top level (tokenizer files incl. nanochat's tokenizer.pkl, generation config,
# chat templates, remote code) is copied as it is.
_NOT_COPIED = ("*.safetensors", "*.safetensors.index.json", "*.pt", "*.pth", "*.bin", "*.gguf")
_NOT_COPIED_NAMES = ("config.json", "adapter_config.json", "mlxgrpo_builtin.json")


# ---------------------------------------------------------------------------------------------
# Checks that run before any work


def check_dtype(dtype: str | None) -> str | None:
    """`dtype` itself when it is one mlx-lm converts to (or None), else a ConfigError."""
    if dtype is None or dtype in ALLOWED_DTYPES:
        return dtype
    raise ConfigError(f"unknown dtype '{dtype}'", hint=f"use one of {', '.join(ALLOWED_DTYPES)}")


def check_quantization(
    bits: int | None, group_size: int | None, mode: str = "affine"
) -> dict[str, Any] | None:
    """The {bits, group_size, mode} to quantize with, or None for no quantization.

    Quantization is on when `bits` is given or the mode is mxfp4 (which has one fixed layout).
    """
    if mode not in QUANT_MODES:
        hint = f"use one of {', '.join(QUANT_MODES)}"
        raise ConfigError(f"unknown quantization mode '{mode}'", hint=hint)
    if mode == "mxfp4":
        if bits not in (None, MXFP4_BITS):
            hint = f"pass --bits {MXFP4_BITS} or none, or use mode affine"
            raise ConfigError(f"mxfp4 stores {MXFP4_BITS} bits per weight, not {bits}", hint=hint)
        if group_size not in (None, MXFP4_GROUP_SIZE):
            hint = f"pass --group-size {MXFP4_GROUP_SIZE} or none"
            raise ConfigError(f"mxfp4 needs group size {MXFP4_GROUP_SIZE}", hint=hint)
        return {"bits": MXFP4_BITS, "group_size": MXFP4_GROUP_SIZE, "mode": mode}
    if bits is None:
        if group_size is not None:
            hint = "add --quantize (and --bits), or drop --group-size"
            raise ConfigError("a group size was given without quantization", hint=hint)
        return None
    if bits not in ALLOWED_BITS:
        hint = f"bits must be one of {', '.join(map(str, ALLOWED_BITS))}"
        raise ConfigError(f"cannot quantize to {bits} bits", hint=hint)
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in AFFINE_GROUP_SIZES:
        hint = f"use one of {', '.join(map(str, AFFINE_GROUP_SIZES))}"
        raise ConfigError(f"unsupported quantization group size {group_size}", hint=hint)
    return {"bits": bits, "group_size": group_size, "mode": mode}


# ---------------------------------------------------------------------------------------------
# stdout capture, error translation


class StageWriter(io.TextIOBase):
    """Stands in for stdout while mlx-lm works: its `[INFO] …` lines become stages.

    The callback runs with the real stdout back in place, so a CLI that prints its stages
    (e.g. a Rich console writing to sys.stdout) is neither swallowed nor looped back here.
    """

    def __init__(self, on_stage: StageCallback) -> None:
        self._on_stage = on_stage
        self._real_stdout = sys.stdout
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *complete, self._pending = (self._pending + text).split("\n")
        for line in complete:
            if line.strip().startswith("[INFO] "):
                with contextlib.redirect_stdout(self._real_stdout):
                    self._on_stage(line.strip().removeprefix("[INFO] "))
        return len(text)


@contextlib.contextmanager
def _mlx_lm_errors(spec: str) -> Iterator[None]:
    """mlx-lm's and the Hub's failures, as errors that say what to do."""
    from huggingface_hub import errors as hub

    try:
        yield
    except (hub.HfHubHTTPError, hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled) as err:
        hint = "check the id, the network and your Hub login (gated models need one)"
        raise MlxgrpoError(
            f"could not fetch model '{spec}' from the Hub: {err}", hint=hint
        ) from err
    except hub.HFValidationError as err:
        hint = "pass a model directory or a Hub id like Qwen/Qwen2.5-0.5B-Instruct"
        raise ConfigError(f"'{spec}' is neither a directory nor a Hub id", hint=hint) from err
    except FileNotFoundError as err:
        raise ConfigError(f"model '{spec}' is incomplete: {err}") from err
    except json.JSONDecodeError as err:
        hint = "re-download the model, or restore the file from the original"
        raise ConfigError(f"model '{spec}' has a corrupt JSON file: {err}", hint=hint) from err
    except RuntimeError as err:
        # MLX's own errors for a damaged weights file: `[load_safetensors] …`, `[read] …`.
        text = str(err)
        if "safetensors" not in text and not text.startswith("[read]"):
            raise
        hint = "re-download the model, or re-save its weights"
        raise ConfigError(
            f"the weights of model '{spec}' are truncated or corrupt: {err}", hint=hint
        ) from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            hint = "pass --trust-remote-code only if you trust that code"
            raise ConfigError(f"model '{spec}' needs its own code to build", hint=hint) from err
        if "not supported" in str(err):
            hint = "upgrade mlx-lm or choose a supported architecture"
            raise MlxgrpoError(f"mlx-lm cannot convert '{spec}': {err}", hint=hint) from err
        raise


def _download_snapshot(repo_id: str, on_stage: StageCallback) -> Path:
    """The local snapshot of a Hub model (the files mlx-lm would fetch), downloaded if needed."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    on_stage(f"Downloading {repo_id}")
    with _mlx_lm_errors(repo_id):
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the safetensors weight files in a model directory."""
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def model_facts(model: Any) -> dict[str, Any]:
    """Logical parameter count, bits per weight, dominant float dtype, quantized layer count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    dtypes: Counter[str] = Counter()
    stored_bytes = 0
    for _, value in tree_flatten(model.parameters()):
        stored_bytes += value.nbytes
        if mx.issubdtype(value.dtype, mx.floating):
            dtypes[str(value.dtype).removeprefix("mlx.core.")] += value.size
    # Quantized weights count as the values they stand for, not as packed words.
    n_parameters = int(get_total_parameters(model))
    return {
        "n_parameters": n_parameters,
        # mlx-lm's compute_bits_per_weight, without private buffers (e.g. rope tables) that
        # are not saved: all saved bytes (scales, biases, norms too) over the logical count.
        "bits_per_weight": stored_bytes * 8 / n_parameters,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "quantized_layers": sum(1 for _, m in model.named_modules() if "scales" in m),
    }


def _check_quantizable(model_dir: Path, quant: dict[str, Any], trust_remote_code: bool) -> int:
    """How many layers the group size skips; a ConfigError when it fits no layer at all.

    mlx-lm quietly leaves a layer unquantized when the group size does not divide its input
    width, so a wrong group size would otherwise give an unquantized "quantized" model.
    """
    from mlx_lm.utils import load_model

    config = read_json_object(model_dir / "config.json", hint="restore the model's config.json")
    if "quantization" in config or "quantization_config" in config:
        hint = "quantize from the unquantized original model"
        raise ConfigError(f"'{model_dir}' is already quantized", hint=hint)
    with _mlx_lm_errors(str(model_dir)):
        model, _ = load_model(model_dir, lazy=True, trust_remote_code=trust_remote_code)
    widths = [m.weight.shape[-1] for _, m in model.named_modules() if hasattr(m, "to_quantized")]
    group = quant["group_size"]
    if widths and not any(width % group == 0 for width in widths):
        raise ConfigError(
            f"group size {group} divides the input width of no layer "
            f"(widths: {', '.join(map(str, sorted(set(widths))))})",
            hint="choose a group size that divides the layer widths (32, 64 or 128)",
        )
    return sum(1 for width in widths if width % group)


def record_dtype(config_path: Path, dtype: str) -> None:
    """Make config.json name the dtype the weights now have (mlx-lm keeps the source's)."""
    config = read_json_object(config_path, hint="restore the model's config.json")
    keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype
    config_path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# HF → MLX


def _convert_without_tokenizer(
    model_dir: Path, dest: Path, dtype: str | None, quant: dict[str, Any] | None, trust: bool
) -> None:
    """mlx-lm's convert for a directory whose tokenizer mlx-lm cannot load (nanochat's
    tokenizer.pkl): the same cast and quantization, without loading or saving a tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(model_dir, lazy=True, trust_remote_code=trust)
    dtype = dtype or config.get("torch_dtype")  # mlx-lm's default
    if dtype in ALLOWED_DTYPES:
        target, castable = getattr(mx, dtype), getattr(model, "cast_predicate", lambda _: True)

        def cast(key: str, value: Any) -> Any:
            floating = mx.issubdtype(value.dtype, mx.floating)
            return value.astype(target) if floating and castable(key) else value

        model.update(tree_map_with_path(cast, model.parameters()))
    if quant is not None:
        model, config = quantize_model(
            model, config, quant["group_size"], quant["bits"], mode=quant["mode"]
        )
    save_model(dest, model, donate_model=True)
    save_config(config, dest / "config.json")


def _local_source(source: str) -> Path:
    """The checked model directory for a local or `builtin:` source."""
    path = Path(resolve_load_target(source) if source.startswith("builtin:") else source)
    path = path.expanduser()
    if path.is_dir() and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        hint = "re-save it with safetensors (save_pretrained(safe_serialization=True))"
        raise ConfigError(f"'{source}' has only PyTorch .bin weights", hint=hint)
    return check_local_model_dir(str(path))


def convert_hf_model(
    source: str,
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int | None = None,
    mode: str = "affine",
    force: bool = False,
    trust_remote_code: bool = False,
    on_stage: StageCallback | None = None,
) -> dict[str, Any]:
    """Convert a Hub id, local HF directory or `builtin:NAME` into an MLX model directory.

    `dtype` (float16/bfloat16/float32; default: config.json's torch_dtype) applies to all
    floating weights, and to the quantization scales. `quantize_bits` turns on quantization
    (affine: bits 2/3/4/6/8, group size 32/64/128, default 64; mxfp4: 4 bits, group 32).
    Returns a summary dict (sizes, parameter count, bits per weight, dtype, quantization).
    """
    stage = on_stage or (lambda _: None)
    started = time.perf_counter()
    dtype = check_dtype(dtype)
    quant = check_quantization(quantize_bits, group_size, mode)
    is_hub = classify_model_spec(source) == "hub"
    model_dir = None if is_hub else _local_source(source)
    out = check_output_dir(output, force, [model_dir] if model_dir else [])
    if model_dir is None:
        model_dir = _download_snapshot(source, stage)
        check_model_files(model_dir, hint=f"delete the cached download of {source} and retry")
    skipped = _check_quantizable(model_dir, quant, trust_remote_code) if quant else 0

    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model

    from mlxgrpo.models.nanochat_tokenizer import is_nanochat_model_dir

    with staging(out) as staged:
        with contextlib.redirect_stdout(StageWriter(stage)), _mlx_lm_errors(source):
            if is_nanochat_model_dir(model_dir):
                _convert_without_tokenizer(model_dir, staged, dtype, quant, trust_remote_code)
            else:
                # The local snapshot, not the id: no second Hub round trip (mlx-lm would
                # fetch the repo's README for its model card, failing on repos without one).
                convert(
                    str(model_dir),
                    str(staged),
                    quantize=quant is not None,
                    q_group_size=quant["group_size"] if quant else None,
                    q_bits=quant["bits"] if quant else None,
                    q_mode=quant["mode"] if quant else "affine",
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                )
        copied = use_source_side_files(model_dir, staged)
        stage("Checking the converted model")
        model, _ = load_model(staged, lazy=True, trust_remote_code=trust_remote_code)
        facts = model_facts(model)
        del model
        if facts["dtype"] is not None:
            record_dtype(staged / "config.json", facts["dtype"])
        size_after = weight_bytes(staged)
        stage(f"Moving the model to {out}")
        install(staged, out)
    return {
        "source": source,
        "output": str(out),
        "size_before_bytes": weight_bytes(model_dir),
        "size_after_bytes": size_after,
        **facts,
        "quantization": quant,
        "skipped_layers": skipped,
        "copied_files": copied,
        "seconds": time.perf_counter() - started,
    }


def copy_model_files(source_dir: Path, dest: Path) -> list[str]:
    """Copy tokenizer and other side files of `source_dir` (not weights or config.json)."""
    copied = []
    for path in sorted(source_dir.iterdir()):
        name = path.name
        skip = name.startswith(".") or name in _NOT_COPIED_NAMES
        if skip or not path.is_file() or any(path.match(p) for p in _NOT_COPIED):
            continue
        shutil.copy2(path, dest / name)
        copied.append(name)
    return copied


def use_source_side_files(source_dir: Path, dest: Path) -> list[str]:
    """Make the tokenizer and other side files of `dest` exactly those of `source_dir`.

    mlx-lm re-saves the tokenizer through transformers, which rewrites its files and, for a
    directory without HF tokenizer files (nanochat's tokenizer.pkl), invents a default one.
    """
    copied = copy_model_files(source_dir, dest)
    keep = {*copied, "config.json", "README.md", "model.safetensors.index.json"}
    for path in dest.iterdir():
        if path.is_file() and path.name not in keep and not path.match("*.safetensors"):
            path.unlink()
    return copied
