"""Tiny random models of every text architecture mlx-lm's own model tests build, in one place.

``ZOO`` maps a name (the config's ``model_type``; ``llama-sliding`` and ``llama-llama3-rope``
are second configurations of llama) to a complete configuration for the installed mlx-lm:
hidden width 32 to 64, two blocks (more only where the architecture needs a pattern of layer
kinds), the vocabulary of the builtin character tokenizer, and sliding windows of 4 tokens so
that windows matter on the short sequences tests use. :func:`build` makes a seeded model in memory;
:func:`write_model_dir` writes a directory that ``mlx_lm.utils.load`` and ``mlxgrpo train`` /
``mlxgrpo infer`` load like any converted model.

Architectures of mlx-lm's test suite left out, and why:

- ``olmo``: its module exits the process unless the ``ai2-olmo`` package is installed (mlx-lm's
  own test skips it too).
- ``bitnet``: its BitLinear layers run a Metal-only kernel ("No Metal back-end" elsewhere).
- ``phi3small``: its head sets fixed token ids 100256-100351 to -inf, writing out of bounds
  (heap corruption, aborts) below a 100352-token vocabulary.
- ``pixtral``, ``qwen3_vl``, ``qwen3_vl_moe``, ``kimi_vl``, ``lfm2-vl``, ``gemma4``: wrappers of a
  vision-language checkpoint around a text model that is here under its own name (llama,
  qwen3, qwen3_moe, deepseek_v3, lfm2, gemma4_text).

Kept although their configurations nest a ``text_config``: ``llama4`` (mlx-lm's module is the
text model of the Llama 4 checkpoints, mixture of experts and chunked attention; ``llama4_text``
is another model) and ``gemma3n`` (text only in mlx-lm; no other entry covers it).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import MODEL_REMAPPING

from mlxgrpo.models import builtin

VOCAB = builtin.VOCAB_SIZE
WINDOW = 4  # sliding windows shorter than the test sequences

# What most architectures share; each entry below adds or overrides its own keys. Keys an
# architecture does not know are dropped by its ModelArgs.from_dict.
BASE: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
MLA = {  # multi-head latent attention, value heads narrower than query heads
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 4,
}
DEEPSEEK_MOE = {
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
SLIDING_FULL = ["sliding_attention", "full_attention"]
GRANITE_SCALES = {
    "logits_scaling": 4.0,
    "embedding_multiplier": 2.0,
    "attention_multiplier": 0.25,
    "residual_multiplier": 0.5,
}

# name -> keys on top of BASE ("model_type" defaults to the name)
# fmt: off
_EXTRA: dict[str, dict[str, Any]] = {
    "afm7": {
        "hidden_dim": 32, "num_layers": 2, "num_kv_reuse_layers": 1, "num_heads": 4,
        "num_kv_heads": 2, "hidden_dim_scale_factor": 2.0,
    },
    "afmoe": {
        **MOE, "layer_types": SLIDING_FULL, "sliding_window": WINDOW, "num_shared_experts": 1,
        "num_dense_layers": 1,
    },
    "apertus": {"mlp_bias": True, "attention_bias": False, "post_norm": True, "qk_norm": True},
    "baichuan_m1": {"sliding_window": WINDOW, "sliding_window_layers": [0], "conv_window": 2},
    "bailing_moe": {
        **MOE, "num_shared_experts": 1, "norm_topk_prob": True, "first_k_dense_replace": 1,
        "use_qk_norm": True,
    },
    "bailing_moe_linear": {
        **MOE, "num_shared_experts": 1, "norm_topk_prob": True, "first_k_dense_replace": 0,
        "layer_group_size": 2, "group_norm_size": 1,
    },
    "cohere": {"logit_scale": 0.5, "layer_norm_eps": 1e-5, "use_qk_norm": True},
    "cohere2": {
        "logit_scale": 0.5, "layer_norm_eps": 1e-5, "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    },
    "dbrx": {
        "d_model": 32, "n_layers": 2, "n_heads": 4,
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000},
    },
    "deepseek": {**DEEPSEEK_MOE},
    "deepseek_v2": {**DEEPSEEK_MOE, **MLA, "rope_scaling": YARN},
    "deepseek_v3": {**DEEPSEEK_MOE, **MLA, "n_group": 2, "topk_group": 1},
    "deepseek_v32": {
        **DEEPSEEK_MOE, **MLA, "n_group": 2, "topk_group": 1, "index_head_dim": 8,
        "index_n_heads": 2, "index_topk": WINDOW,
    },
    "dots1": {**DEEPSEEK_MOE, "norm_topk_prob": True, "routed_scaling_factor": 1.0},
    "ernie4_5": {"use_bias": False, "tie_word_embeddings": True},
    "ernie4_5_moe": {
        "use_bias": False, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32,
        "moe_layer_start_index": 1, "moe_num_shared_experts": 1,
    },
    "exaone": {"num_layers": 2, "layer_norm_epsilon": 1e-5},
    "exaone4": {  # transformers reads layer_types (it cannot derive them from "LG")
        "sliding_window": WINDOW, "sliding_window_pattern": "LG", "layer_types": SLIDING_FULL,
        "rope_scaling": None,
    },
    "exaone_moe": {
        **MOE, "num_shared_experts": 1, "sliding_window": WINDOW, "layer_types": SLIDING_FULL,
        "is_moe_layer": [False, True],
    },
    "falcon_h1": {
        "mamba_d_head": 8, "mamba_n_heads": 8, "mamba_d_ssm": 64, "mamba_d_state": 8,
        "mamba_n_groups": 1, "mamba_chunk_size": 4, "mamba_expand": 2,
    },
    "falcon_mamba": {  # mlx-lm loads it as mamba, with norms on B, C and dt
        "state_size": 8, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "time_step_rank": 4,
    },
    "gemma": {},
    "gemma2": {
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
        "query_pre_attn_scalar": 8,
    },
    "gemma3_text": {
        "sliding_window": WINDOW, "sliding_window_pattern": 2, "query_pre_attn_scalar": 8,
    },
    "gemma3n": {
        "text_config": {
            **BASE, "model_type": "gemma3n", "num_hidden_layers": 4, "num_kv_shared_layers": 2,
            "vocab_size_per_layer_input": VOCAB, "sliding_window": WINDOW,
            "rope_local_base_freq": 10000.0, "final_logit_softcapping": 30.0,
            "layer_types": SLIDING_FULL * 2, "activation_sparsity_pattern": [0.5, 0.5, 0.0, 0.0],
            "hidden_size_per_layer_input": 8, "altup_num_inputs": 2, "altup_coef_clip": 120.0,
            "altup_correct_scale": True, "altup_active_idx": 0, "laurel_rank": 4,
        },
    },
    "gemma4_text": {
        "num_hidden_layers": 4, "global_head_dim": 16, "num_kv_shared_layers": 2,
        "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
        "sliding_window": WINDOW, "layer_types": SLIDING_FULL * 2, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_theta": 10000.0},
        },
    },
    "glm": {},
    "glm4": {"partial_rotary_factor": 0.5, "attention_bias": False},
    "glm4_moe": {
        **DEEPSEEK_MOE, "norm_topk_prob": True, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 1.0, "rope_scaling": None, "use_qk_norm": True,
        "attention_bias": False, "partial_rotary_factor": 0.5,
    },
    "glm4_moe_lite": {
        **DEEPSEEK_MOE, **MLA, "num_key_value_heads": 4, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 0,
    },
    "gpt2": {
        "n_ctx": 256, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 256,
        "layer_norm_epsilon": 1e-5,
    },
    "gpt_bigcode": {
        "n_embd": 32, "n_layer": 2, "n_inner": 64, "n_head": 4, "n_positions": 256,
        "layer_norm_epsilon": 1e-5,
    },
    "gpt_neox": {"layer_norm_eps": 1e-5, "rotary_emb_base": 10000, "rotary_pct": 0.5},
    "gpt_oss": {
        "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
        "sliding_window": WINDOW, "layer_types": SLIDING_FULL,
    },
    "granite": {**GRANITE_SCALES, "attention_bias": False, "mlp_bias": False},
    "granitemoe": {
        **GRANITE_SCALES, "attention_bias": False, "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "granitemoehybrid": {
        **GRANITE_SCALES, "attention_bias": False, "num_local_experts": 4,
        "num_experts_per_tok": 2, "shared_intermediate_size": 64, "mamba_n_heads": 4,
        "mamba_d_head": 16, "mamba_proj_bias": False, "mamba_d_state": 8, "mamba_d_conv": 4,
        "mamba_n_groups": 1, "mamba_conv_bias": True, "layer_types": ["mamba", "attention"],
    },
    "helium": {"attention_bias": False, "mlp_bias": False},
    "hunyuan": {
        "attention_bias": False, "moe_topk": 2, "num_experts": 2, "num_shared_expert": 1,
        "use_mixed_mlp_moe": True, "use_qk_norm": True,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}, "use_cla": True,
        "cla_share_factor": 2,
    },
    "hunyuan_v1_dense": {
        "use_qk_norm": True, "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
    },
    "internlm2": {},
    "internlm3": {},
    "iquestloopcoder": {"loop_num": 2, "loop_window_size": WINDOW},
    "jamba": {
        **MOE, "attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1,
        "expert_layer_period": 2, "mamba_d_conv": 4, "mamba_d_state": 8, "mamba_expand": 2,
    },
    "Klear": {
        **MOE, "attention_bias": False, "mlp_only_layers": [0], "decoder_sparse_step": 1,
        "n_shared_experts": 1, "norm_topk_prob": True,
    },
    "kimi_linear": {
        "linear_attn_config": {"num_heads": 4, "head_dim": 8, "kda_layers": [1]},
        "model_max_length": 256, "num_experts": 2, "moe_intermediate_size": 32, "kv_lora_rank": 8,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    },
    "laguna": {
        **MOE, "num_hidden_layers": 2, "sliding_window": WINDOW, "partial_rotary_factor": 0.5,
        "shared_expert_intermediate_size": 32, "moe_routed_scaling_factor": 2.5,
        "moe_router_score_func": "sqrtsoftplus",
        "layer_types": ["full_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse"], "num_attention_heads_per_layer": [4, 4],
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5,
            },
            "sliding_attention": {
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            },
        },
    },
    "lfm2": {
        "norm_eps": 1e-5, "conv_bias": True, "conv_L_cache": 3, "block_dim": 32,
        "block_ff_dim": 64, "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False, "full_attn_idxs": [1],
    },
    "lfm2_moe": {
        **MOE, "norm_eps": 1e-5, "conv_bias": True, "conv_L_cache": 3, "full_attn_idxs": [1],
        "num_dense_layers": 1, "norm_topk_prob": True, "use_expert_bias": True,
    },
    "lille-130m": {  # its MLP width rounds 8/3 n_embd to a multiple of 256: 0 below 48
        "block_size": 256, "layer_norm_eps": 1e-5, "n_embd": 64, "n_head": 4, "n_kv_heads": 2,
        "n_layer": 2,
    },
    "llama": {},
    "llama-sliding": {"sliding_window": WINDOW, "layer_types": SLIDING_FULL},
    "llama-llama3-rope": {
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "llama4": {
        "text_config": {
            **BASE, "model_type": "llama4", "num_hidden_layers": 4, "attention_bias": False,
            "attention_chunk_size": WINDOW, "interleave_moe_layer_step": 2,
            "intermediate_size_mlp": 64, "num_experts_per_tok": 1, "num_local_experts": 2,
            "rope_scaling": None, "use_qk_norm": True,
        },
    },
    "llama4_text": {"intermediate_size_mlp": 64, "no_rope_layers": [1, 0], "use_qk_norm": True},
    "longcat_flash": {  # num_layers 1: each of its layers holds two attention blocks
        **MLA, "attention_method": "MLA", "zero_expert_type": "identity", "ffn_hidden_size": 64,
        "moe_topk": 2, "expert_ffn_hidden_size": 32, "n_routed_experts": 2, "zero_expert_num": 2,
        "num_layers": 1, "routed_scaling_factor": 1.0, "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True, "attention_bias": False,
    },
    "longcat_flash_ngram": {
        **MLA, "zero_expert_type": "identity", "ffn_hidden_size": 64, "moe_topk": 2,
        "expert_ffn_hidden_size": 32, "n_routed_experts": 2, "zero_expert_num": 2, "num_layers": 1,
        "routed_scaling_factor": 1.0, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
        "attention_bias": False, "ngram_vocab_size_ratio": 2, "emb_neighbor_num": 2,
        "emb_split_num": 2,
    },
    "mamba": {
        "state_size": 8, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
        "time_step_rank": 4, "tie_word_embeddings": True,
    },
    "mamba2": {
        "num_heads": 4, "head_dim": 16, "state_size": 8, "layer_norm_epsilon": 1e-5,
        "conv_kernel": 3, "n_groups": 2, "use_bias": False, "use_conv_bias": True,
        "time_step_limit": [0.01, 10.0], "time_step_rank": "auto", "tie_word_embeddings": True,
    },
    "mimo": {"num_nextn_predict_layers": 0},
    "mimo_v2_flash": {
        "num_experts_per_tok": 2, "hybrid_layer_pattern": [1, 0], "moe_layer_freq": [0, 1],
        "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
        "sliding_window_size": WINDOW, "moe_intermediate_size": 32, "n_shared_experts": 1,
        "n_routed_experts": 4, "routed_scaling_factor": None, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 2, "topk_group": 1,
        "layernorm_epsilon": 1e-5, "swa_rope_theta": 10000.0, "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2, "head_dim": 16, "v_head_dim": 8, "swa_head_dim": 16,
        "swa_v_head_dim": 8, "partial_rotary_factor": 0.5,
    },
    "minicpm": {"dim_model_base": 8, "scale_depth": 1.0, "scale_emb": 2.0},
    "minimax": {
        "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 64,
        "rotary_dim": 4,
    },
    "mistral": {"sliding_window": WINDOW},  # mlx-lm loads it as llama
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "nanochat": {},
    "nemotron": {"hidden_act": "relu2", "norm_eps": 1e-5, "partial_rotary_factor": 0.5},
    "nemotron-nas": {
        "block_configs": [
            {
                "attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
                "ffn": {"ffn_mult": 1.0, "no_op": False, "replace_with_linear": False},
            },
            {
                "attention": {
                    "n_heads_in_group": None, "no_op": True, "replace_with_linear": False,
                },
                "ffn": {"ffn_mult": 1.5, "no_op": False, "replace_with_linear": False},
            },
        ],
    },
    "nemotron_h": {
        "num_hidden_layers": 3, "hybrid_override_pattern": ["M", "*", "-"],
        "attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 16,
        "mamba_proj_bias": False, "ssm_state_size": 8, "conv_kernel": 3, "n_groups": 2,
        "time_step_limit": [0.0, float("inf")], "mlp_bias": False, "layer_norm_epsilon": 1e-5,
        "use_bias": False, "use_conv_bias": True,
    },
    "olmo2": {},
    "olmo3": {"sliding_window": WINDOW, "layer_types": SLIDING_FULL},
    "olmoe": {**MOE},
    "openelm": {
        "model_dim": 32, "num_transformer_layers": 2, "ffn_dim_divisor": 16,
        "num_query_heads": [4, 4], "num_kv_heads": [2, 2], "ffn_multipliers": [1.0, 2.0],
    },
    "phi": {"num_key_value_heads": 4, "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5},
    "phi3": {},
    "phimoe": {
        "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0,
        "original_max_position_embeddings": 64,
        "rope_scaling": {
            "type": "longrope", "long_factor": [1.0, 1.5, 2.0, 4.0],
            "short_factor": [1.0, 1.0, 1.0, 1.0], "long_mscale": 1.2, "short_mscale": 1.2,
        },
    },
    "plamo": {"n_shared_head": 2},
    "plamo2": {
        "hidden_size_per_head": 8, "attention_window_size": WINDOW, "full_attention_idx": [],
        "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_num_heads": 4, "mamba_step": 2,
        "mamba_chunk_size": 4, "tie_word_embeddings": True,
    },
    "qwen": {"kv_channels": 8, "layer_norm_epsilon": 1e-5},
    "qwen2": {},
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 64},
    "qwen3": {"tie_word_embeddings": True},
    "qwen3_5": {
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 3, "full_attention_interval": 2,
        "partial_rotary_factor": 0.5,
    },
    "qwen3_5_moe": {
        **MOE, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 3, "full_attention_interval": 2,
        "shared_expert_intermediate_size": 32, "partial_rotary_factor": 0.5,
    },
    "qwen3_moe": {**MOE, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "qwen3_next": {
        **MOE, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 3, "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32, "mlp_only_layers": [0],
        "full_attention_interval": 2, "partial_rotary_factor": 0.5,
    },
    "recurrent_gemma": {
        "attention_bias": False, "conv1d_width": 3, "logits_soft_cap": 30.0,
        "num_key_value_heads": 1, "attention_window_size": WINDOW,
        "block_types": ["recurrent", "attention"],
    },
    "rwkv7": {
        "norm_eps": 1e-5, "a_low_rank_dim": 8, "v_low_rank_dim": 8, "gate_low_rank_dim": 8,
        "decay_low_rank_dim": 8,
    },
    "seed_oss": {},
    "smollm3": {"no_rope_layer_interval": 2},
    "stablelm": {"partial_rotary_factor": 0.5, "use_qkv_bias": True, "layer_norm_eps": 1e-5},
    "starcoder2": {"norm_epsilon": 1e-5},
    "step3p5": {
        "num_attention_groups": 2, "sliding_window": WINDOW,
        "layer_types": ["full_attention", "sliding_attention"],
        "partial_rotary_factors": [0.5, 1.0],
        "attention_other_setting": {"num_attention_heads": 8, "num_attention_groups": 2},
        "use_head_wise_attn_gate": True, "moe_num_experts": 4, "moe_top_k": 2,
        "moe_intermediate_size": 32, "share_expert_dim": 32, "moe_layers_enum": "1",
    },
    "telechat3": {},
    "youtu_llm": {**MLA},
}
# fmt: on

# Second configurations of one model type: name -> model type.
_VARIANT_OF = {"llama-sliding": "llama", "llama-llama3-rope": "llama"}


def _config(name: str) -> dict[str, Any]:
    extra = _EXTRA[name]
    model_type = _VARIANT_OF.get(name, name)
    if "text_config" in extra:  # a wrapper: the text model's keys stay in text_config
        return {"model_type": model_type, "vocab_size": VOCAB, **extra}
    return {**BASE, "model_type": model_type, **extra}


ZOO: dict[str, dict[str, Any]] = {name: _config(name) for name in sorted(_EXTRA, key=str.lower)}


def module_of(config: dict[str, Any]):
    """The mlx-lm module that builds `config` (mlx-lm's remapping of model types applied)."""
    model_type = config["model_type"]
    return importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo's model `name`, seeded and evaluated, with the weights a checkpoint would hold.

    mlx-lm's own initialisation under `seed`, except that tensors it starts at exactly zero
    (biases, router corrections, mixing coefficients, norm offsets) get N(0, 0.1²) values: a
    trained checkpoint never holds them, and at zero some models degenerate (all experts tie
    in the router; rwkv7 divides by the norm of `key * k_k`, whose gradient at 0 is NaN).
    The weights then pass through the model's `sanitize`, as they do when a directory loads.
    """
    config = ZOO[name]
    module = module_of(config)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and not mx.any(value != 0).item():
            weights[key] = 0.1 * mx.random.normal(value.shape, dtype=value.dtype)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def write_model_dir(name: str, dest: str | Path, seed: int = 0) -> Path:
    """A model directory for `name` as mlx-lm's converter lays one out: config.json,
    model.safetensors (the parameters under the names the model uses), generation_config.json
    and the builtin character tokenizer. Returns `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = build(name, seed)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(ZOO[name], indent=2) + "\n", encoding="utf-8")
    generation = {"eos_token_id": builtin.EOS_TOKEN_ID, "pad_token_id": builtin.PAD_TOKEN_ID}
    (dest / "generation_config.json").write_text(json.dumps(generation) + "\n", encoding="utf-8")
    builtin.save_char_tokenizer(dest)
    return dest


def write_spread_reward(directory: str | Path) -> str:
    """A `--set` item naming a reward that tells almost any two different answers apart (a
    hash of their characters, in [0, 1]), so that a group of a random model's answers has
    advantages as soon as its answers differ; writes the reward's file into `directory`."""
    path = Path(directory) / "spread_reward.py"
    path.write_text(
        "def spread(prompts, completions, answers, **_):\n"
        "    return [sum((i + 1) * ord(ch) for i, ch in enumerate(c)) % 1009 / 1008\n"
        "            for c in completions]\n",
        encoding="utf-8",
    )
    return f"rewards.functions=['{path}:spread']"
