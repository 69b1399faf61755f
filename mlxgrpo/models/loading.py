"""Load a model and its tokenizer through mlx-lm: builtin models, local directories, hub ids.

A model spec is one of
- `builtin:NAME`: a tiny random-init model built into the cache on first use;
- a local MLX model directory (config.json + *.safetensors + tokenizer files, or a converted
  nanochat model whose tokenizer is tokenizer.pkl);
- a Hugging Face hub id (`org/name`), fetched by mlx-lm when it is not a local path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.builtin import DEFAULT_BUILTIN_MODEL, is_builtin_spec, resolve_model_path

SpecKind = Literal["builtin", "local", "hub"]

# Hub repo ids: `owner/name`, letters, digits, `-`, `_`, `.`; no `--` or `..` (HF's own rules).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` shaped, and its first part is not a local directory (`models/x` is local)."""
    if not _HUB_ID.match(spec) or "--" in spec or ".." in spec:
        return False
    return not Path(spec.split("/", 1)[0]).is_dir()


def classify_model_spec(spec: str) -> SpecKind:
    """Whether `spec` names a builtin model, a local path (existing or not) or a hub id."""
    if is_builtin_spec(spec):
        return "builtin"
    if Path(spec).expanduser().exists() or not looks_like_hub_id(spec):
        return "local"
    return "hub"


def _missing_model_error(spec: str) -> ConfigError:
    return ConfigError(
        f"model path '{spec}' not found",
        hint=(
            f"run `mlxgrpo convert hf-model <hub-id> -o {spec}` to create it, or use a hub id "
            f"(e.g. Qwen/Qwen2.5-0.5B-Instruct) or builtin:{DEFAULT_BUILTIN_MODEL}"
        ),
    )


def check_local_model_dir(spec: str) -> Path:
    """The directory for a local spec, or a ConfigError that says what is wrong with it."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise _missing_model_error(spec)
    if not path.is_dir():
        raise ConfigError(
            f"model path '{spec}' is a file, not a model directory",
            hint="pass the directory that holds config.json and the *.safetensors weights",
        )
    if not (path / "config.json").is_file():
        if (path / "tokenizer.pkl").is_file() or any(path.glob("model_*.pt")):
            hint = (
                f"it looks like a nanochat checkpoint: run `mlxgrpo convert nanochat {spec} -o DIR`"
            )
        else:
            hint = "convert a Hugging Face model with `mlxgrpo convert hf-model <hub-id> -o DIR`"
        raise ConfigError(f"'{spec}' is not an MLX model directory (no config.json)", hint=hint)
    if not any(path.glob("model*.safetensors")):
        raise ConfigError(
            f"no model*.safetensors weights in '{spec}'",
            hint="convert the model with `mlxgrpo convert hf-model` to get MLX weights",
        )
    return path


def check_adapter_dir(adapter_path: str) -> Path:
    """The adapter directory, or a ConfigError naming what is missing."""
    path = Path(adapter_path).expanduser()
    hint = (
        "point the adapter path at a directory with adapter_config.json and "
        "adapters.safetensors (a run's checkpoint or final directory)"
    )
    if not path.is_dir():
        raise ConfigError(f"adapter path '{adapter_path}' not found", hint=hint)
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise ConfigError(
            f"adapter directory '{adapter_path}' lacks {', '.join(missing)}", hint=hint
        )
    return path


def resolve_load_target(spec: str) -> str:
    """What mlx-lm should load for `spec`: a checked local directory or a hub id."""
    kind = classify_model_spec(spec)
    if kind == "builtin":
        return resolve_model_path(spec)
    if kind == "local":
        return str(check_local_model_dir(spec))
    return spec


def resolve_model_dtype(dtype: str | None) -> Any:
    """`None` keeps the checkpoint's dtypes; a name goes through the backend's dtype policy."""
    if dtype is None:
        return None
    from mlxgrpo.backend import resolve_dtype

    return resolve_dtype(dtype)


def cast_floating_parameters(model: Any, dtype: Any) -> int:
    """Cast every floating parameter to `dtype`; returns how many tensors were cast.

    Quantization scales and biases are cast too (the packed integer weights are not): a
    bfloat16 activation meeting float16 scales promotes the layer's output, and from there
    the whole forward pass, to float32. Rounding float16 scales to bfloat16 changes them by
    at most 2^-9 relative, far below the quantization error itself.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    updates = [
        (name, value.astype(dtype))
        for name, value in tree_flatten(model.parameters())
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype
    ]
    if updates:
        model.load_weights(updates, strict=False)
    return len(updates)


def load_model_with_config(
    path_spec: str,
    *,
    adapter_path: str | None = None,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    lazy: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """Like `load_model`, also returning the model's config dict (config.json as mlx-lm read it)."""
    import mlx.core as mx

    target_dtype = resolve_model_dtype(dtype)
    target = resolve_load_target(path_spec)
    adapter_dir = check_adapter_dir(adapter_path) if adapter_path is not None else None
    model, tokenizer, config = _mlx_lm_load(path_spec, target, trust_remote_code, lazy)
    if target_dtype is not None:
        cast_floating_parameters(model, target_dtype)
    if adapter_dir is not None:
        # After the cast, so adapter weights keep the precision they were trained in.
        model = _apply_adapters(model, adapter_dir, path_spec)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer, config


def load_model(
    path_spec: str,
    *,
    adapter_path: str | None = None,
    dtype: str | None = "auto",
    trust_remote_code: bool = False,
    lazy: bool = False,
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` for a builtin name, local directory or hub id.

    `dtype`: "auto" (the backend's policy: float32 on CPU, bfloat16 on GPU), "float32",
    "bfloat16", "float16", or None to keep the checkpoint's dtypes. Quantized layers keep their
    packed weights; their scales follow the dtype. `adapter_path`: an mlx-lm adapter directory
    applied on top (kept in the precision it was saved in, float32 for mlxgrpo's). The
    tokenizer is mlx-lm's TokenizerWrapper.
    """
    model, tokenizer, _ = load_model_with_config(
        path_spec,
        adapter_path=adapter_path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        lazy=lazy,
    )
    return model, tokenizer


def _mlx_lm_load(
    spec: str, target: str, trust_remote_code: bool, lazy: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """mlx-lm's load, with its failures turned into errors that say what to do."""
    from mlxgrpo.models.nanochat_tokenizer import is_nanochat_model_dir

    if Path(target).is_dir() and is_nanochat_model_dir(target):
        return _load_nanochat_dir(Path(target), lazy)

    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )
    from mlx_lm.utils import load

    tokenizer_config = {"trust_remote_code": True} if trust_remote_code else None
    try:
        return load(
            target,
            tokenizer_config=tokenizer_config,
            lazy=lazy,
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise MlxgrpoError(
            f"could not fetch model '{spec}' from the Hugging Face Hub: {err}",
            hint="check the id and the network, or convert it to a local directory first",
        ) from err
    except HFValidationError as err:
        raise _missing_model_error(spec) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"model '{spec}' has an unreadable JSON file: {err}") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"model '{spec}' needs its own Python code to build",
                hint="enable trust_remote_code (--trust-remote-code) only if you trust it",
            ) from err
        if "not supported" in str(err):
            raise MlxgrpoError(
                f"mlx-lm cannot load model '{spec}': {err}",
                hint="upgrade mlx-lm or choose a supported architecture",
            ) from err
        raise


def _load_nanochat_dir(path: Path, lazy: bool) -> tuple[Any, Any, dict[str, Any]]:
    """A converted nanochat model: mlx-lm builds it, the tiktoken wrapper is its tokenizer."""
    from mlx_lm.utils import load_model as load_mlx_model

    from mlxgrpo.models.nanochat_tokenizer import load_nanochat_tokenizer

    model, config = load_mlx_model(path, lazy)
    return model, load_nanochat_tokenizer(path), config


def _apply_adapters(model: Any, adapter_dir: Path, spec: str) -> Any:
    from mlx_lm.utils import load_adapters

    try:
        model = load_adapters(model, str(adapter_dir))
    except ValueError as err:
        raise ConfigError(
            f"the adapters in '{adapter_dir}' do not fit model '{spec}': {err}",
            hint="use the base model the adapters were trained on",
        ) from err
    model.eval()
    return model


def save_full_model(dest: Path, model: Any, tokenizer: Any, source_spec: str) -> Path:
    """A complete, loadable model directory (weights, config, tokenizer) for `model`."""
    from mlx_lm.utils import hf_repo_to_path, load_config, save

    target = resolve_load_target(source_spec)
    source = Path(target) if Path(target).exists() else hf_repo_to_path(target)
    save(dest, source, model, tokenizer, load_config(source), donate_model=False)
    return dest
