"""`bench/run.py --sft [--peer]`: supervised fine-tuning at a real shape (random weights of
Qwen2.5-0.5B's exact configuration and vocabulary, float32), mlxgrpo's
``algorithm.type = "sft"`` against mlx-lm's own trainer (`python -m mlx_lm lora`) on
identical work.

Identical work: the same model directory, the same rows (a system prompt, a question and an
answer of vocabulary words, rendered by the model's chat template; the loss on the answer
only: mlx-lm's `--mask-prompt`), LoRA of rank 8 and scale 20 on every block, batches of 4
demonstrations, one optimizer step per batch. Each trainer runs `repeats + 1` steps; the first
is a warm-up. Figures: median seconds per step, target tokens per second (the tokens the loss
covers, as mlx-lm counts them) and peak memory (MLX's peak during the step, the resident
weights, adapters and optimizer state included). Both get the same BLAS set-up
(bench/sft_peer_launcher.py imports mlxgrpo first, then runs the peer's unchanged `main`).
The peer runs with and without its `--grad-checkpoint`.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_model
import scale_setup


@dataclass(frozen=True)
class SftSettings:
    batch_size: int = 4
    system_words: int = 16
    question_words: int = 80  # about 130 prompt tokens with the system prompt and template
    answer_words: int = 126  # 128 target tokens with the end-of-turn marker and newline
    rows: int = 64
    lora_rank: int = 8
    lora_scale: float = 20.0
    learning_rate: float = 1e-5
    max_length: int = 1024  # longer than any row: nothing is cut


FULL = SftSettings()
QUICK = SftSettings(system_words=3, question_words=12, answer_words=6, rows=16)
LAUNCHER = Path(__file__).resolve().parent / "sft_peer_launcher.py"
DIFFERENCES = (
    "the peer appends an end-of-sequence token to every row whose chat template ends with "
    "another token, and trains it (mlxgrpo: one when no target is an end token already)",
    "the peer computes the logits of every position and their softmax in full; mlxgrpo runs "
    "the head on target positions only, in tiles",
    "the peer's Adam vs mlxgrpo's AdamW (weight decay 0): the same update",
    "the peer draws its batches from the rows sorted by length (mlxgrpo: in file order), so "
    "the speed ratio is per target token",
)


def data_dir(vocab: int, s: SftSettings) -> Path:
    """train.jsonl and valid.jsonl of chat rows (system, user, assistant) of vocabulary words."""
    text = ("sft", vocab, s.system_words, s.question_words, s.answer_words, s.rows)

    def build(tmp: Path) -> None:
        words = bench_model.vocab_words(vocab)
        rng = random.Random(0)
        system = "".join(random.Random(1).choices(words, k=s.system_words)).strip()

        def row() -> dict[str, Any]:
            return {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": "".join(rng.choices(words, k=s.question_words))},
                    {"role": "assistant", "content": "".join(rng.choices(words, k=s.answer_words))},
                ]
            }

        for name, count in (("train", s.rows), ("valid", s.batch_size)):
            lines = "".join(json.dumps(row()) + "\n" for _ in range(count))
            (tmp / f"{name}.jsonl").write_text(lines, encoding="utf-8")

    return scale_setup.cached_dir(
        scale_setup.cache_root() / "data" / f"sft-{scale_setup.cache_key(text)}", build
    )


def measure_ours(
    model: Path, data: Path, s: SftSettings, repeats: int, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """mlxgrpo's SFT updates on the rows, through `mlxgrpo.train` (``extra``: more settings)."""
    import mlx.core as mx

    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.io.callbacks import Callback
    from mlxgrpo.engine.loop.trainer import train

    class Probe(Callback):
        def __init__(self) -> None:
            self.updates: list[dict[str, Any]] = []
            self.memory_paths: dict[str, str] = {}

        def on_start(self, info: dict[str, Any]) -> None:
            self.memory_paths = info.get("memory_paths", {})

        def on_update(self, update: int, metrics: dict[str, Any]) -> None:
            self.updates.append(dict(metrics))
            mx.reset_peak_memory()  # each update's own peak, as the peer's are measured

    with tempfile.TemporaryDirectory(prefix="mlxgrpo-sft-bench-") as tmp:
        sets = [
            "algorithm.type=sft",
            f"model.path={model}",
            f"data.dataset={data / 'train.jsonl'}",
            "data.shuffle=false",
            "finetune.type=lora",
            "finetune.lora_layers=-1",
            f"finetune.lora_rank={s.lora_rank}",
            f"finetune.lora_scale={s.lora_scale}",
            f"optim.batch_size={s.batch_size}",
            "optim.gradient_accumulation_steps=1",
            f"optim.learning_rate={s.learning_rate}",
            f"sft.max_length={s.max_length}",
            f"run.max_steps={repeats + 1}",
            f"run.output_dir={tmp}",
            "run.run_name=sft",
            "run.resume=never",
            "checkpoint.save_steps=0",
            "logging.jsonl=false",
            *extra,
        ]
        probe = Probe()
        mx.reset_peak_memory()
        train(resolve_config((), sets, environ={}), [probe])
    measured = probe.updates[1:]
    seconds = statistics.median(u["step_seconds"] for u in measured)
    return {
        "seconds_per_step": seconds,
        "peak_memory_gb": statistics.median(u["peak_memory_gb"] for u in measured),
        "target_tokens": statistics.median(u["target_tokens"] for u in measured),
        "memory_paths": probe.memory_paths,
        "steps": measured,
    }


def measure_peer(
    model: Path, data: Path, s: SftSettings, repeats: int, grad_checkpoint: bool
) -> dict[str, Any]:
    """mlx-lm's `lora` trainer on the same rows and settings, through sft_peer_launcher.py
    (the same BLAS set-up as ours, its per-iteration figures recorded)."""
    with tempfile.TemporaryDirectory(prefix="mlxgrpo-sft-peer-") as tmp:
        work = Path(tmp)
        config = work / "lora.yaml"  # JSON is YAML; the LoRA settings have no flags
        lora = {"rank": s.lora_rank, "scale": s.lora_scale, "dropout": 0.0}
        config.write_text(json.dumps({"lora_parameters": lora}), encoding="utf-8")
        peer_args = {
            "--model": model, "--data": data, "--config": config, "--fine-tune-type": "lora",
            "--num-layers": -1, "--batch-size": s.batch_size, "--iters": repeats + 1,
            "--learning-rate": s.learning_rate, "--max-seq-length": s.max_length,
            "--steps-per-report": 1, "--steps-per-eval": 10**9, "--save-every": 10**9,
            "--val-batches": 1, "--adapter-path": work / "adapters",
        }  # fmt: skip
        argv = [sys.executable, str(LAUNCHER), "--records", str(work / "steps.jsonl")]
        argv += ["--", "--train", "--mask-prompt"]
        argv += [str(part) for pair in peer_args.items() for part in pair]
        if grad_checkpoint:
            argv.append("--grad-checkpoint")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        records = work / "steps.jsonl"
        lines = records.read_text(encoding="utf-8").splitlines() if records.exists() else []
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"mlx_lm lora failed: {tail[0] if tail else done.returncode}")
    steps = [json.loads(line) for line in lines]
    if len(steps) != repeats + 1:
        raise RuntimeError(f"mlx_lm lora reported {len(steps)} steps, expected {repeats + 1}")
    measured = steps[1:]
    return {
        "command": argv[1:],
        "differences": list(DIFFERENCES),
        "seconds_per_step": statistics.median(u["seconds"] for u in measured),
        "tokens_per_sec": statistics.median(u["tokens_per_sec"] for u in measured),
        "peak_memory_gb": statistics.median(u["peak_memory_gb"] for u in measured),
        "grad_checkpoint": grad_checkpoint,
        "steps": measured,
    }


def run_sft(args: Any, environment: dict[str, Any]) -> dict[str, Any]:
    """The SFT section: ours (default settings, and without activation checkpointing), and with
    ``args.peer`` mlx-lm's trainer with and without its gradient checkpointing, on the first
    scale shape (the tiny one with ``--quick``)."""
    s = QUICK if args.quick else FULL
    key, shape = next(iter(scale_setup.select_shapes(None, args.quick).items()))
    model = scale_setup.model_dir(shape)
    data = data_dir(shape.vocab, s)
    weights_gb = scale_setup.parameter_count(shape) * 4 / 1e9
    ours = measure_ours(model, data, s, args.repeats)
    ours["tokens_per_sec"] = ours["target_tokens"] / ours["seconds_per_step"]
    result: dict[str, Any] = {
        "section": "sft",
        "shape": key,
        "settings": s.__dict__,
        "environment": environment,
        "weights_gb": weights_gb,
        "mlxgrpo": {**ours, "peak_vs_weights": ours["peak_memory_gb"] / weights_gb},
    }
    plain = measure_ours(model, data, s, args.repeats, ["finetune.grad_checkpoint=false"])
    plain["tokens_per_sec"] = plain["target_tokens"] / plain["seconds_per_step"]
    result["mlxgrpo_no_checkpointing"] = {
        **plain,
        "peak_vs_weights": plain["peak_memory_gb"] / weights_gb,
    }
    if args.peer:
        for label, checkpoint in (("peer", False), ("peer_grad_checkpoint", True)):
            peer = measure_peer(model, data, s, args.repeats, checkpoint)
            result[label] = {
                **peer,
                # Per target token: each trainer draws its own batches of the same rows.
                "speed_ratio": ours["tokens_per_sec"] / peer["tokens_per_sec"],
                "memory_ratio": ours["peak_memory_gb"] / peer["peak_memory_gb"],
                "no_checkpointing_speed_ratio": plain["tokens_per_sec"] / peer["tokens_per_sec"],
                "no_checkpointing_memory_ratio": plain["peak_memory_gb"] / peer["peak_memory_gb"],
            }
    return result
