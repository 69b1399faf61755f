"""Tiny random-init models and tokenizers built on the spot, for offline tests and demos.

`builtin:NAME` model specs resolve to a directory that mlx-lm loads like any converted model
(config.json + model.safetensors + tokenizer files). nanochat-kind specs are laid out exactly as
`mlxgrpo convert nanochat` writes a converted checkpoint (config.json, model.safetensors and its
index, nanochat's tokenizer.pkl), so they load through the nanochat path. The directory is built
once into the cache and reused. Builders are deterministic: the same spec always produces the
same bytes.

Heavy libraries (mlx, transformers, tokenizers, tiktoken) are imported inside the functions that
need them, so listing or validating builtin names stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlxgrpo import parsing
from mlxgrpo.errors import ConfigError

if TYPE_CHECKING:
    import tiktoken
    from transformers import PreTrainedTokenizerFast

BUILTIN_PREFIX = "builtin:"
DEFAULT_BUILTIN_MODEL = "tiny-qwen2"
# Bump when the files a builder writes change, so stale cache entries are not reused.
BUILDER_VERSION = 1
CACHE_ENV_VAR = "MLXGRPO_CACHE_DIR"
# Fan-in scaled matrices and a wider embedding keep the tiny model's logits away from uniform,
# so small adapters can move its policy (N(0, 0.02) everywhere gives near-uniform outputs that
# LoRA cannot sharpen through a tied embedding).
EMBED_STD = 0.2

# Character tokenizer: printable ASCII, tab and newline, then the special tokens. Vocab entries
# use GPT-2's byte-level alphabet (space is "Ġ", newline "Ċ") because transformers rebuilds a
# qwen2 checkpoint's tokenizer as a byte-level BPE whatever tokenizer.json says.
TOKENIZER_CHARS: tuple[str, ...] = tuple(chr(c) for c in range(0x20, 0x7F)) + ("\t", "\n")
PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)
VOCAB_SIZE = len(TOKENIZER_CHARS) + len(SPECIAL_TOKENS)
PAD_TOKEN_ID = len(TOKENIZER_CHARS) + SPECIAL_TOKENS.index(PAD_TOKEN)
EOS_TOKEN_ID = len(TOKENIZER_CHARS) + SPECIAL_TOKENS.index(EOS_TOKEN)
# Same split as Qwen2's tokenizer, so the saved file and transformers' rebuild agree.
CHAR_TOKENIZER_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# nanochat's tokenizer: byte-level BPE (tiktoken) with these special tokens after the ranks.
NANOCHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
NANOCHAT_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# A few merges of common English pairs; each merged token is built from lower-ranked ones.
NANOCHAT_MERGES: tuple[bytes, ...] = (
    b"th", b"he", b"in", b"er", b"an", b"re", b"on", b" t", b" a", b" s",
    b"the", b" the", b"ing", b" an", b"nd", b" and",
)  # fmt: skip
NANOCHAT_ENCODING_NAME = "mlxgrpo-tiny-nanochat"

# How a builtin model is written: an mlx-lm model with the char tokenizer, or a nanochat model
# (mlx-lm's `nanochat` type) with the tiny nanochat tokenizer, as a converted checkpoint.
BuiltinKind = Literal["mlx-lm", "nanochat"]
MLX_LM: BuiltinKind = "mlx-lm"
NANOCHAT: BuiltinKind = "nanochat"


@dataclass(frozen=True)
class BuiltinSpec:
    """What a builtin model is: its config, its init seed and its kind.

    `config` is mlx-lm's config.json for kind "mlx-lm", nanochat's `model_config` (n_embd,
    n_layer, n_head, n_kv_head, sequence_len) for kind "nanochat"; vocab and eos are filled in.
    """

    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    kind: BuiltinKind = MLX_LM


def _qwen2_config(hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    }


_SPECS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec(
            "tiny-qwen2",
            "Qwen2, hidden 64, 2 layers, tied embeddings (tests)",
            _qwen2_config(hidden=64, layers=2, heads=4, kv_heads=2, inter=128),
            seed=0,
        ),
        BuiltinSpec(
            "tiny-llama",
            "Llama, hidden 64, 2 layers, untied embeddings (tests)",
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "hidden_act": "silu",
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "max_position_embeddings": 1024,
                "attention_bias": False,
                "mlp_bias": False,
                "tie_word_embeddings": False,
            },
            seed=1,
        ),
        BuiltinSpec(
            "small-qwen2",
            "Qwen2, hidden 256, 4 layers, tied embeddings (demos, benchmarks)",
            _qwen2_config(hidden=256, layers=4, heads=4, kv_heads=2, inter=768),
            seed=2,
        ),
        BuiltinSpec(
            "tiny-nanochat",
            "nanochat, n_embd 64, 2 layers, nanochat tokenizer with python/output tokens "
            "(tool-use demo)",
            {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "sequence_len": 512},
            seed=3,
            kind=NANOCHAT,
        ),
    )
}


def list_builtin_models() -> list[str]:
    """Names accepted after `builtin:`, the default first."""
    return [DEFAULT_BUILTIN_MODEL] + sorted(n for n in _SPECS if n != DEFAULT_BUILTIN_MODEL)


def describe_builtin_models() -> dict[str, str]:
    """Name → one-line description, in `list_builtin_models()` order."""
    return {name: _SPECS[name].description for name in list_builtin_models()}


def is_builtin_spec(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def get_builtin_spec(name: str) -> BuiltinSpec:
    """The spec for a builtin name (with or without the `builtin:` prefix)."""
    bare = name[len(BUILTIN_PREFIX) :] if is_builtin_spec(name) else name
    if bare not in _SPECS:
        available = ", ".join(BUILTIN_PREFIX + n for n in list_builtin_models())
        raise ConfigError(
            f"unknown builtin model '{bare}'",
            hint=f"available: {available}",
        )
    return _SPECS[bare]


def nanochat_model_config(spec: BuiltinSpec) -> dict[str, int]:
    """nanochat's `model_config` (as in a checkpoint's meta json) for a nanochat-kind spec."""
    return {**spec.config, "vocab_size": tiny_nanochat_encoding().n_vocab}


def model_config(spec: BuiltinSpec) -> dict[str, Any]:
    """The config.json contents for a builtin model."""
    if spec.kind == NANOCHAT:
        from mlxgrpo.models.nanochat_convert import mlx_config
        from mlxgrpo.models.nanochat_tokenizer import NanochatTokenizer

        return mlx_config(nanochat_model_config(spec), NanochatTokenizer(tiny_nanochat_encoding()))
    return {
        **spec.config,
        "vocab_size": VOCAB_SIZE,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "torch_dtype": "float32",
    }


def spec_fingerprint(spec: BuiltinSpec) -> str:
    """Short hash of everything that determines a builtin model's files."""
    payload = {
        "builder_version": BUILDER_VERSION,
        "config": model_config(spec),
        "seed": spec.seed,
        "init": f"fan-in matrices, embed std {EMBED_STD}",
        **_tokenizer_fingerprint(spec),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:12]


def _tokenizer_fingerprint(spec: BuiltinSpec) -> dict[str, Any]:
    if spec.kind == NANOCHAT:
        return {
            "tokenizer": NANOCHAT_ENCODING_NAME,
            "merges": [merge.hex() for merge in NANOCHAT_MERGES],
            "split_pattern": NANOCHAT_SPLIT_PATTERN,
            "special_tokens": NANOCHAT_SPECIAL_TOKENS,
        }
    return {
        "chars": "".join(TOKENIZER_CHARS),
        "split_pattern": CHAR_TOKENIZER_SPLIT_PATTERN,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHATML_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------------
# Character-level tokenizer


def byte_level_symbol(char: str) -> str:
    """GPT-2's byte-level stand-in for an ASCII char: printable ones are themselves."""
    code = ord(char)
    if 0x21 <= code <= 0x7E:
        return char
    if code <= 0x20:
        return chr(0x100 + code)
    raise ValueError(f"not in the tiny tokenizer's alphabet: {char!r}")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges over printable ASCII + tab + newline, ChatML specials.

    Every character is its own token, so text (spaces included) round-trips exactly.
    Characters outside the alphabet are dropped, as a byte-level BPE drops unknown bytes.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {byte_level_symbol(char): i for i, char in enumerate(TOKENIZER_CHARS)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CHAR_TOKENIZER_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def save_char_tokenizer(dest_dir: str | os.PathLike[str]) -> None:
    """Write the char tokenizer (tokenizer.json, tokenizer_config.json, chat template)."""
    dest = Path(dest_dir)
    build_char_tokenizer().save_pretrained(str(dest))
    # transformers 5 writes its own backend class name; the generic name loads in 4.x too.
    config_path = dest / "tokenizer_config.json"
    config = parsing.json_file(config_path)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, config)


# ---------------------------------------------------------------------------------------------
# Model weights


def _parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the mlx-lm model class for this config."""
    import importlib

    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    return {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}


def _is_embedding(name: str) -> bool:
    """mlx-lm's `embed_tokens` or nanochat's `transformer.wte`."""
    return "embed" in name or name.endswith("wte.weight")


def init_weights(spec: BuiltinSpec) -> dict[str, Any]:
    """Deterministic float32 numpy weights: N(0, 1/fan_in) matrices, N(0, EMBED_STD²)
    embeddings, unit norms, zero biases.

    Each tensor has its own generator seeded by (spec seed, name), so the values do not depend
    on iteration order or on MLX's random number generator.
    """
    import numpy as np

    weights: dict[str, Any] = {}
    for name, shape in sorted(_parameter_shapes(model_config(spec)).items()):
        if name.endswith(".bias"):
            weights[name] = np.zeros(shape, dtype=np.float32)
        elif len(shape) == 1:  # RMSNorm scales
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode("utf-8"))])
            std = EMBED_STD if _is_embedding(name) else shape[-1] ** -0.5
            weights[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return weights


def build_tiny_model(dest_dir: str | os.PathLike[str], name: str = DEFAULT_BUILTIN_MODEL) -> Path:
    """Write builtin model `name` into `dest_dir` (created if missing) and return its path."""
    import mlx.core as mx

    spec = get_builtin_spec(name)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    config = model_config(spec)
    arrays = {key: mx.array(value) for key, value in init_weights(spec).items()}
    if spec.kind == NANOCHAT:
        _write_nanochat_model(dest, config, arrays)
        return dest
    mx.save_safetensors(str(dest / "model.safetensors"), arrays, metadata={"format": "mlx"})
    _write_json(dest / "config.json", config)
    _write_json(
        dest / "generation_config.json",
        {"eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID},
    )
    save_char_tokenizer(dest)
    _write_json(
        dest / "mlxgrpo_builtin.json",
        {"name": spec.name, "fingerprint": spec_fingerprint(spec), "seed": spec.seed},
    )
    return dest


def _write_nanochat_model(dest: Path, config: dict[str, Any], arrays: dict[str, Any]) -> None:
    """What `mlxgrpo convert nanochat` writes, with the same writer: config.json,
    model.safetensors (+ index), tokenizer.pkl. No other file: a Hugging Face tokenizer file
    beside tokenizer.pkl would stop the directory being recognised as nanochat."""
    from mlxgrpo.models.nanochat_convert import write_model_files

    write_model_files(dest, config, arrays)
    write_nanochat_tokenizer(dest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# builtin: resolution and the cache


def cache_dir() -> Path:
    """Root of mlxgrpo's cache: `$MLXGRPO_CACHE_DIR`, else `~/.cache/mlxgrpo`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "mlxgrpo"


_REQUIRED_FILES: dict[BuiltinKind, tuple[str, ...]] = {
    MLX_LM: ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
    NANOCHAT: ("config.json", "model.safetensors", "tokenizer.pkl"),
}


def _is_complete(model_dir: Path, spec: BuiltinSpec) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES[spec.kind])


def builtin_model_dir(name: str) -> Path:
    """Where builtin model `name` lives in the cache (whether or not it was built yet)."""
    spec = get_builtin_spec(name)
    return cache_dir() / "builtin" / f"{spec.name}-{spec_fingerprint(spec)}"


def ensure_builtin_model(name: str) -> Path:
    """Build builtin model `name` into the cache unless it is already there; return its dir.

    The model is written to a temporary sibling directory and renamed into place, so a reader
    never sees a half-written model and two racing builders leave one complete copy.
    """
    spec = get_builtin_spec(name)
    final = builtin_model_dir(name)
    if _is_complete(final, spec):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build_tiny_model(tmp, name)
        os.chmod(tmp, 0o755)
        if final.exists() and not _is_complete(final, spec):
            shutil.rmtree(final, ignore_errors=True)  # damaged entry: replace it
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, spec):  # lost a race only if the winner left a full copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(spec: str) -> str:
    """`builtin:NAME` → the cached model directory (built on first use); anything else as is."""
    if is_builtin_spec(spec):
        return str(ensure_builtin_model(spec))
    return spec


# ---------------------------------------------------------------------------------------------
# nanochat-style tiktoken encoding


def tiny_nanochat_mergeable_ranks() -> dict[bytes, int]:
    """All 256 single bytes (rank = byte value), then NANOCHAT_MERGES in order."""
    ranks = {bytes([b]): b for b in range(256)}
    for merged in NANOCHAT_MERGES:
        ranks[merged] = len(ranks)
    return ranks


def tiny_nanochat_encoding() -> tiktoken.Encoding:
    """A small byte-level tiktoken Encoding with nanochat's special tokens after the ranks."""
    import tiktoken

    ranks = tiny_nanochat_mergeable_ranks()
    special = {token: len(ranks) + i for i, token in enumerate(NANOCHAT_SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name=NANOCHAT_ENCODING_NAME,
        pat_str=NANOCHAT_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special,
    )


def write_nanochat_tokenizer(
    dest_dir: str | os.PathLike[str], encoding: tiktoken.Encoding | None = None
) -> Path:
    """Pickle `encoding` (default: the tiny one) to `dest_dir/tokenizer.pkl`, as nanochat does."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "tokenizer.pkl"
    with open(path, "wb") as fh:
        pickle.dump(encoding if encoding is not None else tiny_nanochat_encoding(), fh)
    return path
