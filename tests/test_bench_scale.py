"""The scale section of the harness: `bench/run.py --scale --quick` (tiny shapes, no peer) yields
a complete, consistent result; the cache, the word tokenizer, the streamed weights and the peer's
command line and install failure are checked offline. Timings are not asserted."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
REPEATS = 2
sys.path.insert(0, str(BENCH))

import bench_model  # noqa: E402
import peer_lora  # noqa: E402
import scale_bench  # noqa: E402
import scale_setup  # noqa: E402


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def parameters(shape: bench_model.ModelShape) -> int:
    """By hand: tied embedding, q/k/v/o with q/k/v biases, SwiGLU MLP, two norms per block."""
    h, head_dim = shape.hidden, shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    attention = h * h + 2 * h * kv + h * h + h + 2 * kv
    block = attention + 3 * h * shape.intermediate + 2 * h
    return shape.vocab * h + shape.layers * block + h


@pytest.fixture(scope="module")
def scale(tmp_path_factory) -> tuple[dict, str, Path]:
    work = tmp_path_factory.mktemp("scale")
    out = work / "scale.json"
    env = {
        **os.environ,
        "MLXGRPO_BENCH_CACHE": str(work / "bench-cache"),
        "MLXGRPO_CACHE_DIR": str(work / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--scale", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout, work / "bench-cache"


@pytest.mark.slow
def test_table_is_printed(scale) -> None:
    _, stdout, _ = scale
    for label in ("mlxgrpo peak memory / update", "mlxgrpo seconds / update", "prod micro-batch"):
        assert label in stdout
    assert "mlxgrpo, no replay seconds / update" in stdout
    assert "mlx-lm-lora" not in stdout


@pytest.mark.slow
def test_the_first_shape_is_also_measured_without_replay(scale) -> None:
    result, _, _ = scale
    first, *rest = result["shapes"].values()
    plain, ours = first["mlxgrpo_without_replay"], first["mlxgrpo"]
    assert plain["updates_measured"] == ours["updates_measured"] == REPEATS
    # The same rollouts either way: replay changes how the training pass runs, not what it sees.
    for a, b in zip(plain["updates"], ours["updates"], strict=True):
        assert a["completion_length_mean"] == b["completion_length_mean"]
    assert all("mlxgrpo_without_replay" not in entry for entry in rest)


@pytest.mark.slow
def test_shapes_and_settings(scale) -> None:
    result, _, cache = scale
    assert result["section"] == "scale" and result["quick"] and result["repeats"] == REPEATS
    assert list(result["shapes"]) == list(scale_setup.QUICK_SHAPES)
    settings = result["settings"]
    assert settings["generations"] == 8 and settings["prompts_per_update"] == 2
    assert settings["micro_batches"] == 2 and settings["kl_coeff"] == 0.1
    for key, entry in result["shapes"].items():
        shape = scale_setup.QUICK_SHAPES[key]
        model = entry["model"]
        assert model["parameters"] == parameters(shape) == scale_setup.parameter_count(shape)
        assert model["weights_bytes"] == 4 * model["parameters"]
        assert model["rope_theta"] == 1e6 and model["tokenizer"] == "words"
        assert Path(model["path"]).parent.parent == cache
        assert (Path(model["path"]) / ".complete").is_file()
        words = settings["system_words"] + settings["question_words"]
        assert words < entry["prompt_tokens"] < words + 40  # one token a word + the template
        # Whichever of the memory-related keys this mlxgrpo has, resolved.
        assert set(entry["engine_settings"]) <= set(scale_bench.ENGINE_KEYS)
        assert "peer" not in entry and "vs_peer" not in entry


@pytest.mark.slow
def test_update_figures_are_medians_of_the_rounds(scale) -> None:
    result, _, _ = scale
    budget = result["settings"]["max_new_tokens"]
    for entry in result["shapes"].values():
        ours = entry["mlxgrpo"]
        updates = ours["updates"]
        assert ours["updates_measured"] == REPEATS == len(updates)
        for name, key in (
            ("seconds_per_update", "step_seconds"),
            ("rollout_seconds", "rollout_seconds"),
            ("train_seconds", "train_seconds"),
            ("peak_memory_gb", "peak_memory_gb"),
        ):
            assert close(ours[name], statistics.median(u[key] for u in updates))
        for update in updates:
            assert update["rollout_seconds"] + update["train_seconds"] <= update["step_seconds"]
            assert 0 < update["completion_length_mean"] <= budget
        weights = entry["model"]["weights_bytes"]
        assert close(ours["peak_over_weights"], ours["peak_memory_gb"] * 1e9 / weights)
        assert ours["peak_memory_gb"] * 1e9 > weights  # the weights are resident during it


@pytest.mark.slow
def test_prod_micro_batch(scale) -> None:
    result, _, _ = scale
    prod = result["prod_micro_batch"]
    last = list(result["shapes"])[-1]
    assert prod["shape"] == last
    s = result["settings"]
    assert prod["rows"] == s["prod_rows"]
    assert prod["sequence_length"] == s["prod_prompt_tokens"] + s["prod_completion_tokens"]
    weights = result["shapes"][last]["model"]["weights_bytes"]
    assert close(prod["peak_over_weights"], prod["peak_memory_gb"] * 1e9 / weights)
    assert prod["peak_memory_gb"] >= prod["active_before_gb"] > 0
    assert prod["seconds"] > 0


@pytest.mark.slow
def test_targets_are_judged_from_the_figures(scale) -> None:
    result, _, _ = scale
    first, targets = next(iter(result["shapes"].values())), result["targets"]
    values = {
        "peak_over_weights": first["mlxgrpo"]["peak_over_weights"],
        "prod_micro_batch_peak_over_weights": result["prod_micro_batch"]["peak_over_weights"],
    }
    assert set(targets) == set(values)  # no peer: no peer ratios
    for name, value in values.items():
        assert targets[name]["value"] == value
        assert targets[name]["met"] is (value <= 1.5)


@pytest.mark.slow
def test_every_word_is_one_token_and_every_id_decodes(scale) -> None:
    from transformers import AutoTokenizer

    result, _, _ = scale
    entry = next(iter(result["shapes"].values()))
    tokenizer = AutoTokenizer.from_pretrained(entry["model"]["path"])
    vocab = entry["model"]["vocab"]
    assert len(tokenizer) == vocab
    words = bench_model.vocab_words(vocab)
    picked = [words[i] for i in (0, 25, 26, 700, len(words) - 1)]
    ids = tokenizer.encode("".join(picked), add_special_tokens=False)
    assert len(ids) == len(picked)
    assert tokenizer.decode(ids) == "".join(picked)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == bench_model.builtin.EOS_TOKEN_ID
    assert all(tokenizer.decode([i]) for i in range(vocab))


def test_streamed_safetensors_match_mlx(tmp_path) -> None:
    import mlx.core as mx
    import numpy as np

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(5, np.float32)}
    path = tmp_path / "w.safetensors"
    bench_model._write_safetensors(
        path, {k: v.shape for k, v in arrays.items()}, lambda n, _: arrays[n]
    )
    loaded = mx.load(str(path))
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert np.array_equal(np.array(loaded[name]), value)


def test_cached_dir_is_all_or_nothing(tmp_path) -> None:
    final = tmp_path / "entry"

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scale_setup.cached_dir(final, broken)
    assert not final.exists() and list(tmp_path.iterdir()) == []
    calls = []
    for _ in range(2):
        scale_setup.cached_dir(final, lambda tmp: calls.append((tmp / "f").write_text("y")))
    assert len(calls) == 1 and (final / "f").read_text() == "y"


def test_peer_command_matches_the_settings(tmp_path) -> None:
    shape, s = scale_setup.SHAPES["0.5b"], scale_setup.FULL
    argv = peer_lora.command(Path("py"), Path("m"), Path("d"), shape, s, 3, tmp_path)
    args = argv[argv.index("--") + 1 :]
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "--train"
    assert flags["--num-layers"] == str(shape.layers) == "24"
    assert flags["--group-size"] == str(s.generations)
    assert flags["--batch-size"] == str(s.prompts_per_update)
    assert flags["--max-completion-length"] == str(s.max_new_tokens)
    assert float(flags["--beta"]) == s.kl_coeff and float(flags["--temperature"]) == s.temperature
    assert flags["--gradient-accumulation-steps"] == "1" and flags["--train-mode"] == "grpo"
    config = json.loads(Path(flags["--config"]).read_text())
    assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    assert config["fuse"] is False


def test_peer_install_failure_is_one_line(tmp_path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "uv").write_text(
        "#!/bin/sh\necho 'resolution failed' >&2\necho 'error: offline' >&2\nexit 1\n"
    )
    (fake / "uv").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "MLXGRPO_BENCH_CACHE": str(tmp_path / "bench-cache"),
    }
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--scale", "--quick", "--peer"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not install mlx-lm-lora" in lines[0]
    assert lines[0].endswith("error: offline")
    assert not peer_lora.venv_dir(tmp_path / "bench-cache").exists()
