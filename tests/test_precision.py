"""Precision policy (docs/architecture.md §8): frozen weights in the compute dtype; trainable
parameters, their gradients and optimizer state, log-probs and the loss always float32; quantized
layers follow the compute dtype in their scales and keep their packed weights."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten
from random_models import random_lm

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.io.checkpoint import ADAPTER_WEIGHTS, adapter_config, write_weights
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.precision import describe, precision_report
from mlxgrpo.engine.loss import grpo
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.errors import ConfigError
from mlxgrpo.generation.rollout import build_micro_batch
from mlxgrpo.models.finetune import adapters_disabled, prepare_trainable
from mlxgrpo.models.loading import cast_floating_parameters, load_model

MODEL = "builtin:tiny-qwen2"


def _cfg(*sets: str):
    return resolve_config((), ["finetune.lora_layers=-1", *sets], environ={}).config


def _split_by_trainable(model: nn.Module) -> tuple[dict, dict]:
    trainable = dict(tree_flatten(model.trainable_parameters()))
    frozen = {k: v for k, v in tree_flatten(model.parameters()) if k not in trainable}
    return trainable, frozen


def _dtypes(arrays) -> set:
    return {a.dtype for a in arrays}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_on_a_bfloat16_model_train_in_float32(kind, tmp_path):
    cfg = _cfg(f"finetune.type={kind}", "algorithm.kl_coeff=0.1")
    model, _ = load_model(MODEL, dtype="bfloat16")
    prepare_trainable(model, cfg.finetune)
    trainable, frozen = _split_by_trainable(model)
    assert _dtypes(trainable.values()) == {mx.float32}
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for k in trainable)
    assert _dtypes(frozen.values()) == {mx.bfloat16}

    optimizer = optim.Adam(learning_rate=1e-2)
    ctx = UpdateContext.from_config(
        model,
        cfg,
        reward_set=None,
        optimizer=optimizer,
        codec=None,
    )
    batch = build_micro_batch([[40, 41, 42], [40, 41, 42]], [[50, 51], [52]])
    with adapters_disabled(model):
        ref = sequence_logprobs(model, batch.tokens, batch.start)
    norm = grpo.LossNorm.for_update([batch.completion_mask], 2)
    advantages = mx.array([1.0, -1.0])
    (loss, (_, logp)), grads = ctx.loss_and_grad(batch, advantages, None, ref, norm)
    assert ref.dtype == logp.dtype == loss.dtype == mx.float32
    assert _dtypes(g for _, g in tree_flatten(grads)) == {mx.float32}
    optimizer.update(model, grads)
    state = [v for k, v in tree_flatten(optimizer.state) if k not in ("step", "learning_rate")]
    assert state and _dtypes(state) == {mx.float32}
    assert _dtypes(_split_by_trainable(model)[0].values()) == {mx.float32}  # still, after a step

    # Saved adapters are float32, and stay so when loaded onto the bfloat16 base.
    write_weights(tmp_path, model, kind, adapter_config(cfg.finetune, len(model.layers)))
    assert _dtypes(mx.load(str(tmp_path / ADAPTER_WEIGHTS)).values()) == {mx.float32}
    loaded, _ = load_model(MODEL, dtype="bfloat16", adapter_path=str(tmp_path))
    prepare_trainable(loaded, cfg.finetune)
    trainable, frozen = _split_by_trainable(loaded)
    assert _dtypes(trainable.values()) == {mx.float32}
    assert _dtypes(frozen.values()) == {mx.bfloat16}


def test_half_precision_adapters_are_trained_as_float32(tmp_path):
    model, _ = load_model(MODEL, dtype="float32")
    prepare_trainable(model, _cfg().finetune)
    halves = {k: v.astype(mx.float16) for k, v in tree_flatten(model.trainable_parameters())}
    mx.save_safetensors(str(tmp_path / ADAPTER_WEIGHTS), halves)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(adapter_config(_cfg().finetune, len(model.layers)))
    )
    resumed, _ = load_model(MODEL, dtype="bfloat16", adapter_path=str(tmp_path))
    prepare_trainable(resumed, _cfg().finetune)
    assert _dtypes(_split_by_trainable(resumed)[0].values()) == {mx.float32}


def test_full_finetuning_trains_float32_weights():
    model, _ = load_model(MODEL, dtype="bfloat16")
    prepare_trainable(model, _cfg("finetune.type=full").finetune)
    trainable, frozen = _split_by_trainable(model)
    assert not frozen and _dtypes(trainable.values()) == {mx.float32}


def test_run_header_reports_the_dtypes_the_run_holds(tmp_path):
    from mlxgrpo.engine.io.callbacks import Callback
    from mlxgrpo.engine.loop.trainer import train

    class Capture(Callback):
        def on_start(self, info):
            self.info = info

    capture = Capture()
    sets = [
        f"model.path={MODEL}",
        "model.dtype=bfloat16",
        "finetune.type=full",
        "algorithm.kl_coeff=0.1",
        "data.dataset=synthetic:repeat?letters=x",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=4",
        "optim.batch_size=2",
        "run.max_steps=1",
        f"run.output_dir={tmp_path}",
        "checkpoint.save_steps=0",
    ]
    train(resolve_config((), sets, environ={}), [capture])
    # Full fine-tuning loads float32 masters whatever model.dtype says; the reference keeps it.
    assert capture.info["precision"] == (
        "weights float32, trainable float32 (all weights), optimizer float32, "
        "log-probs float32, reference bfloat16"
    )


def _quantized_lm(bits: int = 4) -> nn.Module:
    model = random_lm(seed=3)
    model.set_dtype(mx.float16)  # float16 scales, as `convert -q --dtype float16` writes
    nn.quantize(model, group_size=32, bits=bits)
    return model


def test_quantized_layers_follow_the_compute_dtype():
    model = _quantized_lm()
    packed = dict(tree_flatten(model.parameters()))
    cast_floating_parameters(model, mx.bfloat16)
    after = dict(tree_flatten(model.parameters()))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert after[f"{q_proj}.weight"].dtype == mx.uint32
    assert mx.array_equal(after[f"{q_proj}.weight"], packed[f"{q_proj}.weight"])
    floating = [v for v in after.values() if mx.issubdtype(v.dtype, mx.floating)]
    assert _dtypes(floating) == {mx.bfloat16}  # scales, biases and norms alike
    # float16 scales would promote the whole forward pass to float32.
    assert model(mx.array([[1, 2, 3]])).dtype == mx.bfloat16


def test_qlora_reference_is_the_quantized_base_exactly():
    model = _quantized_lm()
    cast_floating_parameters(model, mx.float32)
    tokens = mx.array([[1, 2, 3, 4, 5]])
    base_logits = model(tokens)
    prepare_trainable(model, _cfg().finetune)
    report = precision_report(model, optim.Adam(learning_rate=0.1), "lora")
    assert report["weights"] == "float32 (4-bit quantized)"
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear) and q_proj.linear.weight.dtype == mx.uint32
    trainable, _ = _split_by_trainable(model)
    assert all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    for layer in (m for _, m in model.named_modules() if hasattr(m, "lora_b")):
        layer.lora_b = 0.5 * mx.ones(layer.lora_b.shape)
    assert not mx.allclose(model(tokens), base_logits, atol=1e-3)
    with adapters_disabled(model):
        assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert mx.array_equal(model(tokens), base_logits)
    assert model.layers[0].self_attn.q_proj is q_proj


def test_full_finetuning_of_a_quantized_model_is_refused():
    with pytest.raises(ConfigError, match="cannot train a quantized model") as info:
        prepare_trainable(_quantized_lm(), _cfg("finetune.type=full").finetune)
    assert "lora" in info.value.hint


def test_dora_on_a_three_bit_model_is_refused_before_it_breaks():
    """mlx-lm's DoRA gets a 3-bit layer's input width wrong; LoRA gets it right."""
    with pytest.raises(ConfigError, match="3-bit quantized"):
        prepare_trainable(_quantized_lm(bits=3), _cfg("finetune.type=dora").finetune)
    model = _quantized_lm(bits=3)
    prepare_trainable(model, _cfg("finetune.type=lora").finetune)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 48)


def test_describe_joins_the_report_in_order():
    report = {"weights": "bfloat16", "trainable": "float32 (LoRA)", "log-probs": "float32"}
    assert describe(report) == "weights bfloat16, trainable float32 (LoRA), log-probs float32"
