"""Small random-init mlx-lm models built in memory, for tests of the engine's math."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn


def random_lm(
    model_type: str = "qwen2",
    *,
    seed: int = 0,
    hidden: int = 32,
    vocab: int = 48,
    tied: bool = True,
    rms_norm_eps: float = 1e-6,
) -> nn.Module:
    """A 2-layer model of `model_type` (4 query / 2 KV heads, MLP 2·hidden), seeded weights."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    args = module.ModelArgs(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=2,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=rms_norm_eps,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    return module.Model(args)
