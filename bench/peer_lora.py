"""The scale section's peer: mlx-lm-lora's GRPO trainer on the same model, data and settings.

It is installed, only when `--peer` is given, into its own virtual environment in the bench
cache (pinned version, the same mlx and mlx-lm as ours), and run in a subprocess through
peer_launcher.py, which calls the peer's unchanged `mlx_lm_lora.train.main` and reports each
iteration's seconds and peak memory. One peer iteration (2 prompts x G completions, then one
optimizer step, gradient accumulation 1) is one update, as in mlxgrpo.

Differences in how the peer does the same work are recorded in the JSON (DIFFERENCES).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "mlx-lm-lora"
VERSION = "5.10.2"  # the newest release on PyPI when this was written; pinned for comparability
LAUNCHER = Path(__file__).resolve().parent / "peer_launcher.py"
DIFFERENCES = (
    "the KL reference is a second full copy of the weights (mlxgrpo: the same weights with the "
    "adapters switched off), so the peer holds 2x the weights",
    "its loss splits the 16 completions into micro-batches of 2 rows (its rule: rows = prompts "
    "per update; no setting); mlxgrpo: 2 micro-batches of 8 rows",
    "its rollout decodes 2 sequences at a time (completion_batch_size = prompts per update; no "
    "setting); mlxgrpo decodes all 16 together",
    "its grad_checkpoint option is left at its default (off)",
    "no gradient-norm clipping (mlxgrpo clips at 0.1); both use AdamW, k3 KL, one pass",
    "sampling: plain temperature 1.0 in both (the launcher sets the peer's top_p 1.0 / top_k 0 "
    "in place of its defaults 0.95 / 20)",
)


class PeerError(RuntimeError):
    """The peer could not be installed or run; the message is one line for the user."""


def venv_dir(cache: Path) -> Path:
    return cache / f"peer-{PACKAGE}-{VERSION}-mlx-{metadata.version('mlx')}"


def _requirements() -> list[str]:
    mlx = "mlx[cpu]" if sys.platform.startswith("linux") else "mlx"
    return [
        f"{PACKAGE}=={VERSION}",
        f"{mlx}=={metadata.version('mlx')}",
        f"mlx-lm=={metadata.version('mlx-lm')}",
    ]


def ensure_venv(cache: Path) -> Path:
    """The peer venv's python, installing it first when missing (uv if present, else pip)."""
    venv = venv_dir(cache)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if (venv / ".complete").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)  # a half-finished install
    venv.parent.mkdir(parents=True, exist_ok=True)
    uv = shutil.which("uv")
    if uv:
        steps = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
            [uv, "pip", "install", "--quiet", "--python", str(python), *_requirements()],
        ]
    else:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", *_requirements()],
        ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            shutil.rmtree(venv, ignore_errors=True)
            raise PeerError(
                f"--peer: could not install {' '.join(_requirements())} into {venv}: {lines[-1]}"
            )
    (venv / ".complete").touch()
    return python


def blas_path() -> str:
    """The BLAS library mlxgrpo loaded for itself (Linux), for the peer to load the same."""
    from mlxgrpo.backend import blas_info

    if not sys.platform.startswith("linux"):
        return ""  # macOS: Accelerate, no preload
    info = blas_info()  # the library mlxgrpo loaded for itself, if it loaded one
    return info.path or "" if info.loaded_by_us else ""


def check_peer_blas() -> None:
    """The peer's launcher can only preload a BLAS that exports plain names. With the
    scipy-openblas32 wheel (prefixed names, which mlxgrpo rebinds into libmlx itself) the
    peer would run MLX's reference BLAS, many times slower: an unfair comparison, refused."""
    from mlxgrpo.backend import WHEEL_LABEL, blas_info

    info = blas_info()
    if sys.platform.startswith("linux") and info.loaded_by_us and WHEEL_LABEL in info.name:
        raise PeerError(
            "--peer: mlxgrpo runs on the scipy-openblas32 wheel here, which the peer's process "
            "cannot load; install a system OpenBLAS (apt install libopenblas0) so that both "
            "trainers use the same library"
        )


def command(
    python: Path, model: Path, data: Path, shape: Any, s: Any, iters: int, work: Path
) -> list[str]:
    from scale_setup import REWARD_FILE, REWARD_FUNCTION

    config = work / "peer.yaml"  # JSON is YAML; the LoRA settings have no command-line flags
    lora = {"rank": s.lora_rank, "scale": s.lora_scale, "dropout": 0.0}
    config.write_text(json.dumps({"lora_parameters": lora, "fuse": False}), encoding="utf-8")
    peer_args = {
        "--model": model, "--data": data, "--train-mode": "grpo", "--train-type": "lora",
        "--num-layers": shape.layers, "--batch-size": s.prompts_per_update,
        "--group-size": s.generations, "--max-completion-length": s.max_new_tokens,
        "--temperature": s.temperature, "--beta": s.kl_coeff, "--epsilon": 0.2,
        "--gradient-accumulation-steps": 1, "--iters": iters, "--optimizer": "adamw",
        "--learning-rate": 1e-6, "--seed": 0, "--steps-per-report": 1,
        "--steps-per-eval": 10**9, "--save-every": 10**9, "--adapter-path": work / "adapters",
        "--reward-functions-file": REWARD_FILE, "--reward-functions": REWARD_FUNCTION,
        "--config": config,
    }  # fmt: skip
    flat = [str(part) for pair in peer_args.items() for part in pair]
    records = ["--records", str(work / "iterations.jsonl"), "--blas", blas_path()]
    return [str(python), str(LAUNCHER), *records, "--", "--train", *flat]


def run_peer(python: Path, model: Path, data: Path, shape: Any, s: Any, repeats: int) -> dict:
    """`repeats` + 1 peer iterations (the first is a warm-up); medians as for mlxgrpo."""
    check_peer_blas()
    with tempfile.TemporaryDirectory(prefix="mlxgrpo-bench-peer-") as tmp:
        work = Path(tmp)
        argv = command(python, model, data, shape, s, repeats + 1, work)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        log = work / "peer.log"
        with open(log, "w", encoding="utf-8") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        text = log.read_text(encoding="utf-8", errors="replace")
        records = work / "iterations.jsonl"
        lines = records.read_text(encoding="utf-8").splitlines() if records.exists() else []
        iterations = [json.loads(line) for line in lines]
    kept = keep_log(text)
    if done.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else "no output"
        raise PeerError(
            f"--peer: mlx-lm-lora failed (exit {done.returncode}): {last} (log: {kept})"
        )
    if len(iterations) != repeats + 1:
        raise PeerError(
            f"--peer: expected {repeats + 1} iterations, got {len(iterations)} (log: {kept})"
        )
    measured = iterations[1:]
    return {
        "package": f"{PACKAGE}=={VERSION}",
        "command": argv[1:],
        "log": str(kept),
        "differences": list(DIFFERENCES),
        "updates_measured": len(measured),
        "seconds_per_update": statistics.median(u["seconds"] for u in measured),
        "peak_memory_gb": statistics.median(u["peak_memory_gb"] for u in measured),
        "updates": measured,
    }


def keep_log(text: str) -> Path:
    """Keep the peer's own output (its per-iteration report) where the user can read it."""
    from scale_setup import cache_root

    path = cache_root() / "peer-last.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
