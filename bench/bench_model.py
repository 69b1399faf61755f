"""The benchmark model: a Qwen2-shaped, random-weight model written to a directory mlx-lm loads.

Two sizes: `bench` (~37M parameters, vocab 16,384, the one the figures are quoted for) and
`quick` (the built-in tiny-qwen2 shape, for the smoke test). The tokenizer is the built-in
character tokenizer extended with byte-level BPE merges up to the model's vocab size, so every
id the model can sample decodes (mlx-lm's streaming detokenizer indexes its vocab by id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxgrpo.models import builtin


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def config(self) -> dict[str, Any]:
        cfg = builtin._qwen2_config(
            self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate
        )
        return {
            **cfg,
            "max_position_embeddings": 2048,
            "vocab_size": self.vocab,
            "eos_token_id": builtin.EOS_TOKEN_ID,
            "pad_token_id": builtin.PAD_TOKEN_ID,
            "torch_dtype": "float32",
        }

    def matmul_parameters(self) -> int:
        """Weights that take part in matmuls per token: the blocks plus the (tied) LM head."""
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.vocab * self.hidden

    def attention_flops(self, query_len: int, context_len: float) -> float:
        """Forward FLOPs of QK^T and AV for one sequence: 2 matmuls of 2*q*c*d per layer."""
        return 4.0 * self.layers * query_len * context_len * self.hidden


SHAPES = {
    # Qwen2-like ratios (GQA 4:1, MLP 4x), vocab kept CPU-sized: the head is ~23% of P.
    "bench": ModelShape("bench-qwen2-37m", 512, 8, 8, 2, 2048, 16384),
    "quick": ModelShape("tiny-qwen2", 64, 2, 4, 2, 128, builtin.VOCAB_SIZE),
}


def _merged_vocab(size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Char vocab + specials, then 2- and 3-symbol merges of printable ASCII up to `size`."""
    vocab = {builtin.byte_level_symbol(c): i for i, c in enumerate(builtin.TOKENIZER_CHARS)}
    for token in builtin.SPECIAL_TOKENS:
        vocab[token] = len(vocab)
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


def _save_tokenizer(dest: Path, vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size == builtin.VOCAB_SIZE:
        builtin.save_char_tokenizer(dest)
        return
    vocab, merges = _merged_vocab(vocab_size)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(builtin.CHAR_TOKENIZER_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
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


def build_model_dir(shape: ModelShape, dest: Path, seed: int = 0) -> Path:
    """Write config.json, random fan-in-scaled float32 weights and the tokenizer into `dest`."""
    import mlx.core as mx
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    config = shape.config()
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, dims in sorted(builtin._parameter_shapes(config).items()):
        if name.endswith(".bias"):
            value = np.zeros(dims, dtype=np.float32)
        elif len(dims) == 1:
            value = np.ones(dims, dtype=np.float32)
        else:
            std = builtin.EMBED_STD if "embed" in name else dims[-1] ** -0.5
            value = (rng.standard_normal(dims, dtype=np.float32) * std).astype(np.float32)
        arrays[name] = mx.array(value)
    mx.save_safetensors(str(dest / "model.safetensors"), arrays, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {"eos_token_id": builtin.EOS_TOKEN_ID, "pad_token_id": builtin.PAD_TOKEN_ID}
    (dest / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    _save_tokenizer(dest, shape.vocab)
    return dest


def parameter_count(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))
