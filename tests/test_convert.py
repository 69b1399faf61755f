"""HF → MLX conversion and adapter fusing, on tiny models built on the spot (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load as mlx_lm_load
from random_models import add_random_adapters
from tolerance import assert_close

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.builtin import (
    build_tiny_model,
    tiny_nanochat_encoding,
    write_nanochat_tokenizer,
)
from mlxgrpo.models.convert import convert_hf_model, copy_model_files
from mlxgrpo.models.fuse import fuse_adapters
from mlxgrpo.models.loading import load_model

TOKENS = list(range(3, 93, 3))
LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}
TERMS = 128  # the longest sum behind the tiny model's logits: intermediate size 128


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A float32 tiny Qwen2 in HF layout (hidden 64, intermediate 128, 2 blocks)."""
    return build_tiny_model(tmp_path_factory.mktemp("hf") / "tiny", "builtin:tiny-qwen2")


@pytest.fixture(scope="module")
def source_weights(source) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(source / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def four_bit_fp32(source, tmp_path_factory) -> Path:
    """The tiny model quantized to 4 bits with float32 scales (so dequantizing is exact)."""
    out = tmp_path_factory.mktemp("q4") / "model"
    convert_hf_model(str(source), out, dtype="float32", quantize_bits=4, group_size=64)
    return out


def logits(model, tokens=TOKENS) -> np.ndarray:
    out = model(mx.array([tokens]))
    return np.array(out.astype(mx.float32))[0]


def n_quantized(model) -> int:
    return sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules())


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---------------------------------------------------------------------------------------------
# convert


def test_float16_conversion_is_the_source_cast(source, source_weights, tmp_path):
    stages: list[str] = []
    summary = convert_hf_model(
        str(source), tmp_path / "fp16", dtype="float16", on_stage=stages.append
    )

    model, tokenizer = mlx_lm_load(str(tmp_path / "fp16"))
    converted = dict(mx.load(str(tmp_path / "fp16" / "model.safetensors")))
    assert set(converted) == set(source_weights)
    for name, value in source_weights.items():
        assert converted[name].dtype == mx.float16
        np.testing.assert_array_equal(np.array(converted[name]), value.astype(np.float16))

    base, _ = mlx_lm_load(str(source))
    # fp16 keeps ~3 significant digits; logits here are O(1-10), so 5e-2 is generous yet
    # far below the spread of the logits themselves.
    np.testing.assert_allclose(logits(model), logits(base), atol=5e-2, rtol=1e-2)
    assert tokenizer.encode("a b") == [ord("a") - 32, 0, ord("b") - 32]  # id = ord(c) - 32

    n_params = sum(v.size for v in source_weights.values())
    assert summary["n_parameters"] == n_params
    assert summary["bits_per_weight"] == pytest.approx(16.0)
    assert summary["dtype"] == "float16"
    assert summary["quantization"] is None
    assert summary["size_before_bytes"] == (source / "model.safetensors").stat().st_size
    # Half the bytes per value; the safetensors header adds a little.
    assert summary["size_after_bytes"] < 0.55 * summary["size_before_bytes"]
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "fp16" / name).read_bytes() == (source / name).read_bytes()
    assert "Loading" in stages and not any("INFO" in s for s in stages)


def test_4bit_conversion(source, source_weights, tmp_path, capsys):
    summary = convert_hf_model(
        str(source), tmp_path / "q4", dtype="float16", quantize_bits=4, group_size=64,
        on_stage=lambda stage: print(f"stage: {stage}"),
    )  # fmt: skip
    # mlx-lm's own prints are captured; the callback still reaches the real stdout.
    printed = capsys.readouterr().out.splitlines()
    assert "stage: Quantizing" in printed
    assert all(line.startswith("stage: ") for line in printed)

    model, _ = mlx_lm_load(str(tmp_path / "q4"))
    # Every matrix (embedding + 7 linears in each of 2 blocks) has an input width of 64 or 128.
    assert n_quantized(model) == 15 == summary["quantized_layers"]
    assert summary["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}

    # Affine 4-bit: 4 bits per weight + one fp16 scale and one fp16 bias per 64 weights;
    # norms and attention biases stay fp16.
    quantized_bits = 4 + 2 * 16 / 64
    bits = sum(v.size * (quantized_bits if v.ndim == 2 else 16) for v in source_weights.values())
    n_params = sum(v.size for v in source_weights.values())
    assert summary["bits_per_weight"] == pytest.approx(bits / n_params, rel=1e-9)
    assert summary["n_parameters"] == n_params
    assert summary["size_after_bytes"] < summary["size_before_bytes"] / 5

    # Each stored weight dequantizes to within one quantization step (range / 15) of the fp16
    # source: half a step of rounding, plus mlx's shift of the grid that makes zero exact.
    stored = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    for name, value in source_weights.items():
        if value.ndim != 2:
            continue
        prefix = name.removesuffix(".weight")
        scales, biases = stored[f"{prefix}.scales"], stored[f"{prefix}.biases"]
        restored = np.array(mx.dequantize(stored[name], scales, biases, 64, 4).astype(mx.float32))
        step = np.repeat(np.array(scales.astype(mx.float32)), 64, axis=-1)
        error = np.abs(restored - value.astype(np.float16).astype(np.float32))
        assert np.all(error <= np.abs(step) * 1.001 + 1e-3), name

    # 1 - corr grows with the squared step (x16 per 2 bits: measured ~3e-4 at 8 bits, ~5e-3
    # at 6, ~0.07 at 4 on this random model, which amplifies noise through its tied
    # embedding); an unrelated model correlates ~0. 0.8 still fails on a broken conversion.
    base, _ = mlx_lm_load(str(source))
    assert corr(logits(model), logits(base)) > 0.8


def test_group_size_that_skips_layers_is_reported(source, tmp_path):
    summary = convert_hf_model(str(source), tmp_path / "g128", quantize_bits=8, group_size=128)
    # Only down_proj (input width 128) fits; 13 layers of width 64 stay unquantized.
    assert summary["quantized_layers"] == 2
    assert summary["skipped_layers"] == 13


def test_mxfp4_conversion(source, source_weights, tmp_path):
    summary = convert_hf_model(str(source), tmp_path / "mx", dtype="float16", mode="mxfp4")
    assert summary["quantization"] == {"bits": 4, "group_size": 32, "mode": "mxfp4"}
    model, _ = mlx_lm_load(str(tmp_path / "mx"))
    assert n_quantized(model) == 15
    # mxfp4: 4 bits per weight + one 8-bit shared exponent per 32 weights, no biases.
    bits = sum(v.size * (4 + 8 / 32 if v.ndim == 2 else 16) for v in source_weights.values())
    n_params = sum(v.size for v in source_weights.values())
    assert summary["bits_per_weight"] == pytest.approx(bits / n_params, rel=1e-9)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"quantize_bits": 5}, "2, 3, 4, 6, 8"),
        ({"quantize_bits": 4, "group_size": 16}, "32, 64, 128"),
        ({"quantize_bits": 4, "mode": "nf4"}, "affine, mxfp4"),
        ({"mode": "mxfp4", "quantize_bits": 8}, "4 bits per weight, not 8"),
        ({"mode": "mxfp4", "group_size": 64}, "group size 32"),
        ({"group_size": 64}, "--quantize"),
        ({"dtype": "float8"}, "float16, bfloat16, float32"),
    ],
)
def test_bad_options_fail_before_any_output(source, tmp_path, options, expected):
    with pytest.raises(ConfigError) as err:
        convert_hf_model(str(source), tmp_path / "out", **options)
    assert expected in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_invalid_source(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        convert_hf_model(str(tmp_path / "nope"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        convert_hf_model(str(tmp_path / "empty"), tmp_path / "out")
    (tmp_path / "empty" / "config.json").write_text("{}")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="only PyTorch .bin weights"):
        convert_hf_model(str(tmp_path / "empty"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_failure_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection and nothing cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MlxgrpoError, match="could not fetch model 'no-org/no-model'") as err:
        convert_hf_model("no-org/no-model", tmp_path / "out")
    assert not isinstance(err.value, ConfigError)
    assert not (tmp_path / "out").exists()


def test_hub_source_converts_its_snapshot(monkeypatch, source, tmp_path):
    import huggingface_hub

    fetched = []

    def snapshot(repo_id, **kwargs):  # stands in for the download; returns the snapshot dir
        fetched.append(repo_id)
        return str(source)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    summary = convert_hf_model("no-org/no-model", tmp_path / "out", dtype="float16")
    assert fetched == ["no-org/no-model"]
    assert summary["source"] == "no-org/no-model"
    assert summary["size_before_bytes"] == (source / "model.safetensors").stat().st_size
    mlx_lm_load(str(tmp_path / "out"))


def test_existing_output_is_refused_then_replaced_with_force(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists") as err:
        convert_hf_model(str(source), out, dtype="float16")
    assert "--force" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["sentinel.txt"]

    convert_hf_model(str(source), out, dtype="float16", force=True)
    assert not (out / "sentinel.txt").exists()
    mlx_lm_load(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging leftovers


def test_failed_forced_conversion_keeps_the_old_output(source, tmp_path, monkeypatch):
    import importlib

    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("keep me")

    def broken(hf_path, mlx_path, **kwargs):
        Path(mlx_path).mkdir()
        (Path(mlx_path) / "model.safetensors").write_text("half written")
        raise RuntimeError("disk full")

    # `import mlx_lm.convert` would give the function that mlx_lm/__init__ re-exports.
    monkeypatch.setattr(importlib.import_module("mlx_lm.convert"), "convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_hf_model(str(source), out, force=True)
    assert [p.name for p in out.iterdir()] == ["sentinel.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_group_size_that_fits_no_layer_is_refused(source, tmp_path):
    """A model whose layer widths (48, 80) no allowed group size divides."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    config = {**json.loads((source / "config.json").read_text()), "hidden_size": 48}
    config["intermediate_size"] = 80
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a model directory has one
        shutil.copyfile(source / name, odd / name)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.save_safetensors(str(odd / "model.safetensors"), dict(tree_flatten(model.parameters())))
    with pytest.raises(ConfigError, match="divides the input width of no layer") as err:
        convert_hf_model(str(odd), tmp_path / "out", quantize_bits=4, group_size=32)
    assert "48, 80" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_builtin_source(tmp_path):
    summary = convert_hf_model("builtin:tiny-qwen2", tmp_path / "out", dtype="bfloat16")
    assert summary["source"] == "builtin:tiny-qwen2" and summary["dtype"] == "bfloat16"
    model, _ = mlx_lm_load(str(tmp_path / "out"))
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16


def test_output_must_not_replace_the_source(source):
    with pytest.raises(ConfigError, match="overlaps the input"):
        convert_hf_model(str(source), source, dtype="float16", force=True)
    with pytest.raises(ConfigError, match="overlaps the input"):
        convert_hf_model(str(source), source.parent, dtype="float16", force=True)


# ---------------------------------------------------------------------------------------------
# fuse


def make_adapters(
    model_dir: Path, dest: Path, seed: int, kind: str = "lora"
) -> tuple[np.ndarray, int]:
    """LoRA/DoRA adapters with non-zero lora_b, saved in mlx-lm's format; returns the logits
    of base + adapters (computed before any fusing) and the number of adapter layers."""
    model, _ = mlx_lm_load(str(model_dir))
    count = add_random_adapters(
        model, dest, seed=seed, rank=LORA["rank"], scale=LORA["scale"], kind=kind
    )
    return logits(model), count


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_matches_base_plus_adapters(source, tmp_path, kind, capsys):
    expected, n_layers = make_adapters(source, tmp_path / "adapters", seed=0, kind=kind)
    capsys.readouterr()
    summary = fuse_adapters(str(source), tmp_path / "adapters", tmp_path / "fused")
    assert capsys.readouterr().out == ""

    fused, tokenizer = mlx_lm_load(str(tmp_path / "fused"))
    assert not any(hasattr(m, "lora_a") for m in fused.modules())
    assert_close(logits(fused), expected, terms=TERMS, what="logits")
    base, _ = mlx_lm_load(str(source))
    assert np.abs(logits(base) - expected).max() > 1e-2  # the adapters do change the model

    assert summary["fused_layers"] == n_layers == 14  # 7 linears in each of 2 blocks
    assert summary["quantization"] is None and summary["dtype"] == "float32"
    assert summary["n_parameters"] == sum(
        v.size for v in mx.load(str(source / "model.safetensors")).values()
    )
    assert "tokenizer.json" in summary["copied_files"]
    assert not (tmp_path / "fused" / "adapters.safetensors").exists()
    # The char tokenizer: printable ASCII c has id ord(c) - 32.
    assert tokenizer.encode("hi") == [ord("h") - 32, ord("i") - 32]


def test_fuse_dequantizes_a_4bit_base(four_bit_fp32, tmp_path):
    expected, _ = make_adapters(four_bit_fp32, tmp_path / "adapters", seed=1)
    summary = fuse_adapters(
        str(four_bit_fp32), tmp_path / "adapters", tmp_path / "fused", dequantize=True
    )
    fused, _ = mlx_lm_load(str(tmp_path / "fused"))
    assert n_quantized(fused) == 0 and summary["quantized_layers"] == 0
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    # Dense float32 weights equal to the dequantized ones: only summation order differs from
    # the quantized matmul.
    assert_close(logits(fused), expected, terms=TERMS, what="logits")
    assert summary["quantization"] is None and summary["bits_per_weight"] == pytest.approx(32.0)


def test_fuse_keeps_a_quantized_base_quantized(four_bit_fp32, tmp_path):
    expected, _ = make_adapters(four_bit_fp32, tmp_path / "adapters", seed=2)
    summary = fuse_adapters(str(four_bit_fp32), tmp_path / "adapters", tmp_path / "fused")
    fused, _ = mlx_lm_load(str(tmp_path / "fused"))
    assert n_quantized(fused) == 15
    assert summary["quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    # Each fused layer is quantized again, which costs about as much as the first time.
    assert corr(logits(fused), expected) > 0.9


def test_fuse_errors(source, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        fuse_adapters(str(source), tmp_path / "missing", tmp_path / "fused")
    make_adapters(source, tmp_path / "adapters", seed=3)
    config_path = tmp_path / "adapters" / "adapter_config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "lora_parameters": {**LORA, "rank": 8}}))
    with pytest.raises(ConfigError, match="do not fit"):
        fuse_adapters(str(source), tmp_path / "adapters", tmp_path / "fused")

    config_path.write_text(json.dumps({**config, "lora_parameters": {"rank": 4}}))
    with pytest.raises(ConfigError, match="lora_parameters.scale"):
        fuse_adapters(str(source), tmp_path / "adapters", tmp_path / "fused")

    config_path.write_text(json.dumps(config))
    (tmp_path / "fused").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        fuse_adapters(str(source), tmp_path / "adapters", tmp_path / "fused")
    with pytest.raises(ConfigError, match="overlaps the input"):
        fuse_adapters(str(source), tmp_path / "adapters", tmp_path / "adapters", force=True)


# Rows of the nanochat-style model's embedding: the tiny nanochat tokenizer's ids (its PAD
# is 276) must index it, or loading refuses the pair as mismatched.
NANOCHAT_STYLE_VOCAB = 320


@pytest.fixture
def nanochat_style(source, tmp_path) -> Path:
    """The tiny model, its embedding grown to the nanochat tokenizer's ids, with nanochat's
    tokenizer.pkl instead of HF tokenizer files."""
    model_dir = tmp_path / "nanochat"
    model_dir.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] = NANOCHAT_STYLE_VOCAB
    (model_dir / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(source / "model.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    extra = NANOCHAT_STYLE_VOCAB - embedding.shape[0]
    grown = mx.random.normal((extra, embedding.shape[1]), key=mx.random.key(5)) * 0.02
    weights["model.embed_tokens.weight"] = mx.concatenate([embedding, grown])
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)
    shutil.copyfile(source / "generation_config.json", model_dir / "generation_config.json")
    write_nanochat_tokenizer(model_dir)
    return model_dir


def assert_nanochat_tokenizer(model_dir: Path) -> None:
    """mlxgrpo loads the directory with the tiktoken encoding from tokenizer.pkl."""
    _, tokenizer = load_model(str(model_dir))
    ids = tiny_nanochat_encoding().encode("the cat")
    assert tokenizer.encode("the cat")[-len(ids) :] == ids  # (after a <|bos|>, if any)


def test_convert_keeps_a_nanochat_tokenizer(source, nanochat_style, tmp_path):
    summary = convert_hf_model(str(nanochat_style), tmp_path / "out", quantize_bits=8)
    out = tmp_path / "out"
    # mlx-lm cannot load tokenizer.pkl, so this took the tokenizer-free path: it must write
    # what mlx-lm's convert writes for the same weights (beside an HF tokenizer).
    twin = tmp_path / "hf-twin"
    shutil.copytree(nanochat_style, twin, ignore=shutil.ignore_patterns("tokenizer.pkl"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, twin / name)
    convert_hf_model(str(twin), tmp_path / "via-mlx-lm", quantize_bits=8)
    ours, theirs = (
        mx.load(str(out / "model.safetensors")),
        mx.load(str(tmp_path / "via-mlx-lm" / "model.safetensors")),
    )
    assert set(ours) == set(theirs)
    assert all(ours[k].dtype == theirs[k].dtype for k in ours)
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((tmp_path / "via-mlx-lm" / "config.json").read_text())
    assert summary["copied_files"] == ["generation_config.json", "tokenizer.pkl"]
    assert (out / "tokenizer.pkl").read_bytes() == (nanochat_style / "tokenizer.pkl").read_bytes()
    # transformers invents a default tokenizer for a directory without one; it must not stay.
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    assert_nanochat_tokenizer(out)


def test_fuse_keeps_a_nanochat_tokenizer(nanochat_style, tmp_path):
    make_adapters(nanochat_style, tmp_path / "adapters", seed=4)
    summary = fuse_adapters(str(nanochat_style), tmp_path / "adapters", tmp_path / "fused")
    out = tmp_path / "fused"
    assert "tokenizer.pkl" in summary["copied_files"]
    assert (out / "tokenizer.pkl").read_bytes() == (nanochat_style / "tokenizer.pkl").read_bytes()
    assert not (out / "tokenizer.json").exists()
    assert_nanochat_tokenizer(out)


def test_side_files_are_copied_weights_are_not(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir(), dest.mkdir()
    write_nanochat_tokenizer(src)
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json",
                 "model_000100.pt", "mlxgrpo_builtin.json", "generation_config.json",
                 "tokenizer.json", "chat_template.jinja", ".hidden"):  # fmt: skip
        (src / name).write_text("{}")
    (src / "subdir").mkdir()
    copied = copy_model_files(src, dest)
    expected = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer.pkl"]
    assert copied == expected
    assert sorted(p.name for p in dest.iterdir()) == expected
    assert (dest / "tokenizer.pkl").read_bytes() == (src / "tokenizer.pkl").read_bytes()


def test_output_inside_an_input_or_holding_the_cwd_is_refused(tmp_path, monkeypatch):
    from mlxgrpo.models.output_dir import check_output_dir

    source = tmp_path / "src"
    source.mkdir()
    with pytest.raises(ConfigError, match="overlaps the input"):
        check_output_dir(source / "mlx", False, [source])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match="holds the current directory"):
        check_output_dir(tmp_path, True, [])
    assert check_output_dir(tmp_path / "fresh", False, [source]) == tmp_path / "fresh"
