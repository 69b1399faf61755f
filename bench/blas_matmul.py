"""fp32 matmul through MLX with the bundled reference BLAS vs a preloaded system OpenBLAS.

Each variant runs in a fresh subprocess, because the OpenBLAS preload only takes effect before
mlx is first imported (`MLXGRPO_BLAS=off` vs `MLXGRPO_BLAS=auto`).

    python bench/blas_matmul.py [--size 1024] [--repeats 7] [--rounds 3] [--out results.json]

The variants alternate for `--rounds` rounds so both see the same machine load; the figures are
medians over rounds of each round's median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(size: int, repeats: int, warmup: int) -> dict:
    """Runs in the worker: median seconds of `repeats` timed matmuls after `warmup` untimed ones."""
    import mlxgrpo  # noqa: F401  (preloads the BLAS chosen by MLXGRPO_BLAS before mlx loads)
    from mlxgrpo.backend import blas_info

    # isort: split
    import mlx.core as mx

    a = mx.random.normal((size, size), dtype=mx.float32, key=mx.random.key(0))
    b = mx.random.normal((size, size), dtype=mx.float32, key=mx.random.key(1))
    mx.eval(a, b)
    for _ in range(warmup):
        mx.eval(a @ b)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    return {
        "blas": blas_info().name,
        "median_s": median,
        "gflops": 2 * size**3 / median / 1e9,
        "timings_s": timings,
    }


def run_variant(blas_setting: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MLXGRPO_BLAS": blas_setting}
    command = [sys.executable, __file__, "--worker", "--size", str(args.size)]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"worker with MLXGRPO_BLAS={blas_setting} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per variant")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.size, args.repeats, args.warmup)))
        return

    rounds = [(run_variant("off", args), run_variant("auto", args)) for _ in range(args.rounds)]
    bundled = statistics.median(off["gflops"] for off, _ in rounds)
    openblas = statistics.median(auto["gflops"] for _, auto in rounds)
    ratio = openblas / bundled
    print(
        f"fp32 {args.size}x{args.size} matmul through MLX "
        f"(median of {args.repeats} runs x {args.rounds} rounds)"
    )
    for label, value, blas in (
        ("bundled", bundled, rounds[0][0]["blas"]),
        ("preloaded", openblas, rounds[0][1]["blas"]),
    ):
        print(f"  {label:<10} {value:8.1f} GFLOP/s   {blas}")
    print(f"  speed-up   {ratio:8.1f}x")
    if args.out:
        results = {
            "size": args.size,
            "repeats": args.repeats,
            "bundled_gflops": bundled,
            "openblas_gflops": openblas,
            "speedup": ratio,
            "rounds": [{"bundled": off, "openblas": auto} for off, auto in rounds],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
