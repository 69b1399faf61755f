"""Data loading (local files, synthetic tasks, hub mapping), prompts and the resumable stream."""

from __future__ import annotations

import json
import random
import re

import pytest

from mlxgrpo.data import (
    GSM8K_SYSTEM_PROMPT,
    SYNTHETIC_TASKS,
    Example,
    PromptStream,
    batches,
    build_messages,
    default_rewards,
    default_system_prompt,
    load_examples,
    num_updates,
)
from mlxgrpo.errors import ConfigError
from mlxgrpo.rewards import RewardSet, is_registered

ROWS = [
    {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}", "id": i}
    for i in range(1, 13)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_file_loads_as_train_with_gsm8k_answers_normalised(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    examples = load_examples(str(path), "train", shuffle=False)
    assert [e.prompt for e in examples] == [r["question"] for r in ROWS]
    assert examples[5].answer == "12" and examples[-1].answer == "24"
    assert examples[5].extra == {"id": 6, "solution": ROWS[5]["answer"]}
    # One named file serves every split: evaluating it reads the same rows.
    evaluated = load_examples(str(path), "test", shuffle=False)
    assert [e.prompt for e in evaluated] == [r["question"] for r in ROWS]


def test_csv_and_parquet_files_and_relative_base_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.csv").write_text("q,a\nhello,1\nworld,2\n")
    parquet = load_examples("rows.parquet", base_dir=tmp_path, shuffle=False)
    assert [e.answer for e in parquet] == [str(2 * i) for i in range(1, 13)]
    csv = load_examples("rows.csv", base_dir=tmp_path, prompt_field="q", answer_field="a")
    assert sorted((e.prompt, e.answer) for e in csv) == [("hello", "1"), ("world", "2")]


def test_directory_split_mapping(tmp_path):
    write_jsonl(tmp_path / "train-00000.jsonl", ROWS[:8])
    write_jsonl(tmp_path / "gsm_test.jsonl", ROWS[8:])
    train = load_examples(str(tmp_path), "train", shuffle=False)
    test = load_examples(str(tmp_path), "test", shuffle=False)
    assert [e.extra["id"] for e in train] == list(range(1, 9))
    assert [e.extra["id"] for e in test] == list(range(9, 13))
    with pytest.raises(ConfigError, match="validation"):
        load_examples(str(tmp_path), "validation")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_examples(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(info.value)


def test_missing_field_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": "1"}])
    with pytest.raises(ConfigError) as info:
        load_examples(str(path))
    assert "question" in str(info.value)
    assert "text" in str(info.value) and "label" in str(info.value)
    with pytest.raises(ConfigError, match="text, label"):
        load_examples(str(path), prompt_field="text", answer_field="solution")
    no_answers = load_examples(str(path), prompt_field="text", answer_field=None)
    assert no_answers[0].answer is None and no_answers[0].extra == {"label": "1"}


def test_shuffle_is_seeded_then_cut(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    ids = [e.extra["id"] for e in load_examples(str(path), seed=3, max_samples=5)]
    expected = list(range(1, 13))
    random.Random(3).shuffle(expected)
    assert ids == expected[:5]
    assert ids == [e.extra["id"] for e in load_examples(str(path), seed=3, max_samples=5)]
    assert len(load_examples(str(path), max_samples=0)) == 12


def test_gsm8k_maps_to_hub_id_and_config(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(
            [{"question": "Q?", "answer": "Half of 2,000 is 1,000.\n#### 1,000"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", {"split": "test"})]
    assert examples[0].answer == "1000"


def test_synthetic_generation_is_deterministic_per_seed():
    first = load_examples("synthetic:arithmetic?n=50", shuffle=False)
    again = load_examples("synthetic:arithmetic?n=50", shuffle=False)
    other = load_examples("synthetic:arithmetic?n=50&seed=1", shuffle=False)
    test_split = load_examples("synthetic:arithmetic?n=50", "test", shuffle=False)
    assert first == again
    assert first != other and first != test_split
    assert len(first) == 50


def test_synthetic_arithmetic_answers_are_consistent():
    operations = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for example in load_examples("synthetic:arithmetic?n=100", shuffle=False):
        solution = example.extra["solution"]
        assert solution.endswith(f"#### {example.answer}")
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution)
        assert steps, solution
        for left, op, right, result in steps:
            assert operations[op](int(left), int(right)) == int(result), solution
            assert op != "/" or int(left) % int(right) == 0, solution
        assert steps[-1][3] == example.answer
        assert all(int(n) < 1000 for n in re.findall(r"\d+", example.prompt))


def test_repeat_task_and_its_dense_reward():
    examples = load_examples("synthetic:repeat?n=20&letters=xy", shuffle=False)
    assert {e.answer for e in examples} <= {"x", "y"}
    assert all(e.prompt == f"Repeat the letter {e.answer}:" for e in examples)
    task = SYNTHETIC_TASKS["repeat"]
    assert default_rewards("synthetic:repeat") == list(task.default_rewards) == ["char_match"]
    result = RewardSet(default_rewards("synthetic:repeat")).score(
        ["p"] * 3, ["xxxx", "xy", "zzz"], ["x", "x", "x"]
    )
    assert result.totals == [1.0, 0.5, 0.0]


def test_every_task_default_reward_is_registered():
    for task in SYNTHETIC_TASKS.values():
        assert task.default_rewards
        assert all(is_registered(name) for name in task.default_rewards)


def test_copy_task_strings_are_in_range():
    examples = load_examples("synthetic:copy?n=30&letters=ab&min_len=2&max_len=3")
    assert all(2 <= len(e.answer) <= 3 and set(e.answer) <= {"a", "b"} for e in examples)
    assert all(e.prompt == f"Copy: {e.answer}" for e in examples)


def test_bad_synthetic_specs():
    with pytest.raises(ConfigError, match="synthetic:arithmetic"):
        load_examples("synthetic:nope")
    with pytest.raises(ConfigError, match="letters"):
        load_examples("synthetic:repeat?colour=red")


def test_defaults_and_messages():
    assert default_system_prompt("synthetic:arithmetic") == GSM8K_SYSTEM_PROMPT
    assert default_system_prompt("synthetic:repeat") is None
    assert default_rewards("gsm8k")[0] == "correctness"
    assert "<reasoning>" in GSM8K_SYSTEM_PROMPT and "<answer>" in GSM8K_SYSTEM_PROMPT
    example = Example("What is 2+2?", "4")
    assert build_messages(example, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert build_messages(example, None) == [{"role": "user", "content": "What is 2+2?"}]


def test_num_updates_drops_incomplete_batches():
    assert num_updates(10, 3, 2) == 6
    assert num_updates(9, 3, 1) == 3
    batches_seen = list(batches(list(range(10)), 3, seed=1, num_epochs=2))
    assert len(batches_seen) == 6 and all(len(b) == 3 for b in batches_seen)
    with pytest.raises(ConfigError, match="batch_size"):
        PromptStream(list(range(2)), 3)


def test_stream_epochs_are_permutations_reshuffled_with_seed():
    items = list(range(12))
    stream = PromptStream(items, 4, seed=7, num_epochs=2)
    epoch0 = [x for b in stream for x in b][:12]
    assert sorted(epoch0) == items
    all_batches = list(PromptStream(items, 4, seed=7, num_epochs=2))
    flat = [x for b in all_batches for x in b]
    assert sorted(flat[12:]) == items and flat[:12] != flat[12:]
    assert all_batches == list(PromptStream(items, 4, seed=7, num_epochs=2))
    assert all_batches != list(PromptStream(items, 4, seed=8, num_epochs=2))


@pytest.mark.parametrize("stop_after", [0, 2, 3, 5, 7])
def test_stream_resume_from_json_continues_exactly(stop_after):
    items = list(range(11))  # 3 full batches of 3 per epoch, 2 items dropped per epoch
    reference = list(PromptStream(items, 3, seed=5, num_epochs=3))
    stream = PromptStream(items, 3, seed=5, num_epochs=3)
    head = [stream.next_batch() for _ in range(stop_after)]
    assert stream.updates_done == stop_after
    saved = json.dumps(stream.state())
    resumed = PromptStream(items, 3, seed=5, num_epochs=3)
    resumed.load_state(json.loads(saved))
    assert head + list(resumed) == reference
    assert resumed.updates_done == resumed.total_updates == 9


def test_stream_refuses_state_from_other_data():
    stream = PromptStream(list(range(12)), 3, seed=5)
    stream.next_batch()
    other = PromptStream(list(range(10)), 3, seed=5)
    with pytest.raises(ConfigError, match="num_examples"):
        other.load_state(stream.state())
