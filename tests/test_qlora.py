"""QLoRA through the CLI: convert to 4 bits, train LoRA with KL, then infer, eval and fuse."""

from __future__ import annotations

import json
import math
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.utils import load as mlx_lm_load
from test_inference import greedy_departures, reference_text

from mlxgrpo.models.builtin import build_tiny_model

PROMPT = "Repeat the letter x:"


def _run(cli, *args):
    code, out, err = cli(*args)
    assert code == 0, err
    return out, err


def _answer(cli, model, *extra):
    # float32 on any device, so the answer compares with the in-process float32 reference.
    args = ["infer", "-m", model, "-t", "0", "--max-tokens", "8", "--json"]
    out, _ = _run(cli, *args, "--set", "model.dtype=float32", *extra, PROMPT)
    return json.loads(out)["completion"]


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_qlora_trains_infers_evaluates_and_fuses(cli, tmp_path):
    source = build_tiny_model(tmp_path / "hf", "builtin:tiny-qwen2")
    q4 = tmp_path / "q4"
    convert = ["convert", "hf-model", source, "-o", q4, "-q", "--bits", "4", "--group-size", "32"]
    _run(cli, *convert, "--dtype", "float16")
    runs = tmp_path / "runs"
    sets = ["algorithm.kl_coeff=0.1", "checkpoint.save_steps=2", "model.dtype=float32"]
    train = ["train", "-c", "demo", "-m", q4, "--max-steps", "2", "-o", runs]
    _, err = _run(cli, *train, *[x for s in sets for x in ("--set", s)])
    header = re.sub(r"[│\s]+", " ", err)
    assert (
        "precision weights float32 (4-bit quantized), trainable float32 (LoRA), "
        "optimizer float32, log-probs float32" in header
    )
    run_dir = runs / "demo"

    # KL to the adapters-off reference: zero before any step, finite and positive after one.
    kl = [row["kl"] for row in _train_rows(run_dir)]
    assert len(kl) == 2 and all(math.isfinite(k) and k >= 0 for k in kl)
    assert kl[0] < 1e-6 < kl[1]

    # Only LoRA matrices trained, in float32, with their float32 optimizer state.
    adapters = mx.load(str(run_dir / "final" / "adapters.safetensors"))
    assert adapters and all(k.endswith((".lora_a", ".lora_b")) for k in adapters)
    assert {v.dtype for v in adapters.values()} == {mx.float32}
    assert any(mx.any(v != 0).item() for k, v in adapters.items() if k.endswith("lora_b"))
    state = mx.load(str(run_dir / "checkpoints" / "step-000002" / "optimizer.safetensors"))
    moments = {k: v for k, v in state.items() if k not in ("step", "learning_rate")}
    assert moments and {v.dtype for v in moments.values()} == {mx.float32}

    # mlx-lm itself loads base + adapters: LoRA layers wrap the still-quantized base layers.
    model, tokenizer = mlx_lm_load(str(q4), adapter_path=str(run_dir / "final"))
    lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert lora and all(isinstance(m.linear, nn.QuantizedLinear) for m in lora)
    assert all(m.linear.weight.dtype == mx.uint32 for m in lora)
    model.set_dtype(mx.float32)  # the dtype infer runs in here
    expected = reference_text(model, tokenizer, PROMPT, max_tokens=8)
    trained = _answer(cli, q4, "--adapter", run_dir)
    assert greedy_departures(model, tokenizer, PROMPT, trained, 8) == []
    # Two updates at the demo's rate change the answer.
    assert _answer(cli, q4) not in (expected, trained)

    # --compare-base switches the adapters off in the loaded model: the base rows are exactly
    # what the quantized model answers without any adapters.
    data = ["--dataset", "synthetic:repeat?letters=x", "--limit", "3", "--max-tokens", "6"]
    both, alone = tmp_path / "both.jsonl", tmp_path / "alone.jsonl"
    out, _ = _run(
        cli, "eval", "-m", q4, "--adapter", run_dir, *data, "--compare-base", "--json", "-o", both
    )
    assert [r["label"] for r in json.loads(out)["results"]] == ["base", "adapters"]
    _run(cli, "eval", "-m", q4, *data, "--json", "-o", alone)
    base_rows = [r for r in map(json.loads, both.read_text().splitlines()) if r["model"] == "base"]
    alone_rows = [json.loads(line) for line in alone.read_text().splitlines()]
    assert [r["completion"] for r in base_rows] == [r["completion"] for r in alone_rows]

    # fuse --dequantize: a plain float model that answers like base + adapters. float32, so
    # the fused weights are not rounded to float16 (which could flip a near-tie).
    fused = tmp_path / "fused"
    fuse = ["convert", "fuse", "-m", q4, "--adapter", run_dir / "final", "-o", fused]
    _run(cli, *fuse, "--dequantize", "--dtype", "float32")
    assert "quantization" not in json.loads((fused / "config.json").read_text())
    weights = dict(tree_flatten(mlx_lm_load(str(fused))[0].parameters()))
    assert {v.dtype for v in weights.values()} == {mx.float32}
    assert greedy_departures(model, tokenizer, PROMPT, _answer(cli, fused), 8) == []
