"""Shared fixtures.

Importing mlxgrpo first loads a fast BLAS before MLX (docs/architecture.md §8).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import mlxgrpo  # noqa: F401  (BLAS preload must precede any mlx import)

REPO = Path(__file__).resolve().parent.parent

# Offline always: a test that tries the hub fails fast instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MLX_GRPO_CONFIG", None)
# datasets caches every local file it reads; keep that out of the user's home, and remove it
# when the session ends (subprocesses the tests start share it).
if "HF_DATASETS_CACHE" not in os.environ:
    _DATASETS_CACHE = tempfile.mkdtemp(prefix="mlxgrpo-hf-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
    atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in models are created once per test session in a private cache directory."""
    cache = tmp_path_factory.getbasetemp() / "mlxgrpo-cache"
    monkeypatch.setenv("MLXGRPO_CACHE_DIR", str(cache))
    monkeypatch.delenv("MLX_GRPO_CONFIG", raising=False)


@pytest.fixture
def cli(capsys):
    """Run the real entry point in-process; returns (exit_code, stdout, stderr)."""
    from mlxgrpo.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def run_subprocess(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run `python -m mlxgrpo ARGS` in a fresh interpreter (for exit codes and import checks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mlxgrpo", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=300,
    )


@pytest.fixture
def write_toml(tmp_path):
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write


def spread_reward(directory: Path) -> str:
    """A `--set` item for a reward that varies within almost every group from the first update
    on (the share of characters with an even code point), for tests that need every update to
    move the weights whatever a random model happens to say. Writes the reward's file."""
    path = Path(directory) / "spread_reward.py"
    path.write_text(
        "def even(prompts, completions, answers, **_):\n"
        "    return [sum(ord(ch) % 2 == 0 for ch in c) / max(1, len(c)) for c in completions]\n",
        encoding="utf-8",
    )
    return f"rewards.functions=['{path}:even']"


def record_decode_widths(monkeypatch) -> list[int]:
    """A list that receives, for every decode step of every rollout from now on, how many rows
    the step ran (the rollout's batch width)."""
    from mlxgrpo.generation import rollout as rollout_module

    widths: list[int] = []
    step = rollout_module.queue_next_token

    def counted(model, batch, *args):
        widths.append(len(batch.rows))
        return step(model, batch, *args)

    monkeypatch.setattr(rollout_module, "queue_next_token", counted)
    return widths
