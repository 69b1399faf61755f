"""Hostile input: non-finite numbers, bytes that are not UTF-8, run names that are paths, a bad
--resume, and user text that looks like Rich markup. Each gives one readable line, never a crash."""

from __future__ import annotations

import math
import typing

import pytest

from mlxgrpo.config import resolve_config
from mlxgrpo.config.resolver import SPECS, ConfigProblems
from mlxgrpo.config.values import ValueProblem, coerce
from mlxgrpo.errors import ConfigError
from tests.conftest import run_subprocess

TRAIN = ["train", "-m", "builtin:tiny-qwen2", "--set", "data.dataset=synthetic:repeat?letters=x"]
BAD_BYTES = b"\xff\xfe"


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_clean(out: str, err: str) -> None:
    text = out + err
    assert "Traceback" not in text
    assert "unexpected" not in text
    assert "this is a bug" not in text


# --- 1. non-finite numbers --------------------------------------------------------------------


def _float_keys() -> list[str]:
    keys = []
    for key, spec in SPECS.items():
        args = typing.get_args(spec.type) or (spec.type,)
        inner = [typing.get_args(a) or (a,) for a in args]
        if any(float in group for group in inner):
            keys.append(key)
    return keys


def test_schema_has_float_keys():
    keys = _float_keys()
    assert "rollout.temperature" in keys and "optim.learning_rate" in keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"])
def test_every_float_key_rejects_non_finite(key, value):
    with pytest.raises(ValueProblem, match="expected a finite number"):
        coerce(SPECS[key], value)


def test_finite_floats_still_pass():
    assert coerce(SPECS["rollout.temperature"], "0.5") == 0.5
    assert coerce(SPECS["optim.learning_rate"], 1) == 1.0


@pytest.mark.parametrize(
    "section, key, literal, shown",
    [
        ("rollout", "temperature", "nan", "nan"),
        ("optim", "learning_rate", "inf", "inf"),
        ("algorithm", "kl_coeff", "+inf", "inf"),
        ("rewards", "weights", "[1.0, -inf]", "-inf"),  # no lower bound to catch it
    ],
)
def test_non_finite_in_toml_names_key_value_and_file(cli, write_toml, section, key, literal, shown):
    path = write_toml("values.toml", f"[{section}]\n{key} = {literal}\n")
    code, out, err = cli("config", "show", "-c", path)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {section}.{key} = ")
    assert f"(from file {path}): expected a finite number, got {shown}" in lines[0]
    assert_clean(out, err)


def test_non_finite_from_set_names_the_layer(cli):
    code, out, err = cli("config", "show", "--set", "optim.learning_rate=inf")
    assert code == 2
    (line,) = error_lines(err)
    assert "optim.learning_rate = inf (from --set optim.learning_rate=inf): expected a" in line
    assert_clean(out, err)


def test_non_finite_from_env_config_file(write_toml, monkeypatch):
    path = write_toml("env.toml", "[rewards]\nweights = [-inf]\n")
    with pytest.raises(ConfigProblems) as info:
        resolve_config(environ={"MLX_GRPO_CONFIG": str(path)})
    (problem,) = info.value.problems
    assert problem.startswith("rewards.weights = [-inf] (from env MLX_GRPO_CONFIG=")
    assert problem.endswith("expected a finite number, got -inf; give a real value")


def test_non_finite_from_env_reference(write_toml):
    path = write_toml("ref.toml", '[rollout]\ntop_p = "${env:TOP_P}"\n')
    with pytest.raises(ConfigProblems) as info:
        resolve_config([path], environ={"TOP_P": "NaN"})
    (problem,) = info.value.problems
    assert problem.startswith("rollout.top_p = '${env:TOP_P}'")
    assert "expected a finite number, got nan" in problem


def test_non_finite_command_flag_fails_before_the_model_loads(cli, monkeypatch):
    _forbid_model_loading(monkeypatch)
    code, out, err = cli("infer", "-m", "builtin:tiny-qwen2", "--temperature", "nan", "hi")
    assert code == 2
    (line,) = error_lines(err)
    assert "generate.temperature = nan (from flag --temperature): expected a finite" in line
    assert_clean(out, err)


# --- 2. bytes that are not UTF-8 ----------------------------------------------------------------


def test_binary_config_file_names_the_file(cli, tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"[rollout]\ntemperature = 0.5\n" + BAD_BYTES + b"\x00\x01")
    code, out, err = cli("config", "show", "-c", path)
    assert code == 2
    (line,) = error_lines(err)
    assert f"config file {path} is not UTF-8 text (byte 0xff on line 3)" in line
    assert_clean(out, err)


def test_config_validate_reports_a_binary_file(cli, tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(BAD_BYTES * 8)
    code, out, err = cli("config", "validate", path)
    assert code == 2
    assert "not UTF-8" in err and str(path) in err
    assert_clean(out, err)


def test_infer_file_with_bad_bytes_names_file_and_line(cli, tmp_path, monkeypatch):
    _forbid_model_loading(monkeypatch)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n\n{"prompt": "bad ' + BAD_BYTES + b'"}\n')
    code, out, err = cli("infer", "-m", "builtin:tiny-qwen2", "--file", prompts)
    assert code == 2
    (line,) = error_lines(err)
    assert f"{prompts}:3 is not valid UTF-8" in line
    assert_clean(out, err)
    assert not (tmp_path / "prompts.answers.jsonl").exists()


def test_undecodable_argument_is_a_config_error(cli, monkeypatch):
    _forbid_model_loading(monkeypatch)
    bad = b"hi \xff".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, out, err = cli("infer", "-m", "builtin:tiny-qwen2", "--system", bad, "hello")
    assert code == 2
    (line,) = error_lines(err)
    assert "generate.system_prompt" in line and "not valid UTF-8" in line
    code, out, err = cli("infer", "-m", "builtin:tiny-qwen2", bad)
    assert code == 2
    assert "PROMPT is not valid UTF-8" in err
    assert_clean(out, err)


def test_chat_survives_bad_bytes_on_stdin(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "mlxgrpo", "chat", "-m", "builtin:tiny-qwen2", "--max-tokens", "2"],
        input=b"hello " + BAD_BYTES + b"\n/reset\n/exit\n",
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "not valid UTF-8" in err
    assert "conversation cleared" in err  # the chat went on to the next line
    assert_clean(out, err)


def test_chat_replaces_surrogates_from_a_text_stdin(monkeypatch):
    import io
    import sys

    from mlxgrpo import ui

    monkeypatch.setattr(sys, "stdin", io.StringIO(b"a\xffb\n".decode("utf-8", "surrogateescape")))
    assert ui.chat_input(False) == "a\ufffdb"
    assert ui.chat_input(False) is None


def test_jsonl_data_with_bad_bytes_names_file_and_line(tmp_path):
    from mlxgrpo.data import load_examples

    data = tmp_path / "train.jsonl"
    rows = [b'{"question": "q%d", "answer": "1"}' % i for i in range(3)]
    rows.insert(2, b'{"question": "' + BAD_BYTES + b'", "answer": "2"}')
    data.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(ConfigError) as info:
        load_examples(str(data))
    assert f"{data}:3 is not valid UTF-8" in info.value.message
    assert "\n" not in str(info.value)


def test_train_on_bad_jsonl_is_a_one_line_error(cli, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "\xe2\x82"}\n')
    code, out, err = cli(
        *TRAIN, "--set", f"data.dataset={data}", "--max-steps", "1", "-o", tmp_path / "runs"
    )
    assert code == 2
    (line,) = error_lines(err)
    assert f"{data}:2 is not valid UTF-8" in line
    assert_clean(out, err)


# --- 3. run names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["group/a", "../x", ".", "..", " ", "a\\b", "a\x00b", "a\nb"])
def test_run_name_must_be_one_directory_name(cli, tmp_path, monkeypatch, name):
    _forbid_model_loading(monkeypatch)
    runs = tmp_path / "out" / "runs"
    code, out, err = cli(*TRAIN, "-o", runs, "--run-name", name, "--max-steps", "1")
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: run.run_name = {name!r} (from flag --run-name)")
    assert_clean(out, err)
    assert not (tmp_path / "out").exists()  # nothing written, inside or outside output_dir


def test_run_name_that_names_an_existing_nested_run(cli, tmp_path, monkeypatch):
    _forbid_model_loading(monkeypatch)
    existing = tmp_path / "runs" / "group" / "a"
    existing.mkdir(parents=True)
    (existing / "metrics.jsonl").write_text("{}\n")
    code, out, err = cli(
        *TRAIN, "-o", tmp_path / "runs", "--run-name", "group/a", "--resume", "never"
    )
    assert code == 2
    assert "not a path" in err
    assert_clean(out, err)


def test_plain_and_empty_run_names_are_fine():
    assert resolve_config(overrides=["run.run_name=exp-1.b_2"]).config.run.run_name == "exp-1.b_2"
    assert resolve_config(overrides=["run.run_name="]).config.run.run_name == ""


def test_run_directory_guards_library_callers(tmp_path):
    from mlxgrpo.engine.loop.trainer import run_directory

    with pytest.raises(ConfigError, match="not a path"):
        run_directory(str(tmp_path), "../escape", "auto")
    assert run_directory(str(tmp_path), "ok", "auto") == tmp_path / "ok"


# --- 4. --resume is checked before the model loads ---------------------------------------------


def _forbid_model_loading(monkeypatch):
    import mlxgrpo.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("kind", ["missing", "file", "empty_dir"])
def test_bad_resume_fails_early_and_leaves_no_run_dir(cli, tmp_path, monkeypatch, kind):
    _forbid_model_loading(monkeypatch)
    target = tmp_path / "elsewhere" / "step-000001"
    if kind == "file":
        target.parent.mkdir()
        target.write_text("not a checkpoint")
    elif kind == "empty_dir":
        target.mkdir(parents=True)
    runs = tmp_path / "runs"
    code, out, err = cli(*TRAIN, "-o", runs, "--run-name", "r", "--resume", target)
    assert code == 2
    (line,) = error_lines(err)
    expected = {
        "missing": "no such directory",
        "file": "a file, not a checkpoint directory",
        "empty_dir": "not a complete mlxgrpo checkpoint (no trainer_state.json)",
    }[kind]
    assert f"run.resume = '{target}': {expected}" in line
    assert_clean(out, err)
    assert not runs.exists()


def test_auto_and_never_pass_the_early_check():
    from mlxgrpo.engine.loop.resume import check_resume_target

    check_resume_target("auto")
    check_resume_target("never")
    with pytest.raises(ConfigError):
        check_resume_target("Auto")  # spelled differently: a path, which does not exist


# --- 5. user text is never read as Rich markup ---------------------------------------------------


def test_bracketed_section_name_survives_in_the_error(cli, write_toml):
    path = write_toml("typo.toml", "[rolout]\ntemperature = 0.5\n")
    code, out, err = cli("config", "show", "-c", path)
    assert code == 2
    (line,) = error_lines(err)
    assert "unknown section [rolout] — did you mean [rollout]?" in line


def test_error_problems_and_hint_are_escaped(capsys):
    from mlxgrpo import ui

    ui.error(ConfigProblems(["a [bold]b[/bold] [x]"], hint="see [docs]"))
    ui.error(ConfigError("one [red]two[/]", hint="[fix]"))
    err = capsys.readouterr().err
    assert "a [bold]b[/bold] [x]" in err
    assert "hint: see [docs]" in err
    assert "one [red]two[/] — [fix]" in err


def test_warnings_notes_and_tables_are_escaped(capsys):
    from mlxgrpo import ui

    ui.note("note [n]")
    ui.success("done [s]")
    ui.key_value_table("title [t]", [("[k]", "[v]")], ("[h1]", "h2"))
    ui.runs_table("runs in [dir]", [])
    ui.eval_table("eval: [data]", [("[label]", {"accuracy": 0.5})])
    with ui.stage_status("stage [a]") as status:
        status.update("stage [b]")
    ui.err.print(ui.reward_table(1, _metrics("[fn]")))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for fragment in (
        "note [n]",
        "done [s]",
        "title [t]",
        "[k]",
        "[v]",
        "[h1]",
        "runs in [dir]",
        "eval: [data]",
        "[label]",
        "[fn]",
    ):
        assert fragment in text, fragment


def _metrics(name: str) -> dict:
    return {
        "rewards": {name: {"mean": 0.5, "std": 0.1}},
        "reward_mean": 0.5,
        "reward_std": 0.1,
        "completion_length_mean": 3.0,
        "completion_length_min": 1.0,
        "completion_length_max": 5.0,
    }


def test_subprocess_error_is_one_line_with_brackets(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[optimm]\nlearning_rate = 1e-5\n")
    proc = run_subprocess(["config", "show", "-c", str(path)])
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert "[optimm]" in line and "[optim]" in line
    assert_clean(proc.stdout, proc.stderr)
