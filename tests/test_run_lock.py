"""One process per run directory (engine/io/run_lock.py): a second `train` on a run that is
training gets one line naming the holder; a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from mlxgrpo.engine.io.run_lock import LOCK_FILE, RunInUse, hold_run


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with hold_run(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        refused = pytest.raises(RunInUse, match=rf"in use by process {os.getpid()} ")
        with refused, hold_run(tmp_path):
            pass
    with hold_run(tmp_path):  # released when the first holder left
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / LOCK_FILE).write_text(dead.stdout)
    with hold_run(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def _train(tmp_path: Path, steps: int) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "mlxgrpo", "train", "--model", "builtin:tiny-qwen2",
        "-o", str(tmp_path), "--run-name", "shared", "--max-steps", str(steps),
        "--set", "data.dataset=synthetic:repeat?letters=x", "--set", "checkpoint.save_steps=1",
        "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=6",
        "--set", "optim.batch_size=1", "--set", "optim.gradient_accumulation_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "MLXGRPO_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _train_records(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["update"] for line in lines if '"train"' in line]


def _wait_for_updates(run: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(_train_records(run)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"the first run did not reach update {count}: {proc.poll()}")


@pytest.mark.slow
def test_two_trains_on_one_run_name(tmp_path):
    """The second `train` on a run that is training fails at once with one line naming the
    first's pid, writes nothing into it, and the first ends with exactly its own records.
    After the first is killed with SIGKILL, its lock is taken over and the run resumes."""
    run = tmp_path / "shared"
    first = _train(tmp_path, steps=40)
    try:
        _wait_for_updates(run, first, 2)
        second = _train(tmp_path, steps=40)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 1, err
        assert f"error: run directory {run} is in use by process {first.pid}" in err
        assert "Traceback" not in err and err.count("error:") == 1
        _wait_for_updates(run, first, 4)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    records = _train_records(run)
    assert records == list(range(1, len(records) + 1))  # one writer: no doubled updates
    assert (run / LOCK_FILE).read_text().strip() == str(first.pid)  # left by the dead run
    third = _train(tmp_path, steps=len(records) + 2)
    _, err = third.communicate(timeout=240)
    assert third.returncode == 0, err
    assert "resumed from" in err
    assert _train_records(run) == list(range(1, len(records) + 3))
