"""The exponential-race sampler: Gumbel-max's winner, its log-prob, and the two-stream split."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxgrpo.engine import sampling as sampling_module
from mlxgrpo.engine.logprobs import token_logprobs
from mlxgrpo.engine.sampling import SamplingConfig, sample_recorded, sample_tokens
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
    assert mx.allclose(stats[:, 0], want, atol=1e-5).item()


def test_the_stream_split_changes_no_draw(monkeypatch):
    logits, keys = _logits_and_keys(7)
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


def test_race_frequencies_with_per_row_keys_match_softmax():
    probs = np.exp([1.5, 0.5, 0.0, -2.0])
    probs /= probs.sum()
    logits = mx.array([[1.5, 0.5, 0.0, -2.0, -np.inf]] * 4000)
    keys = mx.random.split(mx.random.key(11), 4000)
    tokens, _ = sample_recorded(logits, keys, SamplingConfig(temperature=1.0), with_entropy=False)
    counts = np.bincount(np.array(tokens), minlength=5) / 4000
    assert counts[4] == 0  # a -inf score never wins
    np.testing.assert_allclose(counts[:4], probs, atol=0.03)  # standard error <= 0.008
