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

from mlxgrpo import parsing
from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.batch_masks import fit_batch_masks
from mlxgrpo.models.blocks import complete_module_state
from mlxgrpo.models.builtin import DEFAULT_BUILTIN_MODEL, is_builtin_spec, resolve_model_path
from mlxgrpo.models.model_check import (
    config_problem,
    loaded_problem,
    tokenizer_problem,
    weights_problem,
)

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
    check_model_files(path)
    return path


_REDO_MODEL = "re-download or re-convert the model (`mlxgrpo convert hf-model`)"


def read_json_object(path: Path, hint: str) -> dict[str, Any]:
    """The JSON object in `path`, or a ConfigError naming the file as corrupt."""
    try:
        text = parsing.read_text(path)
        if not text.strip():
            raise ConfigError(f"'{path}' is corrupt: it is empty", hint=hint)
        data = parsing.json_text(text, str(path))
    except parsing.ParseError as err:
        problem = err.problem.removeprefix("is ")
        raise ConfigError(f"'{path}' is corrupt: {problem}", hint=hint) from err
    except OSError as err:
        raise ConfigError(f"cannot read '{path}': {err.strerror or err}", hint=hint) from err
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' is corrupt: it does not hold a JSON object", hint=hint)
    return data


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` cannot be loaded (truncated, bad header), or None.

    Reads only the header: an 8-byte little-endian length, then that many bytes of JSON whose
    tensors' `data_offsets` must lie inside the rest of the file.
    """
    import struct

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"it is truncated ({size} bytes, shorter than a safetensors header)"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return (
                    f"it is truncated or not a safetensors file ({size} bytes, smaller than "
                    f"the {header_len}-byte header it announces)"
                )
            header_bytes = fh.read(header_len)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    try:
        header = parsing.json_text(
            header_bytes, str(path), max_depth=8, max_bytes=len(header_bytes)
        )
    except parsing.ParseError:
        return "its header is not valid JSON (not a safetensors file, or damaged)"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_size = size - 8 - header_len
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            return f"its header entry for tensor '{name}' is damaged"
        needed = max(needed, *offsets)
    if needed > data_size:
        return f"it is truncated ({size} bytes, the header needs {8 + header_len + needed})"
    return None


def check_safetensors_file(path: Path, what: str, hint: str) -> None:
    """A ConfigError naming `path` when its header says it is truncated or damaged."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise ConfigError(f"{what} '{path}' is corrupt: {problem}", hint=hint)


def check_model_files(path: Path, hint: str = _REDO_MODEL) -> None:
    """config.json parses as an object with the types mlx-lm computes with, a tokenizer is
    there, and every safetensors file is complete (headers only)."""
    config = read_json_object(path / "config.json", hint=f"restore config.json: {hint}")
    problem = config_problem(config)
    if problem is not None:
        raise ConfigError(f"'{path / 'config.json'}': {problem}", hint=f"fix that key: {hint}")
    problem = tokenizer_problem(path)
    if problem is not None:
        raise ConfigError(
            f"model directory '{path}': {problem}",
            hint="copy the tokenizer files of the model beside its weights",
        )
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights, "model weights file", hint)


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
    check_adapter_config(path)
    redo = "use an intact checkpoint directory of the run (or train the adapters again)"
    check_safetensors_file(path / "adapters.safetensors", "adapter weights file", redo)
    return path


def check_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json as mlx-lm reads it; a ConfigError when it is corrupt or incomplete
    (mlx-lm would fail on it with a bare JSON error or KeyError)."""
    path = adapter_dir / "adapter_config.json"
    hint = (
        "restore the adapter_config.json written with the adapters (mlx-lm format), or use "
        "another checkpoint directory of the run"
    )
    config = read_json_object(path, hint)
    if config.get("fine_tune_type", "lora") == "full":
        return config
    params = config.get("lora_parameters")
    params = params if isinstance(params, dict) else {}
    missing = [key for key in ("num_layers", "lora_parameters") if key not in config]
    missing += [f"lora_parameters.{k}" for k in ("rank", "scale") if k not in params]
    if missing:
        raise ConfigError(f"'{path}' is incomplete: it lacks {', '.join(missing)}", hint=hint)
    return config


def resolve_load_target(spec: str) -> str:
    """What mlx-lm should load for `spec`: a checked local directory or a hub id."""
    kind = classify_model_spec(spec)
    if kind == "builtin":
        path = resolve_model_path(spec)
        check_model_files(
            Path(path), hint="delete that cached directory; it is rebuilt on the next use"
        )
        return path
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
    problem = loaded_problem(model, tokenizer)
    if problem is not None:
        raise ConfigError(f"model '{path_spec}': {problem}", hint="fix or replace that file")
    complete_module_state(model)
    fit_batch_masks(model)
    if target_dtype is not None:
        cast_floating_parameters(model, target_dtype)
    if adapter_dir is not None:
        # After the cast, so adapter weights keep the precision they were trained in.
        model = _apply_adapters(model, adapter_dir, path_spec)
    if not lazy:
        mx.eval(model.parameters())
    from mlxgrpo.models.cpu_kernels import on_cpu, use_cpu_kernels

    if on_cpu():
        use_cpu_kernels(model)
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
        raise ConfigError(
            f"model '{spec}' has a corrupt JSON file: {err}", hint=_REDO_MODEL
        ) from err
    except RuntimeError as err:
        if not _is_unreadable_weights(err):
            raise
        raise ConfigError(
            f"the weights of model '{spec}' are truncated or corrupt: {err}", hint=_REDO_MODEL
        ) from err
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
        problem = weights_problem(err, _model_type(target))
        if problem is not None:
            raise ConfigError(f"model '{spec}': {problem}", hint=_REDO_MODEL) from err
        raise


def _model_type(target: str) -> str:
    try:
        return str(read_json_object(Path(target) / "config.json", "").get("model_type"))
    except ConfigError:
        return "?"


def _one_line(err: Exception) -> str:
    """mlx-lm's multi-line mismatch report (a heading, then one line per tensor) as one line:
    the first tensor's line and how many more there are."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    details = lines[1:]
    more = f" (and {len(details) - 1} more tensors)" if len(details) > 1 else ""
    return f"{details[0]}{more}"


def _is_unreadable_weights(err: RuntimeError) -> bool:
    """MLX's own error for a damaged weights file (`[load_safetensors] …`, `[read] …`)."""
    text = str(err)
    return "safetensors" in text or text.startswith("[read]") or "corrupt file" in text


def _load_nanochat_dir(path: Path, lazy: bool) -> tuple[Any, Any, dict[str, Any]]:
    """A converted nanochat model: mlx-lm builds it, the tiktoken wrapper is its tokenizer."""
    from mlx_lm.utils import load_model as load_mlx_model

    from mlxgrpo.models.nanochat_tokenizer import load_nanochat_tokenizer

    model, config = load_mlx_model(path, lazy)
    return model, load_nanochat_tokenizer(path), config


def _load_adapters(model: Any, adapter_dir: Path) -> Any:
    """mlx-lm's ``load_adapters``: the adapter layers its config names, then their weights,
    each of which must be an adapter parameter of the model with the same shape. Unlike
    mlx-lm's check, an adapter kept in a list counts (AFM 7's fused q/k/v projection keeps one
    A and B per part: ``qkv_proj.lora_b.1``), so that what training saved loads back."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = parsing.json_file(adapter_dir / "adapter_config.json")
    kind = config.get("fine_tune_type", "lora")
    if kind != "full":
        linear_to_lora_layers(
            model, config["num_layers"], config["lora_parameters"], use_dora=kind == "dora"
        )
    weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    leaves = {"lora_a", "lora_b", "m"}
    allowed = {
        name: value
        for name, value in params.items()
        if kind == "full" or leaves & set(name.split(".")[-2:])
    }
    errors = [
        f"{name}: not an adapter parameter in the model"
        if name not in allowed
        else f"{name}: shape {tuple(w.shape)}, the model's is {tuple(allowed[name].shape)}"
        for name, w in weights.items()
        if name not in allowed or w.shape != allowed[name].shape
    ]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
    model.load_weights(list(weights.items()), strict=False)
    return model


def _apply_adapters(model: Any, adapter_dir: Path, spec: str) -> Any:
    try:
        model = _load_adapters(model, adapter_dir)
    except parsing.ParseError as err:
        path = adapter_dir / "adapter_config.json"
        raise ConfigError(f"'{path}' is corrupt: {err.problem.removeprefix('is ')}") from err
    except RuntimeError as err:
        if not _is_unreadable_weights(err):
            raise
        raise ConfigError(
            f"the adapter weights in '{adapter_dir}' are truncated or corrupt: {err}",
            hint="use an intact checkpoint directory of the run",
        ) from err
    except ValueError as err:
        raise ConfigError(
            f"the adapters in '{adapter_dir}' do not fit model '{spec}': {_one_line(err)}",
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
