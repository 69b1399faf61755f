"""A loss that weighs every completion log-prob and entropy differently, for tests that compare
two ways of computing the same log-probs (values and gradients)."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.engine.memory.recompute import checkpointed_blocks


def weighted_loss_and_grad(model: nn.Module, batch, *, blocks: bool, **options):
    """``(value, logp, entropy, gradients by name)`` of sum(w * logp) + 0.3 sum(w * entropy)
    over the completion positions, w fixed random weights; ``options`` go to
    :func:`sequence_logprobs`, ``blocks`` checkpoints the transformer blocks."""
    width = batch.tokens.shape[1] - batch.start
    weights = mx.random.normal((batch.tokens.shape[0], width), key=mx.random.key(2))
    kept = batch.completion_mask[:, batch.start :] * weights

    def loss():
        logp, entropy = sequence_logprobs(
            model,
            batch.tokens,
            batch.start,
            with_entropy=True,
            mask=batch.completion_mask,
            **options,
        )
        return mx.sum(logp * kept) + 0.3 * mx.sum(entropy * kept), (logp, entropy)

    with checkpointed_blocks(model) if blocks else contextlib.nullcontext():
        (value, (logp, entropy)), grads = nn.value_and_grad(model, loss)()
    mx.eval(value, logp, entropy, grads)
    return value.item(), logp, entropy, dict(tree_flatten(grads))


def whole_model_loss_and_grad(model: nn.Module, batch):
    """The loss of :func:`weighted_loss_and_grad` from the whole model's logits and the
    textbook log-softmax, with no engine path at all: ``(value, {name: gradient})``."""
    start = batch.start
    width = batch.tokens.shape[1] - start
    weights = mx.random.normal((batch.tokens.shape[0], width), key=mx.random.key(2))
    kept = batch.completion_mask[:, start:] * weights
    targets = batch.tokens[:, start:]

    def loss():
        logits = model(batch.tokens[:, :-1])[:, start - 1 :].astype(mx.float32)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        logp = mx.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        entropy = -mx.sum(mx.exp(log_probs) * log_probs, axis=-1)
        return mx.sum(logp * kept) + 0.3 * mx.sum(entropy * kept)

    value, grads = nn.value_and_grad(model, loss)()
    mx.eval(value, grads)
    return value.item(), dict(tree_flatten(grads))


def shared_prompt_batch(vocab: int):
    """A micro-batch of two groups of completions sharing a prompt (9 and 6 tokens) and a
    lone prompt, ids below ``vocab``."""
    from mlxgrpo.generation.rollout import build_micro_batch

    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (9, 6, 4)]
    rows = [0, 0, 1, 1, 1, 2]
    completions = [rng.integers(0, vocab, n).tolist() for n in (7, 3, 8, 1, 6, 2)]
    return build_micro_batch([prompts[r] for r in rows], completions)


def whole_model_logprobs(model: nn.Module, batch) -> np.ndarray:
    """The definition: the whole model's logits, float64 log-softmax, at the completion
    positions [N, T - start]."""
    logits = np.array(model(batch.tokens[:, :-1]).astype(mx.float32)).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = np.array(batch.tokens)[:, 1:]
    return np.take_along_axis(log_probs, targets[..., None], -1)[..., 0][:, batch.start - 1 :]


def assert_whole_model_logprobs(model: nn.Module, batch, *, terms: int) -> None:
    """The engine's log-probs (head in chunks of 3) equal :func:`whole_model_logprobs` at
    every completion position."""
    from tolerance import assert_close

    want = whole_model_logprobs(model, batch)
    mask = np.array(batch.completion_mask)[:, batch.start :]
    logp = sequence_logprobs(
        model, batch.tokens, batch.start, mask=batch.completion_mask,
        prompt_lengths=batch.prompt_lengths, chunk_size=3,
    )  # fmt: skip
    assert_close(np.array(logp) * mask, want * mask, terms=terms, what="log-probs")


def assert_whole_model_gradients(model: nn.Module, batch, *, terms: int) -> None:
    """Every engine path (split head in chunks of 3, shared prompt pass where it applies,
    checkpointed blocks) gives :func:`whole_model_loss_and_grad`'s value and gradients."""
    from tolerance import assert_close

    value, _, _, grads = weighted_loss_and_grad(
        model, batch, blocks=True, prompt_lengths=batch.prompt_lengths, chunk_size=3
    )
    want_value, want_grads = whole_model_loss_and_grad(model, batch)
    assert_close(value, want_value, terms=terms, scale=abs(want_value) + 1, what="value")
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in want_grads.items():
        assert_close(grads[name], grad, terms=terms, what=name)


def bare_context(model: nn.Module, sets: list[str], optimizer=None):
    """An UpdateContext of ``model`` under the config ``--set`` items ``sets``, without a task:
    no reward set, pad id 0, and SGD at learning rate 1 (a step is minus the gradient) unless
    another ``optimizer`` is given."""
    import types

    import mlx.optimizers as optim

    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.loop.context import UpdateContext

    cfg = resolve_config((), sets, environ={}).config
    return UpdateContext.from_config(
        model,
        cfg,
        reward_set=None,
        optimizer=optimizer if optimizer is not None else optim.SGD(learning_rate=1.0),
        codec=types.SimpleNamespace(pad_id=0),
    )
