"""Convert a nanochat checkpoint (torch state dict + meta json + tokenizer.pkl) to an MLX model.

nanochat writes `model_<step>.pt` (a torch state dict, keys prefixed `_orig_mod.` when the model
was compiled) and `meta_<step>.json` (with `model_config`) into a checkpoint directory such as
`~/.cache/nanochat/chatsft_checkpoints/d20/`, and its tokenizer to
`~/.cache/nanochat/tokenizer/tokenizer.pkl`. The result is a directory mlx-lm's `nanochat`
model type loads: config.json, model.safetensors, tokenizer.pkl.

The parameter names are the same on both sides. Checkpoints from later nanochat versions carry
parts mlx-lm's model does not have (value embeddings, per-layer residual scalars, sliding
windows, padded vocabularies); those are refused by name rather than silently dropped.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxgrpo import parsing
from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.nanochat_tokenizer import (
    ASSISTANT_END,
    BOS,
    TOKENIZER_FILE,
    NanochatTokenizer,
    load_nanochat_encoding,
)
from mlxgrpo.models.output_dir import check_output_dir, install, staging

COMPILED_PREFIX = "_orig_mod."
CHECKPOINT_FILE = re.compile(r"^model_(\d+)\.pt$")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
REQUIRED_CONFIG_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
DEFAULT_SEQUENCE_LEN = 2048
ROPE_THETA = 10000.0  # nanochat's rotary base
MLP_RATIO = 4

StageCallback = Callable[[str], None]


def find_checkpoints(source: Path) -> dict[int, Path]:
    """Step → `model_<step>.pt` in a nanochat checkpoint directory."""
    steps = {}
    for path in source.iterdir():
        match = CHECKPOINT_FILE.match(path.name)
        if match and path.is_file():
            steps[int(match.group(1))] = path
    return steps


def _choose_checkpoint(source: Path, step: int | None) -> tuple[int, Path, list[int]]:
    if not source.exists():
        raise ConfigError(
            f"nanochat checkpoint directory '{source}' not found",
            hint="pass a directory such as ~/.cache/nanochat/chatsft_checkpoints/d20",
        )
    if not source.is_dir():
        raise ConfigError(
            f"'{source}' is a file; pass the nanochat checkpoint directory that holds it",
            hint="e.g. ~/.cache/nanochat/chatsft_checkpoints/d20",
        )
    checkpoints = find_checkpoints(source)
    if not checkpoints:
        raise ConfigError(
            f"no nanochat checkpoint (model_<step>.pt) in '{source}'",
            hint="pass the directory nanochat saved into, e.g. .../chatsft_checkpoints/d20",
        )
    steps = sorted(checkpoints)
    chosen = steps[-1] if step is None else step
    if chosen not in checkpoints:
        raise ConfigError(
            f"no checkpoint for step {step} in '{source}'",
            hint=f"steps available: {', '.join(str(s) for s in steps)}",
        )
    return chosen, checkpoints[chosen], steps


def find_tokenizer(source: Path) -> Path | None:
    """tokenizer.pkl beside the checkpoints or in nanochat's base dir layout.

    nanochat keeps checkpoints in `<base>/<phase>_checkpoints/<tag>/` and the tokenizer in
    `<base>/tokenizer/tokenizer.pkl`, so the checkpoint dir and its two parents are searched.
    """
    for base in (source, source.parent, source.parent.parent):
        for candidate in (base / TOKENIZER_FILE, base / "tokenizer" / TOKENIZER_FILE):
            if candidate.is_file():
                return candidate
    return None


def read_model_config(meta_path: Path) -> dict[str, int]:
    """nanochat's `model_config` from a meta json, checked against what mlx-lm can represent."""
    if not meta_path.is_file():
        raise ConfigError(
            f"'{meta_path.name}' is missing beside the checkpoint",
            hint="nanochat writes meta_<step>.json with every model_<step>.pt; copy it too",
        )
    try:
        meta = parsing.json_file(meta_path)
    except parsing.ParseError as err:
        raise MlxgrpoError(f"'{meta_path}' {err.problem}") from err
    config = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise MlxgrpoError(f"'{meta_path}' has no model_config", hint="is this a nanochat meta?")
    missing = [key for key in REQUIRED_CONFIG_KEYS if not isinstance(config.get(key), int)]
    if missing:
        raise MlxgrpoError(f"'{meta_path}' model_config lacks integer {', '.join(missing)}")
    window = config.get("window_pattern")
    unsupported = sorted(
        key
        for key in config
        if key not in (*REQUIRED_CONFIG_KEYS, "sequence_len", "window_pattern")
    )
    if window is not None and set(str(window)) - {"L"}:
        unsupported.append(f"window_pattern={window!r} (sliding-window attention)")
    if unsupported:
        raise MlxgrpoError(
            f"this nanochat checkpoint uses options mlx-lm's nanochat model cannot represent: "
            f"{', '.join(unsupported)}",
            hint="only the original nanochat architecture (d20/d32 releases) converts",
        )
    return _checked_dimensions(config, meta_path)


def _checked_dimensions(config: dict[str, Any], meta_path: Path) -> dict[str, int]:
    n_embd, n_head, n_kv_head = config["n_embd"], config["n_head"], config["n_kv_head"]
    valid = (
        min(n_embd, n_head, n_kv_head, config["n_layer"], config["vocab_size"]) > 0
        and n_embd % n_head == 0
        and (n_embd // n_head) % 2 == 0
        and n_head % n_kv_head == 0
    )
    if not valid:
        raise MlxgrpoError(f"'{meta_path}' has inconsistent model dimensions: {config}")
    sequence_len = config.get("sequence_len", DEFAULT_SEQUENCE_LEN)
    if not isinstance(sequence_len, int) or sequence_len <= 0:
        raise MlxgrpoError(f"'{meta_path}' has an invalid sequence_len {sequence_len!r}")
    return {**{k: int(config[k]) for k in REQUIRED_CONFIG_KEYS}, "sequence_len": sequence_len}


def expected_shapes(config: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Every parameter of nanochat's GPT (= mlx-lm's nanochat Model) and its shape."""
    embd, vocab = config["n_embd"], config["vocab_size"]
    head_dim = embd // config["n_head"]
    shapes = {"transformer.wte.weight": (vocab, embd), "lm_head.weight": (vocab, embd)}
    for i in range(config["n_layer"]):
        block = f"transformer.h.{i}"
        shapes[f"{block}.attn.c_q.weight"] = (config["n_head"] * head_dim, embd)
        shapes[f"{block}.attn.c_k.weight"] = (config["n_kv_head"] * head_dim, embd)
        shapes[f"{block}.attn.c_v.weight"] = (config["n_kv_head"] * head_dim, embd)
        shapes[f"{block}.attn.c_proj.weight"] = (embd, embd)
        shapes[f"{block}.mlp.c_fc.weight"] = (MLP_RATIO * embd, embd)
        shapes[f"{block}.mlp.c_proj.weight"] = (embd, MLP_RATIO * embd)
    return shapes


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_weights(weights: dict[str, Any], config: dict[str, int], source: Path) -> None:
    """Every expected tensor present with its shape, and nothing else."""
    expected = expected_shapes(config)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise MlxgrpoError(
            f"'{source}' has weights mlx-lm's nanochat model cannot represent: {_names(unknown)}",
            hint="newer nanochat architectures are not supported; convert an original one",
        )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise MlxgrpoError(f"'{source}' lacks weights {_names(missing)}: incomplete checkpoint")
    wrong = [
        f"{name} {tuple(weights[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if tuple(weights[name].shape) != shape
    ]
    if wrong:
        raise MlxgrpoError(
            f"'{source}' weights do not match its model_config: {_names(wrong, 4)}",
            hint="a padded vocabulary or a different architecture is not supported",
        )


def mlx_config(config: dict[str, int], tokenizer: NanochatTokenizer) -> dict[str, Any]:
    """config.json for mlx-lm's `nanochat` model type."""
    return {
        "model_type": "nanochat",
        "hidden_size": config["n_embd"],
        "num_hidden_layers": config["n_layer"],
        "num_attention_heads": config["n_head"],
        "num_key_value_heads": config["n_kv_head"],
        "vocab_size": config["vocab_size"],
        "max_position_embeddings": config["sequence_len"],
        "intermediate_size": MLP_RATIO * config["n_embd"],
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.special_ids[BOS],
        "eos_token_id": [tokenizer.special_ids[ASSISTANT_END], tokenizer.special_ids[BOS]],
    }


def _load_tokenizer(path: Path, config: dict[str, int]) -> NanochatTokenizer:
    tokenizer = NanochatTokenizer(load_nanochat_encoding(path))
    if tokenizer.vocab_size != config["vocab_size"]:
        raise MlxgrpoError(
            f"tokenizer '{path}' has {tokenizer.vocab_size} tokens but the model was trained "
            f"with vocab_size {config['vocab_size']}",
            hint="pass the tokenizer.pkl this model was trained with (--tokenizer)",
        )
    return tokenizer


def _read_weights(model_path: Path, config: dict[str, int], dtype: str) -> dict[str, Any]:
    import mlx.core as mx

    from mlxgrpo.models.torch_checkpoint import load_torch_state_dict

    weights = {
        name.removeprefix(COMPILED_PREFIX): value
        for name, value in load_torch_state_dict(model_path).items()
    }
    check_weights(weights, config, model_path)
    target = getattr(mx, dtype)
    return {name: value.astype(target) for name, value in weights.items()}


def write_model_files(dest: Path, config: dict[str, Any], weights: dict[str, Any]) -> None:
    """The weights and config.json of an MLX nanochat model directory (everything but the
    tokenizer): `config` as `mlx_config` makes it, `weights` every parameter (mlx arrays,
    checked strictly against mlx-lm's model). Empties `weights` to free memory early."""
    from mlx_lm.models.nanochat import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(weights.items()), strict=True)
    weights.clear()
    save_model(dest, model, donate_model=True)
    save_config(dict(config), dest / "config.json")


def _write_model(
    dest: Path, config: dict[str, Any], weights: dict[str, Any], tokenizer_path: Path
) -> None:
    write_model_files(dest, config, weights)
    shutil.copyfile(tokenizer_path, dest / TOKENIZER_FILE)


def convert_nanochat(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    step: int | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    force: bool = False,
    on_stage: StageCallback | None = None,
) -> dict[str, Any]:
    """Convert nanochat checkpoint dir `source` (newest step unless `step`) to MLX at `output`.

    The model is built in a temporary directory beside `output` and renamed into place, so a
    failure never leaves a half model and `force` keeps the old one until the new one is
    complete. Returns a summary dict (paths, step, dtype, sizes, dimensions).
    """
    stage = on_stage or (lambda _message: None)
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}", hint=f"use {', '.join(SUPPORTED_DTYPES)}")
    source, output = Path(source).expanduser(), Path(output).expanduser()
    chosen, model_path, steps = _choose_checkpoint(source, step)
    check_output_dir(output, force, [source])
    tok_path = Path(tokenizer_path).expanduser() if tokenizer_path else find_tokenizer(source)
    if tok_path is None:
        raise ConfigError(
            f"no tokenizer.pkl found for '{source}' (looked in it, its parent and grandparent, "
            "and their tokenizer/ folders)",
            hint="pass --tokenizer PATH/TO/tokenizer.pkl (nanochat keeps it in "
            "~/.cache/nanochat/tokenizer/)",
        )
    meta_path = model_path.with_name(model_path.stem.replace("model_", "meta_", 1) + ".json")
    config = read_model_config(meta_path)
    stage(f"checking tokenizer {tok_path}")
    tokenizer = _load_tokenizer(tok_path, config)
    stage(f"reading {model_path.name}")
    weights = _read_weights(model_path, config, dtype)
    n_parameters = sum(int(v.size) for v in weights.values())
    replaced = output.exists()
    with staging(output) as build:
        build.mkdir()
        stage(f"writing {dtype} weights")
        _write_model(build, mlx_config(config, tokenizer), weights, tok_path)
        install(build, output)
    stage(f"wrote {output}")
    return {
        "output": str(output),
        "source": str(source),
        "model_file": str(model_path),
        "tokenizer_file": str(tok_path),
        "step": chosen,
        "available_steps": steps,
        "dtype": dtype,
        "n_parameters": n_parameters,
        "size_bytes": sum(p.stat().st_size for p in output.iterdir() if p.is_file()),
        "vocab_size": config["vocab_size"],
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "n_kv_head": config["n_kv_head"],
        "n_embd": config["n_embd"],
        "sequence_len": config["sequence_len"],
        "replaced": replaced,
    }
