"""Schedules, checkpoints and the public API, checked against hand-computed values."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

import mlxgrpo
from mlxgrpo.engine.io import checkpoint
from mlxgrpo.engine.loop.schedule import learning_rate_at
from mlxgrpo.engine.loop.trainer import run_directory, update_seed


def lr(update, kind, total=10, warmup=0.2, peak=1.0):
    return learning_rate_at(update, peak=peak, total_updates=total, warmup_ratio=warmup, kind=kind)


def test_warmup_then_decay_by_hand():
    # 10 updates, 2 of warm-up: 0.5, 1.0, then decay over the remaining 8.
    assert [lr(u, "constant") for u in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr(2, "linear") == 1.0 and lr(6, "linear") == pytest.approx(1 - 4 / 8)
    assert lr(6, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr(9, "linear") == pytest.approx(1 / 8)  # the last update still learns


def test_short_runs_leave_warmup():
    # The original derived warm-up from the data set size; here it follows the run's updates.
    assert lr(3, "cosine", total=4, warmup=0.1) < 1.0
    assert [lr(u, "constant", total=3, warmup=0.0) for u in range(3)] == [1.0, 1.0, 1.0]


def test_update_seed_is_deterministic_and_distinct():
    assert update_seed(0, 5) == update_seed(0, 5)
    assert len({update_seed(s, u) for s in range(3) for u in range(50)}) == 150


def test_fresh_run_directory_gets_a_suffix(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "metrics.jsonl").write_text("{}\n")
    assert run_directory(str(tmp_path), "demo", "never").name == "demo-2"
    assert run_directory(str(tmp_path), "demo", "auto").name == "demo"


def test_checkpoint_round_trip_and_incomplete_ones_are_ignored(tmp_path):
    model = nn.Linear(3, 2)
    opt = optim.AdamW(learning_rate=0.1)
    grads = {"weight": mx.ones((2, 3)), "bias": mx.ones((2,))}
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    path = checkpoint.save_checkpoint(
        tmp_path,
        7,
        model,
        opt,
        {"data": {"index": 3}},
        finetune_type="full",
        adapter_cfg=None,
        keep_last=2,
    )
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # crashed mid-write: no state file
    assert checkpoint.latest_checkpoint(tmp_path) == path
    fresh, fresh_opt = nn.Linear(3, 2), optim.AdamW(learning_rate=0.1)
    state = checkpoint.load_checkpoint(path, fresh, fresh_opt, "full")
    assert state["update"] == 7 and state["data"] == {"index": 3}
    assert mx.array_equal(fresh.weight, model.weight).item()
    assert mx.array_equal(fresh_opt.state["weight"]["m"], opt.state["weight"]["m"]).item()
    for update in (8, 10):
        checkpoint.save_checkpoint(
            tmp_path, update, model, opt, {}, finetune_type="full", adapter_cfg=None, keep_last=2
        )
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-000008", "step-000010"]
    assert (
        json.loads((tmp_path / "checkpoints" / "step-000010" / "trainer_state.json").read_text())[
            "update"
        ]
        == 10
    )


def test_public_api_is_lazy():
    assert callable(mlxgrpo.resolve_config) and callable(mlxgrpo.train)
    with pytest.raises(AttributeError):
        mlxgrpo.nope  # noqa: B018


def test_truncated_completions_leave_the_update_when_masked():
    from types import SimpleNamespace

    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.loop import update

    rewards = [1.0, 0.0, 1.0, 0.0]  # two groups of G = 2
    rollout = SimpleNamespace(truncated=[False, True, True, False])
    sets = ("rollout.num_generations=2", "algorithm.mask_truncated_completions=true")
    masked = resolve_config((), sets, {}).config
    adv, keep = update.advantages_and_keep(rewards, rollout.truncated, masked.algorithm, 2)
    assert keep == [0, 3]  # out of the loss and of its normalisers, not just zero-weighted
    assert adv[1] == adv[2] == 0.0 and adv[0] == -adv[3] > 0
    plain = resolve_config((), sets[:1], {}).config
    adv, keep = update.advantages_and_keep(rewards, rollout.truncated, plain.algorithm, 2)
    assert keep == [0, 1, 2, 3] and adv[1] == -adv[0] != 0
