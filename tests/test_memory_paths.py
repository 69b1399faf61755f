"""The memory-saving paths change no result: activation checkpointing per block, the chunked LM
head that recomputes its chunks, completion-only positions, and token-budget micro-batches."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from random_models import add_random_adapters, random_lm
from tolerance import assert_close

from mlxgrpo.engine.loop.microbatch import pack_by_tokens, plan_microbatches, split_evenly
from mlxgrpo.engine.loss import grpo
from mlxgrpo.engine.memory.lm_head import head_chunk_positions, sequence_logprobs
from mlxgrpo.engine.memory.recompute import checkpointed_blocks
from mlxgrpo.generation.logprobs import completion_slice

VOCAB = 48
START = 4
TERMS = 64  # the longest sum in random_lm's models: the MLP's 2 x hidden 32 (vocabulary 48)


def _model(kind: str, tied: bool = True, dropout: float = 0.0) -> nn.Module:
    model = random_lm("qwen2", seed=3, tied=tied, vocab=VOCAB)
    if kind == "full":
        model.unfreeze()
    else:
        add_random_adapters(model, seed=5, b_std=0.1, kind=kind, dropout=dropout)
    mx.eval(model.parameters())
    return model


def _batch() -> tuple[mx.array, mx.array]:
    """3 rows of 12 tokens; completions of 8, 5 and 3 tokens after a 4-token prompt."""
    tokens = mx.random.randint(0, VOCAB, (3, 12), key=mx.random.key(11))
    mask = np.zeros((3, 12), dtype=np.float32)
    for row, length in enumerate((8, 5, 3)):
        mask[row, START : START + length] = 1.0
    return tokens, mx.array(mask)


def _loss_and_grad(model, tokens, loss_mask, *, blocks: bool, **options):
    """A loss touching log-probs and entropies of masked positions, and its gradient."""
    weights = mx.random.normal(loss_mask[:, START:].shape, key=mx.random.key(2))

    def loss():
        logp, entropy = sequence_logprobs(model, tokens, START, with_entropy=True, **options)
        kept = loss_mask[:, START:] * weights
        return mx.sum(logp * kept) + 0.3 * mx.sum(entropy * kept)

    with checkpointed_blocks(model) if blocks else contextlib.nullcontext():
        value, grads = nn.value_and_grad(model, loss)()
    mx.eval(value, grads)
    return value.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize(
    ("kind", "tied", "entropy_grad"),
    [
        ("lora", True, False),  # frozen head: d logp / d features prepared in the forward pass
        ("lora", True, True),  # differentiated entropy: chunks recomputed in the backward pass
        ("dora", True, False),
        ("full", True, False),  # trainable head (tied embedding): recomputed chunks
        ("full", False, True),
    ],
)
def test_checkpointing_and_chunked_head_give_the_same_gradient(
    kind: str, tied: bool, entropy_grad: bool
) -> None:
    model = _model(kind, tied)
    tokens, mask = _batch()
    plain_value, plain = _loss_and_grad(
        model, tokens, mask, blocks=False, entropy_grad=entropy_grad
    )
    # Chunks of 3 positions: 16 masked positions -> 6 chunks, one in memory at a time.
    value, grads = _loss_and_grad(
        model, tokens, mask, blocks=True, chunk_size=3, mask=mask, entropy_grad=entropy_grad
    )
    assert_close(value, plain_value, terms=TERMS, what="loss")
    assert grads.keys() == plain.keys() and grads
    # The plain path runs the head's matmul over every position, the chunked one over 3 at a
    # time, so logits differ in their last bit; a LoRA A gradient sums thousands of such terms
    # (measured up to 1.7e-6 of its largest entry).
    for name, grad in plain.items():
        assert_close(grads[name], grad, terms=TERMS, what=name)
    if kind == "full":  # the head (tied embedding or lm_head) gets its gradient through chunks
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        assert float(mx.abs(grads[head]).max().item()) > 0


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_chunked_mlp_gives_the_same_gradient(kind: str, monkeypatch) -> None:
    """A budget so small that every block's MLP runs in chunks of 5 tokens."""
    from mlxgrpo.engine.memory import recompute

    model = _model(kind)
    mlp = model.layers[0].mlp
    width = max(m.weight.shape[0] for _, m in mlp.named_modules() if hasattr(m, "weight"))
    monkeypatch.setattr(recompute, "MLP_BUDGET_BYTES", 5 * 8 * 4 * width)
    assert recompute.mlp_chunk_tokens(mlp) == 5
    tokens, mask = _batch()
    plain_value, plain = _loss_and_grad(model, tokens, mask, blocks=False)
    value, grads = _loss_and_grad(model, tokens, mask, blocks=True, mask=mask)
    assert_close(value, plain_value, terms=TERMS, what="loss")
    # Chunks of 5 rows run other matmul kernels than 36 rows: equal up to float32 rounding.
    for name, grad in plain.items():
        assert_close(grads[name], grad, terms=TERMS, what=name)
    assert all(type(layer.mlp).__name__ == "MLP" for layer in model.layers)  # restored


def test_masked_positions_only_and_zero_elsewhere() -> None:
    model = _model("lora")
    tokens, mask = _batch()
    full_logp, full_entropy = sequence_logprobs(model, tokens, START, with_entropy=True)
    logp, entropy = sequence_logprobs(
        model, tokens, START, with_entropy=True, mask=mask, chunk_size=2
    )
    kept = np.array(mask[:, START:]) > 0
    assert_close(np.array(logp)[kept], np.array(full_logp)[kept], terms=TERMS, what="log-probs")
    assert_close(np.array(entropy)[kept], np.array(full_entropy)[kept], terms=TERMS)
    assert np.all(np.array(logp)[~kept] == 0) and np.all(np.array(entropy)[~kept] == 0)


def test_blocks_are_plain_again_after_the_context() -> None:
    model = _model("lora")
    before = [type(block) for block in model.layers]
    with checkpointed_blocks(model) as count:
        assert count == 2
        assert all(type(b).__name__.startswith("Checkpointed") for b in model.layers)
    assert [type(block) for block in model.layers] == before
    with checkpointed_blocks(model, enabled=False) as count:
        assert count == 0 and [type(b) for b in model.layers] == before


def test_checkpointing_draws_no_random_numbers_without_dropout() -> None:
    """Sampling after an update must not depend on whether checkpointing was on."""
    model = _model("lora")
    tokens, mask = _batch()
    draws = []
    for blocks in (False, True):
        mx.random.seed(9)
        _loss_and_grad(model, tokens, mask, blocks=blocks)
        draws.append(mx.random.uniform(shape=(4,)).tolist())
    assert draws[0] == draws[1]


def test_dropout_masks_are_the_same_when_recomputed() -> None:
    """With LoRA dropout the checkpointed gradient is the gradient of the loss it reports:
    a central difference along it (same seed, so the same masks) equals its squared norm."""
    model = _model("lora", dropout=0.3)
    tokens, mask = _batch()
    params = tree_flatten(model.trainable_parameters())

    def value_at(step: float) -> float:
        model.update(tree_unflatten([(k, v + step * unit[k]) for k, v in params]))
        mx.random.seed(4)
        with checkpointed_blocks(model):
            logp = sequence_logprobs(model, tokens, START, mask=mask)
        return float(mx.sum(logp).item())

    def loss():
        return mx.sum(sequence_logprobs(model, tokens, START, mask=mask))

    mx.random.seed(4)
    with checkpointed_blocks(model):
        _, grads = nn.value_and_grad(model, loss)()
    grads = dict(tree_flatten(grads))
    norm = sum(float(mx.sum(g * g).item()) for g in grads.values()) ** 0.5
    unit = {k: g / norm for k, g in grads.items()}
    eps = 1e-3
    slope = (value_at(eps) - value_at(-eps)) / (2 * eps)
    model.update(tree_unflatten(params))
    assert slope == pytest.approx(norm, rel=2e-2)


def test_chunked_head_needs_less_memory() -> None:
    """Peak memory of one loss+grad: chunks that recompute keep one chunk of logits, not all."""
    model = random_lm("qwen2", seed=0, hidden=32, vocab=8192)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, 8192, (8, 160), key=mx.random.key(0))
    mask = mx.concatenate([mx.zeros((8, 32)), mx.ones((8, 128))], axis=1)

    def peak(**options) -> int:
        def loss():
            return mx.sum(sequence_logprobs(model, tokens, 32, with_entropy=True, **options)[0])

        mx.clear_cache()
        mx.reset_peak_memory()
        value, grads = nn.value_and_grad(model, loss)()
        mx.eval(value, grads)
        return mx.get_peak_memory()

    whole = peak(chunk_size=8 * 128, mask=mask)  # one chunk: every logit kept for backward
    logits_bytes = 8 * 128 * 8192 * 4
    for entropy_grad in (True, False):  # recomputing chunks, gradient in the forward pass
        chunked = peak(chunk_size=64, mask=mask, entropy_grad=entropy_grad)
        assert whole - chunked > 2 * logits_bytes  # several logit-sized buffers fewer


def test_automatic_chunk_size() -> None:
    assert head_chunk_positions(151_936) == 69  # Qwen2.5's vocabulary: ~320 MB per chunk
    assert head_chunk_positions(16_384) == 640
    assert head_chunk_positions(151_936, budget_bytes=1) == 1


def test_split_evenly_is_contiguous_and_balanced() -> None:
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([4, 9], 5) == [[4], [9]]


def test_pack_by_tokens_respects_the_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(20, 200, 40)]
    keep = [i for i in range(40) if i % 7]  # some filtered out
    chunks = pack_by_tokens(keep, lengths, 600)
    assert sorted(i for c in chunks for i in c) == keep
    for chunk in chunks:
        assert len(chunk) * max(lengths[i] for i in chunk) <= 600
    # Sorted by length: each micro-batch's sequences are no longer than the next one's.
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert max(lengths[i] for i in a) <= min(lengths[i] for i in b)
    assert pack_by_tokens([0, 1], [900, 10], 600) == [[1], [0]]  # too long: a row of its own
    assert plan_microbatches(keep, lengths, parts=3, max_tokens=0) == split_evenly(keep, 3)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_token_packed_accumulation_equals_one_batch(loss_type: str) -> None:
    """Loss and gradient summed over packed micro-batches equal the one-batch values."""
    from mlxgrpo.generation.rollout import build_micro_batch

    model = _model("lora")
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, VOCAB, n)] for n in (3, 5, 4, 6, 3, 5)]
    completions = [[int(t) for t in rng.integers(0, VOCAB, n)] for n in (2, 7, 4, 1, 6, 3)]
    advantages = [0.5, -1.0, 1.5, -0.2, 0.8, -1.6]
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]

    def accumulate(chunks):
        batches = [
            build_micro_batch([prompts[i] for i in c], [completions[i] for i in c]) for c in chunks
        ]
        norm = grpo.LossNorm.for_update([b.completion_mask for b in batches], 8)
        total, grads = 0.0, None
        for chunk, batch in zip(chunks, batches, strict=True):
            adv = mx.array([advantages[i] for i in chunk])

            def loss(batch=batch, adv=adv):
                logp = sequence_logprobs(
                    model, batch.tokens, batch.start, mask=batch.completion_mask, chunk_size=2
                )
                mask = completion_slice(batch.completion_mask, batch.start)
                return grpo.policy_loss(logp, None, adv, mask, norm=norm, loss_type=loss_type)[0]

            with checkpointed_blocks(model):
                value, g = nn.value_and_grad(model, loss)()
            total += value.item()
            g = dict(tree_flatten(g))
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        return total, grads

    whole_value, whole = accumulate([list(range(6))])
    chunks = pack_by_tokens(range(6), lengths, 24)
    assert len(chunks) > 1
    value, grads = accumulate(chunks)
    # Other padding widths reorder float32 sums in attention: equal to float32 rounding.
    # On policy, the loss sums -A over the completion tokens, and the advantages cancel to ~0:
    # their magnitude, not the loss's, sets the scale.
    tokens, largest = sum(map(len, completions)), max(map(abs, advantages))
    assert_close(value, whole_value, terms=tokens, scale=largest, what="loss")
    for name, grad in whole.items():
        assert_close(grads[name], grad, terms=TERMS, what=name)
