"""Runs mlx-lm's own supervised fine-tuning entry point (`mlx_lm lora`'s `main`, unchanged)
for the SFT bench, in mlxgrpo's environment.

    python sft_peer_launcher.py --records FILE -- <mlx_lm lora arguments>

What it adds around the peer's `main`:
- `import mlxgrpo` before mlx loads: the same BLAS set-up as mlxgrpo's own process (a system
  OpenBLAS loaded globally, or libmlx rebound to the scipy-openblas32 wheel), so both trainers
  multiply with the same library.
- a training callback in place of its reporting ones, which appends one JSON line per
  iteration to FILE (run with --steps-per-report 1): the iteration's seconds and tokens per
  second by the peer's own timer (which leaves out reporting and validation), and the peak
  memory since the previous iteration, which it then resets.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", required=True)
    ours = parser.parse_args(sys.argv[1:split])

    import mlxgrpo  # noqa: F401  (the BLAS set-up, before anything imports mlx)

    # isort: split
    import mlx.core as mx
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Probe(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            record = {
                "iteration": info["iteration"],
                "seconds": 1.0 / info["iterations_per_second"],
                "tokens_per_sec": info["tokens_per_second"],
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
            }
            with open(ours.records, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            mx.reset_peak_memory()

    lora.get_reporting_callbacks = lambda *args, **kwargs: Probe()
    sys.argv = ["mlx_lm.lora", *sys.argv[split + 1 :]]
    lora.main()


if __name__ == "__main__":
    main()
