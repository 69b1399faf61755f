"""Training figures: train-step throughput against the measured matmul rate, peak memory of an
update with LoRA and with LoRA + KL, and seconds per full GRPO update.

The train step is `UpdateContext.loss_and_grad` (the trainer's own loss, gradients included) on
one micro-batch of G prompt + completion rows. FLOPs are counted for the work a step needs:
6 x (block matmul parameters) per input position, 6 x (LM head parameters) per position whose
log-prob is used (the completion positions), and PaLM's 12 x layers x hidden x length per
position for attention. A LoRA step freezes the base weights, so it counts 4 instead of 6.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from bench_model import ModelShape

from mlxgrpo.backend import measure_matmul_gflops, set_memory_limits
from mlxgrpo.config import resolve_config
from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loss import grpo
from mlxgrpo.generation.rollout import build_micro_batch
from mlxgrpo.models.finetune import prepare_trainable
from mlxgrpo.models.loading import load_model
from mlxgrpo.task import TextCodec


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Median fp32 [m, k] @ [k, n] rate in GFLOP/s."""
    a = mx.random.normal((m, k), key=mx.random.key(0))
    b = mx.random.normal((k, n), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        timings.append(time.perf_counter() - started)
    return 2 * m * k * n / statistics.median(timings) / 1e9


def step_flops(shape: ModelShape, rows: int, length: int, start: int, weight_factor: int) -> float:
    """FLOPs of one forward + backward over `rows` sequences of `length` tokens (see module)."""
    positions = length - 1  # the model reads tokens[:, :-1]
    head = shape.vocab * shape.hidden
    blocks = shape.matmul_parameters() - head
    weights = weight_factor * (blocks * positions + head * (length - start))
    attention = 12 * shape.layers * shape.hidden * positions * positions
    return float(rows * (weights + attention))


def _micro_batch(prompts: Sequence[list[int]], rows: int, completion: int, vocab: int, eos: int):
    """`rows` samples of prompt 0 (one group) with random completions of `completion` tokens."""
    key = mx.random.key(7)
    ids = mx.random.randint(0, vocab, (rows, completion), key=key).tolist()
    ids = [[t if t != eos else eos - 1 for t in row] for row in ids]
    return build_micro_batch([list(prompts[0])] * rows, ids)


def _context(model_dir: str, overrides: list[str]) -> tuple[UpdateContext, Any]:
    resolved = resolve_config((), [f"model.path={model_dir}", *overrides], environ={})
    cfg = resolved.config
    set_memory_limits()  # as the trainer does (on Linux: glibc keeps freed buffers)
    model, tokenizer = load_model(model_dir)
    prepare_trainable(model, cfg.finetune)
    ctx = UpdateContext.from_config(
        model,
        cfg,
        reward_set=None,
        optimizer=None,
        codec=TextCodec(
            encode=None, decode=None, eos_ids=set(tokenizer.eos_token_ids), pad_id=0
        ),  # the step only needs token ids
    )
    return ctx, tokenizer


def measure_train_step(
    model_dir: str,
    shape: ModelShape,
    prompts: Sequence[list[int]],
    *,
    rows: int,
    completion: int,
    repeats: int,
) -> dict[str, Any]:
    """Full fine-tuning and LoRA steps, interleaved with matmul-rate measurements."""
    kinds = {"full": 6, "lora": 4}
    # The step's arithmetic rate: checkpointing's recomputation is not in the FLOP count, so it
    # is off here (the memory and update sections run the defaults).
    sets = ["finetune.lora_layers=-1", "finetune.grad_checkpoint=false"]
    contexts = {kind: _context(model_dir, [f"finetune.type={kind}", *sets]) for kind in kinds}
    eos = min(contexts["full"][0].codec.eos_ids)
    # Without prompt lengths every row runs whole: the shared-prompt passes run fewer tokens
    # than the FLOP rule counts, so, like checkpointing, they are off for this rate.
    batch = replace(_micro_batch(prompts, rows, completion, shape.vocab, eos), prompt_lengths=None)
    advantages = mx.array([(-1.0) ** i for i in range(rows)], dtype=mx.float32)
    norm = grpo.LossNorm.for_update([batch.completion_mask], completion)
    length = batch.tokens.shape[1]
    mlp_shape = (rows * (length - 1), shape.hidden, shape.intermediate)
    head_shape = (rows * (length - batch.start), shape.hidden, shape.vocab)

    def step(ctx: UpdateContext) -> float:
        started = time.perf_counter()
        (loss, _), grads = ctx.loss_and_grad(batch, advantages, None, None, norm)
        mx.eval(loss, grads)
        return time.perf_counter() - started

    for ctx, _ in contexts.values():
        step(ctx)  # warm-up (and compilation, where the engine compiles)
    rounds: list[dict[str, float]] = []
    for _ in range(repeats):
        # The machine's load drifts: the matmul rate is taken before and after the steps.
        before = measure_matmul_gflops(1024, max_repeats=5, budget_s=1.0)
        record = {
            "matmul_mlp_shape_gflops": matmul_rate(*mlp_shape),
            "matmul_head_shape_gflops": matmul_rate(*head_shape),
        }
        for kind, (ctx, _) in contexts.items():
            record[f"{kind}_seconds"] = step(ctx)
        after = measure_matmul_gflops(1024, max_repeats=5, budget_s=1.0)
        record["matmul_1024_gflops"] = (before + after) / 2
        rounds.append(record)
    tokens = rows * length
    result: dict[str, Any] = {
        "settings": {
            "rows": rows,
            "sequence_length": length,
            "completion_tokens": completion,
            "tokens_per_step": tokens,
            "mlp_matmul_shape": list(mlp_shape),
            "head_matmul_shape": list(head_shape),
            "loss": "UpdateContext.loss_and_grad with the default algorithm settings (grpo loss, "
            "entropy reported but not differentiated, no KL), activation checkpointing and "
            "shared-prompt passes off",
            "flops_rule": "6 (full) or 4 (LoRA) x matmul parameters x positions (LM head on "
            "completion positions only) + 12 x layers x hidden x length per position",
        },
        "rounds": rounds,
    }
    for name in ("matmul_1024_gflops", "matmul_mlp_shape_gflops", "matmul_head_shape_gflops"):
        result[name] = statistics.median(r[name] for r in rounds)
    for kind, factor in kinds.items():
        flops = step_flops(shape, rows, length, batch.start, factor)
        seconds = [r[f"{kind}_seconds"] for r in rounds]
        rates = [r["matmul_1024_gflops"] for r in rounds]
        shares = [flops / s / 1e9 / rate for s, rate in zip(seconds, rates, strict=True)]
        result[kind] = {
            "flops_per_step": flops,
            "seconds": statistics.median(seconds),
            "tokens_per_sec": tokens / statistics.median(seconds),
            "gflops": flops / statistics.median(seconds) / 1e9,
            "share_of_matmul_1024": statistics.median(shares),
        }
    return result


class _UpdateProbe(Callback):
    """Collects per-update figures; resets the peak so each update reports its own."""

    def __init__(self) -> None:
        self.updates: list[dict[str, float]] = []
        self.memory_paths: dict[str, str] = {}

    def on_start(self, info: dict[str, Any]) -> None:
        self.memory_paths = dict(info.get("memory_paths") or {})

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        keys = ("step_seconds", "rollout_seconds", "train_seconds", "peak_memory_gb")
        record = {k: float(metrics[k]) for k in keys}
        if "completion_length_mean" in metrics:  # shows how much was generated (scale section)
            record["completion_length_mean"] = float(metrics["completion_length_mean"])
        self.updates.append(record)
        mx.reset_peak_memory()


def measure_updates(
    config_files: Sequence[str], overrides: Sequence[str], repeats: int
) -> dict[str, Any]:
    """Run `repeats` + 1 full GRPO updates through `mlxgrpo.train`; the first is a warm-up."""
    from mlxgrpo.engine.loop.trainer import train

    with tempfile.TemporaryDirectory(prefix="mlxgrpo-bench-") as tmp:
        sets = [
            *overrides,
            f"run.output_dir={tmp}",
            "run.run_name=bench",
            f"run.max_steps={repeats + 1}",
            "run.resume=never",
            "checkpoint.save_steps=0",
            "logging.jsonl=false",
            "logging.log_completions=false",
        ]
        resolved = resolve_config(tuple(config_files), sets, environ={})
        probe = _UpdateProbe()
        mx.reset_peak_memory()
        train(resolved, [probe])
    measured = probe.updates[1:]
    return {
        "updates_measured": len(measured),
        "seconds_per_update": statistics.median(u["step_seconds"] for u in measured),
        "rollout_seconds": statistics.median(u["rollout_seconds"] for u in measured),
        "train_seconds": statistics.median(u["train_seconds"] for u in measured),
        "peak_memory_gb": statistics.median(u["peak_memory_gb"] for u in measured),
        "memory_paths": probe.memory_paths,
        "updates": measured,
    }


def measure_memory(
    model_dir: Path, *, group: int, batch: int, max_new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Peak memory (and seconds) of updates with LoRA, and with LoRA + a k3 KL term."""
    common = [
        f"model.path={model_dir}",
        "data.dataset=synthetic:repeat?letters=x",
        f"rollout.num_generations={group}",
        f"rollout.max_new_tokens={max_new_tokens}",
        "rollout.temperature=1.0",
        f"optim.batch_size={batch}",
        "optim.gradient_accumulation_steps=1",
        "finetune.type=lora",
        "finetune.lora_layers=-1",
    ]
    lora = measure_updates((), common, repeats)
    with_kl = measure_updates((), [*common, "algorithm.kl_coeff=0.04"], repeats)
    return {
        "settings": {
            "num_generations": group,
            "batch_size": batch,
            "max_new_tokens": max_new_tokens,
            "kl_coeff": 0.04,
        },
        "lora": lora,
        "lora_kl": with_kl,
        "kl_memory_ratio": with_kl["peak_memory_gb"] / lora["peak_memory_gb"],
    }
