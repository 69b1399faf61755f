"""Smoke test of the performance harness: `bench/run.py --quick` yields a complete, consistent
result. The figures themselves are not asserted (timings are machine-dependent)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
REPEATS = 3

# The quick model is the built-in tiny-qwen2 shape: hidden 64, 2 layers, 4 heads (head dim 16),
# 2 KV heads, MLP 128, vocabulary 100, tied embeddings, q/k/v biases.
HIDDEN, LAYERS, INTER, VOCAB = 64, 2, 128, 100
ATTENTION_WEIGHTS = HIDDEN * (64 + 32 + 32 + 64)  # q, k, v, o projections
MLP_WEIGHTS = 3 * HIDDEN * INTER
BLOCK_MATMUL = LAYERS * (ATTENTION_WEIGHTS + MLP_WEIGHTS)
HEAD = VOCAB * HIDDEN


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    work = tmp_path_factory.mktemp("bench")
    out = work / "quick.json"
    # Module-scoped, so it runs before the per-test cache isolation: isolate it here.
    env = {**os.environ, "MLXGRPO_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.slow
def test_table_is_printed(quick) -> None:
    _, stdout = quick
    for label in ("rollout (a)", "rollout (b)", "rollout (c)", "train step", "KL / no KL"):
        assert label in stdout
    assert "seconds per update (configs/demo.toml)" in stdout


@pytest.mark.slow
def test_model_description_matches_the_tiny_shape(quick) -> None:
    result, _ = quick
    model = result["model"]
    biases = HIDDEN + 32 + 32
    norms = 2 * HIDDEN
    assert (
        model["parameters"]
        == HEAD + LAYERS * (ATTENTION_WEIGHTS + biases + MLP_WEIGHTS + norms) + HIDDEN
    )
    assert model["matmul_parameters"] == BLOCK_MATMUL + HEAD
    assert model["dtype"] == "float32"
    assert set(result["section_seconds"]) == {"rollout", "train", "memory", "demo"}


@pytest.mark.slow
def test_rollout_figures_are_complete_and_consistent(quick) -> None:
    result, _ = quick
    rollout = result["rollout"]
    settings = rollout["settings"]
    assert settings["prompts"] >= 4 and settings["num_generations"] == 8
    budget = settings["max_new_tokens"]
    limits = {
        "single": settings["single_calls_per_round"] * budget,
        "batch_generate": settings["prompts"] * settings["num_generations"] * budget,
        "mlxgrpo": settings["prompts"] * settings["num_generations"] * budget,
        "mlxgrpo_tools": settings["prompts"] * settings["num_generations"] * budget,
    }
    medians = {}
    for design, limit in limits.items():
        rounds = rollout[design]["rounds"]
        assert len(rounds) == REPEATS
        for run in rounds:
            assert 0 < run["tokens"] <= limit
            assert run["seconds"] > 0
            assert close(run["tokens_per_sec"], run["tokens"] / run["seconds"])
        medians[design] = statistics.median(run["tokens_per_sec"] for run in rounds)
        assert close(rollout[design]["tokens_per_sec"], medians[design])
    assert close(rollout["ratio_vs_single"], medians["mlxgrpo"] / medians["single"])
    assert close(rollout["ratio_vs_batch_generate"], medians["mlxgrpo"] / medians["batch_generate"])
    assert close(rollout["tool_loop_ratio"], medians["mlxgrpo_tools"] / medians["mlxgrpo"])


@pytest.mark.slow
def test_train_step_flops_and_shares(quick) -> None:
    result, _ = quick
    step = result["train_step"]
    s = step["settings"]
    rows, length, budget = s["rows"], s["sequence_length"], s["completion_tokens"]
    assert s["tokens_per_step"] == rows * length
    start = length - budget  # every row is prompt 0 + a full-length completion
    positions = length - 1
    attention = 12 * LAYERS * HIDDEN * positions * positions
    for kind, factor in (("full", 6), ("lora", 4)):
        figures = step[kind]
        weights = factor * (BLOCK_MATMUL * positions + HEAD * (length - start))
        assert figures["flops_per_step"] == rows * (weights + attention)
        seconds = statistics.median(r[f"{kind}_seconds"] for r in step["rounds"])
        assert close(figures["seconds"], seconds)
        assert close(figures["tokens_per_sec"], rows * length / seconds)
        assert close(figures["gflops"], figures["flops_per_step"] / seconds / 1e9)
        shares = [
            figures["flops_per_step"] / r[f"{kind}_seconds"] / 1e9 / r["matmul_1024_gflops"]
            for r in step["rounds"]
        ]
        assert close(figures["share_of_matmul_1024"], statistics.median(shares))
        assert 0 < figures["share_of_matmul_1024"]
    assert len(step["rounds"]) == REPEATS
    for name in ("matmul_1024_gflops", "matmul_mlp_shape_gflops", "matmul_head_shape_gflops"):
        assert step[name] > 0


@pytest.mark.slow
def test_memory_and_update_figures(quick) -> None:
    result, _ = quick
    memory = result["memory"]
    for run in (memory["lora"], memory["lora_kl"], result["demo_update"]):
        assert run["updates_measured"] == REPEATS == len(run["updates"])
        assert run["peak_memory_gb"] > 0
        assert run["seconds_per_update"] > 0
        assert close(
            run["seconds_per_update"], statistics.median(u["step_seconds"] for u in run["updates"])
        )
        for update in run["updates"]:
            assert update["rollout_seconds"] + update["train_seconds"] <= update["step_seconds"]
    assert close(
        memory["kl_memory_ratio"],
        memory["lora_kl"]["peak_memory_gb"] / memory["lora"]["peak_memory_gb"],
    )


@pytest.mark.slow
def test_targets_are_judged_from_the_figures(quick) -> None:
    result, _ = quick
    targets = result["targets"]
    values = {
        "rollout_vs_single": result["rollout"]["ratio_vs_single"],
        "rollout_vs_batch_generate": result["rollout"]["ratio_vs_batch_generate"],
        "train_share_of_matmul": result["train_step"]["full"]["share_of_matmul_1024"],
        "kl_memory_ratio": result["memory"]["kl_memory_ratio"],
        "tool_loop_vs_plain": result["rollout"]["tool_loop_ratio"],
    }
    bounds = {
        "rollout_vs_single": 8.0,
        "rollout_vs_batch_generate": 1.3,
        "tool_loop_vs_plain": 0.95,
        "train_share_of_matmul": 0.55,
        "kl_memory_ratio": 1.15,
    }
    assert set(targets) == set(values)
    for name, value in values.items():
        assert targets[name]["value"] == value
        wanted = value <= bounds[name] if name == "kl_memory_ratio" else value >= bounds[name]
        assert targets[name]["met"] is wanted


def test_prompts_avoid_special_tokens() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import run as bench_run
    finally:
        sys.path.remove(str(BENCH))
    prompts = bench_run.make_prompts(100, (5, 9), 4)
    assert [len(p) for p in prompts] == [5, 9, 5, 9]
    assert all(0 <= t < 97 for p in prompts for t in p)  # 97..99: pad, im_start, im_end
