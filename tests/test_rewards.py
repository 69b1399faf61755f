"""Reward values, the pre-filled prefix trap, registry resolution, RewardSet.

The reward contract and built-in values are in docs/architecture.md §11.
"""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from mlxgrpo.errors import ConfigError
from mlxgrpo.rewards import (
    GSM8K_REWARDS,
    RewardSet,
    answers_match,
    extract_answer,
    list_rewards,
    parse_gsm8k_answer,
    resolve_reward,
)

PERFECT = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>"


def score(name: str, completions: list[str], answers: list[str | None] | None = None, **cols):
    fn = resolve_reward(name).fn
    answers = answers if answers is not None else ["7"] * len(completions)
    return fn(["q"] * len(completions), completions, answers, **cols)


def test_perfect_completion_earns_every_gsm8k_reward():
    values = {name: score(name, [PERFECT])[0] for name in GSM8K_REWARDS}
    assert values == {
        "correctness": 2.0,
        "int": 0.5,
        "strict_format": 0.5,
        "soft_format": 0.5,
        "xmlcount": 0.5,
    }


def test_correctness_uses_last_answer_and_numeric_normalisation():
    completions = [
        "<answer>1,000</answer>",
        "<answer>$1000</answer>",
        "<answer> 1000.0 </answer>",
        "<answer>1000</answer> then <answer>999</answer>",
        "<answer>999</answer> then <answer>1000</answer>",
        "the answer is 1000",
        "<answer>one thousand</answer>",
    ]
    assert score("correctness", completions, ["1000"] * 7) == [2.0, 2.0, 2.0, 0.0, 2.0, 0.0, 0.0]
    assert score("correctness", ["<answer>5</answer>"], ["$5"]) == [2.0]
    assert answers_match("5.0", "5") and not answers_match("5.1", "5")


def test_correctness_is_not_applicable_without_gold_and_parses_gsm8k_gold():
    assert score("correctness", ["<answer>72</answer>"], [None]) == [None]
    assert score("correctness", ["<answer>72</answer>"], ["48 + 24 = 72\n#### 72"]) == [2.0]


def test_gsm8k_gold_answer_parsing():
    assert parse_gsm8k_answer("She has 1,200 + 34 = 1,234 apples.\n#### 1,234") == "1234"
    assert parse_gsm8k_answer("no marker here") is None


def test_extract_answer_takes_the_last_complete_pair():
    assert extract_answer("<answer>1</answer><answer> 2 </answer>") == "2"
    assert extract_answer("<answer>3") is None
    assert extract_answer("<answer><answer>4</answer>") == "4"


def test_int_reward():
    completions = ["<answer>42</answer>", "<answer>1,000</answer>", "<answer>4.5</answer>", "42"]
    assert score("int", completions) == [0.5, 0.5, 0.0, 0.0]


def test_strict_and_soft_format():
    loose = "Sure! <reasoning>r</reasoning> <answer>7</answer> bye"
    no_reasoning = "<answer>7</answer>"
    completions = [PERFECT, "  " + PERFECT + "\n", loose, no_reasoning]
    assert score("strict_format", completions) == [0.5, 0.5, 0.0, 0.0]
    assert score("soft_format", completions) == [0.5, 0.5, 0.5, 0.0]


def test_xmlcount_pairs_and_trailing_text_penalty():
    trailing = PERFECT + "abcdefghij"  # 10 characters after </answer>
    only_answer = "<answer>7</answer>"
    only_open = "<reasoning> thinking"
    values = score("xmlcount", [PERFECT, trailing, only_answer, only_open, PERFECT + "\n"])
    expected = [0.5, 0.5 - 10 * 0.001, 0.25, 0.0, 0.5]
    assert all(math.isclose(v, e) for v, e in zip(values, expected, strict=True))


def test_prefilled_prefix_is_scored_with_the_completion():
    # The rollout prompt ended with "<reasoning>": the model only produced the rest.
    prefix = "<reasoning>"
    completion = PERFECT[len(prefix) :]
    without = {name: score(name, [completion])[0] for name in ("strict_format", "soft_format")}
    assert without == {"strict_format": 0.0, "soft_format": 0.0}
    for name, expected in [("strict_format", 0.5), ("soft_format", 0.5), ("xmlcount", 0.5)]:
        assert score(name, [completion], completion_prefix=prefix) == [expected]
        assert score(name, [completion], completion_prefix=[prefix]) == [expected]
    result = RewardSet(list(GSM8K_REWARDS)).score(
        ["q"], [completion], ["7"], completion_prefix=[prefix]
    )
    assert result.totals == [4.0]


def test_registry_lists_builtins_with_descriptions():
    rewards = list_rewards()
    for name in (*GSM8K_REWARDS, "char_match", "char_overlap"):
        assert rewards[name], name
    assert resolve_reward("correctness_reward_func").name == "correctness"


def test_unknown_reward_name_lists_registered_names():
    with pytest.raises(ConfigError) as info:
        resolve_reward("corectness")
    text = str(info.value)
    assert "corectness" in text and "correctness" in text and "xmlcount" in text


def test_file_spec_resolution(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_bonus(prompts, completions, answers, **kw):
                return [len(c) / 10 for c in completions]
            """
        )
    )
    absolute = resolve_reward(f"{tmp_path / 'my_rewards.py'}:length_bonus")
    assert absolute.name == "length_bonus"
    assert absolute.fn(["q"], ["abcde"], [None]) == [0.5]
    assert resolve_reward("my_rewards.py:length_bonus", base_dir=tmp_path).fn is absolute.fn
    monkeypatch.chdir(tmp_path)
    assert resolve_reward("my_rewards.py:length_bonus").fn(["q"], ["ab"], [None]) == [0.2]
    with pytest.raises(ConfigError, match="length_bonus"):
        resolve_reward("my_rewards.py:missing")
    with pytest.raises(ConfigError, match="nope.py"):
        resolve_reward("nope.py:f")


def test_module_spec_resolution(tmp_path, monkeypatch):
    package = tmp_path / "userpkg_rewards_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(
        "def constant(prompts, completions, answers, **kw):\n    return [1.5] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    resolved = resolve_reward("userpkg_rewards_test.scoring:constant")
    assert resolved.fn(["a", "b"], ["x", "y"], [None, None]) == [1.5, 1.5]
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        resolve_reward("no_such_module_xyz:f")
    sys.modules.pop("userpkg_rewards_test.scoring", None)
    sys.modules.pop("userpkg_rewards_test", None)


def test_module_spec_finds_local_module_in_base_dir(tmp_path):
    (tmp_path / "local_reward_mod_abc.py").write_text(
        "def half(prompts, completions, answers):\n    return [0.5] * len(completions)\n"
    )
    resolved = resolve_reward("local_reward_mod_abc:half", base_dir=tmp_path)
    assert resolved.fn(["q"], ["c"], [None]) == [0.5]
    assert str(tmp_path) not in sys.path
    sys.modules.pop("local_reward_mod_abc", None)


def test_weighted_total_and_none_counts_as_zero():
    def first(prompts, completions, answers, **kw):
        return [1.0, None, 3.0]

    def second(prompts, completions, answers, **kw):
        return [10.0, 20.0, None]

    result = RewardSet([first, second], [2.0, 0.5]).score(["p"] * 3, ["a", "b", "c"], [None] * 3)
    assert result.totals == [2.0 * 1 + 0.5 * 10, 0.5 * 20, 2.0 * 3]
    assert result.values == {"first": [1.0, None, 3.0], "second": [10.0, 20.0, None]}
    assert result.mean("first") == 2.0 and result.std("first") == 1.0
    assert result.stats()["second"] == {"mean": 15.0, "std": 5.0, "count": 2}


def test_default_weights_are_one_and_count_mismatch_is_an_error():
    reward_set = RewardSet(["int", "xmlcount"])
    assert reward_set.weights == [1.0, 1.0]
    assert reward_set.score(["q"], [PERFECT], ["7"]).totals == [1.0]
    with pytest.raises(ConfigError, match="weights"):
        RewardSet(["int", "xmlcount"], [1.0])
    with pytest.raises(ConfigError):
        RewardSet([])


def test_raising_reward_becomes_none_and_is_counted():
    def broken(prompts, completions, answers, **kw):
        raise RuntimeError("boom")

    reward_set = RewardSet(["int", broken], [1.0, 5.0])
    first = reward_set.score(["q", "q"], [PERFECT, "x"], ["7", "7"])
    assert first.values["broken"] == [None, None]
    assert first.totals == [0.5, 0.0]
    assert first.errors["broken"].count == 1
    assert "RuntimeError: boom" in first.errors["broken"].first_message
    assert first.mean("broken") is None and "int" not in first.errors
    second = reward_set.score(["q"], [PERFECT], ["7"])
    assert second.errors["broken"].count == 2
    assert reward_set.failures["broken"].count == 2


def test_wrong_length_output_is_a_recorded_failure():
    def short(prompts, completions, answers, **kw):
        return [1.0]

    result = RewardSet([short]).score(["q", "q"], ["a", "b"], [None, None])
    assert result.values["short"] == [None, None]
    assert "2 completions" in result.errors["short"].first_message


def test_columns_reach_functions_by_signature():
    seen = {}

    def wants_difficulty(prompts, completions, answers, difficulty):
        seen["difficulty"] = difficulty
        return [float(d) for d in difficulty]

    result = RewardSet([wants_difficulty]).score(
        ["q", "q"], ["a", "b"], [None, None], difficulty=[1, 3], unrelated=["x", "y"]
    )
    assert result.totals == [1.0, 3.0] and seen["difficulty"] == [1, 3]


def test_dense_synthetic_rewards():
    char_match = resolve_reward("char_match").fn
    assert char_match(["p"] * 4, ["xxxx", "xxab", "", " x "], ["x", "x", "x", "x"]) == [
        1.0,
        0.5,
        0.0,
        1.0,
    ]
    assert char_match(["p"], ["abc"], [None]) == [None]
    overlap = resolve_reward("char_overlap").fn
    values = overlap(["p"] * 4, ["abc", "abd", "ab", "abcdef"], ["abc"] * 4)
    assert values == [1.0, 2 / 3, 2 / 3, 3 / 6]
