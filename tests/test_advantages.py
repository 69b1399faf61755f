"""Advantage estimators and reward aggregation (engine/loss/advantages.py) against float64
references written from each definition, one completion at a time, plus hand-computed
cases and the wiring through the update."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mlxgrpo.engine.loss import advantages

G = 4
REWARDS = [1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 1.0, -1.0, 0.3, 0.3, 0.3, 0.3]  # the last group is flat
LENGTHS = [5, 9, 2, 7, 3, 3, 10, 1, 4, 6, 8, 2]


def _loo(rewards, group):
    out = []
    for start in range(0, len(rewards), group):
        block = rewards[start : start + group]
        for i, r in enumerate(block):
            others = [x for j, x in enumerate(block) if j != i]
            out.append(r - sum(others) / len(others) if others else r)
    return out


def _whiten_tokens(values, lengths):
    tokens = [v for v, n in zip(values, lengths, strict=True) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / (len(tokens) - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def _group_mean_removed(rewards, group):
    out = []
    for start in range(0, len(rewards), group):
        block = rewards[start : start + group]
        out += [r - sum(block) / len(block) for r in block]
    return out


def _length_weighted_baseline(rewards, lengths, group):
    out = []
    for start in range(0, len(rewards), group):
        block, sizes = rewards[start : start + group], lengths[start : start + group]
        baseline = sum(r * n for r, n in zip(block, sizes, strict=True)) / sum(sizes)
        out += [r - baseline for r in block]
    return out


REFERENCES = {
    "rloo": lambda r, n, g: _loo(r, g),
    "reinforce_pp": lambda r, n, g: _whiten_tokens(r, n),
    "reinforce_pp_baseline": lambda r, n, g: _whiten_tokens(_group_mean_removed(r, g), n),
    "opo": lambda r, n, g: _length_weighted_baseline(r, n, g),
}


@pytest.mark.parametrize("estimator", sorted(REFERENCES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimators_match_their_float64_definitions(estimator, seed):
    rng = random.Random(seed)
    rewards = REWARDS if seed == 0 else [rng.uniform(-2, 3) for _ in range(4 * G)]
    lengths = LENGTHS if seed == 0 else [rng.randint(1, 40) for _ in range(4 * G)]
    got = advantages.estimate(rewards, G, estimator, lengths)
    expected = REFERENCES[estimator](rewards, lengths, G)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_estimators_by_hand():
    # rloo on [1, 0]: 1 - 0 and 0 - 1; opo on [1, 0] with lengths 3 and 1: baseline 3/4.
    assert advantages.estimate([1.0, 0.0], 2, "rloo", [3, 1]).tolist() == [1.0, -1.0]
    assert advantages.estimate([1.0, 0.0], 2, "opo", [3, 1]).tolist() == [0.25, -0.75]
    # A group of one has no baseline: rloo and opo keep the reward.
    assert advantages.estimate([0.7, 0.2], 1, "rloo", [1, 1]).tolist() == [0.7, 0.2]
    assert advantages.estimate([0.7, 0.2], 1, "opo", [4, 9]).tolist() == [0.7, 0.2]
    # rloo and opo leave a flat group at exactly 0.
    flat = advantages.estimate(REWARDS, G, "rloo", LENGTHS)[-G:]
    assert flat.tolist() == [0.0] * G
    assert advantages.estimate(REWARDS, G, "opo", LENGTHS)[-G:].tolist() == [0.0] * G


def _gdpo_reference(values, weights, group):
    n = len(next(iter(values.values())))
    total = [0.0] * n
    for name, column in values.items():
        for start in range(0, n, group):
            present = [v for v in column[start : start + group] if v is not None]
            mean = sum(present) / len(present) if present else 0.0
            std = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present)) if present else 0
            for i in range(start, start + group):
                if column[i] is not None:
                    total[i] += weights[name] * (column[i] - mean) / (std + 1e-4)
    mean = sum(total) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in total) / n)
    return [(t - mean) / (std + 1e-4) for t in total]


def test_normalize_then_sum_matches_its_definition():
    values = {
        "correct": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        "format": [0.5, 0.5, 0.1, None, 0.2, 0.9, 0.4, 0.4],
        "length": [3.0, 1.0, 2.0, 4.0, None, None, None, None],  # no value in group 2
    }
    weights = {"correct": 2.0, "format": 0.5, "length": 1.0}
    got = advantages.normalize_then_sum(values, weights, 4)
    np.testing.assert_allclose(got, _gdpo_reference(values, weights, 4), rtol=1e-12, atol=1e-12)
    assert advantages.degenerate_groups(values, 4) == [False, False]
    flat = {"a": [1.0, 1.0, 0.0, 1.0], "b": [0.2, 0.2, None, 0.4]}
    assert advantages.degenerate_groups(flat, 2) == [True, False]


def test_normalize_then_sum_differs_from_sum_then_normalize_when_scales_differ():
    """One function in [0, 100], one in [0, 1]: summed first, the small one barely moves the
    ranking; normalised first, it counts as much as the big one."""
    values = {"big": [100.0, 0.0, 100.0, 0.0], "small": [1.0, 0.0, 0.0, 1.0]}
    gdpo = advantages.normalize_then_sum(values, {"big": 1.0, "small": 1.0}, 4)
    assert gdpo[0] > 0 > gdpo[1] and abs(gdpo[2] - gdpo[3]) < 1e-3  # big and small cancel
    summed = [b + s for b, s in zip(values["big"], values["small"], strict=True)]
    assert summed[2] - summed[3] > 90  # the sum ranks 2 far above 3: big alone decides


def test_the_update_uses_the_configured_estimator_and_aggregation():
    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.loop import update
    from mlxgrpo.rewards.reward_set import RewardResult

    def algo(*sets):
        return resolve_config((), ["rollout.num_generations=4", *sets], {}).config.algorithm

    truncated = [False] * len(REWARDS)
    adv, keep = update.advantages_and_keep(
        REWARDS, truncated, algo("algorithm.advantage_estimator=opo"), G, LENGTHS
    )
    expected = _length_weighted_baseline(REWARDS, LENGTHS, G)
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-6)  # float32 from here on
    assert keep == list(range(len(REWARDS)))
    scored = RewardResult(
        names=["a", "b"], weights=[1.0, 3.0], totals=[0.0] * 8,
        values={"a": [1.0, 0.0, 0.5, 0.5, 1, 1, 1, 1], "b": [0.0, 0.2, 0.2, 0.9, 0, 0, 0, 0]},
    )  # fmt: skip
    sets = (
        "algorithm.reward_aggregation=normalize_then_sum",
        "algorithm.filter_zero_std_groups=true",
    )
    adv, keep = update.advantages_and_keep([0.0] * 8, [False] * 8, algo(*sets), 4, None, scored)
    expected = _gdpo_reference(scored.values, {"a": 1.0, "b": 3.0}, 4)
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    assert keep == [0, 1, 2, 3]  # the second group is flat in every function


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("algorithm.advantage_estimator=rloo", "algorithm.scale_rewards=batch"),
         "applies to advantage_estimator = grpo only"),
        (("algorithm.advantage_estimator=opo",
          "algorithm.reward_aggregation=normalize_then_sum"), "use it with advantage_estimator"),
        (("algorithm.reward_aggregation=normalize_then_sum", "algorithm.overlong_penalty=0.5"),
         "set one of them"),
        (("algorithm.rollout_correction=tis", "algorithm.rollout_correction_min=3",
          "algorithm.rollout_correction_cap=2"), "must be below"),
        (("algorithm.rollout_correction_min=0.5",), "rollout_correction_min shapes"),
        (("algorithm.delta=1.1", "algorithm.clip_eps=0.2"), "must exceed 1 \\+ clip_eps_high"),
        (("algorithm.delta=2", "algorithm.loss_type=sapo"), "has no such term"),
    ],
)  # fmt: skip
def test_combinations_that_would_do_nothing_are_refused(sets, message):
    from mlxgrpo.config import resolve_config
    from mlxgrpo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_config((), list(sets), {})
