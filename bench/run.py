"""mlxgrpo performance harness (docs/architecture.md §13): one run, same model and inputs for
every design.

    python bench/run.py [--quick] [--out results.json] [--repeats 3] [--sections ...]
    python bench/run.py --scale [--peer] [--quick] [--shapes a,b] [--out scale.json] [--repeats 2]
    python bench/run.py --learning [--quick] [--out learning.json]
    python bench/run.py --sft [--peer] [--quick] [--out sft.json] [--repeats 3]
    python bench/run.py --distributed [--quick] [--out distributed.json] [--repeats 2]

Builds a random-weight Qwen2-shaped benchmark model (~39M parameters; `--quick`: the tiny
built-in shape) and measures rollout tokens/s of three designs, train-step throughput and its
share of the measured fp32 matmul rate, peak memory of a LoRA update with and without KL, and
seconds per full GRPO update (the demo config, and demo-like settings on the benchmark model).
Every figure is the median of `--repeats` runs; the designs alternate within each round.
Prints a Rich table and writes JSON for later comparison. `--scale` runs only the scale
section instead (real Qwen2.5, Qwen3 and Gemma 3 shapes, optionally against mlx-lm-lora: see
scale_bench.py).
`--learning` runs only the learning table (every loss type on one task: learning_bench.py).
`--sft` runs only supervised fine-tuning at the Qwen2.5-0.5B shape, with `--peer` against mlx-lm's
own `mlx_lm lora` on identical work (sft_bench.py).
`--distributed` runs only the data-parallel section: the same updates in one process and in 2
ranks under `mlx.launch` on this machine (distributed_bench.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlxgrpo  # noqa: F401  (loads the system BLAS before anything imports mlx)

# isort: split
from mlxgrpo.backend import blas_info, default_dtype, device_summary, seed_everything

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

SECTION_KEYS = {
    "rollout": "rollout",
    "train": "train_step",
    "memory": "memory",
    "demo": "demo_update",
}
SECTIONS = tuple(SECTION_KEYS)
SCHEMA_VERSION = 1
TARGETS = {
    "rollout_vs_single": (">=", 8.0),
    "rollout_vs_batch_generate": (">=", 1.3),
    "tool_loop_vs_plain": (">=", 0.95),
    "train_share_of_matmul": (">=", 0.55),
    "kl_memory_ratio": ("<=", 1.15),
}
# Prompt lengths of a GSM8K question with a system prompt under a Qwen2-sized BPE vocabulary.
# The weights are random, so the ids are too (drawn clear of the special tokens).
PROMPT_LENGTHS = (100, 116, 124, 108)
QUICK_PROMPT_LENGTHS = (20, 28, 24, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short runs (smoke)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, help="measurements per figure (default 3)")
    parser.add_argument("--prompts", type=int, default=4, help="batch of prompts B (>= 4)")
    parser.add_argument("--generations", type=int, default=8, help="samples per prompt G")
    parser.add_argument("--max-new-tokens", type=int, help="token budget (default 128)")
    parser.add_argument(
        "--single-calls",
        type=int,
        help="one-call-per-sample calls timed per round (default 8; each call is independent, "
        "so its tokens/s does not depend on how many are timed)",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--quiet", action="store_true", help="no table, only the JSON file")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="only the scale section (Qwen2.5 0.5B/1.5B, Qwen3-0.6B, Gemma-3-270M/1B shapes)",
    )
    parser.add_argument(
        "--shapes", help="--scale: comma list of shape keys (default: all; see scale_setup.py)"
    )
    parser.add_argument(
        "--peer",
        action="store_true",
        help="--scale: also run mlx-lm-lora (installed on demand); --sft: also run mlx_lm lora",
    )
    parser.add_argument(
        "--sft",
        action="store_true",
        help="only supervised fine-tuning at the Qwen2.5-0.5B shape (with --peer: vs mlx_lm lora)",
    )
    parser.add_argument(
        "--rollout-rows",
        type=int,
        help="--scale: also measure each shape with rollout.max_rows set to this",
    )
    parser.add_argument(
        "--learning", action="store_true", help="only the learning table (every loss type)"
    )
    parser.add_argument(
        "--distributed", action="store_true", help="only 1 process vs 2 ranks (mlx.launch)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.peer and not (args.scale or args.sft):
        parser.error("--peer belongs to --scale or --sft")
    if args.shapes and not args.scale:
        parser.error("--shapes belongs to --scale")
    if args.rollout_rows is not None and (not args.scale or args.rollout_rows < 1):
        parser.error("--rollout-rows belongs to --scale and takes a count >= 1")
    if args.scale:
        import scale_setup

        try:
            scale_setup.select_shapes(args.shapes, args.quick)
        except ValueError as exc:
            parser.error(str(exc))
    if args.learning + args.scale + args.distributed + args.sft > 1:
        parser.error("--learning, --scale, --sft and --distributed are separate runs")
    args.repeats = args.repeats or (2 if args.scale or args.distributed else 3)
    args.max_new_tokens = args.max_new_tokens or (24 if quick else 128)
    args.single_calls = args.single_calls or (2 if quick else 8)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or args.prompts < 1 or args.generations < 1 or args.repeats < 1:
        parser.error(f"bad arguments (unknown sections: {sorted(unknown)})")
    return args


def make_prompts(vocab: int, lengths: tuple[int, ...], count: int) -> list[list[int]]:
    import numpy as np

    from mlxgrpo.models.builtin import SPECIAL_TOKENS, TOKENIZER_CHARS

    rng = np.random.default_rng(0)
    first_special = len(TOKENIZER_CHARS)
    ids = [i for i in range(vocab) if not first_special <= i < first_special + len(SPECIAL_TOKENS)]
    return [
        [int(ids[j]) for j in rng.integers(0, len(ids), lengths[k % len(lengths)])]
        for k in range(count)
    ]


def describe_model(shape: Any, model_dir: Path) -> dict[str, Any]:
    import bench_model

    from mlxgrpo.models.loading import load_model

    model, _ = load_model(str(model_dir))
    return {
        "name": shape.name,
        "hidden": shape.hidden,
        "layers": shape.layers,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "intermediate": shape.intermediate,
        "vocab": shape.vocab,
        "tied_embeddings": True,
        "parameters": bench_model.parameter_count(model),
        "matmul_parameters": shape.matmul_parameters(),
        "dtype": str(model.model.norm.weight.dtype).rsplit(".", 1)[-1],
    }


def environment() -> dict[str, Any]:
    return {
        **device_summary(),
        "blas": blas_info().name,
        "dtype": default_dtype(),
        # glibc allocator settings change train-step speed (fresh pages for big buffers).
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def run_scale(args: argparse.Namespace) -> dict[str, Any] | None:
    """The scale section alone; None (after a one-line message) when the peer cannot be set up."""
    import peer_lora
    import scale_bench
    import scale_setup

    seed_everything(0)
    peer_python = None
    if args.peer:  # install first: a failure should not come after an hour of measuring
        try:
            peer_python = peer_lora.ensure_venv(scale_setup.cache_root())
        except peer_lora.PeerError as exc:
            print(exc, file=sys.stderr)
            return None
    return scale_bench.run_scale(args, environment(), peer_python, lambda r: write(r, args.out))


def run_learning(args: argparse.Namespace) -> dict[str, Any]:
    import learning_bench

    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "section": "learning",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "environment": environment(),
        "learning": learning_bench.measure_learning(
            seeds=1 if args.quick else 3, updates=6 if args.quick else 40
        ),
    }
    result["seconds"] = time.perf_counter() - started
    return result


def run_sft(args: argparse.Namespace) -> dict[str, Any]:
    import sft_bench

    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        **sft_bench.run_sft(args, environment()),
    }
    result["seconds"] = time.perf_counter() - started
    return result


def run_distributed(args: argparse.Namespace) -> dict[str, Any]:
    import bench_model
    import distributed_bench

    shape = bench_model.SHAPES["quick" if args.quick else "bench"]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "section": "distributed",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": args.repeats,
        "environment": environment(),
    }
    with tempfile.TemporaryDirectory(prefix="mlxgrpo-bench-model-") as tmp:
        model_dir = bench_model.build_model_dir(shape, Path(tmp) / shape.name)
        result["model"] = describe_model(shape, model_dir)
        result["distributed"] = distributed_bench.measure_distributed(
            str(model_dir),
            batch=args.prompts,
            group=args.generations,
            max_new_tokens=args.max_new_tokens,
            updates=4 if args.quick else 6,
            repeats=args.repeats,
        )
    result["seconds"] = time.perf_counter() - started
    return result


def write(result: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import bench_model
    import rollout_bench
    import train_bench

    from mlxgrpo.models.loading import load_model

    shape = bench_model.SHAPES["quick" if args.quick else "bench"]
    seed_everything(0)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": args.repeats,
        "sections": args.sections,
        "environment": environment(),
    }
    with tempfile.TemporaryDirectory(prefix="mlxgrpo-bench-model-") as tmp:
        model_dir = bench_model.build_model_dir(shape, Path(tmp) / shape.name)
        lengths = QUICK_PROMPT_LENGTHS if args.quick else PROMPT_LENGTHS
        prompts = make_prompts(shape.vocab, lengths, args.prompts)
        result["model"] = describe_model(shape, model_dir)

        def rollout() -> dict[str, Any]:
            model, tokenizer = load_model(str(model_dir))
            return rollout_bench.measure_rollouts(
                model,
                tokenizer,
                prompts,
                group=args.generations,
                max_new_tokens=args.max_new_tokens,
                repeats=args.repeats,
                single_calls=args.single_calls,
            )

        sections = {
            "rollout": rollout,
            "train": lambda: train_bench.measure_train_step(
                str(model_dir),
                shape,
                prompts,
                rows=args.generations,
                completion=args.max_new_tokens,
                repeats=args.repeats,
            ),
            "memory": lambda: train_bench.measure_memory(
                model_dir,
                group=args.generations,
                batch=args.prompts,
                max_new_tokens=args.max_new_tokens,
                repeats=args.repeats,
            ),
            "demo": lambda: train_bench.measure_updates(
                [str(REPO / "configs" / "demo.toml")], [], args.repeats
            ),
        }
        timings = result.setdefault("section_seconds", {})
        for name in args.sections:
            began = time.perf_counter()
            result[SECTION_KEYS[name]] = sections[name]()
            timings[name] = time.perf_counter() - began
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - started
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance figures, where the sections that give them ran."""
    values = {}
    if "rollout" in result:
        values["rollout_vs_single"] = result["rollout"]["ratio_vs_single"]
        values["rollout_vs_batch_generate"] = result["rollout"]["ratio_vs_batch_generate"]
        if "tool_loop_ratio" in result["rollout"]:
            values["tool_loop_vs_plain"] = result["rollout"]["tool_loop_ratio"]
    if "train_step" in result:
        values["train_share_of_matmul"] = result["train_step"]["full"]["share_of_matmul_1024"]
    if "memory" in result:
        values["kl_memory_ratio"] = result["memory"]["kl_memory_ratio"]
    out = {}
    for name, value in values.items():
        op, bound = TARGETS[name]
        met = value >= bound if op == ">=" else value <= bound
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.learning:
        result = run_learning(args)
    elif args.sft:
        result = run_sft(args)
    elif args.distributed:
        result = run_distributed(args)
    else:
        result = run_scale(args) if args.scale else run_benchmark(args)
    if result is None:
        return 2
    write(result, args.out)
    if not args.quiet:
        from report import (
            print_distributed_report,
            print_learning_report,
            print_report,
            print_scale_report,
            print_sft_report,
        )

        if args.learning:
            print_learning_report(result, args.out)
        elif args.sft:
            print_sft_report(result, args.out)
        elif args.distributed:
            print_distributed_report(result, args.out)
        else:
            (print_scale_report if args.scale else print_report)(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
