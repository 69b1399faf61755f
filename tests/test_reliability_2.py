"""Reliability, round 2, where the right outcome is not an error: user text shown escaped,
bad log records skipped and named, user code's stdout kept off `--json`, a stopped `infer
--file` saying where its answers are, data columns that cannot reach a tool, and a resume
that names the settings it was told to ignore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxgrpo.ui.console import escape, visible

TINY = [
    "--model", "builtin:tiny-qwen2", "--set", "finetune.lora_layers=-1",
    "--set", "optim.batch_size=1", "--set", "optim.gradient_accumulation_steps=1",
    "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=4",
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name", "plain name"),
        ("a\nerror: forged", "a\\nerror: forged"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("tab\there", "tab\\there"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("café ✓", "café ✓"),
    ],
)
def test_control_characters_are_shown_escaped(text, shown):
    assert visible(text) == shown


def test_escape_keeps_markup_and_emoji_codes_as_typed_and_lines_when_asked():
    from rich.console import Console

    console = Console(record=True, emoji=False, width=200)
    console.print(escape("[bold]:fire: run[/bold]\nnext"))
    assert console.export_text() == "[bold]:fire: run[/bold]\\nnext\n"
    assert escape("one\ntwo", keep_lines=True) == "one\ntwo"


def test_a_run_named_with_markup_and_an_emoji_code_is_listed_as_typed(cli, tmp_path):
    name = ":fire:[red]"
    code, _, err = cli("train", *TINY, "--max-steps", "1", "-o", tmp_path, "--run-name", name,
                       "--set", "data.dataset=synthetic:repeat")  # fmt: skip
    assert code == 0, err
    assert f"run: {tmp_path}/{name}" in err.replace("\n", "")
    code, out, _ = cli("runs", tmp_path)
    assert code == 0 and name in out and "🔥" not in out


def _run_with_bad_records(cli, tmp_path: Path) -> Path:
    code, _, err = cli("train", *TINY, "--max-steps", "2", "-o", tmp_path, "--run-name", "r",
                       "--set", "data.dataset=synthetic:repeat")  # fmt: skip
    assert code == 0, err
    run = tmp_path / "r"
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"update": null, "kind": "train", "reward_mean": 9.0}\n')
        fh.write('{"update": "three", "kind": "train", "reward_mean": 9.0}\n')
    return run


def test_runs_and_plot_skip_records_without_an_update_number_and_name_them(cli, tmp_path):
    run = _run_with_bad_records(cli, tmp_path)
    code, out, err = cli("runs", tmp_path)
    assert code == 0, err
    assert "line 3: its update is None" in err and "line 4: its update is 'three'" in err
    assert "9.000" not in out  # the skipped records' reward is nowhere
    code, out, err = cli("plot", run, "--terminal")
    assert code == 0, err
    assert f"skipped {run / 'metrics.jsonl'} line 3" in err.replace("\n", "")


def test_what_a_reward_prints_does_not_reach_json_stdout(cli, tmp_path):
    reward = tmp_path / "noisy.py"
    reward.write_text(
        "def noisy(prompts, completions, answers, **kw):\n"
        "    print('hello from the reward')\n"
        "    return [0.0] * len(completions)\n"
    )
    code, out, err = cli("train", *TINY, "--max-steps", "1", "-o", tmp_path, "--json",
                         "--set", "data.dataset=synthetic:repeat",
                         "--set", f'rewards.functions=["{reward}:noisy"]')  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)  # one object, nothing else
    assert summary["updates"] == 1
    assert "hello from the reward" in err


def test_a_stopped_infer_file_says_where_the_finished_answers_are(cli, tmp_path, monkeypatch):
    """Ctrl-C after the first batch: exit 130, the first batch's answers in OUT.partial, and
    a line that says so."""
    from mlxgrpo import inference

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    real = inference.generate_answers

    def stopped_after_one_batch(*args, on_batch, **kwargs):
        def then_stop(batch, done, total):
            on_batch(batch, done, total)
            raise KeyboardInterrupt

        return real(*args, on_batch=then_stop, **kwargs)

    monkeypatch.setattr(inference, "generate_answers", stopped_after_one_batch)
    out = tmp_path / "answers.jsonl"
    code, _, err = cli("infer", "-m", "builtin:tiny-qwen2", "-f", prompts, "-o", out,
                       "--batch-size", "2", "--max-tokens", "2")  # fmt: skip
    assert code == 130
    partial = tmp_path / "answers.jsonl.partial"
    assert f"the 2 of 4 answers finished are in {partial}" in err.replace("\n", "")
    assert len(partial.read_text().splitlines()) == 2 and not out.exists()


def test_a_data_column_named_tool_call_never_reaches_a_tool(cli, tmp_path):
    """The synthetic task's pre-filled call lives outside the row's columns: a user column
    named tool_call is plain data, and training with tools runs."""
    data = tmp_path / "d.jsonl"
    row = {"question": "What is 6 * 7?", "answer": "42", "tool_call": ["calculator", "1/0"]}
    data.write_text(json.dumps(row) + "\n")
    code, _, err = cli("train", "-c", "calculator_demo", "--max-steps", "1", "-o", tmp_path,
                       "--run-name", "r", "--set", f"data.dataset={data}",
                       "--set", "optim.batch_size=1",
                       "--set", "optim.gradient_accumulation_steps=1",
                       "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=4",
                       "--set", "logging.log_completions=true")  # fmt: skip
    assert code == 0, err
    logged = (tmp_path / "r" / "completions.jsonl").read_text()
    assert logged and "1/0" not in logged  # nothing of the column was pre-filled or called


def test_resume_despite_changes_names_them(cli, tmp_path):
    base = ["train", *TINY, "-o", tmp_path, "--run-name", "r",
            "--set", "checkpoint.save_steps=1"]  # fmt: skip
    code, _, err = cli(*base, "--max-steps", "1", "--set", "data.dataset=synthetic:repeat")
    assert code == 0, err
    code, _, err = cli(*base, "--max-steps", "2", "--set", "data.dataset=synthetic:arithmetic",
                       "--set", "run.resume_despite_changes=true")  # fmt: skip
    assert code == 0, err
    flat = err.replace("\n", "")
    assert "despite changed settings: data.dataset: 'synthetic:repeat' -> " in flat
    assert "resumed from" in flat
