"""Every text architecture of mlx-lm's own model tests, as a tiny random model from
tests/architecture_zoo.py, through every path the engine takes.

For each architecture: the log-probs the engine computes (split head in chunks, shared prompt
pass where it applies) equal the float64 log-softmax of the whole model's logits; the gradients
through every path (checkpointed blocks included) equal the whole model's; the model directory
the zoo writes loads back through mlx-lm with the same weights; and two GRPO updates train
adapters that load for inference and change the model's output.
"""

from __future__ import annotations

import functools
import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from architecture_zoo import VOCAB, ZOO, build, write_model_dir, write_spread_reward
from loss_checks import (
    assert_whole_model_gradients,
    assert_whole_model_logprobs,
    shared_prompt_batch,
)
from mlx.utils import tree_flatten, tree_unflatten
from tolerance import assert_close

from mlxgrpo.config import resolve_config
from mlxgrpo.models.builtin import EOS_TOKEN_ID
from mlxgrpo.models.finetune import prepare_trainable

TERMS = 256  # the longest sum in the zoo's models (lille-130m's and nemotron-nas's MLPs)
NAMES = sorted(ZOO, key=str.lower)


@functools.cache
def _model(name: str) -> nn.Module:
    """The zoo's model with LoRA adapters where training puts them (every block, mlx-lm's
    default layers), their B matrices random so that they change the model. Shared by the
    tests here; none of them changes a weight."""
    model = build(name, seed=7)
    finetune = resolve_config((), ["finetune.lora_layers=-1"], environ={}).config.finetune
    prepare_trainable(model, finetune)
    mx.random.seed(9)
    lora_b = [
        (key, 0.1 * mx.random.normal(value.shape))
        for key, value in tree_flatten(model.trainable_parameters())
        if ".lora_b" in f".{key}"
    ]
    assert lora_b, "no adapters"
    model.update(tree_unflatten(lora_b))
    mx.eval(model.parameters())
    return model


@functools.cache
def _batch():
    return shared_prompt_batch(VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_the_engines_logprobs_are_the_whole_models(name):
    model, batch = _model(name), _batch()
    assert_whole_model_logprobs(model, batch, terms=TERMS * VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_every_path_gives_the_whole_models_gradients(name):
    assert_whole_model_gradients(_model(name), _batch(), terms=TERMS * VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_the_written_directory_loads_back_with_the_same_weights(name, tmp_path):
    """Through mlx-lm's load with the tokenizer, which also has transformers read config.json
    (it rejects a config its own class for the model type does not accept)."""
    from mlx_lm.utils import load

    write_model_dir(name, tmp_path, seed=3)
    loaded, tokenizer, config = load(str(tmp_path), return_config=True)
    assert config["model_type"] == ZOO[name]["model_type"]
    assert tokenizer.encode("Repeat") and tokenizer.eos_token_id == EOS_TOKEN_ID
    want = dict(tree_flatten(build(name, seed=3).parameters()))
    got = dict(tree_flatten(loaded.parameters()))
    assert got.keys() == want.keys()
    for key, value in want.items():  # sanitize may renormalise (baichuan_m1's head) again
        assert_close(got[key], value, terms=value.shape[-1] if value.ndim else 1, what=key)


TRAIN = [
    "data.dataset=synthetic:repeat",
    "rollout.num_generations=4",
    "rollout.max_new_tokens=6",
    "rollout.temperature=1.0",
    "optim.batch_size=2",
    "optim.gradient_accumulation_steps=1",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "optim.max_grad_norm=1.0",
    "finetune.lora_layers=-1",
    "checkpoint.save_steps=0",
    "run.resume=never",
    "run.max_steps=2",
    "run.seed=0",
]


def _train(name: str, tmp_path):
    """Two GRPO updates on the zoo's model `name` written to `tmp_path`/model; returns the
    model directory and the run directory."""
    from mlxgrpo.engine.loop.trainer import train

    model_dir = write_model_dir(name, tmp_path / "model")
    sets = [
        *TRAIN,
        f"model.path={model_dir}",
        f"run.output_dir={tmp_path}",
        "run.run_name=run",
        write_spread_reward(tmp_path),
    ]
    train(resolve_config((), sets, environ={}))
    return model_dir, tmp_path / "run"


# Architectures whose mlx-lm model cannot decode a batch of prompts (gpt_bigcode's learned
# positions want one cache offset; Llama 4's chunked cache does not merge): training stops at
# its first rollout with one line that names the model and the reason.
UNBATCHABLE = {"gpt_bigcode": "per-row positions", "llama4": "ChunkedKVCache"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UNBATCHABLE))
def test_a_model_that_cannot_decode_a_batch_stops_with_one_line(name, tmp_path):
    from mlxgrpo.errors import MlxgrpoError

    with pytest.raises(MlxgrpoError, match=UNBATCHABLE[name]) as caught:
        _train(name, tmp_path)
    assert "\n" not in str(caught.value) and name in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in UNBATCHABLE])
def test_two_updates_train_adapters_that_change_inference(name, tmp_path):
    from mlxgrpo.inference import GenerationOptions, generate_answers
    from mlxgrpo.models.loading import load_model

    model_dir, run_dir = _train(name, tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("kind") == "train"]
    assert len(train_records) == 2 and set(train_records[0]["memory_paths"]) == {
        "tiled head", "shared prompt", "replay", "checkpointing",
    }  # fmt: skip
    adapters = mx.load(str(run_dir / "final" / "adapters.safetensors"))
    lora_b = [value for key, value in adapters.items() if ".lora_b" in key]
    assert lora_b, sorted(adapters)
    assert all(mx.isfinite(b).all().item() for b in lora_b)
    assert any(mx.abs(b).max().item() > 0 for b in lora_b), "the updates left LoRA B at zero"

    base, tokenizer = load_model(str(model_dir))
    tuned, _ = load_model(str(model_dir), adapter_path=str(run_dir / "final"))
    x = mx.array([tokenizer.encode("Repeat the letter q:")])
    assert not mx.allclose(tuned(x), base(x)).item(), "the adapters do not change the logits"
    options = GenerationOptions(max_tokens=6, temperature=0.0)
    (answer,) = generate_answers(tuned, tokenizer, ["Repeat the letter q:"], options)
    assert answer.finish_reason == "stop" or (answer.completion_tokens == 6 and answer.text)
