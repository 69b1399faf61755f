"""Bad inputs, round 2: limits on what is parsed, bounds on numbers, escaped user text, typed
data rows, checked model directories, resumes that must match their checkpoint, and smaller
ones. Each case goes through the real entry point with test_bad_inputs.py's contract
(tests/cli_cases.py): a non-zero exit, the expected text on one error line, no traceback and
no "bug in mlxgrpo".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_cases import MODEL, Assets, Case, assets, check_table, run_case, table_params

__all__ = ["assets"]  # the fixture is imported for pytest to find it here

SYNTH = "synthetic:arithmetic"
TINY_TRAIN = (
    "--model", MODEL, "--max-steps", "1", "--set", "finetune.lora_layers=-1",
    "--set", "optim.batch_size=1", "--set", "optim.gradient_accumulation_steps=1",
    "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=4",
)  # fmt: skip
TRAIN = ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--set", f"data.dataset={SYNTH}")
DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_TOML = "[" * 5_000 + "]" * 5_000
PROMPTS = '{"prompt": "What is 2+2?"}\n'


def _copy_model(tmp: Path, assets: Assets, name: str = "m") -> Path:
    dest = tmp / name
    shutil.copytree(assets.model, dest)
    return dest


def _edit_config(tmp: Path, assets: Assets, **changes) -> None:
    path = _copy_model(tmp, assets) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


# --- setups: model directories ---------------------------------------------------------------


def deep_model_config(tmp: Path, assets: Assets) -> None:
    (_copy_model(tmp, assets) / "config.json").write_text('{"model_type": ' + DEEP_JSON + "}")


def llama_config_over_qwen2_weights(tmp: Path, assets: Assets) -> None:
    _edit_config(tmp, assets, model_type="llama")


def string_hidden_size(tmp: Path, assets: Assets) -> None:
    _edit_config(tmp, assets, hidden_size="64")


def float_layer_count(tmp: Path, assets: Assets) -> None:
    _edit_config(tmp, assets, num_hidden_layers=2.5)


def no_model_type(tmp: Path, assets: Assets) -> None:
    _edit_config(tmp, assets, model_type=None)


def negative_vocab(tmp: Path, assets: Assets) -> None:
    _edit_config(tmp, assets, vocab_size=-5)


def no_tokenizer(tmp: Path, assets: Assets) -> None:
    model = _copy_model(tmp, assets)
    for path in model.iterdir():
        if path.name.startswith("tokenizer") or path.name == "chat_template.jinja":
            path.unlink()


def broken_chat_template(tmp: Path, assets: Assets) -> None:
    model = _copy_model(tmp, assets)
    template = "{% for m in messages %}{{ m.content }"
    (model / "chat_template.jinja").write_text(template)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if "chat_template" in config:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config))


def tokenizer_of_a_larger_model(tmp: Path, assets: Assets) -> None:
    """The tokenizer's ids run past the embedding: its PAD id is 97, the embedding has 60."""
    import mlx.core as mx

    model = _copy_model(tmp, assets)
    weights = mx.load(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:60]
    mx.save_safetensors(str(model / "model.safetensors"), weights)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 60}))


def deep_adapter_config(tmp: Path, assets: Assets) -> None:
    shutil.copytree(assets.adapters, tmp / "a")
    (tmp / "a" / "adapter_config.json").write_text('{"x": ' + DEEP_JSON + "}")


def deep_safetensors_header(tmp: Path, assets: Assets) -> None:
    header = ('{"a": ' + "[" * 200 + "]" * 200 + "}").encode()
    data = len(header).to_bytes(8, "little") + header
    (_copy_model(tmp, assets) / "model.safetensors").write_bytes(data)


def file_in_the_way(tmp: Path, assets: Assets) -> None:
    (tmp / "blocker").write_text("a file, not a directory\n")


# --- setups: data, runs and checkpoints ------------------------------------------------------


def _saved_dataset(tmp: Path) -> Path:
    import datasets

    path = tmp / "saved"
    datasets.disable_progress_bars()  # its bar would land in the case's stderr
    try:
        table = datasets.Dataset.from_dict({"question": ["What is 2+2?"], "answer": ["4"]})
        table.save_to_disk(str(path))
    finally:
        datasets.enable_progress_bars()
    return path


def broken_saved_dataset_state(tmp: Path, assets: Assets) -> None:
    (_saved_dataset(tmp) / "state.json").write_text('{"_data_files": [')


def deep_saved_dataset_state(tmp: Path, assets: Assets) -> None:
    (_saved_dataset(tmp) / "state.json").write_text('{"_data_files": ' + DEEP_JSON + "}")


def _trained_run(tmp: Path, *sets: str) -> Path:
    """A finished one-update run at tmp/runs/r with a checkpoint, trained in-process."""
    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.loop.trainer import train

    argv = [
        f"model.path={MODEL}", "finetune.lora_layers=-1", "optim.batch_size=1",
        "optim.gradient_accumulation_steps=1", "rollout.num_generations=2",
        "rollout.max_new_tokens=4", f"data.dataset={SYNTH}", f"run.output_dir={tmp}/runs",
        "run.run_name=r", "run.max_steps=1", "checkpoint.save_steps=1", *sets,
    ]  # fmt: skip
    train(resolve_config((), argv, environ={}))
    return tmp / "runs" / "r"


def trained_run(tmp: Path, assets: Assets) -> None:
    _trained_run(tmp)


def trained_run_with_deep_state(tmp: Path, assets: Assets) -> None:
    (ckpt,) = (_trained_run(tmp) / "checkpoints").iterdir()
    (ckpt / "trainer_state.json").write_text('{"update": ' + DEEP_JSON + "}")


def run_with_deep_metrics_line(tmp: Path, assets: Assets) -> None:
    run = _trained_run(tmp)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"update": ' + DEEP_JSON + "}\n")
        fh.write('{"update": 2, "kind": "train", "reward_mean": 0.5}\n')


def run_with_deep_completions_line(tmp: Path, assets: Assets) -> None:
    run = _trained_run(tmp, "logging.log_completions=true")
    with (run / "completions.jsonl").open("a") as fh:
        fh.write('{"update": 1, "completion": ' + DEEP_JSON + "}\n")
        fh.write('{"update": 1, "completion": "x"}\n')


# --- the table -------------------------------------------------------------------------------

PARSING = [
    Case("deep-toml-config", ("config", "show", "-c", "{tmp}/c.toml"), 2, "more than 64 levels",
         files={"c.toml": "[rollout]\nstop = " + DEEP_TOML + "\n"}),
    Case("deep-toml-inline-table", ("config", "show", "-c", "{tmp}/c.toml"), 2, "c.toml",
         files={"c.toml": "x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"}),
    Case("deep-toml-in-env-config", ("config", "show"), 2, "more than 64 levels",
         files={"c.toml": "[rollout]\nstop = " + DEEP_TOML + "\n"},
         env={"MLX_GRPO_CONFIG": "{tmp}/c.toml"}),
    Case("deep-toml-extends-base", ("config", "show", "-c", "{tmp}/c.toml"), 2, "base.toml",
         files={"c.toml": 'extends = "base.toml"\n', "base.toml": "x = " + DEEP_TOML + "\n"}),
    Case("deep-set-value", ("config", "show", "--set", "rollout.stop=" + DEEP_TOML), 2,
         "--set rollout.stop"),
    Case("deep-model-config-json", ("infer", "-m", "{tmp}/m", "hi"), 2, "more than 64 levels",
         setup=deep_model_config),
    Case("deep-adapter-config", ("infer", "-m", MODEL, "-a", "{tmp}/a", "hi"), 2,
         "adapter_config.json' is corrupt", setup=deep_adapter_config),
    Case("deep-infer-file-line", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl"), 2,
         "p.jsonl:2 nests arrays", files={"p.jsonl": PROMPTS + DEEP_JSON + "\n"}),
    Case("deep-safetensors-header", ("infer", "-m", "{tmp}/m", "hi"), 2,
         "header is not valid JSON", setup=deep_safetensors_header),
    Case("deep-checkpoint-state", (*TRAIN, "--run-name", "r2", "--max-steps", "2", "--resume",
                                   "{tmp}/runs/r/checkpoints/step-000001"), 1,
         "state.json is corrupt", setup=trained_run_with_deep_state, runs=True),
    Case("deep-metrics-line-plot", ("plot", "{tmp}/runs/r", "-o", "{tmp}/p.png"), 2,
         "metrics.jsonl line", setup=run_with_deep_metrics_line),
    Case("deep-completions-line", ("completions", "{tmp}/runs/r"), 2, "completions.jsonl line",
         setup=run_with_deep_completions_line),
    Case("deep-hostfile", ("launch", "--hostfile", "{tmp}/h.json", "--", "mlxgrpo", "--help"),
         2, "more than 64 levels", files={"h.json": DEEP_JSON}),
    Case("deep-saved-dataset-state", (*TRAIN, "--set", "data.dataset={tmp}/saved"), 2,
         "saved dataset", setup=deep_saved_dataset_state),
]  # fmt: skip

NUMBERS = [
    Case("seed-flag-huge", (*TRAIN, "--seed", str(10**30)), 2, "run.seed"),
    Case("seed-set-huge", (*TRAIN, "--set", f"run.seed={10**30}"), 2, "at most 2147483647"),
    Case("seed-in-toml-huge", (*TRAIN, "-c", "{tmp}/c.toml"), 2, "run.seed",
         files={"c.toml": f"[run]\nseed = {2**62}\n"}),
    Case("max-new-tokens-1e30", (*TRAIN, "--set", f"rollout.max_new_tokens={10**30}"), 2,
         "rollout.max_new_tokens"),
    Case("max-new-tokens-beyond-memory", (*TRAIN, "--set", "rollout.max_new_tokens=1000000000"),
         2, "needs about", runs=True),
    Case("max-new-tokens-beyond-memory-bounded-rows",
         (*TRAIN, "--set", "rollout.max_new_tokens=2000000000", "--set", "rollout.max_rows=1"),
         2, "rollout.max_rows", runs=True),
    Case("batch-size-huge", (*TRAIN, "--set", f"optim.batch_size={10**12}"), 2,
         "optim.batch_size"),
    Case("group-size-huge", (*TRAIN, "--set", f"rollout.num_generations={2**40}"), 2,
         "rollout.num_generations"),
    Case("lora-rank-huge", (*TRAIN, "--set", f"finetune.lora_rank={2**40}"), 2,
         "finetune.lora_rank"),
    Case("prompt-length-huge", (*TRAIN, "--set", f"rollout.max_prompt_length={10**15}"), 2,
         "rollout.max_prompt_length"),
    Case("float-from-huge-integer", (*TRAIN, "--set", f"rollout.temperature={10**400}"), 2,
         "finite number"),
    Case("float-overflows-to-inf", (*TRAIN, "--set", "optim.max_grad_norm=1e400"), 2,
         "finite number"),
    Case("eval-tokens-huge", ("eval", "-m", MODEL, "-d", SYNTH, "--set",
                              f"eval.max_new_tokens={10**20}"), 2, "eval.max_new_tokens"),
    Case("infer-file-tokens-beyond-memory", ("infer", "-m", MODEL, "-f", "{tmp}/p.jsonl",
                                             "--max-tokens", "2000000000"), 2, "needs about",
         files={"p.jsonl": PROMPTS}),
    Case("eval-tokens-beyond-memory", ("eval", "-m", MODEL, "-d", SYNTH, "--limit", "2", "--set",
                                       "eval.max_new_tokens=2000000000"), 2,
         "eval.max_new_tokens = 2000000000"),
    Case("save-steps-huge", (*TRAIN, "--set", f"checkpoint.save_steps={10**10}"), 2,
         "checkpoint.save_steps"),
]  # fmt: skip

ESCAPES = [
    Case("newline-in-model-path", ("infer", "-m", "{tmp}/a\nerror: forged", "hi"), 2, "\\n"),
    Case("escape-sequence-in-path", ("infer", "-m", "{tmp}/a\x1b[31mred", "hi"), 2, "\\x1b"),
    Case("markup-in-path", ("infer", "-m", "{tmp}/[bold]x[/bold]", "hi"), 2, "[bold]x[/bold]"),
    Case("emoji-code-in-dataset", (*TRAIN, "--set", "data.dataset={tmp}/:fire:.jsonl"), 2,
         ":fire:.jsonl"),
]  # fmt: skip

ROWS = [
    Case("prompt-is-a-list-of-ints", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2,
         "row 1, field 'question'",
         files={"d.jsonl": '{"question": [1, 2], "answer": "1"}\n'}),
    Case("prompt-is-null", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2, "got null",
         files={"d.jsonl": '{"question": "q", "answer": "1"}\n{"question": null}\n'}),
    Case("prompt-is-empty", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2,
         "the prompt is empty", files={"d.jsonl": '{"question": "  ", "answer": "1"}\n'}),
    Case("prompt-is-a-number", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2, "got int",
         files={"d.jsonl": '{"question": 7, "answer": "1"}\n'}),
    Case("prompt-messages-without-role", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2,
         "list of chat messages",
         files={"d.jsonl": '{"question": [{"content": "hi"}], "answer": "1"}\n'}),
    Case("answer-is-a-list", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2,
         "row 1, field 'answer'", files={"d.jsonl": '{"question": "q", "answer": [1]}\n'}),
    Case("answer-is-an-object", (*TRAIN, "--set", "data.dataset={tmp}/d.jsonl"), 2,
         "the answer must be text or a number",
         files={"d.jsonl": '{"question": "q", "answer": {"v": 1}}\n'}),
    Case("saved-dataset-broken-state", (*TRAIN, "--set", "data.dataset={tmp}/saved"), 2,
         "saved dataset", setup=broken_saved_dataset_state),
    Case("eval-file-prompt-null", ("eval", "-m", MODEL, "-d", "{tmp}/d.jsonl"), 2, "got null",
         files={"d.jsonl": '{"question": null, "answer": "1"}\n'}),
]  # fmt: skip

MODELS = [
    Case("llama-config-qwen2-weights", ("infer", "-m", "{tmp}/m", "hi"), 2,
         "do not match its config.json (model_type 'llama')",
         setup=llama_config_over_qwen2_weights),
    Case("hidden-size-string", ("infer", "-m", "{tmp}/m", "hi"), 2,
         "hidden_size should be an integer", setup=string_hidden_size),
    Case("layer-count-float", ("infer", "-m", "{tmp}/m", "hi"), 2, "num_hidden_layers",
         setup=float_layer_count),
    Case("model-type-missing", ("infer", "-m", "{tmp}/m", "hi"), 2, "model_type",
         setup=no_model_type),
    Case("vocab-negative", ("infer", "-m", "{tmp}/m", "hi"), 2, "vocab_size should not be",
         setup=negative_vocab),
    Case("tokenizer-missing", ("infer", "-m", "{tmp}/m", "hi"), 2, "has no tokenizer",
         setup=no_tokenizer),
    Case("tokenizer-missing-train", (*TRAIN, "-m", "{tmp}/m"), 2, "has no tokenizer",
         setup=no_tokenizer),
    Case("chat-template-syntax", ("infer", "-m", "{tmp}/m", "hi"), 2, "chat template",
         setup=broken_chat_template),
    Case("tokenizer-past-embedding", ("infer", "-m", "{tmp}/m", "hi"), 2,
         "past the embedding's 60 rows", setup=tokenizer_of_a_larger_model),
    Case("convert-output-below-file", ("convert", "hf-model", MODEL, "-o", "{tmp}/blocker/out"),
         2, "which is a file", setup=file_in_the_way),
    Case("fuse-output-below-file", ("convert", "fuse", "-m", MODEL, "-a", "{adapters}", "-o",
                                    "{tmp}/blocker/out"), 2, "which is a file",
         setup=file_in_the_way),
    Case("convert-source-hidden-size-string", ("convert", "hf-model", "{tmp}/m", "-o",
                                               "{tmp}/out"), 2, "hidden_size",
         setup=string_hidden_size),
]  # fmt: skip

RESUME = [
    Case("resume-lora-as-full", (*TRAIN, "--run-name", "r", "--max-steps", "2", "--set",
                                 "finetune.type=full"), 1, "another finetune.type",
         setup=trained_run, runs=True),
    Case("resume-other-lora-layers", (*TRAIN, "--run-name", "r", "--max-steps", "2", "--set",
                                      "finetune.lora_layers=1"), 2, "finetune.lora_layers: -1",
         setup=trained_run, runs=True),
    Case("resume-other-rank", (*TRAIN, "--run-name", "r", "--max-steps", "2", "--set",
                               "finetune.lora_rank=4"), 2, "finetune.lora_rank: 8 -> 4",
         setup=trained_run, runs=True),
    Case("resume-other-dataset", ("train", *TINY_TRAIN, "-o", "{tmp}/runs", "--run-name", "r",
                                  "--max-steps", "2", "--set", "data.dataset=synthetic:repeat"),
         2, "data.dataset", setup=trained_run, runs=True),
    Case("resume-other-seed", (*TRAIN, "--run-name", "r", "--max-steps", "2", "--seed", "5"), 2,
         "run.seed: 0 -> 5", setup=trained_run, runs=True),
    Case("resume-other-model", (*TRAIN, "--run-name", "r", "--max-steps", "2", "-m",
                                "builtin:tiny-llama"), 2, "model.path",
         setup=trained_run, runs=True),
    Case("resume-despite-changes-still-checks-weights",
         (*TRAIN, "--run-name", "r", "--max-steps", "2", "--set", "finetune.lora_rank=4",
          "--set", "run.resume_despite_changes=true"), 1, "do not fit this run's model",
         setup=trained_run, runs=True),
    Case("resume-explicit-checkpoint-other-rank",
         (*TRAIN, "--run-name", "r2", "--max-steps", "2", "--set", "finetune.lora_rank=4",
          "--resume", "{tmp}/runs/r/checkpoints/step-000001"), 2, "finetune.lora_rank",
         setup=trained_run, runs=True),
]  # fmt: skip

SMALLER = [
    Case("launch-empty-hostfile", ("launch", "--hostfile", "{tmp}/h.json", "--", "mlxgrpo",
                                   "--help"), 2, "lists no hosts", files={"h.json": "[]"}),
    Case("launch-hostfile-object", ("launch", "--hostfile", "{tmp}/h.json", "--", "mlxgrpo",
                                    "--help"), 2, "lists no hosts", files={"h.json": '{"a": 1}'}),
    Case("launch-hostfile-not-json", ("launch", "--hostfile", "{tmp}/h.json", "--", "mlxgrpo",
                                      "--help"), 2, "not valid JSON", files={"h.json": "hosts"}),
    Case("launch-hostfile-empty-file", ("launch", "--hostfile", "{tmp}/h.json", "--", "mlxgrpo",
                                        "--help"), 2, "h.json", files={"h.json": ""}),
]  # fmt: skip

GROUPS = {
    "parsing": PARSING,
    "numbers": NUMBERS,
    "escapes": ESCAPES,
    "rows": ROWS,
    "models": MODELS,
    "resume": RESUME,
    "smaller": SMALLER,
}
CASES = table_params(GROUPS)


def test_the_table_is_large_and_unique():
    from test_bad_inputs import GROUPS as ROUND_ONE

    check_table(GROUPS, taken={case.id for cases in ROUND_ONE.values() for case in cases})


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_error_line(case, cli, tmp_path, assets, monkeypatch):
    run_case(case, cli, tmp_path, assets, monkeypatch)
