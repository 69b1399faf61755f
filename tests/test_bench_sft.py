"""The SFT section of the harness: `bench/run.py --sft --peer --quick` (the tiny shape) runs
mlxgrpo's SFT and mlx-lm's own trainer on the same rows and reports consistent figures.
Timings are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> tuple[dict, str]:
    work = tmp_path_factory.mktemp("sft")
    out = work / "sft.json"
    env = {
        **os.environ,
        "MLXGRPO_BENCH_CACHE": str(work / "bench-cache"),
        "MLXGRPO_CACHE_DIR": str(work / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--sft",
            "--peer",
            "--quick",
            "--repeats",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
def test_both_trainers_ran_the_same_steps_and_the_ratios_follow(sft) -> None:
    result, stdout = sft
    ours, peer, checkpointed = result["mlxgrpo"], result["peer"], result["peer_grad_checkpoint"]
    assert len(ours["steps"]) == len(peer["steps"]) == len(checkpointed["steps"]) == 2
    assert [s["iteration"] for s in peer["steps"]] == [2, 3]  # the first is the warm-up
    # Our tokens/s is the loss's tokens over our seconds, as the peer counts its own.
    assert ours["tokens_per_sec"] == pytest.approx(
        ours["target_tokens"] / ours["seconds_per_step"], rel=1e-9
    )
    for entry in (peer, checkpointed):
        assert entry["speed_ratio"] == pytest.approx(
            ours["tokens_per_sec"] / entry["tokens_per_sec"], rel=1e-9
        )
        # The same rows with the prompt masked: each peer step's loss covers about as many
        # tokens as ours (its batches are other rows of the file, plus its appended EOS).
        for step in entry["steps"]:
            counted = step["tokens_per_sec"] * step["seconds"]
            assert 0.5 * ours["target_tokens"] <= counted <= 2 * ours["target_tokens"]
        assert entry["memory_ratio"] == pytest.approx(
            ours["peak_memory_gb"] / entry["peak_memory_gb"], rel=1e-9
        )
    assert not peer["grad_checkpoint"] and checkpointed["grad_checkpoint"]
    assert ours["target_tokens"] > 0
    assert ours["memory_paths"]["tiled head"] == "on"
    plain = result["mlxgrpo_no_checkpointing"]
    assert plain["memory_paths"]["checkpointing"].startswith("off")
    assert ours["memory_paths"]["checkpointing"] == "on"
    assert peer["no_checkpointing_speed_ratio"] == pytest.approx(
        plain["tokens_per_sec"] / peer["tokens_per_sec"], rel=1e-9
    )
    assert "mlx_lm lora, grad ckpt" in stdout and "mlxgrpo sft" in stdout
