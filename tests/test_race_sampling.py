"""The exponential-race sampler: Gumbel-max's winner, its log-prob, and the two-stream split."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

from mlxgrpo.generation import sampling as sampling_module
from mlxgrpo.generation.logprobs import token_logprobs
from mlxgrpo.generation.sampling import SamplingConfig, sample_recorded, sample_tokens
from mlxgrpo.models import cpu_kernels

ROWS, VOCAB = 6, 50


def _logits_and_keys(seed: int = 0):
    logits = mx.random.normal((ROWS, VOCAB), key=mx.random.key(seed)) * 3.0
    keys = mx.random.split(mx.random.key(seed + 1), ROWS)  # one key per row, as rollouts do
    return logits, keys


def test_race_picks_the_gumbel_max_winner():
    """argmax(exp(s) / E) with E = -log(u) is argmax(s + g) with g = -log(-log(u))."""
    sampling = SamplingConfig(temperature=0.8)
    for seed in range(20):
        logits, keys = _logits_and_keys(seed)
        scores = logits * (1 / 0.8)
        u = mx.vmap(lambda k: mx.random.uniform(shape=(VOCAB,), key=k))(keys)
        gumbel = mx.argmax(scores - mx.log(-mx.log(u)), axis=-1)
        assert mx.array_equal(sample_tokens(logits, keys, sampling), gumbel).item(), seed


@pytest.mark.parametrize("split", [False, True])
def test_recorded_draws_are_sample_tokens_draws_with_their_logprobs(split, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN_ELEMENTS", 0 if split else 1 << 40)
    sampling = SamplingConfig(temperature=1.0)
    logits, keys = _logits_and_keys(3)
    tokens, stats = sample_recorded(logits, keys, sampling, with_entropy=False)
    assert mx.array_equal(tokens, sample_tokens(logits, keys, sampling)).item()
    want = token_logprobs(logits, tokens.astype(mx.int32))
    assert stats.shape == (ROWS, 1)
    assert_close(stats[:, 0], want, terms=VOCAB)  # log-softmax over the vocabulary


def test_race_frequencies_with_per_row_keys_match_softmax():
    probs = np.exp([1.5, 0.5, 0.0, -2.0])
    probs /= probs.sum()
    logits = mx.array([[1.5, 0.5, 0.0, -2.0, -np.inf]] * 4000)
    keys = mx.random.split(mx.random.key(11), 4000)
    tokens, _ = sample_recorded(logits, keys, SamplingConfig(temperature=1.0), with_entropy=False)
    counts = np.bincount(np.array(tokens), minlength=5) / 4000
    assert counts[4] == 0  # a -inf score never wins
    np.testing.assert_allclose(counts[:4], probs, atol=0.03)  # standard error <= 0.008


def _sparse_logits(vocab: int, live: dict[int, float], rows: int) -> tuple[mx.array, np.ndarray]:
    """[rows, vocab] logits that are -inf except at ``live`` (token -> logit), and the
    softmax over the live tokens."""
    row = np.full(vocab, -np.inf, dtype=np.float32)
    for token, value in live.items():
        row[token] = value
    probs = np.exp(np.array(list(live.values())))
    return mx.array(np.tile(row, (rows, 1))), probs / probs.sum()


@pytest.mark.parametrize(
    "vocab, live",
    [
        # 16 blocks of 512: live tokens in different blocks, first and last entries included
        (8192, {0: 0.0, 600: 1.0, 4100: 1.5, 8191: 0.5}),
        # no power of two >= 128 divides 4100: padded to 17 blocks of 256; the last real
        # entry sits in the padded block
        (4100, {3: 0.2, 4099: 1.2, 2050: 0.0}),
    ],
)
def test_two_stage_race_draws_the_softmax(vocab, live):
    assert vocab >= sampling_module.TWO_STAGE_MIN_VOCAB
    rows = 3000
    logits, probs = _sparse_logits(vocab, live, rows)
    keys = mx.random.split(mx.random.key(21), rows)
    tokens, stats = sample_recorded(logits, keys, SamplingConfig(temperature=1.0), False)
    drawn = np.array(tokens)
    assert set(drawn.tolist()) <= set(live)  # never a zero-probability or padding entry
    counts = np.array([(drawn == t).mean() for t in live])
    np.testing.assert_allclose(counts, probs, atol=0.035)  # standard error <= 0.0092
    want = token_logprobs(logits, tokens.astype(mx.int32))
    assert_close(stats[:, 0], want, terms=vocab)  # log-softmax over the vocabulary


def test_two_stage_race_matches_its_definition():
    """Stage one: blocks race by mass with the row key's first half; stage two: the chosen
    block's entries race with its second half."""
    vocab, size = 8192, 512
    logits = mx.random.normal((ROWS, vocab), key=mx.random.key(2)) * 2.0
    keys = mx.random.split(mx.random.key(3), ROWS)
    tokens = sample_tokens(logits, keys, SamplingConfig(temperature=1.0))
    e = np.exp(np.array(logits, dtype=np.float64) - np.array(logits).max(-1, keepdims=True))
    for row in range(ROWS):
        first, second = mx.random.split(keys[row])
        u1 = np.array(mx.random.uniform(shape=(vocab // size,), key=first), dtype=np.float64)
        blocks = e[row].reshape(-1, size)
        block = int(np.argmax(blocks.sum(-1) / -np.log(u1)))
        u2 = np.array(mx.random.uniform(shape=(size,), key=second), dtype=np.float64)
        entry = int(np.argmax(blocks[block] / -np.log(u2)))
        assert int(tokens[row]) == block * size + entry, row


@pytest.mark.parametrize("vocab", [VOCAB, 8192])
def test_the_stream_split_changes_no_draw_at_either_size(vocab, monkeypatch):
    logits = mx.random.normal((ROWS, vocab), key=mx.random.key(8)) * 3.0
    keys = mx.random.split(mx.random.key(9), ROWS)
    sampling = SamplingConfig(temperature=1.0)
    monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN_ELEMENTS", 1 << 40)
    whole = sample_recorded(logits, keys, sampling, with_entropy=False)
    monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN_ELEMENTS", 0)
    calls = []
    original = sampling_module.parallel_row_parts
    monkeypatch.setattr(
        sampling_module, "parallel_row_parts", lambda *a: calls.append(1) or original(*a)
    )
    halves = sample_recorded(logits, keys, sampling, with_entropy=False)
    assert calls  # the split path ran
    assert mx.array_equal(whole[0], halves[0]).item()
    assert mx.array_equal(whole[1], halves[1]).item()
    assert mx.array_equal(whole[0], sample_tokens(logits, keys, sampling)).item()


def test_race_blocks():
    assert sampling_module.race_block(151_936) == (128, 0)  # Qwen2.5: 1187 blocks of 128
    assert sampling_module.race_block(32_768) == (512, 0)
    assert sampling_module.race_block(50_257) == (256, 175)  # padded to 50,432
