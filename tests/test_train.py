"""End-to-end GRPO training on a built-in tiny model: learning, resume, run directory, adapters."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import mlx.core as mx
import pytest
from conftest import record_decode_widths, spread_reward
from mlx.utils import tree_flatten
from tolerance import assert_close

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.engine.loss import grpo

LEARN = [
    "model.path=builtin:tiny-qwen2",
    "data.dataset=synthetic:repeat?letters=x",
    "rollout.num_generations=8",
    "rollout.max_new_tokens=12",
    "rollout.temperature=1.0",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "optim.max_grad_norm=1.0",
    "optim.batch_size=4",
    "optim.gradient_accumulation_steps=2",
    "finetune.lora_layers=-1",
    "checkpoint.save_steps=0",
    "run.resume=never",
]


def run(tmp_path, *sets, name="run", callbacks=(), should_stop=lambda: False):
    resolved = resolve_config(
        (), [*LEARN, f"run.output_dir={tmp_path}", f"run.run_name={name}", *sets], environ={}
    )
    return train(resolved, callbacks, should_stop=should_stop)


def rewards_of(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward_mean"] for line in lines if '"train"' in line]


# The seed of the learning runs below. A trajectory at lr 1e-2 turns on float rounding: with
# seed 0 a change of the activation's last bits moved the take-off from update 13 to 25.
LEARN_SEED = "run.seed=1"


def test_grpo_raises_reward(tmp_path):
    summary = run(tmp_path, "run.max_steps=20", LEARN_SEED)
    rewards = rewards_of(tmp_path / "run")
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.4, rewards
    assert summary["last_reward_mean"] == rewards[-1]


def test_memory_paths_learn_as_well(tmp_path, monkeypatch):
    """Token-packed micro-batches, a head in chunks of 5 positions and MLPs in chunks of 7
    tokens (all the memory paths at once) still learn, and the packing is what was asked."""
    from mlxgrpo.engine.memory import recompute

    mlp_width = 2 * 64  # tiny-qwen2's intermediate size
    monkeypatch.setattr(recompute, "MLP_BUDGET_BYTES", 7 * 8 * 4 * mlp_width)
    run(
        tmp_path,
        "run.max_steps=20",
        "optim.max_tokens_per_microbatch=120",
        "optim.gradient_accumulation_steps=3",  # not a divisor of 32: unused with a budget
        "finetune.lm_head_chunk=5",
    )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"train"' in line]
    rewards = [r["reward_mean"] for r in records]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.4, rewards
    # Every prompt alone is longer than 12 tokens, so at most 9 of the 32 rows fit 120 tokens.
    assert all(r["micro_batches"] >= 4 for r in records)


def test_flipped_advantage_sign_does_not_learn(tmp_path, monkeypatch):
    """The learning test's margin is meaningful: with the advantage negated it fails."""
    original = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda *a, **k: -original(*a, **k))
    run(tmp_path, "run.max_steps=20", LEARN_SEED)
    rewards = rewards_of(tmp_path / "run")
    assert not (sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.4), rewards


def test_run_directory_contents(tmp_path):
    run(tmp_path, "run.max_steps=2", "logging.log_completions=true", "checkpoint.save_steps=1")
    run_dir = tmp_path / "run"
    written = tomllib.loads((run_dir / "config.resolved.toml").read_text())
    assert written["rollout"]["num_generations"] == 8
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2]
    for key in (
        "reward_mean",
        "reward_std",
        "zero_std_groups",
        "clip_low",
        "clip_high",
        "entropy",
        "grad_norm",
        "learning_rate",
        "completion_length_mean",
        "truncated_share",
        "rollout_tokens_per_sec",
        "train_tokens_per_sec",
        "peak_memory_gb",
        "advantage_mean",
    ):
        assert key in records[0], key
    assert records[0]["rewards"]["char_match"]["mean"] == pytest.approx(records[0]["reward_mean"])
    completions = (run_dir / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 2 * 4 * 8
    first = json.loads(completions[0])
    assert {"prompt", "completion", "rewards", "advantage", "update"} <= set(first)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
    ]
    assert (run_dir / "final" / "adapters.safetensors").is_file()


def _weights(path):
    return mx.load(str(path / "adapters.safetensors"))


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    run(straight, "run.max_steps=4", "checkpoint.save_steps=2")
    resumed = tmp_path / "resumed"
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    summary = run(resumed, "run.max_steps=4", "checkpoint.save_steps=2", should_stop=stop_after_two)
    assert summary["interrupted"] and summary["updates"] == 2
    assert not (resumed / "run" / "final").exists()
    run(resumed, "run.max_steps=4", "checkpoint.save_steps=2", "run.resume=auto")
    a, b = _weights(straight / "run" / "final"), _weights(resumed / "run" / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert mx.allclose(a[key], b[key], atol=1e-6).item(), key
    ra, rb = rewards_of(straight / "run"), rewards_of(resumed / "run")
    assert ra == pytest.approx(rb, abs=1e-6) and len(rb) == 4


def test_kl_to_adapter_free_reference_starts_at_zero(tmp_path):
    # A reward that varies within groups from the start, so the first update moves the policy
    # (with all rewards equal the only gradient is the KL term's, exactly 0 at policy == ref).
    run(
        tmp_path,
        "run.max_steps=2",
        "algorithm.kl_coeff=0.1",
        "optim.learning_rate=1e-3",
        spread_reward(tmp_path),
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # LoRA B starts at zero, so before the first optimizer step policy == reference: the
    # policy's log-probs come from the rollout's decode steps (engine.memory.replay), the
    # reference's from the training layout, so they agree to float rounding, and k3 ~
    # (difference)^2 / 2.
    assert 0.0 <= records[0]["kl"] <= 1e-9
    assert records[0]["grad_norm"] > 0
    assert records[1]["kl"] > 1e-6


def test_second_iteration_moves_the_ratio(tmp_path):
    run(
        tmp_path,
        "run.max_steps=1",
        "algorithm.num_iterations=2",
        "optim.learning_rate=1e-3",
        spread_reward(tmp_path),
    )
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # Averaged over the two passes: the first has ratio exactly 1, the second does not.
    assert record["ratio"] != pytest.approx(1.0, abs=1e-7)
    assert record["ratio"] == pytest.approx(1.0, abs=0.5)


def test_adapters_load_in_mlx_lm(tmp_path):
    from mlx_lm.utils import load

    from mlxgrpo.models.builtin import resolve_model_path

    run(tmp_path, "run.max_steps=20", LEARN_SEED)
    final = tmp_path / "run" / "final"
    base = resolve_model_path("builtin:tiny-qwen2")
    model, tokenizer = load(base, adapter_path=str(final))
    trained = _weights(final)
    loaded = dict(tree_flatten(model.parameters()))
    for key, value in trained.items():
        assert mx.array_equal(loaded[key], value).item(), key
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            base,
            "--adapter-path",
            str(final),
            "--prompt",
            "Repeat the letter x:",
            "--max-tokens",
            "8",
            "--temp",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "xxxx" in result.stdout  # the trained policy answers with x's


def test_full_finetune_final_is_a_loadable_model(tmp_path):
    from mlx_lm.utils import load

    run(tmp_path, "run.max_steps=1", "finetune.type=full", "optim.learning_rate=1e-3")
    model, tokenizer = load(str(tmp_path / "run" / "final"))
    assert tokenizer.encode("xyz") and model.layers


def test_train_cli_json_summary(cli, tmp_path):
    code, out, err = cli("train", "-c", "demo", "--max-steps", "2", "-o", tmp_path, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["updates"] == 2 and summary["run_dir"].startswith(str(tmp_path))
    assert "mlxgrpo train" in err  # the header panel went to stderr


def test_fresh_run_never_overwrites_an_existing_run(tmp_path):
    run(tmp_path, "run.max_steps=1")
    summary = run(tmp_path, "run.max_steps=1")
    assert summary["run_dir"].endswith("run-2")
    assert (tmp_path / "run" / "final").is_dir()


def test_in_training_evaluation_is_logged(tmp_path):
    run(
        tmp_path,
        "run.max_steps=2",
        "eval.every_updates=1",
        "eval.samples=4",
        "eval.max_new_tokens=6",
        "eval.before_training=true",
        "data.dataset=synthetic:arithmetic",
        "rollout.max_new_tokens=6",
    )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in lines if '"kind": "eval"' in x]
    assert [e["update"] for e in evals] == [0, 1, 2]
    assert all(e["samples"] == 4 and 0.0 <= e["accuracy"] <= 1.0 for e in evals)
    assert all(e["completion_length_mean"] <= 6 for e in evals)


def test_training_continues_from_existing_adapters(tmp_path):
    run(tmp_path, "run.max_steps=2", name="first")
    first = tmp_path / "first" / "final"
    run(
        tmp_path,
        "run.max_steps=1",
        f"model.adapter_path={first}",
        "finetune.lora_rank=4",
        name="second",
    )
    before, after = _weights(first), _weights(tmp_path / "second" / "final")
    assert before.keys() == after.keys()  # the same adapters trained on, none nested inside
    assert any(not mx.array_equal(before[k], after[k]).item() for k in before)
    saved = json.loads((tmp_path / "second" / "final" / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["rank"] == 8  # the loaded adapters' config, not rank 4


def test_dora_adapters_train_and_load(tmp_path):
    from mlx_lm.utils import load

    from mlxgrpo.models.builtin import resolve_model_path

    run(tmp_path, "run.max_steps=1", "finetune.type=dora")
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "dora"
    assert any(k.endswith(".m") for k in _weights(final))  # DoRA's magnitude vectors
    model, _ = load(resolve_model_path("builtin:tiny-qwen2"), adapter_path=str(final))
    assert model.layers


def test_ctrl_c_finishes_the_update_saves_and_exits_130(tmp_path):
    import signal
    import time

    from conftest import REPO

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxgrpo",
            "train",
            "-c",
            "demo",
            "--max-steps",
            "5000",
            "-o",
            str(tmp_path),
            "--set",
            "checkpoint.save_steps=0",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "demo" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = list((tmp_path / "demo" / "checkpoints").iterdir())
    assert len(saved) == 1
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["update"] == len(metrics.read_text().splitlines())
    assert "stopped after" in err


def test_full_finetune_kl_uses_a_frozen_reference(tmp_path):
    run(
        tmp_path,
        "run.max_steps=2",
        "finetune.type=full",
        "algorithm.kl_coeff=0.1",
        "optim.learning_rate=1e-4",
        spread_reward(tmp_path),
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # identical weights at the start
    assert records[1]["kl"] > 1e-6  # the policy moved, the frozen copy did not


def test_lora_layers_default_covers_every_block_and_only_an_explicit_excess_fails(cli, tmp_path):
    common = ["train", "-m", "builtin:tiny-qwen2", "--max-steps", "1", "-o", tmp_path]
    common += [
        "--set",
        "data.dataset=synthetic:repeat?letters=x",
        "--set",
        "rollout.max_new_tokens=4",
    ]
    code, _, err = cli(*common, "--set", "run.run_name=default")
    assert code == 0, err
    assert "lora on all 2 blocks" in " ".join(err.split())  # the header says what it did
    code, out, err = cli(
        *common, "--set", "run.run_name=explicit", "--set", "finetune.lora_layers=5"
    )
    assert code == 2
    assert "finetune.lora_layers = 5 but the model has 2 blocks" in err
    assert "Traceback" not in err + out


def test_a_run_is_the_same_whether_or_not_it_built_the_builtin_model(tmp_path, monkeypatch):
    """Building a builtin model draws from MLX's generator; adapters must not notice."""
    monkeypatch.setenv("MLXGRPO_CACHE_DIR", str(tmp_path / "fresh-cache"))
    run(tmp_path / "a", "run.max_steps=2")  # builds the model into the empty cache
    run(tmp_path / "b", "run.max_steps=2")  # loads it
    a, b = _weights(tmp_path / "a" / "run" / "final"), _weights(tmp_path / "b" / "run" / "final")
    assert a.keys() == b.keys() and a
    for key in a:
        assert mx.array_equal(a[key], b[key]).item(), key


def test_rollout_max_rows_bounds_the_decode_and_leaves_the_run_the_same(tmp_path, monkeypatch):
    """rollout.max_rows = 3 decodes the 32 completions of an update at most 3 at a time (so a
    group of 8 in slices 2-3-3) and the run samples the same completions, so it ends with the
    same rewards, the same loss and, within float noise, the same adapters."""

    run(tmp_path, "run.max_steps=2", "logging.log_completions=true", name="whole")
    widths = record_decode_widths(monkeypatch)
    run(tmp_path, "run.max_steps=2", "logging.log_completions=true", "rollout.max_rows=3",
        name="bounded")  # fmt: skip
    assert widths and max(widths) == 3
    whole, bounded = tmp_path / "whole", tmp_path / "bounded"

    def completions(run_dir):
        lines = (run_dir / "completions.jsonl").read_text().splitlines()
        return [json.loads(line)["completion"] for line in lines]

    assert completions(bounded) == completions(whole)
    assert rewards_of(bounded) == rewards_of(whole)

    def first_update(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return next(json.loads(line) for line in lines if '"train"' in line)

    # Same completions, same weights: the first update's loss and gradient differ only by the
    # order of float sums (the replayed block outputs came from batches of other sizes).
    for key in ("policy_loss", "grad_norm"):
        ours, theirs = first_update(bounded)[key], first_update(whole)[key]
        assert_close(ours, theirs, terms=32 * 12 * 64, what=key)
    # Adam divides by the gradient's own scale, so where a gradient is near zero its noise
    # moves a weight by up to the learning rate: compare against the weights' magnitude.
    after, expected = _weights(bounded / "final"), _weights(whole / "final")
    for name, value in expected.items():
        assert float(mx.abs(after[name] - value).max()) <= 0.01 * float(mx.abs(value).max()), name


def test_adaptive_entropy_weight_moves_toward_its_target_and_resumes_exactly(tmp_path):
    """entropy_target above any entropy the tiny model reaches: the weight climbs by its step
    each update (logged as entropy_coeff), and a run stopped after 2 updates resumes with the
    weight it had, to the same adapters as an uninterrupted run."""
    sets = (
        "run.max_steps=4", "checkpoint.save_steps=2", "algorithm.entropy_target=50",
        "algorithm.entropy_coeff=0.01", "algorithm.entropy_coeff_step=0.02",
        "algorithm.entropy_coeff_max=0.05",
    )  # fmt: skip
    straight = tmp_path / "straight"
    run(straight, *sets)

    def weights_logged(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["entropy_coeff"] for x in lines if '"train"' in x]

    assert weights_logged(straight / "run") == pytest.approx([0.01, 0.03, 0.05, 0.05])
    resumed = tmp_path / "resumed"
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    run(resumed, *sets, should_stop=stop_after_two)
    run(resumed, *sets, "run.resume=auto")
    assert weights_logged(resumed / "run") == weights_logged(straight / "run")
    a, b = _weights(straight / "run" / "final"), _weights(resumed / "run" / "final")
    for key in a:
        assert mx.allclose(a[key], b[key], atol=1e-6).item(), key
