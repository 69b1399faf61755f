"""`mlxgrpo infer`, `chat` and `eval` through the real entry point, on the builtin tiny model."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import REPO
from random_models import add_random_adapters
from test_inference import greedy_reference, reference_text

from mlxgrpo.models.loading import load_model
from mlxgrpo.models.tokenizer import eos_token_ids

MODEL = "builtin:tiny-qwen2"


@pytest.fixture(scope="module")
def tiny():
    return load_model(MODEL)


def infer_json(cli, *args):
    code, out, err = cli("infer", "-m", MODEL, "-t", "0", "--max-tokens", "10", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_infer_answers_greedily_like_a_plain_forward_loop(cli, tiny):
    model, tokenizer = tiny
    record = infer_json(cli, "What is 2+2?")
    assert record["completion"] == reference_text(model, tokenizer, "What is 2+2?", max_tokens=10)
    assert record["completion_tokens"] <= 10 and record["prompt_tokens"] > 5
    assert record["peak_memory_bytes"] > 0


def test_infer_stream_prints_the_same_answer_and_stats(cli):
    expected = infer_json(cli, "stream this")["completion"]
    code, out, err = cli(
        "infer", "-m", MODEL, "-t", "0", "--max-tokens", "10", "--stream", "stream this"
    )
    assert code == 0, err
    assert out == expected + "\n"
    assert "tok/s" in err and "peak memory" in err


def test_infer_system_and_raw_text_change_the_prompt(cli):
    plain = infer_json(cli, "hi")
    with_system = infer_json(cli, "--system", "You are a pirate.", "hi")
    raw = infer_json(cli, "--no-chat-template", "hi")
    assert with_system["prompt_tokens"] > plain["prompt_tokens"] > raw["prompt_tokens"]


def test_infer_file_writes_one_answer_per_prompt_in_order(cli, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps("first prompt"),
        json.dumps({"prompt": "second", "id": 7}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "third"}]}),
    ]
    prompts.write_text("\n".join(lines) + "\n")
    code, _, err = cli(
        "infer",
        "-m",
        MODEL,
        "-t",
        "0",
        "--max-tokens",
        "10",
        "--file",
        prompts,
        "--batch-size",
        "2",
    )
    assert code == 0, err
    records = [json.loads(x) for x in (tmp_path / "prompts.answers.jsonl").read_text().splitlines()]
    assert [r.get("prompt") for r in records] == ["first prompt", "second", None]
    assert records[1]["id"] == 7
    singles = [infer_json(cli, p)["completion"] for p in ("first prompt", "second", "third")]
    assert [r["completion"] for r in records] == singles
    assert not (tmp_path / "prompts.answers.jsonl.partial").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": \n', "prompts.jsonl:2 is not valid JSON"),
        ('{"question": "no prompt key"}\n', "prompts.jsonl:1 has no prompt"),
        ("\n\n", "has no prompts"),
    ],
)
def test_infer_rejects_malformed_prompt_files(cli, tmp_path, content, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    code, _, err = cli("infer", "-m", MODEL, "--file", prompts)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_infer_refuses_to_overwrite_answers(cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"hi"\n')
    existing = tmp_path / "p.answers.jsonl"
    existing.write_text("keep me\n")
    code, _, err = cli("infer", "-m", MODEL, "--file", prompts)
    assert code == 2 and "already exists" in err and "--force" in err
    assert existing.read_text() == "keep me\n"
    code, _, err = cli(
        "infer", "-m", MODEL, "-t", "0", "--max-tokens", "4", "--file", prompts, "--force"
    )
    assert code == 0, err
    assert json.loads(existing.read_text())["prompt"] == "hi"


def test_infer_usage_errors(cli, tmp_path):
    code, _, err = cli("infer", "-m", MODEL)
    assert code == 2 and "PROMPT or --file" in err
    code, _, err = cli("infer", "-m", str(tmp_path / "missing-model"), "hi")
    assert code == 2 and "missing-model" in err and "not found" in err
    code, _, err = cli("infer", "-m", MODEL, "--temperature", "-1", "hi")
    assert code == 2 and "generate.temperature" in err


def test_chat_through_a_pipe_answers_resets_and_exits(tiny):
    model, tokenizer = tiny
    script = "hello\n/reset\nhello\n/system Be terse.\n/exit\nnever answered\n"
    result = subprocess.run(
        [sys.executable, "-m", "mlxgrpo", "chat", "-m", MODEL, "-t", "0", "--max-tokens", "10"],
        input=script,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    answers = result.stdout.splitlines()
    expected = reference_text(model, tokenizer, "hello", max_tokens=10)
    assert answers == [expected, expected]  # the same answer after /reset; nothing after /exit
    assert "conversation cleared" in result.stderr and "system message set" in result.stderr


def test_chat_keeps_history_between_turns(cli, tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    code, out, err = cli("chat", "-m", MODEL, "-t", "0", "--max-tokens", "10")
    assert code == 0, err
    first, second = out.splitlines()
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "second"},
    ]
    assert second == reference_text(model, tokenizer, history, max_tokens=10)


# --- eval ------------------------------------------------------------------------------------


def _greedy_answers(model, tokenizer, questions, max_tokens):
    """What greedy decoding answers to each question, through an independent no-cache loop."""
    from mlxgrpo.config import resolve_config
    from mlxgrpo.task import text_codec

    cfg = resolve_config((), (), {}).config
    codec = text_codec(tokenizer, cfg)
    eos = eos_token_ids(tokenizer)
    answers = []
    for q in questions:
        from mlxgrpo.data import Example

        ids = greedy_reference(model, codec.encode(Example(prompt=q, answer="")), max_tokens, eos)
        answers.append(tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids).strip())
    return answers


def _make_adapters(tmp_path):
    """LoRA adapters with random (non-zero) B matrices, saved in mlx-lm's format."""
    model, _ = load_model(MODEL)
    out = tmp_path / "adapters"
    add_random_adapters(model, out, seed=0, scale=20.0, b_std=0.5)
    return out, model


def test_eval_counts_exactly_the_right_answers(cli, tiny, tmp_path):
    model, tokenizer = tiny
    questions = [f"question number {i}" for i in range(6)]
    greedy = _greedy_answers(model, tokenizer, questions, 8)
    # Answers 0, 2, 4 are what the model says; 1, 3, 5 are not: accuracy must be exactly 1/2.
    rows = [
        {"question": q, "answer": g if i % 2 == 0 else g + "!?"}
        for i, (q, g) in enumerate(zip(questions, greedy, strict=True))
    ]
    data = tmp_path / "task"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = tmp_path / "results.jsonl"
    args = ["eval", "-m", MODEL, "--dataset", data, "--max-tokens", "8", "--batch-size", "4"]
    args += ["--set", "rewards.functions=['exact_match']", "-o", results, "--json"]
    code, out, err = cli(*args)
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["accuracy"] == pytest.approx(0.5) and result["samples"] == 6
    records = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, False] * 3
    assert [r["completion"].strip() for r in records] == greedy


def test_eval_on_one_named_file_evaluates_that_file(cli, tiny, tmp_path):
    model, tokenizer = tiny
    questions = [f"item {i}" for i in range(3)]
    greedy = _greedy_answers(model, tokenizer, questions, 8)
    rows = [{"question": q, "answer": g} for q, g in zip(questions, greedy, strict=True)]
    data = tmp_path / "my.jsonl"  # not named after a split: still the data to evaluate
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "-m", MODEL, "--dataset", data, "--max-tokens", "8", "--json"]
    code, out, err = cli(*args, "--set", "rewards.functions=['exact_match']")
    assert code == 0, err
    result = json.loads(out)["results"][0]
    assert result["samples"] == 3 and result["accuracy"] == pytest.approx(1.0)


def test_eval_compare_base_shows_base_and_adapters(cli, tiny, tmp_path):
    model, tokenizer = tiny
    adapters, adapted_model = _make_adapters(tmp_path)
    questions = [f"q{i}" for i in range(4)]
    base = _greedy_answers(model, tokenizer, questions, 8)
    tuned = _greedy_answers(adapted_model, tokenizer, questions, 8)
    assert base != tuned  # the adapters change behaviour, so the two columns can differ
    data = tmp_path / "task"
    data.mkdir()
    rows = [{"question": q, "answer": t} for q, t in zip(questions, tuned, strict=True)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "-m", MODEL, "--adapter", adapters, "--compare-base", "--dataset", data]
    args += ["--max-tokens", "8", "--set", "rewards.functions=['exact_match']", "--json"]
    code, out, err = cli(*args)
    assert code == 0, err
    base_row, tuned_row = json.loads(out)["results"]
    assert (base_row["label"], tuned_row["label"]) == ("base", "adapters")
    expected_base = sum(b == t for b, t in zip(base, tuned, strict=True)) / len(questions)
    assert base_row["accuracy"] == pytest.approx(expected_base)
    assert tuned_row["accuracy"] == pytest.approx(1.0)
    code, out, err = cli(*args[:-1])  # the table
    assert code == 0 and "(base)" in out and "accuracy (pass@1)" in out


def test_eval_adapter_last_finds_the_newest_run(cli, tmp_path):
    adapters, _ = _make_adapters(tmp_path)
    runs = tmp_path / "runs"
    (runs / "old" / "final").mkdir(parents=True)
    final = runs / "new" / "final"
    final.mkdir(parents=True)
    for f in adapters.iterdir():
        (final / f.name).write_bytes(f.read_bytes())
    args = ["eval", "-m", MODEL, "--dataset", "synthetic:repeat?letters=x", "--limit", "2"]
    args += ["--max-tokens", "4", "--set", f"run.output_dir={runs}", "--adapter", "last", "--json"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert json.loads(out)["results"][0]["adapters"] == str(final)
    code, _, err = cli(
        *args[:-5], "--set", f"run.output_dir={tmp_path / 'none'}", "--adapter", "last"
    )
    assert code == 2 and "no run with adapters" in err


def test_eval_errors_are_one_clear_line(cli, tmp_path):
    code, _, err = cli("eval", "-m", MODEL, "--compare-base", "--dataset", "synthetic:arithmetic")
    assert code == 2 and "--compare-base needs adapters" in err
    code, _, err = cli("eval", "-m", MODEL, "--adapter", str(tmp_path / "nope"), "--limit", "1")
    assert code == 2 and "not found" in err  # before any dataset is fetched
    code, _, err = cli("eval", "-m", str(tmp_path / "no-model"), "--limit", "1")
    assert code == 2 and "no-model" in err
    code, _, err = cli("eval", "-m", MODEL, "--pass-k", "4", "--temperature", "0")
    assert code == 2 and "pass_k > 1 needs eval.temperature" in err
