"""The written-out frozen-head log-probs equal autodiff through full logits (values, gradient)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from tolerance import assert_close

from mlxgrpo.engine.memory import frozen_head, lm_head
from mlxgrpo.generation.logprobs import tempered, token_logprobs_and_entropy
from mlxgrpo.models import cpu_kernels
from mlxgrpo.models.heads import LogitMap, MappedHead, head_linear

VOCAB, HIDDEN, POSITIONS = 97, 16, 11


def _heads() -> dict[str, object]:
    mx.random.seed(3)
    embedding = nn.Embedding(VOCAB, HIDDEN)
    embedding.weight = embedding.weight * 3.0  # logits of a few units, like a trained model
    linear = nn.Linear(HIDDEN, VOCAB, bias=True)
    linear.weight = linear.weight * 3.0
    q_embedding = nn.QuantizedEmbedding.from_embedding(nn.Embedding(VOCAB, 32), 32, 4)
    q_linear = nn.QuantizedLinear.from_linear(nn.Linear(32, VOCAB, bias=False), 32, 4)
    return {
        "tied": embedding.as_linear,
        "linear": linear,
        "quantized_tied": q_embedding.as_linear,
        "quantized_linear": q_linear,
        # Heads with what models do around them: a softcap well inside the logits' range (so
        # tanh bends), a logit scale, features scaled down first, and all of them at once.
        "softcapped": MappedHead(embedding.as_linear, LogitMap(softcap=2.0)),
        "scaled": MappedHead(linear, LogitMap(multiplier=0.5, input_divisor=4.0)),
        "divided_capped": MappedHead(q_linear, LogitMap(divisor=3.0, softcap=1.5)),
    }


MAPPED = ["softcapped", "scaled", "divided_capped"]


def _inputs(head):
    owner = getattr(head_linear(head), "__self__", head_linear(head))
    width = HIDDEN if owner.__class__ in (nn.Embedding, nn.Linear) else 32
    k1, k2 = mx.random.split(mx.random.key(5))
    features = mx.random.normal((POSITIONS, width), key=k1)
    targets = mx.random.randint(0, VOCAB, (POSITIONS,), key=k2)
    return features, targets


def _reference(head, features, targets, temperature):
    """Full logits and autodiff: what the written-out path must reproduce."""
    logits = tempered(head(features), temperature)
    return token_logprobs_and_entropy(logits, targets)


@pytest.mark.parametrize("name", ["tied", "linear", "quantized_tied", "quantized_linear"])
@pytest.mark.parametrize("step", [1, 4, POSITIONS])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("tile", [None, 10, 1])  # whole vocabulary, uneven tiles, one entry
def test_values_and_gradient_match_autodiff(name, step, parallel, tile, monkeypatch):
    _check(name, step, parallel, tile, monkeypatch)


@pytest.mark.parametrize("name", MAPPED)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("tile", [None, 10])
def test_mapped_heads_match_autodiff_through_their_map(name, parallel, tile, monkeypatch):
    _check(name, 4, parallel, tile, monkeypatch)


def _check(name, step, parallel, tile, monkeypatch):
    if parallel:  # tiny inputs: force the two-stream split
        monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN_ELEMENTS", 0)
    head = _heads()[name]
    features, targets = _inputs(head)
    weights = mx.random.normal((POSITIONS,), key=mx.random.key(9))
    temperature = 0.7

    def ours(f):
        return frozen_head.frozen_head_logprobs(
            head,
            f,
            targets,
            step=step,
            with_entropy=True,
            differentiable=True,
            temperature=temperature,
            tile=tile,
        )

    logp, entropy = ours(features)
    want_logp, want_entropy = _reference(head, features, targets, temperature)
    assert_close(logp, want_logp, terms=VOCAB, what="log-probs")
    assert_close(entropy, want_entropy, terms=VOCAB, what="entropies")
    grad = mx.grad(lambda f: (ours(f)[0] * weights).sum())(features)
    want = mx.grad(lambda f: (_reference(head, f, targets, temperature)[0] * weights).sum())(
        features
    )
    assert_close(grad, want, terms=VOCAB, what="gradient")
    # the entropy is a value: no gradient flows through it
    through_entropy = mx.grad(lambda f: ours(f)[1].sum())(features)
    assert mx.array_equal(through_entropy, mx.zeros_like(features)).item()


def test_reference_pass_values_without_gradient():
    head = _heads()["tied"]
    features, targets = _inputs(head)
    (logp,) = frozen_head.frozen_head_logprobs(
        head, features, targets, step=3, with_entropy=False, differentiable=False, temperature=1.0
    )
    assert_close(logp, _reference(head, features, targets, 1.0)[0], terms=VOCAB)


def test_lm_head_takes_the_written_out_path_only_for_frozen_linear_heads(monkeypatch):
    calls = []
    original = lm_head.frozen_head_logprobs
    monkeypatch.setattr(
        lm_head, "frozen_head_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    embedding = nn.Embedding(VOCAB, HIDDEN)
    features, targets = _inputs(embedding.as_linear)
    kwargs = dict(chunk_size=4, with_entropy=True, differentiable=True, temperature=1.0)
    embedding.freeze()
    lm_head._apply_head(embedding.as_linear, features, targets, entropy_grad=False, **kwargs)
    assert calls == [1]
    # a differentiated entropy, or a trainable head, take the autodiff paths
    lm_head._apply_head(embedding.as_linear, features, targets, entropy_grad=True, **kwargs)
    embedding.unfreeze()
    lm_head._apply_head(embedding.as_linear, features, targets, entropy_grad=False, **kwargs)
    assert calls == [1]


def test_unknown_heads_are_refused():
    assert frozen_head.target_rows(lambda x: x) is None
    with pytest.raises(ValueError, match="linear head"):
        frozen_head.frozen_head_logprobs(
            lambda x: x,
            mx.zeros((2, VOCAB)),
            mx.zeros((2,), dtype=mx.int32),
            step=1,
            with_entropy=False,
            differentiable=False,
            temperature=1.0,
        )


def test_tiles_agree_when_the_maximum_moves_between_them():
    """Logits spanning hundreds of units: each tile's exponentials are relative to its own
    maximum, and the running sums must be rescaled exactly as the maximum rises (or the
    entropy and the gradient drift while the log-prob still looks right)."""
    embedding = nn.Embedding(VOCAB, HIDDEN)
    # later vocabulary rows are larger, so the running maximum rises tile after tile
    embedding.weight = embedding.weight * mx.linspace(1.0, 60.0, VOCAB)[:, None]
    head = embedding.as_linear
    features, targets = _inputs(head)
    weights = mx.random.normal((POSITIONS,), key=mx.random.key(4))

    def ours(f, tile):
        return frozen_head.frozen_head_logprobs(
            head, f, targets, step=4, with_entropy=True, differentiable=True,
            temperature=1.0, tile=tile,
        )  # fmt: skip

    want_logp, want_entropy = _reference(head, features, targets, 1.0)
    want_grad = mx.grad(lambda f: (_reference(head, f, targets, 1.0)[0] * weights).sum())(features)
    for tile in (5, 32):
        logp, entropy = ours(features, tile)
        assert_close(logp, want_logp, terms=VOCAB, what="log-probs")
        # The entropies' own scale (< 1), not the logits' (~100): only probable entries move
        # an entropy, and a sum rescaled wrongly as the maximum rises shifts it by ~3e-2.
        assert_close(entropy, want_entropy, terms=VOCAB, what="entropies")
        grad = mx.grad(lambda f, t=tile: (ours(f, t)[0] * weights).sum())(features)
        assert_close(grad, want_grad, terms=VOCAB, what="gradient")


def test_tile_size_follows_the_budget():
    assert frozen_head.tile_entries(512, budget_bytes=6 * 4 * 512 * 100) == 100
    assert frozen_head.tile_entries(512, budget_bytes=1) == 1
    # the default keeps one tile's buffers under 50 MB at the default chunk of positions
    entries = frozen_head.tile_entries(frozen_head.FROZEN_HEAD_POSITIONS)
    assert 1000 < entries and entries * frozen_head.FROZEN_HEAD_POSITIONS * 4 * 6 <= 50 * 2**20


@pytest.mark.parametrize("name", ["tied", "linear", "quantized_tied"])
def test_tiles_change_only_the_summation_order(name):
    """Tiled and whole-vocabulary walks give the same log-probs, entropies and gradients, up to
    the rounding of sums over the vocabulary in another order."""
    head = _heads()[name]
    features, targets = _inputs(head)
    weights = mx.random.normal((POSITIONS,), key=mx.random.key(12))

    def run(f, tile):
        return frozen_head.frozen_head_logprobs(
            head, f, targets, step=POSITIONS, with_entropy=True, differentiable=True,
            temperature=0.9, tile=tile,
        )  # fmt: skip

    whole = run(features, VOCAB)
    tiled = run(features, 13)  # 8 tiles, the last one short
    for what, a, b in zip(("log-probs", "entropies"), whole, tiled, strict=True):
        assert_close(b, a, terms=VOCAB, what=what)
    grads = [
        mx.grad(lambda f, t=tile: (run(f, t)[0] * weights).sum())(features) for tile in (VOCAB, 13)
    ]
    assert_close(grads[1], grads[0], terms=VOCAB, what="gradients")
