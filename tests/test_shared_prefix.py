"""Rows that share a prompt run it through the trunk once: same log-probs, entropies and
gradients as the plain pass, with and without activation checkpointing."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from loss_checks import weighted_loss_and_grad
from random_models import add_random_adapters, random_lm
from tolerance import assert_close

from mlxgrpo.engine.memory import shared_prefix
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.generation.rollout import build_micro_batch

VOCAB = 48
TERMS = 64  # the longest sum in random_lm's models: the MLP's 2 x hidden 32 (vocabulary 48)


def _model(kind: str) -> nn.Module:
    model = random_lm("qwen2", seed=7, vocab=VOCAB)
    if kind == "full":
        model.unfreeze()
    else:
        add_random_adapters(model, seed=9, b_std=0.1)
    mx.eval(model.parameters())
    return model


def _batch():
    """Two groups of 3 completions (prompts of 9 and 6 tokens) and a lone prompt of 4."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (9, 6, 4)]
    rows = [0, 0, 0, 1, 1, 1, 2]
    completions = [rng.integers(0, VOCAB, n).tolist() for n in (7, 3, 5, 8, 1, 6, 2)]
    return build_micro_batch([prompts[r] for r in rows], completions)


def _loss_and_grad(model, batch, *, shared: bool, blocks: bool):
    prompt_lengths = batch.prompt_lengths if shared else None
    return weighted_loss_and_grad(model, batch, blocks=blocks, prompt_lengths=prompt_lengths)


def test_the_plan_runs_each_prompt_once_and_maps_every_wanted_position() -> None:
    batch = _batch()
    tokens = np.asarray(batch.tokens)
    lengths = np.asarray(batch.prompt_lengths)
    wanted = np.asarray(batch.completion_mask) > 0
    layout = shared_prefix.plan(tokens, lengths, wanted)
    assert layout is not None
    assert layout.prefix_tokens.shape == (3, 8)  # three distinct prompts minus the last token
    assert layout.prompt_of_row.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert layout.suffix_tokens.shape == (7, 8)  # the longest completion
    assert layout.tokens_run == 3 * 8 + 7 * 8 < 7 * (tokens.shape[1] - 1)
    suffix = np.asarray(layout.suffix_tokens).reshape(-1)
    # Suffix input s predicts the token after it: the target of each wanted position is the
    # next suffix token (or the row's last completion token).
    r_idx, t_idx = np.nonzero(wanted)
    assert len(layout.source) == len(r_idx) == int(wanted.sum())
    for src, r, t in zip(layout.source, r_idx, t_idx, strict=True):
        assert suffix[src] == tokens[r, t - 1]


def test_no_plan_when_a_wanted_position_is_inside_a_prompt_or_nothing_is_shared() -> None:
    batch = _batch()
    tokens, lengths = np.asarray(batch.tokens), np.asarray(batch.prompt_lengths)
    wanted = np.asarray(batch.completion_mask) > 0
    inside = wanted.copy()
    inside[0, 3] = True
    assert shared_prefix.plan(tokens, lengths, inside) is None
    # One row per prompt: two passes would run as many tokens as one.
    assert shared_prefix.plan(tokens[[0, 3, 6]], lengths[[0, 3, 6]], wanted[[0, 3, 6]]) is None


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("blocks", [False, True])
def test_shared_prompts_give_the_same_results_and_gradients(
    kind: str, blocks: bool, monkeypatch
) -> None:
    runs = []
    model = _model(kind)
    assert shared_prefix.supports(model.model, model)  # checked once, before counting
    two_passes = shared_prefix.suffix_hidden
    monkeypatch.setattr(shared_prefix, "suffix_hidden", lambda *a: runs.append(1) or two_passes(*a))
    batch = _batch()
    value, logp, entropy, plain = _loss_and_grad(model, batch, shared=False, blocks=False)
    shared_value, shared_logp, shared_entropy, grads = _loss_and_grad(
        model, batch, shared=True, blocks=blocks
    )
    assert runs == [1]  # only the shared call took the two passes
    mask = batch.completion_mask[:, batch.start :]
    assert_close(shared_logp * mask, logp * mask, terms=TERMS, what="log-probs")
    assert_close(shared_entropy * mask, entropy * mask, terms=TERMS, what="entropies")
    assert float(mx.abs(shared_logp * (1 - mask)).max()) == 0.0  # zero outside completions
    # The loss weighs the log-probs with random signs, so it may cancel to less than they are.
    scale = max(abs(value), float(mx.abs(logp * mask).max()))
    assert_close(shared_value, value, terms=TERMS, scale=scale, what="loss")
    assert grads.keys() == plain.keys() and grads
    for name, grad in plain.items():
        assert_close(grads[name], grad, terms=TERMS, what=name)
    # (Dropping the gradient through the prompt's keys and values fails the check above.)


def test_a_model_with_a_position_dependent_rope_takes_the_plain_pass() -> None:
    assert shared_prefix.supports(_model("lora").model)
    from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE

    model = _model("lora")
    model.model.layers[1].self_attn.rope = DynamicNTKScalingRoPE(8, 64, False, 10000.0, 2.0)
    assert shared_prefix.blocker(model.model, model) is not None


@pytest.mark.parametrize("model_type", ["llama", "olmo2", "phi3"])
def test_other_architectures_give_the_same_log_probs(model_type: str) -> None:
    model = random_lm(model_type, seed=1, vocab=VOCAB)
    batch = _batch()
    options = dict(mask=batch.completion_mask)
    plain = sequence_logprobs(model, batch.tokens, batch.start, **options)
    shared = sequence_logprobs(
        model, batch.tokens, batch.start, prompt_lengths=batch.prompt_lengths, **options
    )
    assert_close(shared, plain, terms=TERMS)


def test_sliding_windows_must_be_asked_of_the_caches() -> None:
    """A window wider than the probe's prompt is trusted only because the model asks its
    caches for that window's mask; a model whose caches rotate but that never asks is refused."""
    from test_architectures import _model as architecture_model

    model = architecture_model("gemma3_text")  # window 4 on every other layer
    assert shared_prefix.blocker(model.model, model) is None
    unasked = architecture_model("gemma3_text")
    unasked.model.window_size = None  # its rotating caches keep 4, its masks are full
    assert "sliding windows" in shared_prefix.blocker(unasked.model, unasked)
