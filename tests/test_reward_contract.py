"""The reward-function contract: one number or None per completion, a time limit per call, and a
run that stops when a function fails on every update for rewards.max_consecutive_failures."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.errors import RewardFunctionError
from mlxgrpo.rewards import RewardSet

PROMPTS, COMPLETIONS, ANSWERS = ["q", "q"], ["a", "b"], [None, None]

SMALL = [
    "model.path=builtin:tiny-qwen2",
    "data.dataset=synthetic:repeat?letters=x",
    "rollout.num_generations=2",
    "rollout.max_new_tokens=4",
    "optim.batch_size=2",
    "optim.gradient_accumulation_steps=1",
    "optim.learning_rate=1e-3",
    "finetune.lora_layers=-1",
    "checkpoint.save_steps=0",
    "run.resume=never",
]

REWARDS = textwrap.dedent(
    """
    import time

    calls = {"flaky": 0}

    def good(prompts, completions, answers, **kw):
        return [1.0] * len(completions)

    def short(prompts, completions, answers, **kw):
        return [1.0]

    def flaky(prompts, completions, answers, **kw):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("transient outage")
        return [0.5] * len(completions)

    def broken(prompts, completions, answers, **kw):
        raise RuntimeError("always down")

    def hangs(prompts, completions, answers, **kw):
        time.sleep(3)
        return [1.0] * len(completions)
    """
)


class Messages(Callback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_message(self, message: str) -> None:
        self.lines.append(message)


def score_one(fn, **options):
    return RewardSet([fn], **options).score(PROMPTS, COMPLETIONS, ANSWERS)


def test_wrong_length_is_a_contract_violation_that_names_what_came_back():
    def short(prompts, completions, answers, **kw):
        return [1.0, 2.0, 3.0]

    result = score_one(short)
    assert result.values["short"] == [None, None] and result.totals == [0.0, 0.0]
    message = result.errors["short"].first_message
    assert "returned 3 value(s) for 2 completions" in message
    assert "[1.0, 2.0, 3.0]" in message and "expected a list of 2 numbers" in message


@pytest.mark.parametrize(
    ("returned", "shown"),
    [
        (["0.5", "1"], "str '0.5'"),  # numeric strings too: float() would hide the bug
        ([1.0, object()], "object"),
        ("1.0", "returned str '1.0'"),
        (None, "returned NoneType None"),
        ([float("nan"), 1.0], "non-finite value nan"),
    ],
)
def test_non_numeric_values_are_contract_violations(returned, shown):
    def odd(prompts, completions, answers, **kw):
        return returned

    result = score_one(odd)
    assert result.values["odd"] == [None, None]
    assert shown in result.errors["odd"].first_message
    assert "expected a list of 2 numbers" in result.errors["odd"].first_message


def test_none_numbers_bools_and_arrays_are_within_the_contract():
    import numpy as np

    def fine(prompts, completions, answers, **kw):
        return [None, True]

    def array(prompts, completions, answers, **kw):
        return np.array([0.25, 2])

    result = RewardSet([fine, array]).score(PROMPTS, COMPLETIONS, ANSWERS)
    assert not result.errors
    assert result.values == {"fine": [None, 1.0], "array": [0.25, 2.0]}


def test_a_hanging_call_times_out_and_scoring_goes_on():
    def hangs(prompts, completions, answers, **kw):
        time.sleep(3)
        return [1.0, 1.0]

    def quick(prompts, completions, answers, **kw):
        return [0.5, 0.5]

    started = time.perf_counter()
    result = RewardSet([hangs, quick], timeout_s=0.5).score(PROMPTS, COMPLETIONS, ANSWERS)
    assert time.perf_counter() - started < 2.0  # did not wait for the sleeper
    assert result.values == {"hangs": [None, None], "quick": [0.5, 0.5]}
    assert result.totals == [0.5, 0.5]
    assert "rewards.timeout_s = 0.5 s" in result.errors["hangs"].first_message


def test_within_the_limit_values_and_exceptions_come_back_as_without_one():
    def boom(prompts, completions, answers, **kw):
        raise ValueError("bad input")

    def ok(prompts, completions, answers, **kw):
        return [1.0, 0.0]

    result = RewardSet([boom, ok], timeout_s=5).score(PROMPTS, COMPLETIONS, ANSWERS)
    assert result.values["ok"] == [1.0, 0.0]
    assert result.errors["boom"].first_message == "raised ValueError: bad input"


def _train(tmp_path, functions, *sets, callbacks=()):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    specs = json.dumps([f"{path}:{name}" for name in functions])
    resolved = resolve_config(
        (),
        [
            *SMALL,
            f"run.output_dir={tmp_path}",
            "run.run_name=run",
            f"rewards.functions={specs}",
            *sets,
        ],
        environ={},
    )
    return train(resolved, callbacks)


def _reward_errors(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward_errors"] for line in lines if '"train"' in line]


def test_a_function_raising_on_every_update_stops_the_run(tmp_path):
    messages = Messages()
    with pytest.raises(RewardFunctionError) as info:
        _train(tmp_path, ["good", "broken"], "run.max_steps=10", callbacks=[messages])
    text = str(info.value)
    assert "reward function broken failed on every call for 3 consecutive updates" in text
    assert "raised RuntimeError: always down" in text and "\n" not in text
    assert info.value.exit_code == 1
    assert len(_reward_errors(tmp_path)) == 3  # stopped right at the third failed update
    assert not (tmp_path / "run" / "final").exists()
    assert sum("broken" in line for line in messages.lines) == 1  # shown once, not each update


def test_wrong_length_every_update_stops_after_the_configured_count(cli, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    spec = json.dumps([f"{tmp_path / 'my_rewards.py'}:short"])
    args = ["train", "--max-steps", "10", "-o", tmp_path]
    for item in [*SMALL, f"rewards.functions={spec}", "rewards.max_consecutive_failures=2"]:
        args += ["--set", item]
    code, out, err = cli(*args, "--set", "run.run_name=run")
    assert code == 1
    flat = " ".join(err.split())
    assert "reward function short failed on every call for 2 consecutive updates" in flat
    assert "returned 1 value(s) for 4 completions" in flat
    assert "Traceback" not in err + out and "unexpected" not in flat.lower()
    assert "finished" not in flat
    assert len(_reward_errors(tmp_path)) == 2


def test_a_transient_failure_does_not_stop_the_run(tmp_path):
    messages = Messages()
    summary = _train(tmp_path, ["flaky"], "run.max_steps=4", callbacks=[messages])
    assert summary["updates"] == 4 and summary["final_dir"]
    errors = _reward_errors(tmp_path)
    assert errors[0] == {"flaky": 1} and all(e == {} for e in errors[1:])
    assert [m for m in messages.lines if "flaky" in m] == [
        "reward function flaky raised RuntimeError: transient outage "
        "(its values count as None for that batch)"
    ]


def test_a_hanging_function_times_out_and_training_proceeds(tmp_path):
    messages = Messages()
    started = time.perf_counter()
    summary = _train(
        tmp_path,
        ["good", "hangs"],
        "run.max_steps=2",
        "rewards.timeout_s=0.5",
        "logging.log_completions=true",
        callbacks=[messages],
    )
    assert summary["updates"] == 2 and summary["final_dir"]
    assert time.perf_counter() - started < 30
    lines = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    assert all(json.loads(line)["rewards"]["hangs"] is None for line in lines)
    assert any("hangs did not return within rewards.timeout_s = 0.5 s" in m for m in messages.lines)


def test_a_function_that_needs_the_main_thread_is_told_how_to_get_it():
    import signal

    def uses_alarm(prompts, completions, answers, **kw):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # refused outside the main thread
        return [1.0, 1.0]

    assert not score_one(uses_alarm).errors
    message = score_one(uses_alarm, timeout_s=5).errors["uses_alarm"].first_message
    assert "main thread" in message and "rewards.timeout_s = 0" in message
