"""The benchmark models: random-weight models of a given mlx-lm architecture, written to a
directory mlx-lm loads.

Two Qwen2 sizes here: `bench` (~37M parameters, vocab 16,384, the one the figures are quoted
for) and `quick` (the built-in tiny-qwen2 shape, for the smoke test); the scale section adds
real Qwen2.5, Qwen3 and Gemma 3 shapes (scale_setup.py). A shape names its mlx-lm model type;
its config.json is that family's layout filled in from the shape (`FAMILIES`), and its
parameter names and shapes come from mlx-lm's own model class, built lazily, so nothing is
allocated to learn them. The tokenizer is the built-in character tokenizer extended with
byte-level BPE merges up to the model's vocab size, so every id the model can sample decodes
(mlx-lm's streaming detokenizer indexes its vocab by id). Shapes with `tokenizer="words"` get
merges that make each generated lowercase word (with its leading space) one token instead, so
prompt text made of those words has a known token count.

Weights are written tensor by tensor, so a 1.5B float32 model never sits in memory whole.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import string
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxgrpo.models import builtin


@dataclass(frozen=True)
class ModelShape:
    """A model's dimensions; `config()` is its config.json.

    `head_dim` 0 means hidden // heads (the Qwen2 layout). `extra` holds further config.json
    keys of the family (a sliding window, say), as (key, value) pairs so the shape stays
    hashable; they override the family's defaults.
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tokenizer: str = "bpe"  # "bpe" (ASCII pairs/triples) or "words" (see module)
    model_type: str = "qwen2"
    head_dim: int = 0
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def attention_dim(self) -> int:
        """The width of one attention head."""
        return self.head_dim or self.hidden // self.heads

    def config(self) -> dict[str, Any]:
        if self.model_type not in FAMILIES:
            raise ValueError(f"no config layout for model type {self.model_type!r}")
        return {
            **FAMILIES[self.model_type](self),
            **dict(self.extra),
            "vocab_size": self.vocab,
            "eos_token_id": builtin.EOS_TOKEN_ID,
            "pad_token_id": builtin.PAD_TOKEN_ID,
            "torch_dtype": "float32",
        }

    def matmul_parameters(self) -> int:
        """Weights that take part in matmuls per token: the blocks plus the (tied) LM head.

        Every family here has q/k/v/o projections and a gated MLP of three matrices.
        """
        q_width, kv_width = self.heads * self.attention_dim, self.kv_heads * self.attention_dim
        attention = 2 * self.hidden * q_width + 2 * self.hidden * kv_width
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.vocab * self.hidden

    def attention_flops(self, query_len: int, context_len: float) -> float:
        """Forward FLOPs of QK^T and AV for one sequence: 2 matmuls of 2*q*c*d per layer.

        Only for full attention in every layer: a sliding window caps some layers' context.
        """
        if self.config().get("sliding_window"):
            raise ValueError(f"{self.name}: attention FLOPs assume no sliding window")
        return 4.0 * self.layers * query_len * context_len * self.heads * self.attention_dim


def qwen2_config(shape: ModelShape) -> dict[str, Any]:
    """Qwen2's layout: q/k/v biases, SiLU MLP, tied embeddings (key order as builtin's)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": True,
    }


def qwen3_config(shape: ModelShape) -> dict[str, Any]:
    """Qwen3's layout: no biases, RMSNorm on each head's queries and keys, an explicit
    head_dim, SiLU MLP; the small models tie their embeddings."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.attention_dim,
        "intermediate_size": shape.intermediate,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": shape.max_positions,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": True,
    }


def gemma3_text_config(shape: ModelShape) -> dict[str, Any]:
    """Gemma 3's text layout: five sliding-window layers (local RoPE base 1e4) to one global
    layer (`rope_theta`), query/key norms, sandwich norms, GELU MLP, embeddings scaled by
    sqrt(hidden) and tied to the head; queries scaled by query_pre_attn_scalar**-0.5."""
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.attention_dim,
        "intermediate_size": shape.intermediate,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": shape.rope_theta,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "query_pre_attn_scalar": shape.attention_dim,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": True,
    }


FAMILIES: dict[str, Callable[[ModelShape], dict[str, Any]]] = {
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "gemma3_text": gemma3_text_config,
}
# Families whose RMSNorm scales by (1 + weight): a stored zero is a unit scale.
OFFSET_NORMS = frozenset({"gemma3_text"})

SHAPES = {
    # Qwen2-like ratios (GQA 4:1, MLP 4x), vocab kept CPU-sized: the head is ~23% of P.
    "bench": ModelShape("bench-qwen2-37m", 512, 8, 8, 2, 2048, 16384),
    "quick": ModelShape("tiny-qwen2", 64, 2, 4, 2, 128, builtin.VOCAB_SIZE),
}


def parameter_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors mlx-lm loads for this config, from its model class.

    MLX arrays are lazy: building the model records how to initialise its parameters and
    allocates nothing until they are evaluated, which they never are here. A tied model's
    checkpoint has no `lm_head.weight`, even where the class builds one and drops it on load.
    """
    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    shapes = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def base_vocab_size() -> int:
    """Ids below this are single characters and special tokens; merged tokens follow."""
    return len(_base_vocab())


def _base_vocab() -> dict[str, int]:
    vocab = {builtin.byte_level_symbol(c): i for i, c in enumerate(builtin.TOKENIZER_CHARS)}
    for token in builtin.SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab


def _merged_vocab(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Char vocab + specials, then 2- and 3-symbol merges of printable ASCII up to `size`."""
    vocab = _base_vocab()
    letters = [chr(c) for c in range(0x21, 0x7F)]
    merges: list[tuple[str, str]] = []
    pairs = [(a, b) for a in letters for b in letters]
    triples = [(a + b, c) for a, b in pairs for c in letters]
    for left, right in pairs + triples:
        if len(vocab) >= size:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    return vocab, merges


def vocab_words(size: int) -> list[str]:
    """The words of a `words` tokenizer of `size` ids: " a" .. " z", " aa" .., " aaa" .., ...

    Each is one token (with its leading space) because every prefix is a token too.
    """
    words: list[str] = []
    room = size - len(_base_vocab())
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if len(words) >= room:
                return words
            words.append(" " + "".join(letters))
    raise AssertionError("unreachable")


def _word_vocab(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Char vocab + specials, then one merge per word: (" abc" minus its last letter, letter).

    Word-level in effect, yet a byte-level BPE: transformers 5 rebuilds any qwen2 tokenizer as
    one from tokenizer.json's vocab and merges, so a WordLevel model would not survive loading.
    """
    vocab = _base_vocab()
    merges: list[tuple[str, str]] = []
    space = builtin.byte_level_symbol(" ")
    for word in vocab_words(size):
        symbol = space + word[1:]
        vocab[symbol] = len(vocab)
        merges.append((symbol[:-1], symbol[-1]))
    return vocab, merges


def bpe_backend(vocab_size: int, kind: str) -> Any:
    """The `tokenizers` backend of `vocab_size` ids: `kind` "words" or "bpe" (see module)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = (_word_vocab if kind == "words" else _merged_vocab)(vocab_size)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(builtin.CHAR_TOKENIZER_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _save_tokenizer(dest: Path, vocab_size: int, kind: str = "bpe") -> None:
    from transformers import PreTrainedTokenizerFast

    if vocab_size == builtin.VOCAB_SIZE and kind == "bpe":
        builtin.save_char_tokenizer(dest)
        return
    backend = bpe_backend(vocab_size, kind)
    backend.add_special_tokens(list(builtin.SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=builtin.EOS_TOKEN,
        pad_token=builtin.PAD_TOKEN,
        chat_template=builtin.CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.save_pretrained(str(dest))
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make: Any) -> None:
    """A float32 safetensors file written one tensor at a time (`make(name, dims)` -> array)."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, dims in shapes.items():
        size = 4 * math.prod(dims)
        header[name] = {
            "dtype": "F32",
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format wants the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dims in shapes.items():
            make(name, dims).astype("<f4", copy=False).tofile(f)  # no bytes copy


def build_model_dir(shape: ModelShape, dest: Path, seed: int = 0) -> Path:
    """Write config.json, random fan-in-scaled float32 weights and the tokenizer into `dest`.

    Matrices are N(0, 1/fan_in), embeddings N(0, EMBED_STD^2), biases zero, norms a unit scale
    (ones, or zeros where the family adds 1).
    """
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    config = shape.config()
    rng = np.random.default_rng(seed)
    norm = np.zeros if shape.model_type in OFFSET_NORMS else np.ones

    def make(name: str, dims: tuple[int, ...]) -> Any:
        if name.endswith(".bias"):
            return np.zeros(dims, dtype=np.float32)
        if len(dims) == 1:
            return norm(dims, dtype=np.float32)
        value = rng.standard_normal(dims, dtype=np.float32)
        value *= builtin.EMBED_STD if "embed" in name else dims[-1] ** -0.5  # in place: one copy
        return value

    shapes = dict(sorted(parameter_shapes(config).items()))
    _write_safetensors(dest / "model.safetensors", shapes, make)
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {"eos_token_id": builtin.EOS_TOKEN_ID, "pad_token_id": builtin.PAD_TOKEN_ID}
    (dest / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    _save_tokenizer(dest, shape.vocab, shape.tokenizer)
    return dest


def parameter_count(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))
