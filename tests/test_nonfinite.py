"""The NaN guard: an update with a NaN/inf loss or gradient norm is skipped without touching the
weights, repeated skips stop the run with one line, and no final/ of NaN weights is written."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import spread_reward
from mlx.utils import tree_flatten
from test_train import LEARN

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.engine.loop import training_pass, update
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.engine.loss import grpo
from mlxgrpo.errors import TrainingDivergedError


class Messages(Callback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_message(self, message: str) -> None:
        self.lines.append(message)


def _run(tmp_path, *sets, callbacks=()):
    # A reward with a spread from the start: every normal update moves the LoRA weights.
    sets = (*LEARN, spread_reward(tmp_path), *sets)
    resolved = resolve_config(
        (), [*sets, f"run.output_dir={tmp_path}", "run.run_name=run"], environ={}
    )
    return train(resolved, callbacks)


def _train_metrics(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"train"' in line]


def _snapshot(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_nonfinite_updates_are_skipped_and_three_in_a_row_stop_the_run(tmp_path, monkeypatch):
    poisoned = {2, 4, 5, 6}  # 1-based updates whose loss is NaN
    state = {"update": 0}
    before_after: list[tuple[dict, dict, int, int]] = []
    real_loss, real_train_step = grpo.policy_loss, update.train_step

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * mx.nan if state["update"] in poisoned else loss), metrics

    def recording_train_step(ctx, *args, **kwargs):
        state["update"] += 1
        weights, steps = _snapshot(ctx.model), int(ctx.optimizer.state["step"])
        result = real_train_step(ctx, *args, **kwargs)
        after = int(ctx.optimizer.state["step"])
        before_after.append((weights, _snapshot(ctx.model), steps, after))
        return result

    monkeypatch.setattr(grpo, "policy_loss", nan_loss)
    monkeypatch.setattr(update, "train_step", recording_train_step)
    messages = Messages()
    with pytest.raises(TrainingDivergedError) as info:
        _run(tmp_path, "run.max_steps=10", callbacks=[messages])

    text = str(info.value)
    assert "training diverged: the last 3 updates (to update 6)" in text and "\n" not in text
    assert info.value.exit_code == 1
    metrics = _train_metrics(tmp_path)
    assert [m["nonfinite_skipped"] for m in metrics] == [0, 1, 0, 1, 1, 1]
    for number, (before, after, steps, steps_after) in enumerate(before_after, start=1):
        moved = any(not np.array_equal(before[k], after[k]) for k in before)
        assert moved == (number not in poisoned), number
        # A skipped step does not reach the optimizer: its moments and step count stay put.
        assert steps_after == steps + (number not in poisoned), number
    assert any("update 2 skipped: loss nan" in m and "unchanged" in m for m in messages.lines)
    assert not (tmp_path / "run" / "final").exists()


def test_a_skip_followed_by_good_updates_finishes(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = grpo.policy_loss

    def nan_on_second_microbatch(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * mx.inf if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(grpo, "policy_loss", nan_on_second_microbatch)
    summary = _run(tmp_path, "run.max_steps=3")
    assert [m["nonfinite_skipped"] for m in _train_metrics(tmp_path)] == [1, 0, 0]
    assert summary["updates"] == 3 and (tmp_path / "run" / "final").is_dir()


def test_huge_learning_rate_stops_with_one_line_and_no_final(cli, tmp_path):
    args = ["train", "--max-steps", "8", "-o", tmp_path]
    for item in [*LEARN, spread_reward(tmp_path), "run.run_name=run", "optim.learning_rate=1e30"]:
        args += ["--set", item]
    code, out, err = cli(*args)
    flat = " ".join(err.split())
    assert code == 1, err
    assert "error: training diverged" in flat and "lower optim.learning_rate" in flat
    assert "finished" not in flat and "Traceback" not in err + out
    assert not (tmp_path / "run" / "final").exists()
    assert [m["nonfinite_skipped"] for m in _train_metrics(tmp_path)][-3:] == [1, 1, 1]


def test_final_save_refuses_nonfinite_weights(tmp_path, monkeypatch):
    """The last line of defence, whatever put the NaN there."""
    real_step = training_pass.step

    def step_then_poison(ctx, grads, loss):
        result = real_step(ctx, grads, loss)
        name, value = tree_flatten(ctx.model.trainable_parameters())[0]
        ctx.model.update(_nested(name, value * mx.nan))
        return result

    monkeypatch.setattr(training_pass, "step", step_then_poison)
    with pytest.raises(TrainingDivergedError, match="refusing to write final/"):
        _run(tmp_path, "run.max_steps=1")
    assert not (tmp_path / "run" / "final").exists()


def test_a_step_that_overflows_the_weights_stops_at_once(tmp_path, monkeypatch):
    import mlx.optimizers as optim

    real_update = optim.Optimizer.update

    def overflowing_update(self, model, grads):
        real_update(self, model, grads)
        name, value = tree_flatten(model.trainable_parameters())[0]
        model.update(_nested(name, value + mx.inf))

    monkeypatch.setattr(optim.Optimizer, "update", overflowing_update)
    with pytest.raises(TrainingDivergedError, match="optimizer step turned the trainable weights"):
        _run(tmp_path, "run.max_steps=3")
    assert not (tmp_path / "run" / "final").exists()


def _nested(dotted: str, value) -> dict:
    """{"a": {"b": [.., {"c": value}]}}-style tree for Module.update from a flat key."""
    from mlx.utils import tree_unflatten

    return tree_unflatten([(dotted, value)])
