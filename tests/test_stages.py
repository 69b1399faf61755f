"""Staged configs: [[stages]] inherit the top level and override it, resolve and validate one by
one, run in order in one run directory from each other's weights, and resume where they were."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxgrpo import runlog
from mlxgrpo.config import ConfigProblems, resolve_config
from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.engine.io.checkpoint import resolve_adapter_source
from mlxgrpo.engine.loop.trainer import train

STAGED = """
[model]
path = "builtin:tiny-qwen2"

[data]
dataset = "synthetic:repeat?letters=xyz"

[finetune]
lora_layers = -1

[optim]
learning_rate = 1e-2
lr_scheduler_type = "constant"
warmup_ratio = 0.0
batch_size = 4
gradient_accumulation_steps = 1

[run]
max_steps = 4

[checkpoint]
save_steps = 1

[[stages]]
name = "sft"
algorithm = { type = "sft" }
optim = { learning_rate = 2e-2 }

[[stages]]
name = "grpo"
rollout = { num_generations = 4, max_new_tokens = 8, temperature = 1.0 }
"""


@pytest.fixture
def staged(tmp_path) -> Path:
    path = tmp_path / "staged.toml"
    path.write_text(STAGED)
    return path


def test_stages_inherit_the_top_level_and_override_it(cli, staged):
    code, out, err = cli(
        "config", "show", "-c", staged, "--resolved", "-f", "json", "--set", "run.seed=5"
    )
    assert code == 0, err
    shown = json.loads(out)
    sft, grpo = shown["stages"]
    assert (sft["name"], grpo["name"]) == ("sft", "grpo")
    assert (sft["algorithm"]["type"], grpo["algorithm"]["type"]) == ("sft", "grpo")
    assert sft["optim"]["learning_rate"] == 0.02  # its own
    assert grpo["optim"]["learning_rate"] == 0.01 == shown["optim"]["learning_rate"]  # inherited
    assert grpo["rollout"]["num_generations"] == 4 and sft["rollout"]["num_generations"] == 8
    assert sft["run"]["seed"] == grpo["run"]["seed"] == 5  # --set reaches every stage
    # --set beats a stage's own value, as it beats the file's.
    over = resolve_config([staged], ["optim.learning_rate=0.5"], environ={})
    assert [s.config.optim.learning_rate for _, s in over.stages] == [0.5, 0.5]
    code, out, _ = cli("config", "show", "-c", staged)
    assert '[[stages]]\nname = "sft"\n\n[stages.algorithm]\ntype = "sft"' in out


def _with_stages(staged: Path, stages: str) -> Path:
    text = STAGED[: STAGED.index("[[stages]]")] + stages
    staged.write_text(text)
    return staged


@pytest.mark.parametrize(
    ("stages", "expect"),
    [
        (
            '[[stages]]\nname = "a"\n[[stages]]\nname = "a"\n',
            "two stages are named 'a'",
        ),
        (
            '[[stages]]\nname = "rl"\nalgorithm = { type = "ppo" }\n',
            "stage rl: algorithm.type = 'ppo'",
        ),
        (
            '[[stages]]\nname = "warm"\nalgorithm = { type = "sft" }\n'
            'data = { dataset = "synthetic:arithmetic?tool=calculator" }\n',
            "stage warm: data.dataset = synthetic:arithmetic?tool=calculator writes no "
            "demonstrations",
        ),
        ('[[stages]]\nalgorithm = { type = "sft" }\n', "stage 1 needs a name"),
        ('[[stages]]\nname = "x"\nrun = { run_name = "y" }\n', "belongs to the whole run"),
        (
            '[[stages]]\nname = "a"\n[[stages]]\nname = "b"\nfinetune = { type = "full" }\n',
            "the stages train with different finetune.type values",
        ),
    ],
    ids=[
        "duplicate-name",
        "unknown-algorithm",
        "sft-without-demonstrations",
        "no-name",
        "run-key-in-stage",
        "mixed-finetune",
    ],
)
def test_a_bad_stage_is_one_error_line_before_anything_loads(cli, staged, stages, expect):
    path = _with_stages(staged, stages)
    code, out, err = cli("train", "-c", path, "-o", path.parent / "runs")
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith("hint")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error:"), err
    assert expect in errors[0], err
    assert "Traceback" not in err and not (path.parent / "runs").exists()


class StopInStage(Callback):
    """Asks the run to stop once the named stage has logged ``at`` updates."""

    def __init__(self, stage: str, at: int) -> None:
        self.stage, self.at, self.current, self.count = stage, at, None, 0

    def on_start(self, info: dict) -> None:
        self.current, self.count = Path(info["run_dir"]).name, 0

    def on_update(self, update: int, metrics: dict) -> None:
        self.count += 1

    def should_stop(self) -> bool:
        return self.current == self.stage and self.count >= self.at


def _adapters(run_dir: Path) -> dict:
    return mx.load(str(run_dir / "final" / "adapters.safetensors"))


def test_stages_run_in_order_from_each_others_weights_and_resume(tmp_path, staged):
    def run(name: str, resume: str, **kwargs):
        sets = [
            f"run.output_dir={tmp_path / 'runs'}",
            f"run.run_name={name}",
            f"run.resume={resume}",
        ]
        return train(resolve_config([staged], sets, environ={}), **kwargs)

    whole = run("whole", "never")
    root = tmp_path / "runs" / "whole"
    assert whole["run_dir"] == str(root) and [s["stage"] for s in whole["stages"]] == [
        "sft",
        "grpo",
    ]
    assert [s["updates"] for s in whole["stages"]] == [4, 4]
    grpo_cfg = (root / "grpo" / "config.resolved.toml").read_text()
    assert f'adapter_path = "{root / "sft" / "final"}"' in grpo_cfg
    sft_out, grpo_out = _adapters(root / "sft"), _adapters(root / "grpo")
    assert any(not mx.array_equal(sft_out[k], grpo_out[k]).item() for k in sft_out)
    # Viewers see the stages as runs of their own; adapters of a staged run are its last's.
    runs_root = tmp_path / "runs"
    listed = [runlog.run_label(p, runs_root) for p in runlog.list_runs(runs_root)]
    assert listed == ["whole/sft", "whole/grpo"]
    assert resolve_adapter_source(str(root), str(runs_root)) == root / "grpo" / "final"
    assert resolve_adapter_source("last", str(runs_root)) == root / "grpo" / "final"

    stop = StopInStage("grpo", 2)
    halted = run("split", "auto", callbacks=[stop], should_stop=stop.should_stop)
    assert halted["interrupted"] and halted["stages"][-1]["updates"] == 2
    messages: list[str] = []
    listener = type("Listen", (Callback,), {"on_message": lambda self, t: messages.append(t)})()
    resumed = run("split", "auto", callbacks=[listener])
    assert not resumed["interrupted"] and [s["stage"] for s in resumed["stages"]] == ["grpo"]
    assert any(m.startswith("stage 1/2 sft: finished earlier") for m in messages), messages
    assert any("resumed from" in m and "step-000002" in m for m in messages), messages
    split = tmp_path / "runs" / "split"
    for stage in ("sft", "grpo"):
        a, b = _adapters(root / stage), _adapters(split / stage)
        assert all(mx.array_equal(a[k], b[k]).item() for k in a), stage


# Kills itself right after the grpo stage logs update 2 (update numbers restart per stage).
KILLER = """
import os, signal, sys
from mlxgrpo.engine.io import callbacks
logged = callbacks.JsonlLogger.on_update
def on_update(self, update, metrics):
    logged(self, update, metrics)
    if self.path.parent.name == "grpo" and update == 2:
        os.kill(os.getpid(), signal.SIGKILL)
callbacks.JsonlLogger.on_update = on_update
from mlxgrpo.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_in_the_second_stage_then_resume_gives_the_same_weights(tmp_path, staged):
    def cli_run(name: str, killer: bool = False) -> subprocess.CompletedProcess:
        head = [sys.executable, "-c", KILLER] if killer else [sys.executable, "-m", "mlxgrpo"]
        args = ["train", "-c", str(staged), "-o", str(tmp_path / "runs"), "--run-name", name]
        return subprocess.run(
            [*head, *args], capture_output=True, text=True, timeout=300, env=dict(os.environ)
        )

    assert cli_run("whole").returncode == 0
    killed = cli_run("killed", killer=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli_run("killed")
    assert resumed.returncode == 0, resumed.stderr
    for stage in ("sft", "grpo"):
        a = _adapters(tmp_path / "runs" / "whole" / stage)
        b = _adapters(tmp_path / "runs" / "killed" / stage)
        assert all(mx.array_equal(a[k], b[k]).item() for k in a), stage
    records = (tmp_path / "runs" / "killed" / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["update"] for r in records if '"train"' in r] == [1, 2, 3, 4]


def test_a_staged_run_resumes_with_auto_only(staged):
    with pytest.raises(ConfigProblems) as exc:
        resolve_config([staged], ["run.resume=/some/checkpoint"], environ={}, check_paths=False)
    assert any("a staged run resumes with auto" in p for p in exc.value.problems)


def test_trinity_names_load(staged):
    """Trinity-RFT's stage_name and algorithm_type, as its staged configs write them."""
    text = STAGED[: STAGED.index("[[stages]]")]
    text += '[[stages]]\nstage_name = "warm"\nalgorithm_type = "sft"\n'
    text += '[[stages]]\nstage_name = "rl"\nalgorithm_type = "grpo"\n'
    staged.write_text(text)
    resolved = resolve_config([staged], environ={})
    assert [(n, s.config.algorithm.type) for n, s in resolved.stages] == [
        ("warm", "sft"),
        ("rl", "grpo"),
    ]
