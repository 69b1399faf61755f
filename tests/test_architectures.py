"""mlx-lm architectures beyond the ones the code once knew by name: where the LM head splits
off, and that every path the engine takes (split head in chunks, shared prompt pass,
checkpointed blocks) gives the log-probs and gradients of the whole model.

Tiny random models, one per architecture, from configurations written here (hidden 32, two
blocks, vocabulary 48). Every one of them splits, those that map the head's output (a final
softcap, a logit scale, features scaled before the head) with that map.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from loss_checks import (
    assert_whole_model_gradients,
    assert_whole_model_logprobs,
    shared_prompt_batch,
    weighted_loss_and_grad,
    whole_model_loss_and_grad,
)
from random_models import add_random_adapters
from tolerance import assert_close

from mlxgrpo.models.batch_masks import fit_batch_masks
from mlxgrpo.models.heads import conventional_head, split_head

VOCAB = 48
TERMS = 64  # the longest sum in these models: the MLP's 64
BASE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    head_dim=8,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# model type -> (extra configuration, whether its head splits off exactly)
ARCHITECTURES = {
    "llama": ({}, True),
    "qwen3": ({"tie_word_embeddings": True}, True),
    "gemma": ({}, True),  # embeddings scaled inside the trunk, tied head
    "gemma3_text": (
        {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 8.0},
        True,
    ),  # fmt: skip
    "starcoder2": ({"norm_epsilon": 1e-5}, True),
    "glm4": ({"partial_rotary_factor": 0.5, "attention_bias": False}, True),
    "hunyuan_v1_dense": ({}, True),
    "seed_oss": ({}, True),
    "deepseek": ({}, True),
    "minicpm": ({"dim_model_base": 8, "scale_depth": 1.0, "scale_emb": 2.0}, True),  # head(f / 4)
    "gemma2": (
        {
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 8.0,
        },
        True,
    ),  # fmt: skip
    "cohere": ({"logit_scale": 0.5, "layer_norm_eps": 1e-5, "use_qk_norm": False}, True),
    "gemma4_text": (
        {
            "num_hidden_layers": 4,
            "global_head_dim": 16,
            "num_key_value_heads": 1,
            "num_kv_shared_layers": 2,  # the last two blocks read the keys and values of others
            "hidden_size_per_layer_input": 8,  # blocks take a per-layer input too
            "vocab_size_per_layer_input": VOCAB,
            "sliding_window": 4,
            "final_logit_softcapping": 30.0,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1e6},
                "sliding_attention": {"rope_theta": 1e4},
            },
        },
        True,
    ),  # blocks return (hidden, keys and values, offset)
    "granite": (
        {
            "logits_scaling": 4.0,
            "embedding_multiplier": 2.0,
            "attention_multiplier": 0.25,
            "residual_multiplier": 0.5,
            "attention_bias": False,
            "mlp_bias": False,
        },
        True,
    ),  # fmt: skip
}


def _model(model_type: str, fit: bool = True) -> nn.Module:
    """A tiny random model with random adapters; ``fit``: with its attention adapted to
    per-row masks, as loading does (:func:`mlxgrpo.models.batch_masks.fit_batch_masks`)."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    extra, _ = ARCHITECTURES[model_type]
    args = module.ModelArgs.from_dict({"model_type": model_type, **BASE, **extra})
    mx.random.seed(7)
    model = module.Model(args)
    add_random_adapters(model, seed=9, b_std=0.1)
    mx.eval(model.parameters())
    if fit:
        fit_batch_masks(model)
    return model


def _batch():
    return shared_prompt_batch(VOCAB)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_head_splits_off_exactly_where_the_model_allows(model_type):
    model = _model(model_type)
    assert conventional_head(model) is not None
    split = split_head(model)
    assert (split is not None) == ARCHITECTURES[model_type][1]
    if split is not None:
        trunk, head = split
        x = mx.array([[3, 9, 4, 17, 22, 5]])
        assert mx.array_equal(head(trunk(x)), model(x)).item()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_path_gives_the_whole_models_logprobs_and_gradients(model_type):
    model, batch = _model(model_type), _batch()
    assert_whole_model_logprobs(model, batch, terms=TERMS * VOCAB)
    # Gradients: every path against the whole model differentiated as it is.
    assert_whole_model_gradients(model, batch, terms=TERMS * VOCAB)


def test_the_check_runs_without_dropout_and_leaves_every_modules_mode_as_it_was():
    """Active dropout would make two forward passes differ: the check runs the model in eval
    mode, then puts back each module's own mode."""
    module = importlib.import_module("mlx_lm.models.gemma")
    args = module.ModelArgs.from_dict({"model_type": "gemma", **BASE})
    mx.random.seed(7)
    model = module.Model(args)
    add_random_adapters(model, seed=9, b_std=0.1, dropout=0.5)
    mx.eval(model.parameters())
    model.train()
    model.model.layers[0].eval()  # one subtree in another mode
    modes = {name: m.training for name, m in model.named_modules()}
    assert split_head(model) is not None
    assert {name: m.training for name, m in model.named_modules()} == modes


MLA = {  # DeepSeek-V3's multi-head latent attention: value heads narrower than query heads
    "model_type": "deepseek_v3",
    **BASE,
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "n_group": 2,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 4,
}


def test_mla_runs_through_the_cpu_kernels_with_its_own_value_width():
    """Decoding (cached, one query) and training attention (many queries, gradient) with value
    heads of another width than the queries', through the CPU kernels."""
    from mlxgrpo.generation.rollout import generate_groups
    from mlxgrpo.generation.sampling import SamplingConfig
    from mlxgrpo.models.cpu_kernels import use_cpu_kernels

    module = importlib.import_module("mlx_lm.models.deepseek_v3")
    mx.random.seed(5)
    model = module.Model(module.ModelArgs.from_dict(MLA))
    mx.eval(model.parameters())
    prompts = [[3, 9, 4, 17, 22], [8, 1, 30]]
    plain = []  # greedy by whole forward passes, before the kernels are switched in
    for prompt in prompts:
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(mx.argmax(model(mx.array([sequence]))[0, -1]).item()))
        plain.append(sequence[len(prompt) :])
    batch = _batch()
    want_value, want_grads = whole_model_loss_and_grad(model, batch)
    assert use_cpu_kernels(model) > 0
    rollout = generate_groups(
        model, prompts, num_generations=2, max_new_tokens=6,
        sampling=SamplingConfig(temperature=0.0), eos_token_ids=[],
    )  # fmt: skip
    assert rollout.completion_ids == [ids for ids in plain for _ in range(2)]
    value, _, _, grads = weighted_loss_and_grad(model, batch, blocks=True, chunk_size=3)
    assert_close(value, want_value, terms=TERMS * VOCAB, scale=abs(want_value) + 1, what="value")
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, terms=TERMS * VOCAB, what=name)


def test_grouped_score_attention_decodes_a_batch_as_each_prompt_alone():
    """Gemma 2 groups its scores by KV head: fitted, a batch of prompts of different lengths
    (one mask per row) decodes greedily as whole forward passes over each prompt do."""
    from mlxgrpo.generation.rollout import generate_groups
    from mlxgrpo.generation.sampling import SamplingConfig

    model = _model("gemma2")
    prompts = [[3, 9, 4, 17, 22], [8, 1, 30]]
    plain = []
    for prompt in prompts:
        sequence = list(prompt)
        for _ in range(5):
            sequence.append(int(mx.argmax(model(mx.array([sequence]))[0, -1]).item()))
        plain.append(sequence[len(prompt) :])
    rollout = generate_groups(
        model, prompts, num_generations=2, max_new_tokens=5,
        sampling=SamplingConfig(temperature=0.0), eos_token_ids=[],
    )  # fmt: skip
    assert rollout.completion_ids == [ids for ids in plain for _ in range(2)]
