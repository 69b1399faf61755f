"""The scale section of the harness: `bench/run.py --scale --quick` (tiny shapes of every family,
no peer) yields a complete, consistent result; the shapes' configs and parameter counts, the
cache, the word tokenizer, the streamed weights of each family and the peer's command line and
install failure are checked offline. Timings are not asserted."""

from __future__ import annotations

import importlib
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
    """By hand: a tied embedding, q/k/v/o, a gated MLP of three matrices and a final norm, plus
    per family: Qwen2 q/k/v biases and two norms a block; Qwen3 q/k norms and two norms a block;
    Gemma 3 q/k norms and four norms a block (around attention and around the MLP)."""
    h, head_dim = shape.hidden, shape.head_dim or shape.hidden // shape.heads
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    attention = 2 * h * q + 2 * h * kv
    extra = {
        "qwen2": q + 2 * kv + 2 * h,
        "qwen3": 2 * head_dim + 2 * h,
        "gemma3_text": 2 * head_dim + 4 * h,
    }[shape.model_type]
    block = attention + 3 * h * shape.intermediate + extra
    return shape.vocab * h + shape.layers * block + h


# What the published checkpoints hold (their config.json files): the values a shape must carry.
PUBLISHED = {
    "0.5b": {  # Qwen/Qwen2.5-0.5B
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
        "vocab_size": 151936, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "1.5b": {  # Qwen/Qwen2.5-1.5B
        "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
        "vocab_size": 151936, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "qwen3-0.6b": {  # Qwen/Qwen3-0.6B
        "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 3072, "vocab_size": 151936, "rope_theta": 1e6,
        "rope_scaling": None, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "attention_bias": False,
    },
    "gemma3-270m": {  # google/gemma-3-270m
        "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 2048, "vocab_size": 262144, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rope_scaling": None, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "gemma3-1b": {  # google/gemma-3-1b-it's text model
        "model_type": "gemma3_text", "hidden_size": 1152, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 6912, "vocab_size": 262144, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rope_scaling": None, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
}  # fmt: skip
# Parameters with the tied embedding counted once, and the embedding's share: Qwen2.5-0.5B
# "0.49B (0.36B non-embedding)", 1.5B "1.54B (1.31B)", Qwen3-0.6B "0.6B (0.44B)", Gemma 3 270M
# "170M embedding + 100M transformer", Gemma 3 1B "1B".
PUBLISHED_PARAMETERS = {
    "0.5b": (494_032_768, 0.36e9),
    "1.5b": (1_543_714_304, 1.31e9),
    "qwen3-0.6b": (596_049_920, 0.44e9),
    "gemma3-270m": (268_098_176, 0.10e9),
    "gemma3-1b": (999_885_952, 0.70e9),
}


def test_shapes_carry_the_published_configs() -> None:
    assert list(scale_setup.SHAPES) == ["0.5b", "gemma3-270m", "qwen3-0.6b", "gemma3-1b", "1.5b"]
    for key, want in PUBLISHED.items():
        shape = scale_setup.SHAPES[key]
        config = shape.config()
        assert {name: config.get(name) for name in want} == want, key
        assert config["torch_dtype"] == "float32" and shape.tokenizer == "words"
        # mlx-lm reads every one of them under these names (a misspelt key would fall back to
        # its default silently).
        module = importlib.import_module(f"mlx_lm.models.{shape.model_type}")
        args = module.ModelArgs.from_dict(config)
        read = {name: getattr(args, name) for name in want if hasattr(args, name)}
        assert read == {name: want[name] for name in read}, key
        assert len(read) >= len(want) - 2  # gemma3_text has no tie/bias fields of its own


def test_parameter_counts_are_the_published_models_from_lazy_mlx_lm_models() -> None:
    import mlx.core as mx

    held = mx.get_active_memory()  # what earlier tests in this process still hold
    mx.reset_peak_memory()
    for key, (total, non_embedding) in PUBLISHED_PARAMETERS.items():
        shape = scale_setup.SHAPES[key]
        count = scale_setup.parameter_count(shape)
        assert count == total == parameters(shape), key
        assert round((count - shape.vocab * shape.hidden) / 1e9, 2) == non_embedding / 1e9, key
    # Nothing was evaluated: the 1.5B float32 weights alone would be 6.2 GB.
    assert mx.get_peak_memory() - held < 10**7
    for shape in scale_setup.QUICK_SHAPES.values():
        assert scale_setup.parameter_count(shape) == parameters(shape), shape.name


def test_matmul_parameters_are_the_matrices_of_each_family() -> None:
    import math

    shapes = {**scale_setup.SHAPES, **scale_setup.QUICK_SHAPES, **bench_model.SHAPES}
    for shape in shapes.values():
        tensors = bench_model.parameter_shapes(shape.config())
        matrices = sum(math.prod(dims) for dims in tensors.values() if len(dims) == 2)
        assert shape.matmul_parameters() == matrices, shape.name  # the tied embedding is the head
    assert scale_setup.SHAPES["qwen3-0.6b"].attention_flops(1, 10.0) == 4.0 * 28 * 10 * 2048
    with pytest.raises(ValueError, match="sliding window"):
        scale_setup.SHAPES["gemma3-270m"].attention_flops(1, 10.0)


def test_the_qwen25_rows_keep_their_cache_entries() -> None:
    reference = json.loads((BENCH / "reference" / "scale-linux-cpu-2core-epyc.json").read_text())
    for key in ("0.5b", "1.5b"):
        shape = scale_setup.SHAPES[key]
        written = Path(reference["shapes"][key]["model"]["path"]).name
        assert written == f"{shape.name}-{scale_setup.shape_key(shape)}"
    keys = {scale_setup.shape_key(s) for s in scale_setup.SHAPES.values()}
    assert len(keys) == len(scale_setup.SHAPES)


def test_shapes_can_be_picked_by_key() -> None:
    assert scale_setup.select_shapes(None, quick=False) == scale_setup.SHAPES
    assert scale_setup.select_shapes("", quick=True) == scale_setup.QUICK_SHAPES
    picked = scale_setup.select_shapes("qwen3-0.6b, gemma3-270m", quick=False)
    assert list(picked) == ["qwen3-0.6b", "gemma3-270m"]
    with pytest.raises(ValueError, match="gemma3-270m"):  # the message lists the choices
        scale_setup.select_shapes("0.5b,gemma-270m", quick=False)
    with pytest.raises(ValueError):
        scale_setup.select_shapes("0.5b", quick=True)


def test_the_word_tokenizer_reaches_gemma3s_vocabulary() -> None:
    size = scale_setup.GEMMA3_VOCAB
    words = bench_model.vocab_words(size)
    assert len(set(words)) == len(words) == size - bench_model.base_vocab_size()
    assert max(len(word) for word in words) == 5  # " " + four letters
    backend = bench_model.bpe_backend(size, "words")
    assert backend.get_vocab_size() == size
    picked = [words[i] for i in (0, 30, 20000, len(words) - 1)]
    ids = backend.encode("".join(picked)).ids
    assert len(ids) == len(picked) and ids[-1] == size - 1


@pytest.mark.parametrize("key", ["tiny-gemma3", "tiny-qwen3"])
def test_each_familys_weights_load_into_mlx_lm_as_written(key, tmp_path) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load
    from tolerance import assert_close

    shape = scale_setup.QUICK_SHAPES[key]
    path = bench_model.build_model_dir(shape, tmp_path / key)
    written = mx.load(str(path / "model.safetensors"))
    assert "lm_head.weight" not in written  # tied: the head is the embedding
    model, tokenizer = load(str(path))  # strict: every name and shape as the model wants
    loaded = dict(tree_flatten(model.parameters()))
    assert sum(v.size for v in loaded.values()) == parameters(shape)
    assert set(loaded) == set(written)
    norms = {n: v for n, v in written.items() if v.ndim == 1 and not n.endswith(".bias")}
    assert any("q_norm" in n for n in norms) and any("k_norm" in n for n in norms)
    # Unit scales: Gemma stores the offset from 1, Qwen3 the scale itself.
    unit = 0.0 if shape.model_type == "gemma3_text" else 1.0
    assert all(np.all(np.array(v) == unit) for v in norms.values())
    x = mx.random.normal((3, shape.hidden), key=mx.random.key(0))
    rms = mx.sqrt(mx.mean(model.model.norm(x) ** 2, axis=-1))
    assert_close(rms, np.ones(3), terms=shape.hidden, scale=1.0, what="final norm's RMS")
    if shape.model_type == "gemma3_text":
        assert model.tie_word_embeddings and "lm_head" not in model
        sliding = [layer.self_attn.is_sliding for layer in model.layers]
        assert sliding == [True, False] and model.args.sliding_window == 16
    ids = tokenizer.encode(" ab cd" * 20)
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), shape.vocab) and bool(mx.isfinite(logits).all())


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
        [
            *(sys.executable, str(BENCH / "run.py"), "--scale", "--quick"),
            *("--rollout-rows", "3", "--out", str(out)),
        ],
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
    assert "mlxgrpo, rollout.max_rows=3 peak memory / update" in stdout
    for key in ("tiny-a (qwen2)", "tiny-gemma3 (gemma3_text)", "tiny-qwen3 (qwen3)"):
        assert key in stdout
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
def test_every_shape_is_also_measured_with_a_bounded_rollout(scale) -> None:
    """--rollout-rows 3: the same completions (the rollout samples them the same in any batch),
    with the bound recorded."""
    result, _, _ = scale
    for entry in result["shapes"].values():
        bounded, ours = entry["mlxgrpo_rollout_rows"], entry["mlxgrpo"]
        assert bounded["max_rows"] == 3 and bounded["updates_measured"] == REPEATS
        for a, b in zip(bounded["updates"], ours["updates"], strict=True):
            assert a["completion_length_mean"] == b["completion_length_mean"]


@pytest.mark.slow
def test_shapes_and_settings(scale) -> None:
    result, _, cache = scale
    assert result["section"] == "scale" and result["quick"] and result["repeats"] == REPEATS
    assert list(result["shapes"]) == list(scale_setup.QUICK_SHAPES)
    settings = result["settings"]
    assert settings["generations"] == 8 and settings["prompts_per_update"] == 2
    assert settings["micro_batches"] == 2 and settings["kl_coeff"] == 0.1
    types = {entry["model"]["model_type"] for entry in result["shapes"].values()}
    assert types == {"qwen2", "qwen3", "gemma3_text"}
    for key, entry in result["shapes"].items():
        shape = scale_setup.QUICK_SHAPES[key]
        model = entry["model"]
        assert model["parameters"] == parameters(shape) == scale_setup.parameter_count(shape)
        config = json.loads((Path(model["path"]) / "config.json").read_text())
        assert model["config"] == config == shape.config()
        if window := config.get("sliding_window"):  # the local layers do cut the prompt
            assert window < entry["prompt_tokens"]
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
    first_key, last_key = list(result["shapes"])[0], list(result["shapes"])[-1]
    assert targets["peak_over_weights"]["what"].startswith(f"{first_key}: ")
    assert targets["prod_micro_batch_peak_over_weights"]["what"].startswith(f"{last_key}: ")


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


def test_the_peer_refuses_a_blas_it_cannot_load(monkeypatch) -> None:
    """With the prefixed wheel the peer would run MLX's reference BLAS: refused, one line."""
    from mlxgrpo import backend

    wheel = backend.BlasInfo(f"OpenBLAS {backend.WHEEL_LABEL}", "/x/libscipy_openblas.so", True)
    system = backend.BlasInfo("OpenBLAS 0.3.21 (pthread)", "/usr/lib/libopenblas.so.0", True)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(backend, "blas_info", lambda: wheel)
    with pytest.raises(peer_lora.PeerError, match="install a system OpenBLAS"):
        peer_lora.check_peer_blas()
    monkeypatch.setattr(backend, "blas_info", lambda: system)
    peer_lora.check_peer_blas()
    assert peer_lora.blas_path() == "/usr/lib/libopenblas.so.0"
