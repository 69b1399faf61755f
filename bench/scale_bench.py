"""The scale section (docs/architecture.md §5): memory and time of GRPO updates at real
model shapes.

    python bench/run.py --scale [--peer] [--quick] [--shapes K,...] [--rollout-rows N]
        [--out F] [--repeats N]

On random-weight models with the configurations of Qwen2.5-0.5B, Gemma-3-270M, Qwen3-0.6B,
Gemma-3-1B and Qwen2.5-1.5B (scale_setup.py; `--shapes` picks some by key, in the order
given), at fixed settings (LoRA rank 8 / scale 20 on all blocks, G = 8, 2 prompts per update,
128 new tokens, 2 micro-batches, KL 0.1, temperature 1.0), it reports per shape the peak
memory of an update against the weights' bytes and the seconds per update (medians after a
warm-up update); at the last shape (the largest in a full run) also the peak of one
`prod`-sized micro-batch (16 rows x (150 + 256) tokens). The first shape is also measured
without replay and, with `--peer`, against mlx-lm-lora on the same model, data and settings
(peer_lora.py). `--rollout-rows N` measures every shape again with `rollout.max_rows=N` (the
rollout decodes at most N completions at once: a smaller KV cache, a slower rollout). Random
weights rarely sample EOS, so completions run the whole budget: the
same work for both.
"""

from __future__ import annotations

import datetime as dt
import gc
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bench_model
from bench_model import ModelShape
from scale_setup import (
    FULL,
    QUICK,
    REWARD_FILE,
    REWARD_FUNCTION,
    Settings,
    data_dir,
    model_dir,
    overrides,
    parameter_count,
    prompt_tokens,
    select_shapes,
)

# Memory-related engine keys: their resolved values are recorded where this mlxgrpo has them.
ENGINE_KEYS = (
    "finetune.grad_checkpoint",
    "finetune.lm_head_chunk",
    "finetune.reuse_rollout_activations",
    "optim.max_tokens_per_microbatch",
)


def engine_settings(sets: list[str]) -> dict[str, Any]:
    """The resolved values of the memory-related engine keys this version of mlxgrpo has."""
    from mlxgrpo.config import resolve_config

    cfg = resolve_config((), sets, environ={}).config
    found = {}
    for key in ENGINE_KEYS:
        section, name = key.split(".")
        if hasattr(getattr(cfg, section), name):
            found[key] = getattr(getattr(cfg, section), name)
    return found


def measure_prod_micro_batch(model: Path, shape: ModelShape, s: Settings) -> dict[str, Any]:
    """Peak memory and seconds of one `prod`-sized UpdateContext.loss_and_grad, LoRA on all
    blocks, with the KL term's reference log-probs computed beforehand (as the trainer does)."""
    import mlx.core as mx
    import train_bench

    from mlxgrpo.engine.loop.training_pass import reference_logprobs
    from mlxgrpo.engine.loss import grpo

    sets = [
        "finetune.type=lora",
        "finetune.lora_layers=-1",
        f"finetune.lora_rank={s.lora_rank}",
        f"finetune.lora_scale={s.lora_scale}",
        f"algorithm.kl_coeff={s.kl_coeff}",
    ]
    ctx, _ = train_bench._context(str(model), sets)
    eos = min(ctx.codec.eos_ids)
    first_word = bench_model.base_vocab_size()  # ids from here on are plain words
    rng = random.Random(2)
    prompt = [rng.randrange(first_word, shape.vocab) for _ in range(s.prod_prompt_tokens)]
    batch = train_bench._micro_batch(
        [prompt], s.prod_rows, s.prod_completion_tokens, shape.vocab, eos
    )
    advantages = mx.array([(-1.0) ** i for i in range(s.prod_rows)], dtype=mx.float32)
    norm = grpo.LossNorm.for_update([batch.completion_mask], s.prod_completion_tokens)
    ref = reference_logprobs(ctx, batch)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    started = time.perf_counter()
    (loss, _), grads = ctx.loss_and_grad(batch, advantages, None, ref, norm)
    mx.eval(loss, grads)
    seconds = time.perf_counter() - started
    peak = mx.get_peak_memory()
    weights = 4 * parameter_count(shape)
    return {
        "rows": s.prod_rows,
        "prompt_tokens": s.prod_prompt_tokens,
        "completion_tokens": s.prod_completion_tokens,
        "sequence_length": int(batch.tokens.shape[1]),
        "kl_coeff": s.kl_coeff,
        "engine_settings": engine_settings([f"model.path={model}", *sets]),
        "active_before_gb": before / 1e9,
        "peak_memory_gb": peak / 1e9,
        "peak_over_weights": peak / weights,
        "seconds": seconds,
    }


def _measured(sets: list[str], params: int, repeats: int) -> dict[str, Any]:
    """mlxgrpo's update figures for these settings, with the peak over the weights' bytes."""
    import train_bench

    figures = train_bench.measure_updates((), sets, repeats)
    figures["peak_over_weights"] = figures["peak_memory_gb"] * 1e9 / (4 * params)
    return figures


def _free() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def run_scale(
    args: Any,
    environment: dict[str, Any],
    peer_python: Path | None,
    progress: Callable[[dict[str, Any]], None] = lambda result: None,
) -> dict[str, Any]:
    """All scale figures; `peer_python` (the peer venv's interpreter) adds the peer's run.

    `progress(result)` is called after each stage with what is known so far: a run killed for
    lack of memory at the last stage still leaves the figures of the earlier ones.
    """
    import peer_lora

    shapes = select_shapes(getattr(args, "shapes", None), args.quick)
    s = QUICK if args.quick else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": 1,
        "section": "scale",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": args.repeats,
        "environment": environment,
        "settings": {**asdict(s), "reward": f"{REWARD_FILE.name}:{REWARD_FUNCTION}"},
        "shapes": {},
    }
    timings = result.setdefault("section_seconds", {})
    for index, (key, shape) in enumerate(shapes.items()):
        began = time.perf_counter()
        model, data = model_dir(shape), data_dir(shape.vocab, s)
        timings[f"{key}_prepare"] = time.perf_counter() - began
        sets = overrides(model, data, shape.vocab, s)
        params = parameter_count(shape)
        entry: dict[str, Any] = {
            "model": {
                **asdict(shape),
                "extra": dict(shape.extra),
                "config": shape.config(),
                "parameters": params,
                "weights_bytes": 4 * params,
                "dtype": "float32",
                "path": str(model),
            },
            "prompt_tokens": prompt_tokens(model, data),
            "data_file": str(data / "train.jsonl"),
            "engine_settings": engine_settings(sets),
        }

        began = time.perf_counter()
        ours = entry["mlxgrpo"] = _measured(sets, params, args.repeats)
        timings[f"{key}_mlxgrpo"] = time.perf_counter() - began
        _free()
        if index == 0:  # what replaying the rollout's activations saves, side by side
            began = time.perf_counter()
            plain = [*sets, "finetune.reuse_rollout_activations=false"]
            entry["mlxgrpo_without_replay"] = _measured(plain, params, args.repeats)
            timings[f"{key}_mlxgrpo_without_replay"] = time.perf_counter() - began
            _free()
        if rows := getattr(args, "rollout_rows", None):  # the rollout's decode batch bounded
            began = time.perf_counter()
            bounded = [*sets, f"rollout.max_rows={rows}"]
            entry["mlxgrpo_rollout_rows"] = {
                "max_rows": rows,
                **_measured(bounded, params, args.repeats),
            }
            timings[f"{key}_mlxgrpo_rollout_rows"] = time.perf_counter() - began
            _free()
        if peer_python is not None and index == 0:  # the shape the targets compare
            began = time.perf_counter()
            try:
                entry.update(_peer_figures(peer_python, model, data, shape, s, args, ours))
            except peer_lora.PeerError as exc:  # keep mlxgrpo's figures; say what failed
                print(exc, file=sys.stderr)
                entry["peer_error"] = str(exc)
            timings[f"{key}_peer"] = time.perf_counter() - began
        result["shapes"][key] = entry
        progress(result)
    last_key, last_shape = list(shapes.items())[-1]
    began = time.perf_counter()
    prod = measure_prod_micro_batch(model_dir(last_shape), last_shape, s)
    result["prod_micro_batch"] = {"shape": last_key, **prod}
    timings["prod_micro_batch"] = time.perf_counter() - began
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - started
    return result


def _peer_figures(
    python: Path,
    model: Path,
    data: Path,
    shape: ModelShape,
    s: Settings,
    args: Any,
    ours: dict[str, Any],
) -> dict[str, Any]:
    import peer_lora

    peer = peer_lora.run_peer(python, model, data, shape, s, args.repeats)
    peer["peak_over_weights"] = peer["peak_memory_gb"] * 1e9 / (4 * parameter_count(shape))
    ratios = {
        "peak_mlxgrpo_over_peer": ours["peak_memory_gb"] / peer["peak_memory_gb"],
        "seconds_peer_over_mlxgrpo": peer["seconds_per_update"] / ours["seconds_per_update"],
    }
    return {"peer": peer, "vs_peer": ratios}


TARGETS = {  # the acceptance figures, set for the first and last shapes of a full run
    "peak_over_weights": ("<=", 1.5, "{first}: update peak / weights' bytes"),
    "peak_vs_peer": ("<=", 0.5, "{first}: mlxgrpo peak / peer peak"),
    "peer_seconds_over_mlxgrpo": (">=", 4.0, "{first}: peer s/update / mlxgrpo s/update"),
    "prod_micro_batch_peak_over_weights": (
        "<=",
        1.5,
        "{last}: prod micro-batch peak / weights' bytes",
    ),
}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    first_key = next(iter(result["shapes"]))
    first = result["shapes"][first_key]
    last_key = result["prod_micro_batch"]["shape"]
    values = {
        "peak_over_weights": first["mlxgrpo"]["peak_over_weights"],
        "prod_micro_batch_peak_over_weights": result["prod_micro_batch"]["peak_over_weights"],
    }
    if "vs_peer" in first:
        values["peak_vs_peer"] = first["vs_peer"]["peak_mlxgrpo_over_peer"]
        values["peer_seconds_over_mlxgrpo"] = first["vs_peer"]["seconds_peer_over_mlxgrpo"]
    out = {}
    for name, value in values.items():
        op, bound, what = TARGETS[name]
        met = value >= bound if op == ">=" else value <= bound
        what = what.format(first=first_key, last=last_key)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met, "what": what}
    return out
