"""Several optimizer steps per rollout (optim.steps_per_generation): which groups each step
trains on, the rollout's policy as the old policy of the later steps, and a run that logs,
checkpoints, stops and resumes at whole generations."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import spread_reward
from loss_checks import bare_context
from random_models import add_random_adapters, random_lm
from test_train import LEARN
from tolerance import assert_close

from mlxgrpo.config import ConfigProblems, resolve_config
from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.microbatch import generation_shares
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.engine.loop.training_pass import learn, micro_batches, old_logprobs
from mlxgrpo.errors import ConfigError
from mlxgrpo.generation.logprobs import completion_slice
from mlxgrpo.generation.rollout import SamplingConfig, generate_groups

VOCAB = 48
GROUP = 3
TERMS = 64  # the longest sum in random_lm's models: the MLP's 2 x hidden 32


# --- which completions each step trains on ---------------------------------------------------


def test_groups_take_turns_over_the_steps():
    # Four groups of two; row 5 (group 2) was filtered out of the update.
    assert generation_shares([0, 1, 2, 3, 4, 6, 7], 2, 2) == [[0, 1, 4], [2, 3, 6, 7]]
    assert generation_shares([0, 1, 2], 3, 1) == [[0, 1, 2]]
    assert generation_shares([], 4, 3) == [[], [], []]
    with pytest.raises(ValueError):
        generation_shares([0], 2, 0)


def test_two_ranks_share_out_the_steps_as_one_process_does():
    """Each rank holds a contiguous half of the groups; every step gets the same groups as in
    one process, half from each rank."""
    group, steps = 2, 4
    one = generation_shares(list(range(16)), group, steps)
    rank0 = generation_shares(list(range(8)), group, steps, first_group=0)
    rank1 = generation_shares(list(range(8)), group, steps, first_group=4)
    for j in range(steps):
        assert len(rank0[j]) == len(rank1[j]) == 2
        assert sorted(rank0[j] + [8 + i for i in rank1[j]]) == one[j]


# --- the old policy of the later steps -------------------------------------------------------


def _model() -> nn.Module:
    model = random_lm("qwen2", seed=7, vocab=VOCAB)
    add_random_adapters(model, seed=9, b_std=0.1)
    mx.eval(model.parameters())
    return model


def _context(model: nn.Module, *sets: str) -> UpdateContext:
    return bare_context(model, ["rollout.temperature=1.0", *sets], optim.Adam(1e-2))


def _rollout(model: nn.Module, record: bool):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (9, 6, 7, 5)]
    return generate_groups(
        model,
        prompts,
        num_generations=GROUP,
        max_new_tokens=8,
        sampling=SamplingConfig(temperature=1.0),
        eos_token_ids={0, 1},
        seed=3,
        record_activations=record,
    )


def _plain_logprobs(ctx: UpdateContext, rollout, chunk: list[int]) -> tuple[mx.array, mx.array]:
    """A chunk's log-probs by one plain forward pass of the whole model, and its mask."""
    batch = rollout.training_batch(chunk, pad_id=0)
    logits = ctx.model(batch.tokens[:, :-1]).astype(mx.float32)
    logp = nn.log_softmax(logits, axis=-1)[:, batch.start - 1 :]
    picked = mx.take_along_axis(logp, batch.tokens[:, batch.start :, None], axis=-1)[..., 0]
    return picked, completion_slice(batch.completion_mask, batch.start)


@pytest.mark.parametrize("replay", [True, False])
def test_old_logprobs_are_the_policy_at_the_rollout(replay: bool):
    """Taken before the first step, from the rollout's recorded block outputs or by a forward
    pass: the log-probs of a plain pass of the same weights."""
    model = _model()
    sets = [] if replay else ["finetune.reuse_rollout_activations=false"]
    ctx = _context(model, "optim.gradient_accumulation_steps=2", *sets)
    assert ctx.replays_rollout == replay
    rollout = _rollout(model, record=ctx.replays_rollout)
    assert (rollout.activations is not None) == replay
    share = [3, 4, 5, 9, 10, 11]  # groups 1 and 3, as step 1 of 2 trains on
    olds = old_logprobs(ctx, rollout, share)
    chunks = micro_batches(ctx, rollout, share)
    assert len(olds) == len(chunks) == 2
    for old, chunk in zip(olds, chunks, strict=True):
        plain, mask = _plain_logprobs(ctx, rollout, chunk)
        assert_close(old * mask, plain * mask, terms=TERMS, what="old log-probs")
    if replay:
        assert rollout.activations is not None  # still there for the first step


def test_a_later_step_weighs_by_the_ratio_to_the_rollout_policy():
    """Step 0 moves the weights; step 1's mean ratio is then exp(new - old) over its tokens
    with old taken at the rollout, not 1 (what it would be with its own first pass)."""
    model = _model()
    ctx = _context(model, "optim.gradient_accumulation_steps=1", "optim.max_grad_norm=0")
    rollout = _rollout(model, record=ctx.replays_rollout)
    advantages = [0.9, -0.4, -0.5, 1.2, 0.1, -1.3, 0.6, -0.6, 0.0, 1.0, -1.0, 0.2]
    first, later = generation_shares(list(range(12)), GROUP, 2)
    olds = old_logprobs(ctx, rollout, later)
    before, mask = _plain_logprobs(ctx, rollout, later)
    learn(ctx, rollout, advantages, first)
    assert rollout.activations is None  # used up by the first step
    after, _ = _plain_logprobs(ctx, rollout, later)
    metrics, _ = learn(ctx, rollout, advantages, later, olds)
    # In float64, from the two plain passes' log-probs.
    gap = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    weights = np.asarray(mask, dtype=np.float64)
    expected = float((np.exp(gap) * weights).sum() / weights.sum())
    assert abs(expected - 1.0) > 1e-3  # the first step did move this share's log-probs
    assert_close(metrics["ratio"], expected, terms=TERMS, what="mean ratio")


def test_old_logprobs_must_match_the_micro_batches():
    model = _model()
    ctx = _context(model, "optim.gradient_accumulation_steps=2")
    rollout = _rollout(model, record=False)
    with pytest.raises(ValueError, match="1 old log-prob arrays for 2 micro-batches"):
        learn(ctx, rollout, [0.5] * 12, list(range(6)), [mx.zeros((3, 8))])


# --- a run ------------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.updates = 0

    def on_update(self, update: int, metrics: dict) -> None:
        self.updates = update

    def on_message(self, text: str) -> None:
        self.messages.append(text)


def _run(tmp_path, *sets, callbacks=(), should_stop=lambda: False, name="run"):
    resolved = resolve_config(
        (),
        [
            *LEARN,
            spread_reward(tmp_path),
            "logging.log_completions=true",
            f"run.output_dir={tmp_path}",
            f"run.run_name={name}",
            *sets,
        ],
        environ={},
    )
    return train(resolved, callbacks, should_stop=should_stop)


def _records(run_dir, name: str = "metrics.jsonl") -> list[dict]:
    lines = (run_dir / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_one_rollout_feeds_two_logged_updates(tmp_path):
    summary = _run(
        tmp_path,
        "optim.steps_per_generation=2",
        "run.max_steps=4",
        "checkpoint.save_steps=2",
        "optim.lr_scheduler_type=linear",
    )
    assert summary["updates"] == 4
    run_dir = tmp_path / "run"
    train_records = [r for r in _records(run_dir) if r["kind"] == "train"]
    assert [r["update"] for r in train_records] == [1, 2, 3, 4]
    assert [r["generation_step"] for r in train_records] == [0, 1, 0, 1]
    for a, b in (train_records[0:2], train_records[2:4]):
        # One rollout's figures, two optimizer steps at their own learning rates.
        assert a["reward_mean"] == b["reward_mean"] and a["rollout_seconds"] == b["rollout_seconds"]
        assert a["learning_rate"] > b["learning_rate"]
        assert a["ratio"] == pytest.approx(1.0, abs=1e-6) and abs(b["ratio"] - 1.0) > 1e-4
    completions = _records(run_dir, "completions.jsonl")
    # Each rollout: 2 steps x batch_size 4 prompts x G 8, logged with its first step.
    assert [r["update"] for r in completions] == [1] * 64 + [3] * 64
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]


def test_a_stop_inside_a_rollout_waits_for_its_last_step(tmp_path):
    seen = Recorder()
    summary = _run(
        tmp_path,
        "optim.steps_per_generation=3",
        "run.max_steps=6",
        callbacks=[seen],
        should_stop=lambda: seen.updates >= 1,
    )
    assert summary["interrupted"] and summary["updates"] == 3
    assert "stopping after this rollout's last 2 updates" in seen.messages
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()


def test_the_run_is_whole_generations(tmp_path):
    """Updates from the epochs round down to whole rollouts; a checkpoint inside a rollout
    cannot be resumed with it."""
    seen = Recorder()
    # 12 synthetic prompts / batch_size 4 = 3 updates per epoch -> 2 at two steps per rollout.
    summary = _run(
        tmp_path,
        "optim.steps_per_generation=2",
        "run.max_train_samples=12",
        "run.num_epochs=1",
        "checkpoint.save_steps=2",
        callbacks=[seen],
    )
    assert summary["total_updates"] == 2
    one = _run(tmp_path, "run.max_steps=1", "checkpoint.save_steps=1", name="one")
    assert one["updates"] == 1
    checkpoint = tmp_path / "one" / "checkpoints" / "step-000001"
    with pytest.raises(ConfigError, match="inside a rollout of optim.steps_per_generation = 2"):
        _run(tmp_path, "optim.steps_per_generation=2", f"run.resume={checkpoint}", name="one")


def test_settings_that_would_split_a_rollout_are_refused():
    cfg = ["optim.steps_per_generation=4", "checkpoint.save_steps=6", "run.max_steps=10"]
    with pytest.raises(ConfigProblems) as exc:
        resolve_config((), cfg, environ={})
    problems = exc.value.problems
    assert any(p.startswith("checkpoint.save_steps = 6 is not a multiple") for p in problems)
    assert any(p.startswith("run.max_steps = 10 is not a multiple") for p in problems)
    fine = ["optim.steps_per_generation=4", "checkpoint.save_steps=8", "run.max_steps=12"]
    assert resolve_config((), fine, environ={}).config.optim.steps_per_generation == 4
