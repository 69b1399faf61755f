"""The engine's fast paths equal their plain definitions: LM head on completion positions only,
the hand-written log-prob/entropy gradient, and the Gumbel-max sampler's distribution."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from random_models import random_lm
from tolerance import assert_close

from mlxgrpo.engine.memory.lm_head import sequence_logprobs, split_lm_head
from mlxgrpo.generation.logprobs import token_logprobs_and_entropy
from mlxgrpo.generation.sampling import SamplingConfig, sample_tokens


def _qwen2(tied: bool) -> nn.Module:
    model = random_lm("qwen2", seed=1, tied=tied)
    mx.eval(model.parameters())
    return model


def _llama() -> nn.Module:
    model = random_lm("llama", seed=2, tied=False, rms_norm_eps=1e-5)
    mx.eval(model.parameters())
    return model


class _Wrapped(nn.Module):
    """A model of an unknown layout: sequence_logprobs must run it whole."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, x: mx.array) -> mx.array:
        return self.inner(x) * 0.5


def _naive_logprobs(model: nn.Module, tokens: np.ndarray, start: int):
    """Whole-model logits, float64 log-softmax, every position; then the completion slice."""
    logits = np.array(model(mx.array(tokens[:, :-1]))).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    targets = tokens[:, 1:]
    logp = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    return logp[:, start - 1 :], entropy[:, start - 1 :]


TERMS = 64  # the longest sum in random_lm's models: the MLP's 2 x hidden (vocabulary 48)
TOKENS = np.array(
    [[3, 9, 4, 17, 22, 5, 40, 7], [8, 1, 30, 2, 11, 12, 13, 47], [5, 5, 6, 7, 8, 9, 10, 11]],
    dtype=np.int32,
)


@pytest.mark.parametrize("build", [lambda: _qwen2(True), lambda: _qwen2(False), _llama])
def test_split_head_recomposes_the_model(build) -> None:
    model = build()
    trunk, head = split_lm_head(model)
    x = mx.array(TOKENS)
    assert_close(head(trunk(x)), model(x), terms=TERMS)


def test_unknown_layouts_are_not_split() -> None:
    assert split_lm_head(_Wrapped(_qwen2(True))) is None


@pytest.mark.parametrize(
    "build", [lambda: _qwen2(True), lambda: _qwen2(False), _llama, lambda: _Wrapped(_llama())]
)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_sequence_logprobs_equal_whole_model_log_softmax(build, chunk_size) -> None:
    model, start = build(), 3
    want_logp, want_entropy = _naive_logprobs(model, TOKENS, start)
    logp, entropy = sequence_logprobs(
        model, mx.array(TOKENS), start, with_entropy=True, chunk_size=chunk_size
    )
    assert_close(logp, want_logp, terms=TERMS, what="log-probs")
    assert_close(entropy, want_entropy, terms=TERMS, what="entropies")


def _reference_logp_entropy(logits: mx.array, targets: mx.array):
    """The textbook formulas, differentiated by MLX's autodiff."""
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logp = mx.take_along_axis(log_probs, targets[..., None], axis=-1).squeeze(-1)
    probs = mx.softmax(logits, axis=-1)
    entropy = -mx.sum(mx.where(probs > 0, probs * log_probs, 0.0), axis=-1)
    return logp, entropy


@pytest.mark.parametrize("masked", [False, True])
def test_fused_gradient_equals_autodiff_of_the_definition(masked: bool) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    if masked:  # vocabulary entries removed by a filter: -inf logits
        logits[:, :, 7:] = -np.inf
    targets = mx.array(rng.integers(0, 7, size=(2, 5)).astype(np.int32))
    w_logp = mx.array(rng.standard_normal((2, 5)).astype(np.float32))
    w_entropy = mx.array(rng.standard_normal((2, 5)).astype(np.float32))

    def loss(fn):
        def inner(z):
            logp, entropy = fn(z, targets)
            return mx.sum(logp * w_logp) + mx.sum(entropy * w_entropy)

        return inner

    z = mx.array(logits)
    fused_value, fused_grad = mx.value_and_grad(loss(token_logprobs_and_entropy))(z)
    # Autodiff through -inf gives NaN; a huge finite logit is the same distribution.
    finite = mx.array(np.where(np.isinf(logits), -1e9, logits))
    ref_value, ref_grad = mx.value_and_grad(loss(_reference_logp_entropy))(finite)
    vocab = logits.shape[-1]
    # The value adds a weighted log-prob and entropy per position; each sums over the vocabulary.
    assert_close(fused_value.item(), ref_value.item(), terms=2 * targets.size, what="value")
    got, want = np.array(fused_grad), np.array(ref_grad)
    if masked:
        assert np.all(got[:, :, 7:] == 0)
        got, want = got[:, :, :7], want[:, :, :7]
    assert_close(got, want, terms=vocab, what="gradient")
    # Hand check of one entry: d logp_t / d z_t = 1 - p_t, d H / d z_j = -p_j (log p_j + H).
    p = np.exp(logits[0, 0] - np.log(np.exp(logits[0, 0]).sum()))
    log_p = np.log(np.where(p > 0, p, 1.0))
    entropy = -(p * log_p).sum()
    t = int(np.array(targets)[0, 0])
    wl, we = float(np.array(w_logp)[0, 0]), float(np.array(w_entropy)[0, 0])
    expected = -wl * p - we * p * (log_p + entropy)
    expected[t] += wl
    assert_close(np.array(fused_grad)[0, 0], expected, terms=vocab, what="hand check")


def test_sampler_frequencies_match_softmax() -> None:
    logits = mx.array([[2.0, 1.0, 0.0, -1.0, -np.inf]] * 4000)
    tokens = np.array(sample_tokens(logits, mx.random.key(5), SamplingConfig(temperature=1.0)))
    counts = np.bincount(tokens, minlength=5) / tokens.size
    probs = np.exp([2.0, 1.0, 0.0, -1.0])
    probs /= probs.sum()
    assert counts[4] == 0
    # 4000 draws: the standard error of each frequency is <= 0.008.
    np.testing.assert_allclose(counts[:4], probs, atol=0.03)
    tempered = np.array(sample_tokens(logits, mx.random.key(6), SamplingConfig(temperature=0.5)))
    hot = np.exp(np.array([2.0, 1.0, 0.0, -1.0]) / 0.5)
    hot /= hot.sum()
    np.testing.assert_allclose(np.bincount(tempered, minlength=5)[:4] / 4000, hot, atol=0.03)


def test_metric_entropy_is_not_differentiated() -> None:
    rng = np.random.default_rng(1)
    z = mx.array(rng.standard_normal((3, 4, 9)).astype(np.float32) * 2)
    targets = mx.array(rng.integers(0, 9, size=(3, 4)).astype(np.int32))
    weights = mx.array(rng.standard_normal((3, 4)).astype(np.float32))

    def loss(entropy_grad: bool, use_entropy: bool):
        def inner(logits):
            logp, entropy = token_logprobs_and_entropy(logits, targets, entropy_grad=entropy_grad)
            return mx.sum(logp * weights) + (mx.sum(entropy) if use_entropy else 0.0)

        return inner

    metric_value, metric_grad = mx.value_and_grad(loss(False, True))(z)
    _, logp_only_grad = mx.value_and_grad(loss(True, False))(z)
    full_value, _ = mx.value_and_grad(loss(True, True))(z)
    # The value adds a weighted log-prob and an entropy per position; each sums over the vocabulary.
    assert_close(metric_value.item(), full_value.item(), terms=2 * targets.size, what="value")
    assert_close(metric_grad, logp_only_grad, terms=z.shape[-1], what="gradient")
