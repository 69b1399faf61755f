"""Faults: kill -9 at any point then `--resume auto`, broken checkpoints, stale temporaries,
planted symlinks, read-only and full disks. Each should end in identical training or in one
clear error line, never in doubled logs, overwritten files or a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import spread_reward

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.safe_io import atomic_write, remove_stale_temporaries

STEPS = 6
# Settings that learn (non-zero gradients, with the spread reward train_args adds), so
# "identical weights" means something.
SETS = [
    "data.dataset=synthetic:repeat?letters=x",
    "finetune.lora_layers=-1",
    "checkpoint.save_steps=2",
    f"run.max_steps={STEPS}",
    "rollout.num_generations=4",
    "rollout.max_new_tokens=8",
    "rollout.temperature=1.0",
    "optim.batch_size=2",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
]

# Runs the real CLI in a child that SIGKILLs itself at an exact point, chosen by FAULT:
# "update:N" right after update N's metrics record is written; "checkpoint:N" in the middle of
# writing checkpoint N (weights written, optimizer state not yet).
KILLER = """
import os, signal, sys
from mlxgrpo.engine.io import callbacks, checkpoint
kind, at = os.environ["FAULT"].split(":")
at = int(at)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind == "update":
    logged = callbacks.JsonlLogger.on_update
    def on_update(self, update, metrics):
        logged(self, update, metrics)
        if update == at:
            die()
    callbacks.JsonlLogger.on_update = on_update
else:
    save = checkpoint._save_arrays
    def save_arrays(path, arrays):
        if path.name == checkpoint.OPTIMIZER_STATE and checkpoint.checkpoint_name(at) in str(path):
            die()
        save(path, arrays)
    checkpoint._save_arrays = save_arrays
from mlxgrpo.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(out: Path, resume: str = "auto", extra: tuple[str, ...] = ()) -> list[str]:
    args = ["train", "-m", "builtin:tiny-qwen2", "-o", str(out), "--run-name", "r"]
    args += ["--resume", resume]
    for item in [*SETS, spread_reward(out.parent), *extra]:  # the reward file stays out of `out`
        args += ["--set", item]
    return args


def run_cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", KILLER] if fault else [sys.executable, "-m", "mlxgrpo"]
    env = {**os.environ, **({"FAULT": fault} if fault else {})}
    return subprocess.run(
        [*head, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def adapters(run_dir: Path) -> dict[str, mx.array]:
    return mx.load(str(run_dir / "final" / "adapters.safetensors"))


def train_updates(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["update"] for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    a, b = adapters(reference), adapters(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert mx.allclose(a[key], b[key], atol=1e-6).item(), key
    assert train_updates(run_dir) == list(range(1, STEPS + 1))  # one record per update
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoints at 2, 4, 6 and final/."""
    out = tmp_path_factory.mktemp("reference")
    done = run_cli(train_args(out, "never"))
    assert done.returncode == 0, done.stderr
    run_dir = out / "r"
    start = run_dir / "checkpoints" / "step-000002" / "adapters.safetensors"
    moved = adapters(run_dir)
    assert any(not mx.array_equal(moved[k], v).item() for k, v in mx.load(str(start)).items())
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    ["update:1", "update:3", "checkpoint:4"],
    ids=["before-first-checkpoint", "between-checkpoints", "during-checkpoint-write"],
)
def test_kill_then_resume_matches_uninterrupted_run(tmp_path, reference, fault):
    killed = run_cli(train_args(tmp_path), fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    kind, at = fault.split(":")
    if kind == "checkpoint":  # the kill left its half-written checkpoint behind
        assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if ".tmp-" in p.name]
    resumed = run_cli(train_args(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    if kind == "checkpoint":
        assert "left half-written by a run that was killed" in resumed.stdout + resumed.stderr
    assert_same_training(tmp_path / "r", reference)


TWO_STEPS = ("optim.steps_per_generation=2",)


@pytest.fixture(scope="module")
def two_steps_reference(tmp_path_factory) -> Path:
    """An uninterrupted run that takes two optimizer steps per rollout."""
    out = tmp_path_factory.mktemp("two-steps")
    done = run_cli(train_args(out, "never", TWO_STEPS))
    assert done.returncode == 0, done.stderr
    return out / "r"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["update:1", "update:3"])
def test_kill_between_the_steps_of_a_rollout_resumes_exactly(tmp_path, two_steps_reference, fault):
    """Killed after a rollout's first step: the resume starts that rollout again from the
    checkpoint before it (the same weights, so the same samples) and ends in the same weights."""
    killed = run_cli(train_args(tmp_path, extra=TWO_STEPS), fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_cli(train_args(tmp_path, extra=TWO_STEPS))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(tmp_path / "r", two_steps_reference)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert [r["generation_step"] for r in records if r["kind"] == "train"] == [0, 1] * 3


@pytest.mark.slow
def test_external_kill_9_while_training_then_resume(tmp_path, reference):
    """A real `kill -9` from outside, wherever it lands once a few updates are logged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxgrpo", *train_args(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    resumed = run_cli(train_args(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(tmp_path / "r", reference)


class Messages(Callback):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_message(self, text: str) -> None:
        self.lines.append(text)


def _truncate_optimizer(step: Path) -> None:
    data = (step / "optimizer.safetensors").read_bytes()
    (step / "optimizer.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_state(step: Path) -> None:
    (step / "trainer_state.json").write_text('{"update": 6, "da')


def _delete_weights(step: Path) -> None:
    (step / "adapters.safetensors").unlink()


DAMAGE = {
    "truncated-optimizer": (_truncate_optimizer, "optimizer.safetensors does not load"),
    "corrupt-state": (_corrupt_state, "trainer_state.json is corrupt"),
    "missing-weights": (_delete_weights, "adapters.safetensors is missing"),
}


def _damaged_copy(reference: Path, tmp_path: Path, damage: str) -> Path:
    run_dir = tmp_path / "r"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    DAMAGE[damage][0](run_dir / "checkpoints" / "step-000006")
    return run_dir


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_auto_skips_a_broken_newest_checkpoint(tmp_path, reference, damage):
    run_dir = _damaged_copy(reference, tmp_path, damage)
    sets = [*SETS, spread_reward(tmp_path), "model.path=builtin:tiny-qwen2"]
    sets.append(f"run.output_dir={tmp_path}")
    resolved = resolve_config((), [*sets, "run.run_name=r", "run.resume=auto"], environ={})
    messages = Messages()
    summary = train(resolved, [messages])
    assert summary["updates"] == STEPS
    newest = run_dir / "checkpoints" / "step-000006"
    skipped = [m for m in messages.lines if m.startswith(f"skipped checkpoint {newest}")]
    assert len(skipped) == 1 and DAMAGE[damage][1] in skipped[0], messages.lines
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000004'} at update 4" in messages.lines
    assert_same_training(run_dir, reference)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_named_broken_checkpoint_is_one_line(cli, tmp_path, reference, damage):
    run_dir = _damaged_copy(reference, tmp_path, damage)
    step = run_dir / "checkpoints" / "step-000006"
    args = train_args(tmp_path, str(step))
    code, _, err = cli(*args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(step) in lines[0] and "Traceback" not in err and "unexpected" not in err
    if damage != "corrupt-state":  # an early path check may word that one its own way
        assert DAMAGE[damage][1] in lines[0]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(dead_pid, 0)
        pytest.skip(f"pid {dead_pid} was reused already")
    stale = [
        tmp_path / f".step-000004.tmp-{dead_pid}-0a1b2c3d",
        tmp_path / f".tmp-step-4-{dead_pid}",
    ]
    live = tmp_path / ".step-000004.tmp-1-0a1b2c3d"  # pid 1 always runs: its writer may be busy
    for path in [*stale, live]:
        path.mkdir()
        (path / "optimizer.safetensors").write_bytes(b"half")
    (tmp_path / f".metrics.jsonl.tmp-{dead_pid}-ffff0000").write_text("x")
    keep = tmp_path / "step-000002"
    keep.mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([*stale, tmp_path / f".metrics.jsonl.tmp-{dead_pid}-ffff0000"])
    assert live.is_dir() and keep.is_dir()
    assert not any(p.exists() for p in stale)


def test_symlink_at_partial_is_never_followed(cli, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("hi") + "\n")
    partial = tmp_path / "prompts.answers.jsonl.partial"
    partial.symlink_to(victim)
    code, _, err = cli("infer", "-m", "builtin:tiny-qwen2", "--max-tokens", "3", "--file", prompts)
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert json.loads((tmp_path / "prompts.answers.jsonl").read_text())["prompt"] == "hi"

    # eval --output writes the same way; and a stopped write keeps its .partial by a rename
    # that replaces the link instead of writing through it.
    from mlxgrpo.cli.eval_cmd import _write_records

    out = tmp_path / "eval.jsonl"
    (tmp_path / "eval.jsonl.partial").symlink_to(victim)
    _write_records(out, [])
    assert out.read_text() == "" and victim.read_text() == "precious\n"
    with pytest.raises(KeyboardInterrupt), atomic_write(out, keep_partial=partial) as fh:
        fh.write("half")
        raise KeyboardInterrupt
    assert not partial.is_symlink() and partial.read_text() == "half"
    assert victim.read_text() == "precious\n" and out.read_text() == ""


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str):
    """A tmpfs at `where`: as root, chmod does not stop writes, but a read-only or a tiny
    file system does. Skips where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}), so no read-only/full disk to test")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def _one_line_error(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and "unexpected" not in err
    for part in parts:
        assert part in lines[0], err


def test_read_only_output_directory_is_one_line(cli, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        code, _, err = cli(*train_args(ro, "never"))
        assert code == 1
        _one_line_error(err, f"'{ro / 'r'}'", "read-only file system")
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps("hi") + "\n")
        answers = ro / "answers.jsonl"
        args = ["infer", "-m", "builtin:tiny-qwen2", "--max-tokens", "2", "--file", prompts]
        code, _, err = cli(*args, "-o", answers)
        assert code == 1
        _one_line_error(err, f"'{answers}'", "read-only file system")


def test_full_disk_is_one_line_and_leaves_no_temporaries(cli, tmp_path):
    with mounted_tmpfs(tmp_path / "full", "size=64k") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        code, _, err = cli(*train_args(full, "never"))
        assert code == 1
        _one_line_error(err, str(full / "r"), "no space left on device")
        assert not [p for p in full.rglob("*") if ".tmp-" in p.name]
