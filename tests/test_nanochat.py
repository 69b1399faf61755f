"""nanochat: the torch-free `.pt` reader, the safe tokenizer.pkl loader, the tokenizer wrapper,
conversion to MLX (checked against a numpy forward pass of nanochat's architecture), loading."""

from __future__ import annotations

import builtins
import copyreg
import os
import pickle
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiktoken
from mlx.utils import tree_flatten
from nanochat_fixtures import (
    TINY_CONFIG,
    FakeStorage,
    FakeTensor,
    StorageCounter,
    contiguous,
    from_bfloat16_bits,
    nanochat_state,
    nanochat_weights,
    shared_views,
    step_seed,
    to_bfloat16_bits,
    transposed_view,
    write_nanochat_checkpoint,
    write_pt,
)
from random_models import add_random_adapters
from tolerance import assert_close

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.builtin import tiny_nanochat_encoding, write_nanochat_tokenizer
from mlxgrpo.models.loading import load_model, load_model_with_config
from mlxgrpo.models.nanochat_convert import convert_nanochat
from mlxgrpo.models.nanochat_tokenizer import (
    load_nanochat_encoding,
    load_nanochat_tokenizer,
    wrap_nanochat_tokenizer,
)
from mlxgrpo.models.tokenizer import decode, eos_token_ids, render_prompt, render_prompt_text
from mlxgrpo.models.torch_checkpoint import load_torch_state_dict

ENC = tiny_nanochat_encoding()
SPECIAL = {token: ENC.encode_single_token(token) for token in ENC.special_tokens_set}
BOS, USER_START, USER_END = SPECIAL["<|bos|>"], SPECIAL["<|user_start|>"], SPECIAL["<|user_end|>"]
ASSISTANT_START, ASSISTANT_END = SPECIAL["<|assistant_start|>"], SPECIAL["<|assistant_end|>"]


@pytest.fixture(scope="module")
def nanochat_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("nanochat-base")
    write_nanochat_checkpoint(base)
    return base


@pytest.fixture(scope="module")
def converted(nanochat_base, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("converted") / "nanochat-d2"
    summary = convert_nanochat(nanochat_base / "chatsft_checkpoints" / "d2", output)
    return output, summary


# ---------------------------------------------------------------------------------------------
# numpy reference of nanochat's GPT (nanochat/gpt.py), in float64


# nanochat's F.rms_norm uses float32's machine epsilon; mlx-lm's nanochat model uses 1e-5.
NANOCHAT_EPS = float(np.finfo(np.float32).eps)
MLX_LM_EPS = 1e-5


def _rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rotary(x: np.ndarray) -> np.ndarray:
    """nanochat's apply_rotary_emb on (T, H, D): halves rotated by -theta."""
    positions, head_dim = np.arange(x.shape[0]), x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    angles = np.outer(positions, inv_freq)[:, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def reference_logits(
    weights: dict[str, np.ndarray], config: dict, ids: list[int], eps: float = NANOCHAT_EPS
) -> np.ndarray:
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    heads, kv_heads = config["n_head"], config["n_kv_head"]
    head_dim = config["n_embd"] // heads
    steps = len(ids)
    x = _rms_norm(w["transformer.wte.weight"][ids], eps)
    causal = np.tril(np.ones((steps, steps), dtype=bool))
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        h = _rms_norm(x, eps)
        q = (h @ w[f"{p}.attn.c_q.weight"].T).reshape(steps, heads, head_dim)
        k = (h @ w[f"{p}.attn.c_k.weight"].T).reshape(steps, kv_heads, head_dim)
        v = (h @ w[f"{p}.attn.c_v.weight"].T).reshape(steps, kv_heads, head_dim)
        q, k = _rms_norm(_rotary(q), eps), _rms_norm(_rotary(k), eps)
        k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_dim)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attended = np.einsum("hts,shd->thd", probs, v).reshape(steps, -1)
        x = x + attended @ w[f"{p}.attn.c_proj.weight"].T
        hidden = np.maximum(_rms_norm(x, eps) @ w[f"{p}.mlp.c_fc.weight"].T, 0.0) ** 2
        x = x + hidden @ w[f"{p}.mlp.c_proj.weight"].T
    logits = _rms_norm(x, eps) @ w["lm_head.weight"].T
    return 15.0 * np.tanh(logits / 15.0)


# ---------------------------------------------------------------------------------------------
# The .pt reader


def test_reader_round_trips_dtypes_strides_offsets_and_shared_storages(tmp_path):
    rng = np.random.default_rng(0)
    keys = StorageCounter()
    matrix = rng.standard_normal((3, 5)).astype(np.float32)
    first, second = rng.standard_normal((2, 4)), rng.standard_normal((6,))
    bf16 = rng.standard_normal((4, 3)).astype(np.float32)
    ints = np.arange(-6, 6, dtype=np.int64).reshape(3, 4)
    shared = shared_views([first, second], keys)
    # A column slice: offset 1 into a (3, 5) storage, shape (3, 2), row stride 5.
    base = contiguous(matrix, keys)
    column_slice = FakeTensor(base.storage, 1, (3, 2), (5, 1))
    state = {
        "transposed": transposed_view(matrix, keys),
        "first": shared[0],
        "second": shared[1],
        "column_slice": column_slice,
        "bf16": contiguous(bf16, keys, dtype="bfloat16"),
        "ints": contiguous(ints, keys, dtype="int64"),
        "half": contiguous(matrix, keys, dtype="float16"),
        "flags": contiguous(matrix > 0, keys, dtype="bool"),
        "scalar": contiguous(np.array(2.5, dtype=np.float32), keys),
    }
    loaded = load_torch_state_dict(write_pt(tmp_path / "state.pt", state))

    assert list(loaded) == list(state)
    np.testing.assert_array_equal(np.array(loaded["transposed"]), matrix)
    np.testing.assert_array_equal(np.array(loaded["first"]), first.astype(np.float32))
    np.testing.assert_array_equal(np.array(loaded["second"]), second.astype(np.float32))
    np.testing.assert_array_equal(np.array(loaded["column_slice"]), matrix[:, 1:3])
    assert loaded["bf16"].dtype == mx.bfloat16
    expected_bf16 = from_bfloat16_bits(to_bfloat16_bits(bf16))
    np.testing.assert_array_equal(np.array(loaded["bf16"].astype(mx.float32)), expected_bf16)
    assert np.abs(expected_bf16 - bf16).max() > 0  # the rounding is real, so the check is too
    assert loaded["ints"].dtype == mx.int64
    np.testing.assert_array_equal(np.array(loaded["ints"]), ints)
    assert loaded["half"].dtype == mx.float16
    np.testing.assert_array_equal(np.array(loaded["half"]), matrix.astype(np.float16))
    np.testing.assert_array_equal(np.array(loaded["flags"]), matrix > 0)
    assert loaded["scalar"].shape == () and loaded["scalar"].item() == 2.5


def test_reader_reads_a_nanochat_checkpoint(nanochat_base):
    path = nanochat_base / "chatsft_checkpoints" / "d2" / "model_000005.pt"
    loaded = load_torch_state_dict(path)
    weights = nanochat_weights(TINY_CONFIG, step_seed(5))
    assert set(loaded) == {"_orig_mod." + name for name in weights}
    assert loaded["_orig_mod.transformer.wte.weight"].dtype == mx.bfloat16
    for name, values in weights.items():
        got = np.array(loaded["_orig_mod." + name].astype(mx.float32))
        np.testing.assert_array_equal(got, values, err_msg=name)


class _RunsCommand:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_reader_refuses_code_in_the_pickle(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"w": _RunsCommand(sentinel)}, protocol=2))
        zf.writestr("evil/byteorder", "little")
    with pytest.raises(MlxgrpoError, match=r"references '(posix|nt)\.system'"):
        load_torch_state_dict(path)
    assert not sentinel.exists()


def test_reader_rejects_legacy_big_endian_and_foreign_files(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(MlxgrpoError, match="legacy"):
        load_torch_state_dict(legacy)

    keys = StorageCounter()
    state = {"w": contiguous(np.ones((2, 2), dtype=np.float32), keys)}
    big = write_pt(tmp_path / "big.pt", state, byteorder="big")
    with pytest.raises(MlxgrpoError, match="big-endian"):
        load_torch_state_dict(big)

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(MlxgrpoError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(text)
    with pytest.raises(ConfigError, match="not found"):
        load_torch_state_dict(tmp_path / "missing.pt")


def test_reader_rejects_a_view_outside_its_storage(tmp_path):
    storage = FakeStorage("0", "float32", np.zeros(4, dtype="<f4").tobytes(), 4)
    bad = write_pt(tmp_path / "bad.pt", {"w": FakeTensor(storage, 2, (2, 2), (2, 1))})
    with pytest.raises(MlxgrpoError, match="outside its storage"):
        load_torch_state_dict(bad)


# ---------------------------------------------------------------------------------------------
# tokenizer.pkl loading


class _WritesFile:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.sentinel)!r}, 'w').write('x')",))


def _pickle_encoding_state(state) -> bytes:
    """A pickle of a tiktoken Encoding whose state is `state` (a registered encoding pickles
    as its bare name), written without building the Encoding."""
    import io

    class StatePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is tiktoken.Encoding:
                return (copyreg.__newobj__, (tiktoken.Encoding,), state)
            return NotImplemented

    out = io.BytesIO()
    StatePickler(out).dump(tiktoken.Encoding.__new__(tiktoken.Encoding))
    return out.getvalue()


def test_safe_loader_round_trips_nanochat_tokenizer(tmp_path):
    path = write_nanochat_tokenizer(tmp_path)
    encoding = load_nanochat_encoding(path)
    text = "the and héllo <|bos|>"
    assert encoding.encode(text, allowed_special="all") == ENC.encode(text, allowed_special="all")
    assert encoding.n_vocab == ENC.n_vocab and encoding.name == ENC.name
    for protocol in (0, 2):
        old_protocol = tmp_path / f"protocol{protocol}.pkl"
        old_protocol.write_bytes(pickle.dumps(ENC, protocol=protocol))
        reloaded = load_nanochat_encoding(old_protocol)
        assert reloaded.encode_ordinary(text) == ENC.encode_ordinary(text)


@pytest.mark.parametrize("payload", ["command", "exec"])
def test_safe_loader_refuses_code_before_it_runs(tmp_path, payload):
    sentinel = tmp_path / "SENTINEL"
    evil = _RunsCommand(sentinel) if payload == "command" else _WritesFile(sentinel)
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(evil))
    expected = r"(posix|nt)\.system" if payload == "command" else r"builtins\.exec"
    with pytest.raises(MlxgrpoError, match=f"refusing to load .* references '{expected}'"):
        load_nanochat_encoding(path)
    assert not sentinel.exists()


def test_safe_loader_refuses_other_objects_and_registered_names(tmp_path):
    plain = tmp_path / "dict.pkl"
    plain.write_bytes(pickle.dumps({"name": "x", "pat_str": "."}))
    with pytest.raises(MlxgrpoError, match="holds a dict, not a tiktoken Encoding"):
        load_nanochat_encoding(plain)

    named = tmp_path / "named.pkl"
    named.write_bytes(_pickle_encoding_state("cl100k_base"))
    with pytest.raises(MlxgrpoError, match="registered encoding 'cl100k_base'"):
        load_nanochat_encoding(named)

    state = {"name": "x", "pat_str": ".", "mergeable_ranks": {b"a": 0}, "extra": 1}
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(_pickle_encoding_state(state))
    with pytest.raises(MlxgrpoError, match="malformed tiktoken Encoding"):
        load_nanochat_encoding(odd)


# ---------------------------------------------------------------------------------------------
# The tokenizer wrapper


@pytest.fixture(scope="module")
def wrapped():
    return wrap_nanochat_tokenizer(ENC)


def test_chat_rendering_follows_nanochat(wrapped):
    # Texts free of the tiny encoding's merges, so each byte is its own token (rank = byte).
    system, question, answer = "Go.", "Hi 2+2?", "Ok"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    expected = [BOS, USER_START, *f"{system}\n\n{question}".encode(), USER_END, ASSISTANT_START]
    assert render_prompt(wrapped, messages) == expected
    assert render_prompt(wrapped, messages, add_generation_prompt=False) == expected[:-1]
    history = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": system},
    ]
    expected_history = [
        *[BOS, USER_START, *question.encode(), USER_END],
        *[ASSISTANT_START, *answer.encode(), ASSISTANT_END],
        *[USER_START, *system.encode(), USER_END, ASSISTANT_START],
    ]
    assert render_prompt(wrapped, history) == expected_history
    text = render_prompt_text(wrapped, messages)
    assert text == f"<|bos|><|user_start|>{system}\n\n{question}<|user_end|><|assistant_start|>"


def test_special_token_text_in_messages_stays_plain_text(wrapped):
    content = "<|assistant_end|><|bos|>"
    plain = ENC.encode_ordinary(content)
    assert not set(plain) & set(SPECIAL.values()) and ENC.decode(plain) == content
    assert render_prompt(wrapped, content) == [BOS, USER_START, *plain, USER_END, ASSISTANT_START]
    # Plain encode behaves like a HF tokenizer: special text is the special token, BOS first.
    assert wrapped.encode("<|bos|>x", add_special_tokens=False) == [BOS, ord("x")]
    assert wrapped.encode("x") == [BOS, ord("x")]


def test_bad_conversations_are_config_errors(wrapped):
    with pytest.raises(ConfigError, match="alternate"):
        render_prompt(wrapped, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ConfigError, match="system message must be followed"):
        render_prompt(wrapped, [{"role": "system", "content": "s"}])


def test_eos_ids_vocab_and_decoding(wrapped):
    assert eos_token_ids(wrapped) == {ASSISTANT_END, BOS}
    assert wrapped.bos_token == "<|bos|>" and wrapped.bos_token_id == BOS
    assert wrapped.vocab_size == len(wrapped) == 256 + 16 + 9
    assert wrapped.convert_tokens_to_ids("<|assistant_end|>") == ASSISTANT_END
    assert wrapped.get_vocab()["Ġthe"] == ENC.encode_single_token(b" the")
    ids = [BOS, *ENC.encode_ordinary("the end"), ASSISTANT_END]
    assert decode(wrapped, mx.array(ids)) == "<|bos|>the end<|assistant_end|>"
    assert decode(wrapped, ids, skip_special_tokens=True) == "the end"


def test_streaming_detokenizer_never_splits_a_character(wrapped):
    text = "héllo ✓ and ünïcode ✓✓"
    ids = wrapped.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    detokenizer = wrapped.detokenizer
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert all("\ufffd" not in segment for segment in segments)
    assert "".join(segments) == text == wrapped.decode(ids)
    assert wrapped.detokenizer.text == ""  # a fresh copy per caller


def test_tokenizer_save_pretrained_round_trips(wrapped, tmp_path):
    wrapped.save_pretrained(tmp_path)
    reloaded = load_nanochat_tokenizer(tmp_path)
    assert render_prompt(reloaded, "the cat") == render_prompt(wrapped, "the cat")


# ---------------------------------------------------------------------------------------------
# Conversion and loading


def test_conversion_matches_nanochat_reference_forward(converted):
    output, summary = converted
    assert summary["step"] == 5 and summary["available_steps"] == [3, 5]
    assert summary["n_parameters"] == sum(v.size for v in nanochat_weights(TINY_CONFIG, 0).values())
    assert sorted(p.name for p in output.iterdir() if not p.name.endswith(".index.json")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.pkl",
    ]
    model, tokenizer, config = load_model_with_config(str(output), dtype="float32")
    assert config["model_type"] == "nanochat" and config["num_key_value_heads"] == 2
    ids = render_prompt(tokenizer, "the answer is 42, and the end")
    weights = nanochat_weights(TINY_CONFIG, step_seed(5))
    got = np.array(model(mx.array([ids]))[0])
    # Same norm epsilon as mlx-lm: the mapping itself is exact up to float32 rounding.
    exact = reference_logits(weights, TINY_CONFIG, ids, eps=MLX_LM_EPS)
    assert np.abs(exact).max() > 2.0  # logits far from zero, so agreement means something
    mlp = 4 * TINY_CONFIG["n_embd"]  # the longest sum: the MLP's c_proj over 4 x n_embd
    assert_close(got, exact, terms=mlp)
    # nanochat's own epsilon: mlx-lm's larger one shifts logits by ~1e-4 at most.
    original = reference_logits(weights, TINY_CONFIG, ids)
    np.testing.assert_allclose(got, original, atol=5e-4, rtol=0)


def test_greedy_generation_equals_repeated_full_forward(converted):
    from mlxgrpo.generation.rollout import SamplingConfig, generate_groups

    model, tokenizer = load_model(str(converted[0]), dtype="float32")
    prompt = render_prompt(tokenizer, "and then")
    rollout = generate_groups(
        model,
        [prompt],
        num_generations=2,
        max_new_tokens=10,
        sampling=SamplingConfig(temperature=0.0),
        eos_token_ids=eos_token_ids(tokenizer),
    )
    expected: list[int] = []
    for _ in range(10):
        logits = model(mx.array([prompt + expected]))[0, -1]
        expected.append(int(mx.argmax(logits).item()))
        if expected[-1] in eos_token_ids(tokenizer):
            break
    assert rollout.completion_ids == [expected, expected]


def test_loading_applies_dtype_and_adapters(converted, tmp_path):
    output = str(converted[0])
    half, _ = load_model(output, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.bfloat16}

    base, tokenizer = load_model(output, dtype="float32")
    add_random_adapters(base, tmp_path, seed=0)

    tuned, _ = load_model(output, adapter_path=str(tmp_path), dtype="float32")
    plain, _ = load_model(output, dtype="float32")
    ids = mx.array([render_prompt(tokenizer, "adapters")])
    assert mx.allclose(tuned(ids), base(ids), atol=1e-5)
    assert not mx.allclose(tuned(ids), plain(ids), atol=1e-3)


def test_full_model_save_round_trips_through_mlx_lm(converted, tmp_path):
    from mlxgrpo.models.loading import save_full_model

    model, tokenizer = load_model(str(converted[0]), dtype="float32")
    save_full_model(tmp_path / "full", model, tokenizer, str(converted[0]))
    reloaded, reloaded_tokenizer = load_model(str(tmp_path / "full"), dtype="float32")
    ids = render_prompt(tokenizer, "the end")
    assert render_prompt(reloaded_tokenizer, "the end") == ids
    assert mx.array_equal(reloaded(mx.array([ids])), model(mx.array([ids])))


def test_step_option_picks_that_checkpoint(nanochat_base, tmp_path):
    source = nanochat_base / "chatsft_checkpoints" / "d2"
    summary = convert_nanochat(source, tmp_path / "step3", step=3, dtype="bfloat16")
    assert summary["step"] == 3 and summary["dtype"] == "bfloat16"
    weights = mx.load(str(tmp_path / "step3" / "model.safetensors"))
    assert weights["lm_head.weight"].dtype == mx.bfloat16
    step3 = nanochat_weights(TINY_CONFIG, step_seed(3))["lm_head.weight"]
    expected = from_bfloat16_bits(to_bfloat16_bits(step3))
    np.testing.assert_array_equal(np.array(weights["lm_head.weight"].astype(mx.float32)), expected)


def test_conversion_errors_name_the_problem(nanochat_base, tmp_path):
    source = nanochat_base / "chatsft_checkpoints" / "d2"
    with pytest.raises(ConfigError, match="not found"):
        convert_nanochat(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no nanochat checkpoint \(model_<step>\.pt\)"):
        convert_nanochat(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="step 7") as info:
        convert_nanochat(source, tmp_path / "out", step=7)
    assert "3, 5" in str(info.value.hint)
    lonely = write_nanochat_checkpoint(tmp_path / "lonely", steps=(1,), with_tokenizer=False)
    with pytest.raises(ConfigError, match="no tokenizer.pkl") as info:
        convert_nanochat(lonely, tmp_path / "out")
    assert "--tokenizer" in str(info.value.hint)
    explicit = nanochat_base / "tokenizer" / "tokenizer.pkl"
    summary = convert_nanochat(lonely, tmp_path / "out", tokenizer_path=explicit)
    assert summary["tokenizer_file"] == str(explicit)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left


def test_unrepresentable_weights_are_refused_by_name(tmp_path):
    source = write_nanochat_checkpoint(tmp_path / "newer", steps=(2,))
    checkpoint = source / "model_000002.pt"
    weights = nanochat_weights(TINY_CONFIG, 1)
    state = nanochat_state(weights)
    keys = StorageCounter()
    keys.next = 100
    state["_orig_mod.resid_lambdas"] = contiguous(np.ones(2, dtype=np.float32), keys)
    write_pt(checkpoint, state)
    with pytest.raises(MlxgrpoError, match="cannot represent: resid_lambdas"):
        convert_nanochat(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    sliding = write_nanochat_checkpoint(
        tmp_path / "sliding", steps=(1,), config={**TINY_CONFIG, "window_pattern": "SSSL"}
    )
    with pytest.raises(MlxgrpoError, match="window_pattern='SSSL'"):
        convert_nanochat(sliding, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_is_kept_until_replaced(nanochat_base, tmp_path):
    source = nanochat_base / "chatsft_checkpoints" / "d2"
    output = tmp_path / "model"
    output.mkdir()
    (output / "keep.txt").write_text("old model")
    with pytest.raises(ConfigError, match="already exists"):
        convert_nanochat(source, output)
    assert (output / "keep.txt").read_text() == "old model"
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]

    summary = convert_nanochat(source, output, force=True)
    assert summary["replaced"] is True
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no backup left behind
