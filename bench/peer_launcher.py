"""Runs mlx-lm-lora's own training entry point (`mlx_lm_lora.train.main`) inside the peer's
virtual environment, for the scale bench. Not imported by mlxgrpo; needs no mlxgrpo.

    python peer_launcher.py --records FILE [--blas LIB] -- <mlx_lm_lora.train arguments>

What it adds around the peer's unchanged `main`:
- `--blas LIB`: loads that BLAS with RTLD_GLOBAL before mlx is imported, as mlxgrpo does on
  Linux (mlx[cpu]'s bundled reference BLAS is ~30x slower; both trainers get the same library).
- a training callback that appends one JSON line per iteration to FILE (the peer is run with
  --steps-per-report 1): seconds of the iteration (its own timer, which leaves out reporting
  and validation) and the peak memory since the previous iteration, which it then resets.
- plain temperature sampling, as mlxgrpo's rollouts: the peer's GRPO arguments default to
  top-p 0.95 and top-k 20, which its command line does not expose.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import sys


def main() -> None:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", required=True)
    parser.add_argument("--blas", default="")
    ours = parser.parse_args(sys.argv[1:split])
    if ours.blas:
        ctypes.CDLL(ours.blas, mode=ctypes.RTLD_GLOBAL)

    import mlx.core as mx
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora import train as peer

    class Probe(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            record = {
                "iteration": info["iteration"],
                "seconds": 1.0 / info["iterations_per_second"],
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "completion_length_mean": info.get("train_average_generated_tokens"),
            }
            with open(ours.records, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            mx.reset_peak_memory()

    peer.GRPOTrainingArgs = functools.partial(peer.GRPOTrainingArgs, top_p=1.0, top_k=0)
    run = peer.run
    peer.run = lambda args, training_callback=None: run(args, training_callback=Probe())
    sys.argv = ["mlx_lm_lora.train", *sys.argv[split + 1 :]]
    peer.main()


if __name__ == "__main__":
    main()
