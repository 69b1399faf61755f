"""`mlxgrpo convert hf-model | fuse` through the CLI, then `infer` and `eval` on what they wrote."""

from __future__ import annotations

import json

import pytest
from mlx_lm.utils import load as mlx_lm_load
from test_cli_generate import _greedy_answers, _make_adapters

from mlxgrpo.models.builtin import build_tiny_model
from mlxgrpo.models.loading import load_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("hf") / "tiny", "builtin:tiny-qwen2")


def infer_json(cli, model, prompt, *extra):
    code, out, err = cli(
        "infer", "-m", model, "-t", "0", "--max-tokens", "8", "--json", *extra, prompt
    )
    assert code == 0, err
    return json.loads(out)["completion"]


def test_plain_conversion_answers_like_the_source(cli, hf_dir, tmp_path):
    out = tmp_path / "plain"
    code, stdout, err = cli("convert", "hf-model", hf_dir, "-o", out, "--dtype", "float32")
    assert code == 0, err
    assert "size after" in stdout and "bits per weight" in stdout
    mlx_lm_load(str(out))  # loadable by mlx-lm itself
    assert infer_json(cli, out, "hello there") == infer_json(cli, hf_dir, "hello there")


def test_four_bit_conversion_then_infer_and_eval(cli, hf_dir, tmp_path):
    out = tmp_path / "q4"
    args = ["convert", "hf-model", hf_dir, "-o", out, "-q", "--bits", "4", "--group-size", "32"]
    code, stdout, err = cli(*args, "--dtype", "float16", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert summary["size_after_bytes"] < summary["size_before_bytes"] / 2
    model, tokenizer = load_model(str(out))
    questions = ["one", "two", "three", "four"]
    greedy = _greedy_answers(model, tokenizer, questions, 6)
    assert infer_json(cli, out, "one").strip() != ""  # the 4-bit model generates
    data = tmp_path / "task"
    data.mkdir()
    rows = [
        {"question": q, "answer": g if i < 3 else "wrong"}
        for i, (q, g) in enumerate(zip(questions, greedy, strict=True))
    ]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, err = cli(
        "eval",
        "-m",
        out,
        "--dataset",
        data,
        "--max-tokens",
        "6",
        "--json",
        "--set",
        "rewards.functions=['exact_match']",
    )
    assert code == 0, err
    assert json.loads(stdout)["results"][0]["accuracy"] == pytest.approx(0.75)


def test_convert_refuses_bad_input_without_touching_anything(cli, hf_dir, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = cli("convert", "hf-model", hf_dir, "-o", existing)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (existing / "keep.txt").read_text() == "mine"
    code, _, err = cli("convert", "hf-model", hf_dir, "-o", tmp_path / "x", "--bits", "5")
    assert code == 2 and "bits must be one of 2, 3, 4, 6, 8" in err
    assert not (tmp_path / "x").exists()
    code, _, err = cli("convert", "hf-model", tmp_path / "missing", "-o", tmp_path / "y")
    assert code == 2 and "missing" in err and "Traceback" not in err
    code, _, err = cli("convert", "hf-model", "-o", tmp_path / "z")
    assert code == 2 and "no model to convert" in err
    code, _, err = cli(
        "convert", "hf-model", "-o", existing, "--force", "--set", f"model.path={hf_dir}"
    )
    assert code == 0, err
    assert not (existing / "keep.txt").exists() and (existing / "config.json").is_file()


def test_fuse_bakes_adapters_into_a_model_that_answers_the_same(cli, tmp_path):
    adapters, _ = _make_adapters(tmp_path)
    out = tmp_path / "fused"
    code, stdout, err = cli(
        "convert", "fuse", "-m", "builtin:tiny-qwen2", "--adapter", adapters, "-o", out
    )
    assert code == 0, err
    assert "fused layers" in stdout
    with_adapters = infer_json(cli, "builtin:tiny-qwen2", "fuse me", "--adapter", str(adapters))
    assert infer_json(cli, out, "fuse me") == with_adapters
    assert with_adapters != infer_json(cli, "builtin:tiny-qwen2", "fuse me")
    code, _, err = cli("convert", "fuse", "-m", "builtin:tiny-qwen2", "-o", tmp_path / "z")
    assert code == 2 and "no adapters to fuse" in err


def test_nanochat_checkpoint_converts_and_infers_like_nanochat_itself(cli, tmp_path, monkeypatch):
    import io
    import sys

    import numpy as np
    from nanochat_fixtures import (
        TINY_CONFIG,
        nanochat_weights,
        step_seed,
        write_nanochat_checkpoint,
    )
    from test_nanochat import MLX_LM_EPS, reference_logits

    checkpoints = write_nanochat_checkpoint(tmp_path / "nanochat")
    out = tmp_path / "nanochat-mlx"
    code, stdout, err = cli("convert", "nanochat", checkpoints, "-o", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["step"] == 5  # the newest of steps 3 and 5
    _, tokenizer = load_model(str(out))
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    # Greedy decoding with a numpy forward pass over the original (step 5) weights.
    weights = nanochat_weights(TINY_CONFIG, step_seed(5))
    ids: list[int] = []
    for _ in range(8):
        ids.append(
            int(np.argmax(reference_logits(weights, TINY_CONFIG, prompt_ids + ids, MLX_LM_EPS)[-1]))
        )
        if ids[-1] in tokenizer.eos_token_ids:
            ids.pop()
            break
    answer = infer_json(cli, out, "hi")
    assert len(ids) >= 2 and answer == tokenizer.decode(ids)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, stdout, err = cli("chat", "-m", out, "-t", "0", "--max-tokens", "8")
    assert code == 0 and stdout == answer + "\n", err


def test_convert_nanochat_refuses_a_malicious_tokenizer(cli, tmp_path):
    import os
    import pickle

    from nanochat_fixtures import write_nanochat_checkpoint

    class RunsCommand:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    sentinel = tmp_path / "SENTINEL"
    checkpoints = write_nanochat_checkpoint(tmp_path / "nanochat", steps=(1,))
    (tmp_path / "nanochat" / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(RunsCommand()))
    out = tmp_path / "out"
    code, _, err = cli("convert", "nanochat", checkpoints, "-o", out)
    assert code != 0 and "refusing to load" in err and "system" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not sentinel.exists() and not out.exists()


def test_a_converted_nanochat_model_trains_and_its_adapters_load(cli, tmp_path):
    from nanochat_fixtures import write_nanochat_checkpoint
    from test_inference import reference_text

    checkpoints = write_nanochat_checkpoint(tmp_path / "nanochat", steps=(1,))
    out = tmp_path / "nanochat-mlx"
    assert cli("convert", "nanochat", checkpoints, "-o", out)[0] == 0
    runs = tmp_path / "runs"
    code, _, err = cli("train", "-c", "demo", "-m", out, "--max-steps", "2", "-o", runs)
    assert code == 0, err
    metrics = [json.loads(x) for x in (runs / "demo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m.get("kind") == "train"]
    assert len(train_rows) == 2 and all(m["completion_length_mean"] > 0 for m in train_rows)
    final = runs / "demo" / "final"
    model, tokenizer = load_model(str(out), adapter_path=str(final))
    expected = reference_text(model, tokenizer, "hi", max_tokens=8)
    assert infer_json(cli, out, "hi", "--adapter", str(runs / "demo")) == expected
