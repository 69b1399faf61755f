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


def add_random_adapters(
    model: nn.Module,
    dest=None,
    *,
    seed: int,
    rank: int = 4,
    scale: float = 10.0,
    num_layers: int = 2,
    b_std: float = 0.05,
    kind: str = "lora",
    dropout: float = 0.0,
) -> int:
    """Put LoRA/DoRA layers on the last `num_layers` blocks of `model` (frozen first), give
    them non-zero B matrices (so they change the model), and, when `dest` is given, save them
    there in mlx-lm's adapter format. Returns the number of adapter layers."""
    from pathlib import Path

    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlxgrpo.engine.io.checkpoint import write_weights

    lora = {"rank": rank, "scale": scale, "dropout": dropout}
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora, use_dora=kind == "dora")
    mx.random.seed(seed)
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_b")]
    for layer in layers:
        layer.lora_b = b_std * mx.random.normal(layer.lora_b.shape)
    if dest is not None:
        config = {"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": lora}
        write_weights(Path(dest), model, "lora", config)
    return len(layers)
