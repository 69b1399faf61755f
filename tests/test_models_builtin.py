"""Builtin tiny models, the char tokenizer, the nanochat tiktoken fixture and model loading."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load
from nanochat_fixtures import StorageCounter, contiguous, write_pt
from random_models import add_random_adapters

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models import builtin
from mlxgrpo.models.builtin import (
    EMBED_STD,
    EOS_TOKEN,
    NANOCHAT_MERGES,
    NANOCHAT_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    TOKENIZER_CHARS,
    VOCAB_SIZE,
    build_char_tokenizer,
    build_tiny_model,
    describe_builtin_models,
    list_builtin_models,
    resolve_model_path,
    tiny_nanochat_encoding,
    write_nanochat_tokenizer,
)
from mlxgrpo.models.loading import (
    cast_floating_parameters,
    classify_model_spec,
    load_model,
    load_model_with_config,
)
from mlxgrpo.models.nanochat_convert import convert_nanochat
from mlxgrpo.models.nanochat_tokenizer import is_nanochat_model_dir
from mlxgrpo.models.tokenizer import decode, eos_token_ids, render_prompt, render_prompt_text

ALPHABET = "".join(TOKENIZER_CHARS)


def char_ids(text: str) -> list[int]:
    """Naive reference: every character is the token at its index in the alphabet."""
    return [ALPHABET.index(c) for c in text]


def special_id(token: str) -> int:
    return len(TOKENIZER_CHARS) + SPECIAL_TOKENS.index(token)


@pytest.fixture(scope="module")
def built_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each builtin model built once into a fresh directory."""
    root = tmp_path_factory.mktemp("builtin-models")
    return {name: build_tiny_model(root / name, name) for name in list_builtin_models()}


@pytest.fixture(scope="module")
def loaded(built_dirs):
    """mlx-lm's own loader over the tiny models (qwen2 gets transformers' Qwen2Tokenizer)."""
    return {name: load(str(built_dirs[name])) for name in ("tiny-qwen2", "tiny-llama")}


# --- builders ------------------------------------------------------------------------------


def test_list_builtin_models_starts_with_default():
    names = list_builtin_models()
    assert names[0] == "tiny-qwen2"
    assert {"tiny-qwen2", "tiny-llama", "small-qwen2", "tiny-nanochat"} <= set(names)
    assert list(describe_builtin_models()) == names
    assert "tool-use demo" in describe_builtin_models()["tiny-nanochat"]


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_builders_are_deterministic(tmp_path, built_dirs, name):
    again = build_tiny_model(tmp_path / "again", name)
    for filename in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / filename).read_bytes() == (built_dirs[name] / filename).read_bytes()


def test_different_models_get_different_weights(built_dirs):
    a = mx.load(str(built_dirs["tiny-qwen2"] / "model.safetensors"))
    b = mx.load(str(built_dirs["tiny-llama"] / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert a[key].shape == b[key].shape == (VOCAB_SIZE, 64)
    assert not mx.array_equal(a[key], b[key])


def test_weights_are_float32_with_the_documented_init(built_dirs):
    weights = mx.load(str(built_dirs["tiny-qwen2"] / "model.safetensors"))
    assert all(w.dtype == mx.float32 for w in weights.values())
    norm = np.array(weights["model.layers.0.input_layernorm.weight"])
    bias = np.array(weights["model.layers.0.self_attn.q_proj.bias"])
    matrix = np.array(weights["model.layers.0.mlp.up_proj.weight"])
    assert np.all(norm == 1.0) and np.all(bias == 0.0)
    assert matrix.shape == (128, 64)
    # Fan-in scaled: std 1/sqrt(64) for a [128, 64] (out, in) matrix.
    assert abs(matrix.std() - 64**-0.5) < 0.01 and abs(matrix.mean()) < 0.01
    embed = np.array(weights["model.embed_tokens.weight"])
    assert abs(embed.std() - EMBED_STD) < 0.02


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama", "small-qwen2"])
def test_mlx_lm_loads_and_runs_forward(built_dirs, name):
    model, tokenizer = load(str(built_dirs[name]))
    config = json.loads((built_dirs[name] / "config.json").read_text())
    assert config["vocab_size"] == VOCAB_SIZE == len(tokenizer)
    ids = tokenizer.encode("What is 2+3?")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), VOCAB_SIZE)
    assert logits.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(logits)))
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])


# --- char tokenizer ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_tokenizer_round_trips_printable_text_exactly(loaded, name):
    _, tokenizer = loaded[name]
    rng = random.Random(1234)
    samples = ["  two leading, two trailing  ", "a\n\nb \n c\t\td", " ", "\n", "x  =  1 ;"]
    samples += ["".join(rng.choice(ALPHABET) for _ in range(60)) for _ in range(20)]
    for text in samples:
        ids = tokenizer.encode(text)
        assert ids == char_ids(text), repr(text)
        assert tokenizer.decode(ids) == text


def test_streaming_detokenizer_matches_decode(loaded):
    _, tokenizer = loaded["tiny-qwen2"]
    text = "Hello,  world!\n  indented\tline ~end "
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokenizer.encode(text):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_chat_template_renders_chatml(loaded, name):
    _, tokenizer = loaded[name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    start, end = special_id("<|im_start|>"), special_id("<|im_end|>")
    expected = (
        [start] + char_ids("system\nBe brief.") + [end] + char_ids("\n")
        + [start] + char_ids("user\n2+2?") + [end] + char_ids("\n")
    )  # fmt: skip
    assert render_prompt(tokenizer, messages, add_generation_prompt=False) == expected
    with_prompt = render_prompt(tokenizer, messages)
    assert with_prompt == expected + [start] + char_ids("assistant\n")
    assert render_prompt_text(tokenizer, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_eos_is_im_end_everywhere(loaded, built_dirs, name):
    _, tokenizer = loaded[name]
    im_end = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert im_end == special_id(EOS_TOKEN)
    assert eos_token_ids(tokenizer) == {im_end}
    config = json.loads((built_dirs[name] / "config.json").read_text())
    generation = json.loads((built_dirs[name] / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == im_end
    assert tokenizer.pad_token_id == special_id("<|endoftext|>")


def test_render_prompt_on_a_bare_transformers_tokenizer():
    tokenizer = build_char_tokenizer()
    ids = render_prompt(tokenizer, "hi")  # a string is one user turn
    start, end = special_id("<|im_start|>"), special_id("<|im_end|>")
    assert ids == [start] + char_ids("user\nhi") + [end, *char_ids("\n"), start] + char_ids(
        "assistant\n"
    )
    assert eos_token_ids(tokenizer) == {special_id(EOS_TOKEN)}


def test_render_prompt_falls_back_without_a_template():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    expected = "System: S\nUser: U\nAssistant: A\nUser: V"
    assert render_prompt(tokenizer, messages) == char_ids(expected + "\nAssistant:")
    assert render_prompt(tokenizer, messages, add_generation_prompt=False) == char_ids(expected)
    assert render_prompt_text(tokenizer, messages) == expected + "\nAssistant:"


def test_render_prompt_rejects_malformed_messages():
    with pytest.raises(ConfigError, match="message 1"):
        render_prompt(build_char_tokenizer(), [{"role": "user", "content": "a"}, {"text": "b"}])


def test_decode_accepts_arrays_and_skips_specials():
    tokenizer = build_char_tokenizer()
    ids = char_ids("ok go") + [special_id(EOS_TOKEN)]
    assert decode(tokenizer, mx.array(ids)) == "ok go<|im_end|>"
    assert decode(tokenizer, np.array(ids), skip_special_tokens=True) == "ok go"


def test_reward_text_leaves_out_special_tokens():
    # A sampled <|endoftext|> is not a stop token; kept as text, its letters would earn
    # character rewards (a reward hack the tiny model found).
    from mlxgrpo.config import resolve_config
    from mlxgrpo.task import text_codec

    codec = text_codec(build_char_tokenizer(), resolve_config((), (), {}).config)
    ids = char_ids("x") + [special_id("<|endoftext|>")] + char_ids("y")
    assert codec.decode(ids) == "xy"


# --- builtin: resolution and the cache -----------------------------------------------------


def test_builtin_resolution_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGRPO_CACHE_DIR", str(tmp_path))
    path = Path(resolve_model_path("builtin:tiny-qwen2"))
    assert path.parent == tmp_path / "builtin"
    assert path.name.startswith("tiny-qwen2-")
    weights = path / "model.safetensors"
    first_mtime = weights.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(builtin, "build_tiny_model", no_rebuild)
    assert Path(resolve_model_path("builtin:tiny-qwen2")) == path
    assert weights.stat().st_mtime_ns == first_mtime
    assert os.listdir(tmp_path / "builtin") == [path.name]  # no temp dirs left behind


def test_builtin_resolution_survives_losing_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGRPO_CACHE_DIR", str(tmp_path))
    final = builtin.builtin_model_dir("tiny-qwen2")
    real_build = builtin.build_tiny_model

    def build_while_another_process_wins(dest, name):
        real_build(final, name)  # the other process renames its copy into place first
        return real_build(dest, name)

    monkeypatch.setattr(builtin, "build_tiny_model", build_while_another_process_wins)
    assert Path(resolve_model_path("builtin:tiny-qwen2")) == final
    assert os.listdir(final.parent) == [final.name]
    model, _ = load(str(final))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, VOCAB_SIZE)


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGRPO_CACHE_DIR", str(tmp_path))
    path = Path(resolve_model_path("builtin:tiny-llama"))
    reference = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").unlink()
    assert Path(resolve_model_path("builtin:tiny-llama")) == path
    assert (path / "model.safetensors").read_bytes() == reference


def test_unknown_builtin_lists_available_names():
    with pytest.raises(ConfigError) as info:
        resolve_model_path("builtin:huge-gpt")
    assert "huge-gpt" in info.value.message
    assert "builtin:tiny-qwen2" in info.value.hint and "builtin:tiny-llama" in info.value.hint


def test_non_builtin_specs_pass_through():
    assert resolve_model_path("models/qwen-4bit") == "models/qwen-4bit"
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


# --- nanochat tiktoken fixture -------------------------------------------------------------


def test_tiny_nanochat_encoding_round_trips_and_merges():
    enc = tiny_nanochat_encoding()
    for text in ["the cat and the hat", "  spaces\n\nnewlines\t", "héllo wörld ✓", ""]:
        assert enc.decode(enc.encode(text)) == text
    assert enc.encode("the") == [256 + NANOCHAT_MERGES.index(b"the")]
    assert enc.encode("A") == [ord("A")]
    assert enc.encode("é") == list("é".encode())  # unmerged bytes are their byte value


def test_tiny_nanochat_special_token_ids():
    enc = tiny_nanochat_encoding()
    first_special = 256 + len(NANOCHAT_MERGES)
    for offset, token in enumerate(NANOCHAT_SPECIAL_TOKENS):
        assert enc.encode_single_token(token) == first_special + offset
    assert enc.n_vocab == first_special + 9
    ids = enc.encode("<|bos|><|user_start|>hi<|user_end|>", allowed_special="all")
    assert ids == [first_special, first_special + 1, ord("h"), ord("i"), first_special + 2]
    with pytest.raises(ValueError):
        enc.encode("<|bos|>")  # specials in plain text are refused unless allowed


def test_nanochat_tokenizer_pickle_round_trips(tmp_path):
    path = write_nanochat_tokenizer(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.pkl"
    with open(path, "rb") as fh:
        restored = pickle.load(fh)
    original = tiny_nanochat_encoding()
    text = "<|assistant_start|>the answer is 42<|assistant_end|>"
    assert restored.encode(text, allowed_special="all") == original.encode(
        text, allowed_special="all"
    )
    assert restored.special_tokens_set == set(NANOCHAT_SPECIAL_TOKENS)


# --- load_model ----------------------------------------------------------------------------


def test_load_model_casts_to_the_requested_dtype():
    model, tokenizer = load_model("builtin:tiny-qwen2", dtype="bfloat16")
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}
    assert model(mx.array([tokenizer.encode("hi")])).shape == (1, 2, VOCAB_SIZE)
    kept, _, config = load_model_with_config("builtin:tiny-qwen2", dtype=None)
    assert {v.dtype for _, v in tree_flatten(kept.parameters())} == {mx.float32}
    assert config["eos_token_id"] == special_id(EOS_TOKEN)


def test_load_model_auto_dtype_follows_the_device():
    model, _ = load_model("builtin:tiny-llama")
    expected = mx.bfloat16 if mx.default_device().type == mx.gpu else mx.float32
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {expected}


def test_cast_keeps_packed_weights_and_casts_quantization_scales():
    model, _ = load_model("builtin:tiny-qwen2", dtype="float32")
    nn.quantize(model, group_size=32, bits=4)
    before = dict(tree_flatten(model.parameters()))
    cast_floating_parameters(model, mx.bfloat16)
    after = dict(tree_flatten(model.parameters()))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert after[f"{q_proj}.weight"].dtype == mx.uint32
    assert mx.array_equal(after[f"{q_proj}.weight"], before[f"{q_proj}.weight"])
    # Scales in another dtype than the activations would promote the forward to float32.
    assert after[f"{q_proj}.scales"].dtype == mx.bfloat16
    assert after[f"{q_proj}.bias"].dtype == mx.bfloat16  # bias of a quantized layer, too
    assert after["model.norm.weight"].dtype == mx.bfloat16


def test_load_model_applies_adapters(tmp_path):
    base, tokenizer = load_model("builtin:tiny-qwen2", dtype="float32")
    add_random_adapters(base, tmp_path, seed=0)

    tuned, _ = load_model("builtin:tiny-qwen2", adapter_path=str(tmp_path), dtype="float32")
    plain, _ = load_model("builtin:tiny-qwen2", dtype="float32")
    ids = mx.array([tokenizer.encode("adapters change logits")])
    assert mx.allclose(tuned(ids), base(ids), atol=1e-5)
    assert not mx.allclose(tuned(ids), plain(ids), atol=1e-3)


def test_missing_adapter_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="adapter path"):
        load_model("builtin:tiny-qwen2", adapter_path=str(tmp_path / "nope"))


def test_missing_local_model_path_is_a_config_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError) as info:
        load_model(missing)
    assert info.value.message == f"model path '{missing}' not found"
    assert "mlxgrpo convert hf-model" in info.value.hint


def test_directory_without_config_is_a_config_error(tmp_path):
    write_nanochat_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="no config.json") as info:
        load_model(str(tmp_path))
    assert "convert nanochat" in info.value.hint


def test_spec_classification(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert classify_model_spec("builtin:tiny-qwen2") == "builtin"
    assert classify_model_spec("Qwen/Qwen2.5-0.5B-Instruct") == "hub"
    assert classify_model_spec("./models/x") == "local"
    assert classify_model_spec("/abs/path/model") == "local"
    assert classify_model_spec("models/qwen-4bit") == "hub"  # no ./models here
    (tmp_path / "models").mkdir()
    assert classify_model_spec("models/qwen-4bit") == "local"  # a missing dir under ./models


def test_hub_fetch_failure_is_a_runtime_error(monkeypatch):
    import mlx_lm.utils
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no cached snapshot and no network")

    monkeypatch.setattr(mlx_lm.utils, "snapshot_download", offline)
    with pytest.raises(MlxgrpoError) as info:
        load_model("someorg/not-cached-model")
    assert not isinstance(info.value, ConfigError)
    assert "someorg/not-cached-model" in info.value.message and info.value.hint


# --- builtin:tiny-nanochat -----------------------------------------------------------------

NANOCHAT_ENC = tiny_nanochat_encoding()
NANOCHAT_IDS = {token: NANOCHAT_ENC.encode_single_token(token) for token in NANOCHAT_SPECIAL_TOKENS}
# What `mlxgrpo convert nanochat` writes (mlx-lm's save_model adds the index).
CONVERTED_NANOCHAT_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.pkl",
]


@pytest.fixture
def tiny_nanochat():
    """`(model, tokenizer, config)` of builtin:tiny-nanochat, through the normal loader."""
    return load_model_with_config("builtin:tiny-nanochat", dtype="float32")


def test_tiny_nanochat_builds_offline_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGRPO_CACHE_DIR", str(tmp_path))
    path = Path(resolve_model_path("builtin:tiny-nanochat"))
    assert path.parent == tmp_path / "builtin" and path.name.startswith("tiny-nanochat-")
    assert sorted(os.listdir(path)) == CONVERTED_NANOCHAT_FILES
    assert is_nanochat_model_dir(path)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    # Complete by nanochat's files (no tokenizer.json), so the cached copy is reused.
    monkeypatch.setattr(builtin, "build_tiny_model", no_rebuild)
    assert Path(resolve_model_path("builtin:tiny-nanochat")) == path
    assert os.listdir(tmp_path / "builtin") == [path.name]


def test_tiny_nanochat_is_what_convert_nanochat_writes(built_dirs, tmp_path):
    """Its weights as a nanochat checkpoint, converted, give the builtin directory byte for
    byte: same files, same config.json, same weights file, same tokenizer.pkl."""
    spec = builtin.get_builtin_spec("tiny-nanochat")
    keys = StorageCounter()
    state = {name: contiguous(values, keys) for name, values in builtin.init_weights(spec).items()}
    checkpoint = tmp_path / "chatsft_checkpoints" / "d2"
    checkpoint.mkdir(parents=True)
    write_pt(checkpoint / "model_000001.pt", state)
    meta = {"step": 1, "model_config": builtin.nanochat_model_config(spec)}
    (checkpoint / "meta_000001.json").write_text(json.dumps(meta))
    write_nanochat_tokenizer(tmp_path / "tokenizer")
    converted = Path(convert_nanochat(checkpoint, tmp_path / "converted")["output"])

    built = built_dirs["tiny-nanochat"]
    assert sorted(os.listdir(built)) == sorted(os.listdir(converted)) == CONVERTED_NANOCHAT_FILES
    for name in CONVERTED_NANOCHAT_FILES:
        assert (built / name).read_bytes() == (converted / name).read_bytes(), name


def test_tiny_nanochat_builds_are_deterministic(built_dirs, tmp_path):
    first = built_dirs["tiny-nanochat"]
    again = build_tiny_model(tmp_path / "again", "tiny-nanochat")
    a = mx.load(str(first / "model.safetensors"))
    b = mx.load(str(again / "model.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 2 + 2 * 6  # wte, lm_head, 6 per block
    assert all(mx.array_equal(a[name], b[name]) for name in a)
    for name in CONVERTED_NANOCHAT_FILES:
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_tiny_nanochat_weights_follow_the_builtin_init(built_dirs):
    weights = mx.load(str(built_dirs["tiny-nanochat"] / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float32}
    wte = np.array(weights["transformer.wte.weight"])
    assert wte.shape == (NANOCHAT_ENC.n_vocab, 64)
    assert abs(wte.std() - EMBED_STD) < 0.02
    c_fc = np.array(weights["transformer.h.1.mlp.c_fc.weight"])
    assert c_fc.shape == (256, 64) and abs(c_fc.std() - 64**-0.5) < 0.01
    c_k = weights["transformer.h.0.attn.c_k.weight"]
    assert c_k.shape == (2 * 16, 64)  # 2 kv heads of head_dim 16: grouped-query attention
    lm_head = np.array(weights["lm_head.weight"])
    assert lm_head.shape == (NANOCHAT_ENC.n_vocab, 64) and abs(lm_head.std() - 0.125) < 0.01


def test_tiny_nanochat_loads_with_the_nanochat_tokenizer_and_eos(tiny_nanochat, built_dirs):
    _, tokenizer, config = tiny_nanochat
    assert config["model_type"] == "nanochat"
    assert config["num_key_value_heads"] == 2 and config["max_position_embeddings"] == 512
    assert config["vocab_size"] == len(tokenizer) == NANOCHAT_ENC.n_vocab == 281
    end, bos = NANOCHAT_IDS["<|assistant_end|>"], NANOCHAT_IDS["<|bos|>"]
    assert config["eos_token_id"] == [end, bos] and config["bos_token_id"] == bos
    assert eos_token_ids(tokenizer) == {end, bos}
    assert tokenizer.eos_token_id == end and tokenizer.eos_token == "<|assistant_end|>"
    on_disk = json.loads((built_dirs["tiny-nanochat"] / "config.json").read_text())
    assert on_disk["eos_token_id"] == [end, bos]


@pytest.mark.parametrize(
    "token", ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
)
def test_tiny_nanochat_tool_tokens_are_single_special_ids(tiny_nanochat, token):
    _, tokenizer, _ = tiny_nanochat
    ids = tokenizer.encode(token, add_special_tokens=False)
    assert ids == [NANOCHAT_IDS[token]]
    assert ids[0] in tokenizer.all_special_ids
    assert tokenizer.decode(ids) == token
    call = f"{token}2+3"
    assert decode(tokenizer, tokenizer.encode(call, add_special_tokens=False)) == call


def test_tiny_nanochat_chat_template_ends_with_assistant_start(tiny_nanochat):
    _, tokenizer, _ = tiny_nanochat
    question = "What is 2+3?"
    ids = render_prompt(tokenizer, [{"role": "user", "content": question}])
    expected = [
        NANOCHAT_IDS["<|bos|>"],
        NANOCHAT_IDS["<|user_start|>"],
        *NANOCHAT_ENC.encode_ordinary(question),
        NANOCHAT_IDS["<|user_end|>"],
        NANOCHAT_IDS["<|assistant_start|>"],
    ]
    assert ids == expected
    assert render_prompt_text(tokenizer, question) == (
        f"<|bos|><|user_start|>{question}<|user_end|><|assistant_start|>"
    )


def test_tiny_nanochat_forward_gives_vocab_logits(tiny_nanochat):
    model, tokenizer, _ = tiny_nanochat
    ids = tokenizer.encode("<|assistant_start|><|python_start|>2+3<|python_end|>")
    assert len(ids) == 7  # bos, three specials, "2", "+", "3"
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), NANOCHAT_ENC.n_vocab)
    assert logits.dtype == mx.float32 and bool(mx.all(mx.isfinite(logits)))
    assert float(mx.std(logits[0, -1]).item()) > 0.5  # not a uniform policy


def test_tiny_nanochat_trains_one_update_offline(cli, tmp_path):
    code, out, err = cli(
        "train", "-m", "builtin:tiny-nanochat", "-o", tmp_path / "runs",
        "--set", "data.dataset=synthetic:repeat?letters=x",
        "--set", "rollout.max_new_tokens=8",
        "--set", "rollout.num_generations=2",
        "--set", "optim.batch_size=2",
        "--max-steps", "1",
    )  # fmt: skip
    assert code == 0, out + err
    (run,) = (tmp_path / "runs").iterdir()
    updates = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("kind") == "train"
    ]
    assert [u["update"] for u in updates] == [1]
    training = json.loads((run / "final" / "training.json").read_text())
    assert training["base_model"] == "builtin:tiny-nanochat"
    assert (run / "final" / "adapters.safetensors").is_file()
