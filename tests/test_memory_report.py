"""The memory-path report: which techniques a run uses and why any is off, in the run header
and in the first update record of metrics.jsonl."""

from __future__ import annotations

import importlib
import json
import re

import mlx.core as mx
import pytest
from random_models import add_random_adapters, random_lm
from test_architectures import _model as architecture_model

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.memory.report import memory_paths


def _sections(*sets: str):
    cfg = resolve_config(overrides=list(sets)).config
    return cfg.finetune, cfg.algorithm


def _report(model, *sets: str, tools=None) -> dict[str, str]:
    finetune, algorithm = _sections(*sets)
    return {p.name: p.describe() for p in memory_paths(model, finetune, algorithm, tools)}


def _lora_qwen2():
    model = random_lm("qwen2", seed=3)
    add_random_adapters(model, seed=4)
    mx.eval(model.parameters())
    return model


def test_a_plain_architecture_with_lora_gets_every_path():
    report = _report(_lora_qwen2())
    assert report == {
        "tiled head": "on",
        "shared prompt": "on",
        "replay": "on",
        "checkpointing": "on",
    }


@pytest.mark.parametrize(
    ("sets", "name", "why"),
    [
        (["algorithm.entropy_coeff=0.01"], "tiled head", "entropy bonus"),
        (["finetune.grad_checkpoint=false"], "checkpointing", "grad_checkpoint = false"),
        (["finetune.grad_checkpoint=false"], "replay", "needs finetune.grad_checkpoint"),
        (["finetune.reuse_rollout_activations=false"], "replay", "= false"),
    ],
)
def test_each_setting_that_turns_a_path_off_is_named(sets, name, why):
    report = _report(_lora_qwen2(), *sets)
    assert report[name].startswith("off: ") and why in report[name]


def test_a_trained_head_and_tool_results_are_named():
    model = random_lm("qwen2", seed=3)  # nothing frozen: full fine-tuning trains the head
    report = _report(model, "finetune.type=full", tools=object())
    assert "the LM head trains" in report["tiled head"]
    assert "tool results" in report["replay"]


def test_architectures_say_why_a_path_is_off():
    # Gemma 2's attention broadcasts its mask against grouped-query scores: a per-row mask does
    # not fit until loading adapts it (models/batch_masks.py), and the check says so.
    unfitted = _report(architecture_model("gemma2", fit=False))
    assert unfitted["tiled head"] == "on"  # with the final softcap applied tile by tile
    assert unfitted["shared prompt"].startswith("off: its attention cannot take")
    assert unfitted["replay"] == "off: it needs the shared-prompt pass"
    assert unfitted["checkpointing"] == "on"
    assert set(_report(architecture_model("gemma2")).values()) == {"on"}
    sliding = _report(architecture_model("gemma3_text"))
    assert set(sliding.values()) == {"on"}
    module = importlib.import_module("mlx_lm.models.lfm2")
    mx.random.seed(0)
    convolutional = module.Model(
        module.ModelArgs.from_dict(
            {
                "model_type": "lfm2",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "norm_eps": 1e-5,
                "vocab_size": 48,
                "full_attn_idxs": [1],
                "rope_theta": 10000.0,
                "block_dim": 32,
                "block_ff_dim": 64,
                "block_multiple_of": 16,
                "block_ffn_dim_multiplier": 1.0,
                "block_auto_adjust_ff_dim": False,
                "max_position_embeddings": 128,
                "conv_bias": True,
                "conv_L_cache": 3,
            }
        )
    )
    add_random_adapters(convolutional, seed=1)
    recurrent = _report(convolutional)
    assert recurrent["shared prompt"].startswith("off: recurrent or convolutional layers")
    assert recurrent["tiled head"] == recurrent["checkpointing"] == "on"


def test_train_prints_the_report_and_logs_it_once(cli, tmp_path):
    code, _, err = cli("train", "-c", "demo", "--max-steps", "2", "-o", tmp_path)
    assert code == 0, err
    header = re.sub(r"[│\s]+", " ", err)  # the panel may wrap the line
    assert "memory tiled head ✓ · shared prompt ✓ · replay ✓ · checkpointing ✓" in header
    records = [
        json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert records[0]["memory_paths"] == {
        "tiled head": "on",
        "shared prompt": "on",
        "replay": "on",
        "checkpointing": "on",
    }
    assert all("memory_paths" not in r for r in records[1:])


def test_doctor_reports_a_models_memory_paths_without_training(cli):
    code, out, err = cli("doctor", "--json", "--model", "builtin:tiny-qwen2")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "builtin:tiny-qwen2"
    assert report["memory_paths"] == {
        "tiled head": "on",
        "shared prompt": "on",
        "replay": "on",
        "checkpointing": "on",
    }
    code, out, err = cli(
        "doctor", "--json", "-c", "demo", "--set", "finetune.reuse_rollout_activations=false"
    )
    assert code == 0, err
    assert json.loads(out)["memory_paths"]["replay"].startswith("off: ")
