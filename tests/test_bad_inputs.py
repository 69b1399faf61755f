"""Bad inputs through the real CLI: each gives one error line naming the problem, exit != 0.

Every case is an argv (with `{tmp}`, `{model}` and `{adapters}` filled in), the files it writes
first, the exit code and a substring the error line must contain. The checks are the same for
all: a non-zero exit, the substring on the error line, one error line (an optional `hint:`
line, and Click's `Usage:` framing for usage errors, may come with it), no traceback and no
"unexpected error" line. Nothing trains beyond one update of the builtin tiny model; most cases
fail before any model loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_cases import (
    MODEL,
    Assets,
    Case,
    assets,
    check_one_line_error,
    check_table,
    run_case,
    table_params,
)

__all__ = ["assets"]  # the fixture is imported for pytest to find it here
# One update of the tiny model at most, all blocks adapted (the preset's defaults are larger).
TINY_TRAIN = (
    "--model", MODEL, "--max-steps", "1", "--set", "finetune.lora_layers=-1",
    "--set", "optim.batch_size=1", "--set", "optim.gradient_accumulation_steps=1",
    "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=4",
)  # fmt: skip
EVAL = ("eval", "-m", MODEL, "--limit", "1", "--max-tokens", "2")
SYNTH = "synthetic:arithmetic"

# ---------------------------------------------------------------------------------------------
# Setups that need the tiny model or its adapters


def _copy_model(tmp: Path, assets: Assets, name: str = "m") -> Path:
    dest = tmp / name
    shutil.copytree(assets.model, dest)
    return dest


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def truncated_weights(tmp: Path, assets: Assets) -> None:
    _truncate(_copy_model(tmp, assets) / "model.safetensors")


def stub_weights(tmp: Path, assets: Assets) -> None:
    _truncate(_copy_model(tmp, assets) / "model.safetensors", keep=5)


def garbage_weights(tmp: Path, assets: Assets) -> None:
    # A plausible 8-byte length, then bytes that are no JSON header.
    (_copy_model(tmp, assets) / "model.safetensors").write_bytes(
        (16).to_bytes(8, "little") + b"\x00\x01garbage-garbage" + b"\x00" * 64
    )


def corrupt_model_config(tmp: Path, assets: Assets) -> None:
    (_copy_model(tmp, assets) / "config.json").write_text('{"model_type": "qwen2",')


def list_model_config(tmp: Path, assets: Assets) -> None:
    (_copy_model(tmp, assets) / "config.json").write_text("[1, 2]")


def unknown_architecture(tmp: Path, assets: Assets) -> None:
    path = _copy_model(tmp, assets) / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "model_type": "no_such_arch"}))


def truncated_builtin_cache(tmp: Path, assets: Assets) -> None:
    """The cached copy of the builtin model (MLXGRPO_CACHE_DIR is set to tmp/cache) is cut."""
    from mlxgrpo.models.builtin import builtin_model_dir

    cached = builtin_model_dir(MODEL)
    assert str(cached).startswith(str(tmp))
    shutil.copytree(assets.model, cached)
    _truncate(cached / "model.safetensors")


def model_without_weights(tmp: Path, assets: Assets) -> None:
    (_copy_model(tmp, assets) / "model.safetensors").unlink()


def model_without_config(tmp: Path, assets: Assets) -> None:
    (_copy_model(tmp, assets) / "config.json").unlink()


def _copy_adapters(tmp: Path, assets: Assets) -> Path:
    dest = tmp / "a"
    shutil.copytree(assets.adapters, dest)
    return dest


def corrupt_adapter_config(tmp: Path, assets: Assets) -> None:
    (_copy_adapters(tmp, assets) / "adapter_config.json").write_text('{"num_layers": 2,,}')


def empty_adapter_config(tmp: Path, assets: Assets) -> None:
    (_copy_adapters(tmp, assets) / "adapter_config.json").write_text("")


def incomplete_adapter_config(tmp: Path, assets: Assets) -> None:
    (_copy_adapters(tmp, assets) / "adapter_config.json").write_text('{"num_layers": 2}')


def mismatched_adapters(tmp: Path, assets: Assets) -> None:
    path = _copy_adapters(tmp, assets) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_parameters"]["rank"] = config["lora_parameters"]["rank"] * 2
    path.write_text(json.dumps(config))


def truncated_adapter_weights(tmp: Path, assets: Assets) -> None:
    _truncate(_copy_adapters(tmp, assets) / "adapters.safetensors")


def adapters_without_weights(tmp: Path, assets: Assets) -> None:
    (_copy_adapters(tmp, assets) / "adapters.safetensors").unlink()


def existing_output(tmp: Path, assets: Assets) -> None:
    (tmp / "out").mkdir()


def file_in_the_way(tmp: Path, assets: Assets) -> None:
    (tmp / "blocker").write_text("a file, not a directory\n")


def resume_without_checkpoint(tmp: Path, assets: Assets) -> None:
    (tmp / "ckpt").mkdir()


# ---------------------------------------------------------------------------------------------
# The table

PROMPTS = '{"prompt": "What is 2+2?"}\n'
GOOD_REWARD = (
    "def other(prompts, completions, answers, **kw):\n    return [0.0] * len(completions)\n"
)

CONFIG = [
    Case("unknown-section", ("config", "show", "-c", "{tmp}/c.toml"), 2, "bogus",
         files={"c.toml": "[bogus]\nx = 1\n"}),
    Case("unknown-key", ("config", "show", "-c", "{tmp}/c.toml"), 2, "pathh",
         files={"c.toml": '[model]\npathh = "x"\n'}),
    Case("unknown-key-set", ("config", "show", "--set", "optim.learnin_rate=1e-5"), 2,
         "learnin_rate"),
    Case("unknown-section-set", ("config", "show", "--set", "nosection.key=1"), 2, "nosection"),
    Case("set-without-equals", ("config", "show", "--set", "optim.learning_rate"), 2,
         "optim.learning_rate"),
    Case("wrong-type-number", ("config", "show", "-c", "{tmp}/c.toml"), 2,
         "expected a number", files={"c.toml": '[rollout]\ntemperature = "hot"\n'}),
    Case("wrong-type-int", ("config", "show", "-c", "{tmp}/c.toml"), 2, "batch_size",
         files={"c.toml": "[optim]\nbatch_size = 1.5\n"}),
    Case("wrong-type-bool", ("config", "show", "--set", "data.shuffle=maybe"), 2, "shuffle"),
    Case("wrong-type-list", ("config", "show", "-c", "{tmp}/c.toml"), 2, "functions",
         files={"c.toml": "[rewards]\nfunctions = 3\n"}),
    Case("out-of-range-batch", ("config", "show", "--set", "optim.batch_size=0"), 2,
         "batch_size"),
    Case("out-of-range-top-p", ("config", "show", "--set", "rollout.top_p=1.5"), 2, "top_p"),
    Case("out-of-range-lr", ("config", "show", "--set", "optim.learning_rate=-1"), 2,
         "learning_rate"),
    Case("bad-choice", ("config", "show", "--set", "finetune.type=qlora"), 2, "qlora"),
    Case("bad-toml", ("config", "show", "-c", "{tmp}/c.toml"), 2, "c.toml",
         files={"c.toml": '[model\npath = "x"\n'}),
    Case("missing-config", ("config", "show", "-c", "{tmp}/missing.toml"), 2, "missing.toml"),
    Case("missing-config-train", ("train", "-c", "{tmp}/missing.toml"), 2, "missing.toml"),
    Case("config-is-dir", ("config", "show", "-c", "{tmp}"), 2, "directory"),
    Case("unknown-preset", ("config", "show", "-c", "nosuchpreset"), 2, "nosuchpreset"),
    Case("missing-env-config", ("config", "show"), 2, "MLX_GRPO_CONFIG",
         env={"MLX_GRPO_CONFIG": "{tmp}/nope.toml"}, subprocess=True),
    Case("weights-length", (*EVAL, "-d", SYNTH, "-c", "{tmp}/c.toml"), 2, "weights",
         files={"c.toml": '[rewards]\nfunctions = ["soft_format", "correctness"]\n'
                          "weights = [1.0]\n"}),
    # NaN / inf (agent r1's part)
    Case("nan-set", ("config", "show", "--set", "optim.learning_rate=nan"), 2, "learning_rate"),
    Case("inf-set", ("config", "show", "--set", "rollout.temperature=inf"), 2, "temperature"),
    Case("nan-toml", ("config", "show", "-c", "{tmp}/c.toml"), 2, "clip_eps",
         files={"c.toml": "[algorithm]\nclip_eps = nan\n"}),
    Case("inf-toml", ("config", "show", "-c", "{tmp}/c.toml"), 2, "max_grad_norm",
         files={"c.toml": "[optim]\nmax_grad_norm = inf\n"}),
    Case("nan-temperature-flag", ("infer", "-m", MODEL, "--temperature", "nan", "hi"), 2,
         "temperature"),
    # Non-UTF-8 config (agent r1's part)
    Case("non-utf8-config", ("config", "show", "-c", "{tmp}/c.toml"), 2, "UTF-8",
         files={"c.toml": b'[model]\npath = "caf\xe9"\n'}),
    # Run names (agent r1's part)
    Case("run-name-traversal", ("train", *TINY_TRAIN, "--set", f"data.dataset={SYNTH}",
                                "-o", "{tmp}/runs", "--run-name", "../escape"), 2, "run.run_name"),
    Case("run-name-slash", ("train", *TINY_TRAIN, "--set", f"data.dataset={SYNTH}",
                            "-o", "{tmp}/runs", "--run-name", "a/b"), 2, "run.run_name"),
]  # fmt: skip

DATA = [
    Case("missing-dataset", (*EVAL, "--dataset", "{tmp}/nope.jsonl"), 2, "nope.jsonl"),
    Case("empty-jsonl", (*EVAL, "--dataset", "{tmp}/d.jsonl"), 2, "no rows",
         files={"d.jsonl": ""}),
    Case("blank-jsonl", (*EVAL, "--dataset", "{tmp}/d.jsonl"), 2, "no rows",
         files={"d.jsonl": "\n\n  \n"}),
    Case("empty-csv", (*EVAL, "--dataset", "{tmp}/d.csv"), 2, "no rows", files={"d.csv": ""}),
    Case("header-only-csv", (*EVAL, "--dataset", "{tmp}/d.csv"), 2, "no rows",
         files={"d.csv": "question,answer\n"}),
    Case("empty-json-list", (*EVAL, "--dataset", "{tmp}/d.json"), 2, "no rows",
         files={"d.json": "[]\n"}),
    Case("empty-train", ("train", *TINY_TRAIN, "-o", "{tmp}/runs",
                         "--set", "data.dataset={tmp}/d.jsonl"), 2, "d.jsonl is empty",
         files={"d.jsonl": ""}),
    Case("corrupt-jsonl", (*EVAL, "--dataset", "{tmp}/d.jsonl"), 2, "d.jsonl",
         files={"d.jsonl": '{"question": "a", "answer": "1"}\n{"question": \n'}),
    Case("corrupt-parquet", (*EVAL, "--dataset", "{tmp}/d.parquet"), 2, "d.parquet",
         files={"d.parquet": b"PAR1 not really a parquet file"}),
    Case("wrong-prompt-field", (*EVAL, "--dataset", "{tmp}/d.jsonl"), 2, "'question'",
         files={"d.jsonl": '{"q": "a", "answer": "1"}\n'}),
    Case("wrong-answer-field", (*EVAL, "--dataset", "{tmp}/d.jsonl", "--set",
                                "data.answer_field=solution"), 2, "'solution'",
         files={"d.jsonl": '{"question": "a", "answer": "1"}\n'}),
    Case("unsupported-type", (*EVAL, "--dataset", "{tmp}/d.txt"), 2, "d.txt",
         files={"d.txt": "question answer\n"}),
    Case("dir-without-data", (*EVAL, "--dataset", "{tmp}/ds/"), 2, "no split",
         files={"ds/readme.md": "nothing here\n"}),
    Case("unknown-synthetic", (*EVAL, "--dataset", "synthetic:no_such_task"), 2,
         "no_such_task"),
]  # fmt: skip

MODELS = [
    Case("missing-model-dir", ("infer", "-m", "{tmp}/nope", "hi"), 2, "not found"),
    Case("model-is-file", ("infer", "-m", "{tmp}/f.bin", "hi"), 2, "is a file",
         files={"f.bin": "x"}),
    Case("model-without-config", ("infer", "-m", "{tmp}/m", "hi"), 2, "no config.json",
         setup=model_without_config),
    Case("model-without-weights", ("infer", "-m", "{tmp}/m", "hi"), 2, "no model*.safetensors",
         setup=model_without_weights),
    Case("corrupt-config-infer", ("infer", "-m", "{tmp}/m", "hi"), 2,
         "config.json' is corrupt", setup=corrupt_model_config),
    Case("corrupt-config-train", ("train", *TINY_TRAIN, "-m", "{tmp}/m", "-o", "{tmp}/runs",
                                  "--set", f"data.dataset={SYNTH}"), 2,
         "config.json' is corrupt", setup=corrupt_model_config),
    Case("corrupt-config-convert", ("convert", "hf-model", "{tmp}/m", "-o", "{tmp}/out"), 2,
         "config.json' is corrupt", setup=corrupt_model_config),
    Case("config-not-object", ("eval", "-m", "{tmp}/m", "-d", SYNTH, "-n", "1"), 2,
         "does not hold a JSON object", setup=list_model_config),
    Case("truncated-weights-infer", ("infer", "-m", "{tmp}/m", "hi"), 2, "truncated",
         setup=truncated_weights),
    Case("truncated-weights-chat", ("chat", "-m", "{tmp}/m"), 2, "truncated",
         setup=truncated_weights),
    Case("truncated-weights-convert", ("convert", "hf-model", "{tmp}/m", "-o", "{tmp}/out"), 2,
         "model.safetensors' is corrupt", setup=truncated_weights),
    Case("truncated-weights-fresh", ("infer", "-m", "{tmp}/m", "hi"), 2,
         "model.safetensors' is corrupt", setup=truncated_weights, subprocess=True),
    Case("stub-weights", ("infer", "-m", "{tmp}/m", "hi"), 2, "truncated", setup=stub_weights),
    Case("garbage-weights", ("infer", "-m", "{tmp}/m", "hi"), 2, "model.safetensors",
         setup=garbage_weights),
    Case("truncated-builtin-cache", ("infer", "-m", MODEL, "hi"), 2,
         "model.safetensors' is corrupt", setup=truncated_builtin_cache,
         env={"MLXGRPO_CACHE_DIR": "{tmp}/cache"}),
    Case("unknown-architecture", ("infer", "-m", "{tmp}/m", "hi"), 1, "no_such_arch",
         setup=unknown_architecture),
    Case("unknown-builtin", ("infer", "-m", "builtin:no-such-model", "hi"), 2, "no-such-model"),
]  # fmt: skip

ADAPTERS = [
    Case("missing-adapter", ("infer", "-m", MODEL, "-a", "{tmp}/nope", "hi"), 2, "not found"),
    Case("adapter-without-weights", ("infer", "-m", MODEL, "-a", "{tmp}/a", "hi"), 2,
         "lacks adapters.safetensors", setup=adapters_without_weights),
    Case("corrupt-adapter-config", ("infer", "-m", MODEL, "-a", "{tmp}/a", "hi"), 2,
         "adapter_config.json' is corrupt", setup=corrupt_adapter_config),
    Case("empty-adapter-config", ("eval", "-m", MODEL, "-a", "{tmp}/a", "-d", SYNTH, "-n", "1"),
         2, "adapter_config.json' is corrupt", setup=empty_adapter_config),
    Case("corrupt-adapter-config-fuse", ("convert", "fuse", "-m", MODEL, "-a", "{tmp}/a",
                                         "-o", "{tmp}/out"), 2,
         "adapter_config.json' is corrupt", setup=corrupt_adapter_config),
    Case("incomplete-adapter-config", ("infer", "-m", MODEL, "-a", "{tmp}/a", "hi"), 2,
         "lora_parameters", setup=incomplete_adapter_config),
    Case("truncated-adapter-weights", ("infer", "-m", MODEL, "-a", "{tmp}/a", "hi"), 2,
         "adapters.safetensors' is corrupt", setup=truncated_adapter_weights),
    Case("mismatched-adapters", ("infer", "-m", MODEL, "-a", "{tmp}/a", "hi"), 2,
         "do not fit", setup=mismatched_adapters),
    Case("adapter-last-without-runs", (*EVAL, "-d", SYNTH, "--adapter", "last",
                                       "--set", "run.output_dir={tmp}/none"), 2,
         "no run with adapters"),
    Case("compare-base-without-adapters", (*EVAL, "-d", SYNTH, "--compare-base"), 2,
         "--compare-base needs adapters"),
    Case("missing-adapter-chat", ("chat", "-m", MODEL, "-a", "{tmp}/nope"), 2, "not found"),
    Case("missing-adapter-train", ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--set",
                                   f"data.dataset={SYNTH}", "--set",
                                   "model.adapter_path={tmp}/nope"), 2, "nope"),
]  # fmt: skip

REWARDS = [
    Case("unknown-reward", (*EVAL, "-d", SYNTH, "--set", 'rewards.functions=["nope_reward"]'),
         2, "nope_reward"),
    Case("bad-reward-spec", (*EVAL, "-d", SYNTH, "--set", 'rewards.functions=["mod:"]'), 2,
         "mod:"),
    Case("reward-file-missing", (*EVAL, "-d", SYNTH, "--set",
                                 'rewards.functions=["{tmp}/r.py:score"]'), 2, "file not found"),
    Case("reward-file-without-function", (*EVAL, "-d", SYNTH, "--set",
                                          'rewards.functions=["{tmp}/r.py:score"]'), 2,
         "no attribute 'score'", files={"r.py": GOOD_REWARD}),
    Case("reward-not-callable", (*EVAL, "-d", SYNTH, "--set",
                                 'rewards.functions=["{tmp}/r.py:score"]'), 2,
         "not callable", files={"r.py": "score = 3\n"}),
    Case("reward-file-syntax-error", (*EVAL, "-d", SYNTH, "--set",
                                      'rewards.functions=["{tmp}/r.py:score"]'), 2,
         "SyntaxError", files={"r.py": "def score(:\n"}),
    Case("reward-module-missing", (*EVAL, "-d", SYNTH, "--set",
                                   'rewards.functions=["no_such_module_xyz:score"]'), 2,
         "no_such_module_xyz"),
    Case("empty-reward-name", (*EVAL, "-d", SYNTH, "--set", 'rewards.functions=[" "]'), 2,
         "Empty reward function name"),
    # The reward contract (agent r2's part): a reward that returns text instead of numbers.
    Case("reward-returns-text", ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--set",
                                 f"data.dataset={SYNTH}", "--set",
                                 'rewards.functions=["{tmp}/r.py:score"]', "--set",
                                 "rewards.max_consecutive_failures=1"), 1, "score", runs=True,
         files={"r.py": "def score(prompts, completions, answers, **kwargs):\n"
                        "    return ['high' for _ in completions]\n"}),
]  # fmt: skip

COMMANDS = [
    Case("unknown-command", ("no-such-command",), 2, "no-such-command"),
    Case("unknown-flag", ("infer", "--bogus", "hi"), 2, "--bogus"),
    Case("flag-not-a-number", ("infer", "--max-tokens", "abc", "hi"), 2, "--max-tokens"),
    Case("batch-size-zero", ("infer", "-f", "{tmp}/p.jsonl", "--batch-size", "0"), 2,
         "--batch-size", files={"p.jsonl": PROMPTS}),
    Case("infer-negative-temperature", ("infer", "-m", MODEL, "-t", "-1", "hi"), 2,
         "temperature"),
    Case("infer-top-p-range", ("infer", "-m", MODEL, "--top-p", "2", "hi"), 2, "top_p"),
    Case("infer-no-prompt", ("infer", "-m", MODEL), 2, "prompt"),
    Case("infer-missing-file", ("infer", "-m", MODEL, "-f", "{tmp}/nope.jsonl"), 2,
         "nope.jsonl"),
    Case("infer-bad-jsonl", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl"), 2,
         "p.jsonl:2 is not valid JSON", files={"p.jsonl": PROMPTS + '{"prompt": \n'}),
    Case("infer-output-exists", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl",
                                 "-o", "{tmp}/out.jsonl"), 2, "exists",
         files={"p.jsonl": PROMPTS, "out.jsonl": "old\n"}),
    Case("infer-output-under-file", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl",
                                     "-o", "{tmp}/blocker/out.jsonl"), 1, "blocker",
         files={"p.jsonl": PROMPTS}, setup=file_in_the_way),
    Case("infer-file-and-prompt", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl", "hi"), 2,
         "--file", files={"p.jsonl": PROMPTS}),
    Case("infer-non-utf8-prompts", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl"), 2, "UTF-8",
         files={"p.jsonl": b'{"prompt": "caf\xe9"}\n'}),
    Case("eval-pass-k-zero", (*EVAL, "-d", SYNTH, "--pass-k", "0"), 2, "pass_k"),
    Case("eval-output-exists", (*EVAL, "-d", SYNTH, "-o", "{tmp}/out.jsonl"), 2, "exists",
         files={"out.jsonl": "old\n"}),
    Case("eval-output-is-dir", (*EVAL, "-d", SYNTH, "-o", "{tmp}/outdir", "--force"), 1,
         "outdir", files={"outdir/keep": ""}),
    Case("convert-missing-source", ("convert", "hf-model", "{tmp}/nope", "-o", "{tmp}/out"), 2,
         "not found"),
    Case("convert-bad-dtype", ("convert", "hf-model", MODEL, "-o", "{tmp}/out",
                               "--dtype", "float8"), 2, "float8"),
    Case("convert-bad-bits", ("convert", "hf-model", MODEL, "-o", "{tmp}/out", "-q",
                              "--bits", "5"), 2, "5 bits"),
    Case("convert-bad-mode", ("convert", "hf-model", MODEL, "-o", "{tmp}/out", "-q",
                              "--mode", "nf4"), 2, "nf4"),
    Case("convert-bad-group-size", ("convert", "hf-model", MODEL, "-o", "{tmp}/out",
                                    "--group-size", "48"), 2, "group size 48"),
    Case("convert-output-exists", ("convert", "hf-model", MODEL, "-o", "{tmp}/out"), 2,
         "already exists", setup=existing_output),
    Case("convert-output-overlaps", ("convert", "hf-model", "{tmp}/m", "-o", "{tmp}/m",
                                     "--force"), 2, "overlaps", setup=_copy_model),
    Case("convert-missing-output-flag", ("convert", "hf-model", MODEL), 2, "--output"),
    Case("chat-missing-model", ("chat", "-m", "{tmp}/nope"), 2, "not found"),
    Case("plot-missing-run", ("plot", "{tmp}/no-run", "-o", "{tmp}/p.png"), 2, "no-run"),
]  # fmt: skip

RESUME = [
    # Early --resume checks (agent r1's part): these must fail before any model loads.
    Case("resume-missing-path", ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--set",
                                 f"data.dataset={SYNTH}", "--resume", "{tmp}/nope"), 2, "nope"),
    Case("resume-not-a-checkpoint", ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--set",
                                     f"data.dataset={SYNTH}", "--resume", "{tmp}/ckpt"), 2,
         "ckpt", setup=resume_without_checkpoint),
    Case("resume-a-file", ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--set",
                           f"data.dataset={SYNTH}", "--resume", "{tmp}/f.txt"), 2, "f.txt",
         files={"f.txt": "x"}),
]  # fmt: skip

GROUPS = {
    "config": CONFIG,
    "data": DATA,
    "models": MODELS,
    "adapters": ADAPTERS,
    "rewards": REWARDS,
    "commands": COMMANDS,
    "resume": RESUME,
}
CASES = table_params(GROUPS)


def test_the_table_is_large_and_unique():
    check_table(GROUPS)


# ---------------------------------------------------------------------------------------------
# The checks


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_error_line(case, cli, tmp_path, assets, monkeypatch):
    run_case(case, cli, tmp_path, assets, monkeypatch)


def test_the_checks_can_fail():
    """The assertions catch a traceback, two error lines, a wrong message and exit code 0."""
    case = Case("x", ("x",), 2, "config.json")
    good = "error: 'm/config.json' is corrupt: not valid JSON — restore it\n"
    check_one_line_error(case, 2, good)
    check_one_line_error(case, 2, "Usage: mlxgrpo x\nTry 'mlxgrpo x -h' for help.\n\n" + good)
    for code, stderr in [
        (0, good),
        (1, good),
        (2, good + "error: another line\n"),
        (2, "Traceback (most recent call last):\n" + good),
        (2, "error: RuntimeError: config.json — this is a bug in mlxgrpo or an unexpected input"),
        (2, "error: model.safetensors is truncated\n"),
    ]:
        with pytest.raises(AssertionError):
            check_one_line_error(case, code, stderr)
