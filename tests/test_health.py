"""Learning health (engine/loop/health.py): each failure named once, when it has held long
enough, and never for a healthy run."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from mlxgrpo.engine.loop.health import STREAK, HealthWatch

HEALTHY = {
    "zero_std_groups": 0.25, "grad_norm": 0.8, "clip_low": 0.01, "clip_high": 0.02,
    "entropy": 2.0, "logprob_mismatch_mean": 2e-7, "skipped": 0.0,
}  # fmt: skip


def _run(changes_at, updates=12):
    """The warnings each update of a run gives, ``changes_at(update)`` altering its metrics."""
    watch, given = HealthWatch(), {}
    for update in range(1, updates + 1):
        for key in watch.check(update, {**HEALTHY, **changes_at(update)}):
            given[key] = update
    return given


def test_a_healthy_run_gets_no_warning():
    assert _run(lambda u: {}) == {}


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("no_signal", {"zero_std_groups": 1.0}),
        ("zero_gradient", {"grad_norm": 0.0}),
        ("clip_saturated", {"clip_low": 0.5, "clip_high": 0.4}),
    ],
)
def test_streak_conditions_are_named_once_after_they_held_long_enough(key, bad):
    assert _run(lambda u: bad) == {key: STREAK}
    # Broken by one healthy update, the streak starts over.
    assert _run(lambda u: {} if u == 3 else bad) == {key: 3 + STREAK}
    assert _run(lambda u: bad if u % 2 else {}) == {}


def test_a_skipped_update_is_no_zero_gradient():
    assert _run(lambda u: {"grad_norm": 0.0, "skipped": 1.0}) == {}


def test_entropy_collapse_counts_only_early_and_from_a_real_start():
    assert _run(lambda u: {"entropy": 2.0 if u < 4 else 0.01}) == {"entropy_collapse": 4}
    assert _run(lambda u: {"entropy": 2.0 if u < 11 else 0.01}) == {}  # late: a converged run
    assert _run(lambda u: {"entropy": 0.01}) == {}  # it never had any to lose


def test_a_growing_sampler_mismatch_is_named_when_it_is_more_than_noise():
    # 3e-4 at first: at update 3 it is 9x that (too little growth), at 4 it is 27x.
    # 6e-7 at first: it passes the 1e-3 floor at update 8 (1.3e-3).
    assert _run(lambda u: {"logprob_mismatch_mean": 1e-4 * 3**u}) == {"mismatch_growing": 4}
    assert _run(lambda u: {"logprob_mismatch_mean": 2e-7 * 3**u}) == {"mismatch_growing": 8}
    assert _run(lambda u: {"logprob_mismatch_mean": 5e-3}) == {}  # large but steady


def test_unmoved_adapters_are_named_after_the_streak():
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from random_models import random_lm

    model = random_lm("qwen2", seed=0, hidden=32, vocab=32)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    watch = HealthWatch()
    assert watch.check(STREAK - 1, HEALTHY, model) == {}
    assert list(watch.check(STREAK, HEALTHY, model)) == ["adapters_unmoved"]
    name, value = next(
        (k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")
    )
    model.load_weights([(name, mx.ones_like(value))], strict=False)  # one adapter moved
    assert HealthWatch().check(STREAK, HEALTHY, model) == {}


def test_a_run_that_cannot_learn_says_so_once(cli, tmp_path):
    reward = tmp_path / "flat.py"
    reward.write_text("def flat(prompts, completions, answers, **kw):\n"
                      "    return [0.5] * len(completions)\n")  # fmt: skip
    code, _, err = cli(
        "train", "--model", "builtin:tiny-qwen2", "--max-steps", str(STREAK + 2), "-o", tmp_path,
        "--run-name", "r", "--set", "data.dataset=synthetic:repeat",
        "--set", f'rewards.functions=["{reward}:flat"]', "--set", "optim.batch_size=1",
        "--set", "optim.gradient_accumulation_steps=1", "--set", "rollout.num_generations=2",
        "--set", "rollout.max_new_tokens=4",
    )  # fmt: skip
    assert code == 0, err
    assert err.count("learning health: trains but does not learn") == 1
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    flagged = [json.loads(x)["update"] for x in lines if '"health"' in x]
    assert flagged == [STREAK]


def test_entropy_control_steps_toward_the_target_within_its_bounds():
    from mlxgrpo.engine.loop.entropy_control import EntropyControl

    control = EntropyControl(coeff=0.02, target=1.0, step=0.015, low=0.0, high=0.04)
    # Below the target the weight rises (capped at 0.04); above it, it falls (floored at 0).
    assert [control.after(e) for e in (0.5, 0.5, 0.2, 1.5, 1.5, 2.0, 2.0)] == pytest.approx(
        [0.035, 0.04, 0.04, 0.025, 0.01, 0.0, 0.0]
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("algorithm.entropy_coeff_step=0.1",), "entropy_coeff_step steers"),
        (("algorithm.entropy_target=1", "algorithm.entropy_coeff=0.5"), "must lie within"),
    ],
)
def test_entropy_settings_that_would_do_nothing_are_refused(sets, message):
    from mlxgrpo.config import resolve_config
    from mlxgrpo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_config((), list(sets), {})
