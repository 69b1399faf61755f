"""DAPO's dynamic sampling: draw until the update holds enough informative groups."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlxgrpo.engine.loop import dynamic_sampling
from mlxgrpo.generation.rollout import Rollout
from mlxgrpo.rewards import RewardResult

G = 2


def _part(group_rewards: list[tuple[float, float]], tag: str) -> dynamic_sampling.ScoredRollout:
    """A fake scored rollout: one prompt per group, rewards as given."""
    rewards = [r for pair in group_rewards for r in pair]
    count = len(rewards)
    rollout = Rollout(
        prompt_ids=[[i] for i in range(len(group_rewards))],
        num_generations=G,
        prompt_index=[i // G for i in range(count)],
        completion_ids=[[i, i] for i in range(count)],
        truncated=[False] * count,
        finish_reason=["stop"] * count,
        completion_logprobs=[[-0.5, -0.25]] * count,
    )
    scored = RewardResult(["r"], [1.0], list(rewards), {"r": list(rewards)})
    texts = [f"{tag}{i}" for i in range(count)]
    return dynamic_sampling.ScoredRollout(
        [f"{tag}-prompt{g}" for g in range(len(group_rewards))], rollout, texts, scored, rewards
    )


def test_informative_groups() -> None:
    assert dynamic_sampling.informative_groups([1, 1, 0, 1, 0.5, 0.5, 0, 2], 2) == [1, 3]


def test_fill_draws_until_enough_groups_and_keeps_drawing_order() -> None:
    first = _part([(1, 1), (0, 1), (0, 0)], "a")  # one informative group
    extras = [_part([(1, 1), (0, 0), (1, 1)], "b"), _part([(0, 1), (1, 0), (2, 0)], "c")]
    asked = []

    def draw(k: int):
        asked.append(k)
        return extras[k - 1]

    filled = dynamic_sampling.fill(first, draw, batch_size=3, max_extra_draws=5)
    assert asked == [1, 2] and filled.draws == 3
    assert filled.sampled.num_groups == 9 and len(filled.sampled.texts) == 18
    # a's group 1, then c's groups 0 and 1 (c's group 2 is surplus and dropped).
    assert filled.trained_groups == [1, 6, 7]
    assert filled.trained.examples == ["a-prompt1", "c-prompt0", "c-prompt1"]
    assert filled.trained.texts == ["a2", "a3", "c0", "c1", "c2", "c3"]
    assert filled.trained.rewards == [0, 1, 0, 1, 1, 0]
    assert filled.trained.scored.values["r"] == [0, 1, 0, 1, 1, 0]
    assert filled.trained.rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    assert len(filled.trained.rollout.completion_logprobs) == 6


def test_fill_stops_at_the_cap_and_when_data_runs_out() -> None:
    dull = [(1, 1), (0, 0)]
    calls = []

    def draw(k: int):
        calls.append(k)
        return _part(dull, f"x{k}")

    filled = dynamic_sampling.fill(_part(dull, "a"), draw, batch_size=2, max_extra_draws=2)
    assert calls == [1, 2] and filled.draws == 3
    # Nothing informative anywhere: the update's own batch, as without dynamic sampling.
    assert filled.trained.examples == ["a-prompt0", "a-prompt1"]
    filled = dynamic_sampling.fill(
        _part([(0, 1), (0, 0)], "a"), lambda k: None, batch_size=2, max_extra_draws=4
    )
    assert filled.draws == 1 and filled.trained_groups == [0]


def test_draw_seeds_differ_per_draw_and_update() -> None:
    seeds = {dynamic_sampling.draw_seed(u, k) for u in (10, 11) for k in (1, 2, 3)}
    assert len(seeds) == 6


LEARN = [
    "model.path=builtin:tiny-qwen2",
    "finetune.lora_layers=-1",
    "data.dataset=synthetic:repeat?letters=xy&n=64",
    "rollout.num_generations=4",
    "rollout.max_new_tokens=6",
    "rollout.temperature=1.0",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "optim.batch_size=2",
    "optim.gradient_accumulation_steps=1",
    "algorithm.dynamic_sampling=true",
    "algorithm.max_resample_batches=2",
    "run.resume=never",
]


def _run(tmp_path, *sets, should_stop=lambda: False):
    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.loop.trainer import train

    resolved = resolve_config((), [*LEARN, f"run.output_dir={tmp_path}", *sets], environ={})
    return train(resolved, [], should_stop=should_stop)


def _records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"train"' in line]


def test_training_with_dynamic_sampling_resumes_exactly(tmp_path) -> None:
    from mlx.utils import tree_flatten

    sets = ["run.max_steps=4", "checkpoint.save_steps=2", "run.run_name=r"]
    _run(tmp_path / "straight", *sets)
    straight = _records(tmp_path / "straight" / "r")
    assert len(straight) == 4
    assert any(r["sampling_draws"] > 1 for r in straight)  # it did draw extra batches
    assert all(1 <= r["sampling_draws"] <= 3 for r in straight)
    assert all(r["trained_groups"] <= 2 for r in straight)
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    _run(tmp_path / "resumed", *sets, should_stop=stop_after_two)
    _run(tmp_path / "resumed", *sets[:2], "run.run_name=r", "run.resume=auto")
    resumed = _records(tmp_path / "resumed" / "r")
    for a, b in zip(straight, resumed, strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["sampling_draws"] == b["sampling_draws"]

    def weights(path):
        return dict(tree_flatten(mx.load(str(path / "adapters.safetensors"))))

    a, b = (
        weights(tmp_path / "straight" / "r" / "final"),
        weights(tmp_path / "resumed" / "r" / "final"),
    )
    assert a.keys() == b.keys() and a
    for key in a:
        assert mx.allclose(a[key], b[key], atol=1e-6).item(), key
