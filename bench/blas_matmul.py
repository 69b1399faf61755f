"""fp32 matmul through MLX: bundled reference BLAS vs what `auto` picks vs the OpenBLAS wheel.

Each variant runs in a fresh subprocess, because the BLAS is chosen once per process, before or
at the first `import mlx`: `MLXGRPO_BLAS=off` (bundled), `auto` (a system OpenBLAS when there is
one, else the wheel) and `wheel` (scipy-openblas32, rebound into libmlx's slots).

    python bench/blas_matmul.py [--size 1024] [--repeats 7] [--rounds 3] [--out results.json]

The variants alternate for `--rounds` rounds so all see the same machine load; the figures are
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
    import mlxgrpo  # noqa: F401  (sets up the BLAS chosen by MLXGRPO_BLAS before mlx loads)
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

    variants = ("off", "auto", "wheel")
    rounds = [{v: run_variant(v, args) for v in variants} for _ in range(args.rounds)]
    gflops = {v: statistics.median(r[v]["gflops"] for r in rounds) for v in variants}
    print(
        f"fp32 {args.size}x{args.size} matmul through MLX "
        f"(median of {args.repeats} runs x {args.rounds} rounds)"
    )
    print(f"  {'MLXGRPO_BLAS':<13} {'GFLOP/s':>8}  {'speed-up':>8}   BLAS")
    for v in variants:
        ratio = gflops[v] / gflops["off"]
        print(f"  {v:<13} {gflops[v]:8.1f}  {ratio:7.1f}x   {rounds[0][v]['blas']}")
    if args.out:
        results = {
            "size": args.size,
            "repeats": args.repeats,
            "bundled_gflops": gflops["off"],
            "openblas_gflops": gflops["auto"],
            "wheel_gflops": gflops["wheel"],
            "speedup": gflops["auto"] / gflops["off"],
            "wheel_speedup": gflops["wheel"] / gflops["off"],
            "rounds": [
                {"bundled": r["off"], "openblas": r["auto"], "wheel": r["wheel"]} for r in rounds
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
