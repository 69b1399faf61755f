"""The training pass replays the rollout's block outputs instead of running its forward pass:
same log-probs, entropies and gradients as computing them, through take_groups, joins and
several iterations; and it is used only where it is valid."""

from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from loss_checks import weighted_loss_and_grad
from mlx.utils import tree_flatten
from random_models import add_random_adapters, random_lm
from tolerance import assert_close

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.training_pass import learn
from mlxgrpo.engine.memory.replay import replay_applies
from mlxgrpo.generation.recording import RecordedActivations
from mlxgrpo.generation.rollout import SamplingConfig, generate_groups, join_rollouts

VOCAB = 48
TERMS = 64  # the longest sum in random_lm's models: the MLP's 2 x hidden 32 (vocabulary 48)
EOS = {0, 1, 2}  # frequent enough that rows stop early and get dropped from the decode batch


def _model(kind: str = "lora", seed: int = 7) -> nn.Module:
    model = random_lm("qwen2", seed=seed, vocab=VOCAB)
    if kind == "full":
        model.unfreeze()
    else:
        add_random_adapters(model, seed=9, b_std=0.1, kind=kind)
    mx.eval(model.parameters())
    return model


def _rollout(model: nn.Module, prompts, new_tokens: int = 9, seed: int = 3, record: bool = True):
    return generate_groups(
        model,
        prompts,
        num_generations=3,
        max_new_tokens=new_tokens,
        sampling=SamplingConfig(temperature=1.0),
        eos_token_ids=EOS,
        seed=seed,
        sync_every=2,
        record_activations=record,
    )


def _prompts(*lengths: int, seed: int = 4) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def _loss_and_grad(model: nn.Module, batch, known):
    value, logp, _, grads = weighted_loss_and_grad(
        model,
        batch,
        blocks=True,
        prompt_lengths=batch.prompt_lengths,
        temperature=0.8,
        known=known,
    )
    return value, logp, grads


def _assert_same(model, batch, known) -> None:
    value, logp, plain = _loss_and_grad(model, batch, None)
    replayed_value, replayed_logp, grads = _loss_and_grad(model, batch, known)
    mask = batch.completion_mask[:, batch.start :]
    assert_close(replayed_logp * mask, logp * mask, terms=TERMS, what="log-probs")
    # The loss weighs the log-probs with random signs, so it may cancel to less than they are.
    scale = max(abs(value), float(mx.abs(logp * mask).max()))
    assert_close(replayed_value, value, terms=TERMS, scale=scale, what="loss")
    assert grads.keys() == plain.keys() and grads
    for name, grad in plain.items():
        assert_close(grads[name], grad, terms=TERMS, what=name)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_replayed_outputs_give_the_computed_log_probs_and_gradients(kind: str) -> None:
    model = _model(kind)
    rollout = _rollout(model, _prompts(9, 6))
    lengths = sorted({len(c) for c in rollout.completion_ids})
    assert len(lengths) > 1 and lengths[0] < 9  # some rows stopped early (and were dropped)
    rows = [4, 0, 2, 5, 3]  # any subset, in any order
    batch = rollout.training_batch(rows)
    assert rollout.activations is not None
    _assert_same(model, batch, rollout.activations.take_rows(rows))


def test_the_forward_pass_really_comes_from_the_records() -> None:
    """Negative control: records that are a little off move the log-probs and the gradients
    (noise, not a scale: the final norm would undo a scale)."""
    model = _model()
    rollout = _rollout(model, _prompts(9, 6))
    rows = list(range(6))
    batch = rollout.training_batch(rows)
    records = rollout.activations
    assert records is not None
    # Rows that stopped were dropped from the decode batch: fewer records than rows x steps,
    # so the test above covers positions recorded before and after a compaction.
    assert records.flat[0].shape[0] - 1 < records.index.size
    noise = [
        0.05 * mx.random.normal(f.shape, key=mx.random.key(b)) for b, f in enumerate(records.flat)
    ]
    off = RecordedActivations(
        [f + n for f, n in zip(records.flat, noise, strict=True)], records.index
    )
    _, logp, plain = _loss_and_grad(model, batch, None)
    _, off_logp, off_grads = _loss_and_grad(model, batch, off.take_rows(rows))
    mask = batch.completion_mask[:, batch.start :]
    assert float(mx.abs((off_logp - logp) * mask).max()) > 1e-3
    moved = max(float(mx.abs(off_grads[n] - g).max()) for n, g in plain.items())
    assert moved > 1e-3


def test_records_follow_take_groups_and_joins() -> None:
    model = _model()
    first = _rollout(model, _prompts(9, 6, 5), new_tokens=9)
    second = _rollout(model, _prompts(7, seed=8), new_tokens=5, seed=11)
    joined = join_rollouts([first.take_groups([2, 0]), second])
    assert joined.activations is not None
    assert joined.activations.index.shape == (9, 9)
    rows = [8, 0, 3, 6, 1]
    _assert_same(model, joined.training_batch(rows), joined.activations.take_rows(rows))
    unrecorded = _rollout(model, _prompts(5), record=False)
    assert unrecorded.activations is None
    assert join_rollouts([first, unrecorded]).activations is None


def _context(model: nn.Module, *sets: str) -> UpdateContext:
    cfg = resolve_config(
        (), ["algorithm.kl_coeff=0.1", "rollout.temperature=1.0", *sets], environ={}
    ).config
    codec = types.SimpleNamespace(pad_id=0)
    return UpdateContext.from_config(
        model,
        cfg,
        reward_set=None,
        optimizer=optim.Adam(1e-2),
        codec=codec,
    )


@pytest.mark.parametrize("iterations", [1, 2])
def test_training_with_replay_takes_the_same_steps(iterations: int) -> None:
    """The whole training pass, with the reference pass and (for 2 iterations) a second pass
    that must compute its forward pass, since the first step changed the weights."""
    sets = (f"algorithm.num_iterations={iterations}",)
    replaying, computing = _model(), _model()
    ctx = _context(replaying, *sets)
    plain_ctx = _context(computing, *sets, "finetune.reuse_rollout_activations=false")
    assert ctx.replays_rollout and not plain_ctx.replays_rollout
    rollout = _rollout(replaying, _prompts(9, 6), record=ctx.replays_rollout)
    assert rollout.activations is not None
    advantages = [0.9, -0.4, -0.5, 1.2, 0.1, -1.3]
    keep = [0, 1, 2, 3, 5]
    metrics, _ = learn(ctx, rollout, advantages, keep)
    assert rollout.activations is None  # consumed by the training pass
    plain_rollout = _rollout(computing, _prompts(9, 6), record=False)
    assert plain_rollout.completion_ids == rollout.completion_ids
    plain_metrics, _ = learn(plain_ctx, plain_rollout, advantages, keep)
    # The advantages cancel in the loss (they sum to -0.1): their magnitude sets its scale.
    largest = max(map(abs, advantages))
    loss, plain_loss = metrics["policy_loss"], plain_metrics["policy_loss"]
    assert_close(loss, plain_loss, terms=TERMS, scale=largest, what="loss")
    after = dict(tree_flatten(replaying.trainable_parameters()))
    plain_after = dict(tree_flatten(computing.trainable_parameters()))
    for name, value in plain_after.items():
        assert float(mx.abs(after[name] - value).max()) <= 1e-4, name


def test_replay_is_used_only_where_it_is_valid() -> None:
    assert _context(_model()).replays_rollout
    assert not _context(_model(), "finetune.grad_checkpoint=false").replays_rollout
    assert not _context(_model(), "finetune.reuse_rollout_activations=false").replays_rollout
    dropout = random_lm("qwen2", seed=7, vocab=VOCAB)
    add_random_adapters(dropout, seed=9, dropout=0.1)
    dropout.eval()  # dropout counts whatever the mode at the time of the check
    assert not replay_applies(dropout, _context(_model()).finetune)
    assert not replay_applies(_model(), _context(_model()).finetune, tools=object())
    from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE

    no_shared_layout = _model()
    no_shared_layout.model.layers[1].self_attn.rope = DynamicNTKScalingRoPE(8, 64, False, 1e4, 2.0)
    assert not replay_applies(no_shared_layout, _context(_model()).finetune)


def test_a_mismatched_record_is_an_error_not_a_silent_result() -> None:
    model = _model()
    rollout = _rollout(model, _prompts(9, 6))
    assert rollout.activations is not None
    records = rollout.activations.take_rows([0, 1])
    batch = rollout.training_batch([0, 1, 2])  # three rows, records of two
    with pytest.raises(ValueError, match="replayed block output"):
        _loss_and_grad(model, batch, records)


def test_a_call_the_recorder_does_not_understand_drops_the_whole_rollout() -> None:
    """Positions are numbered by armed calls: after a call it could not record, keeping the
    later ones would shift every position, so nothing is kept."""
    from mlxgrpo.generation.recording import ActivationRecorder

    recorder = ActivationRecorder(num_blocks=2)
    step = mx.zeros((2, 1, 4))
    recorder.arm([[0], [1]])
    recorder._take(0, step)
    recorder._take(1, step)
    assert recorder.records(2) is not None  # one whole step: usable
    recorder = ActivationRecorder(num_blocks=2)
    recorder.arm([[0], [1]])
    recorder._take(0, mx.zeros((2, 3, 4)))  # three tokens per row: not a decode step
    for _ in range(2):
        recorder.arm([[0], [1]])
        recorder._take(0, step)
        recorder._take(1, step)
    assert recorder.records(2) is None


def test_replay_holds_with_sliding_windows() -> None:
    """Gemma 3's local layers see 4 tokens back: the rollout decodes them through rotating
    caches, the training pass through windowed masks, and the two must agree."""
    from test_architectures import _model as architecture_model

    from mlxgrpo.engine.memory import shared_prefix

    model = architecture_model("gemma3_text")
    assert shared_prefix.supports(model.model, model)  # else the records would go unused
    rollout = _rollout(model, _prompts(9, 6))
    assert rollout.activations is not None
    rows = [1, 5, 0, 3]
    _assert_same(model, rollout.training_batch(rows), rollout.activations.take_rows(rows))
