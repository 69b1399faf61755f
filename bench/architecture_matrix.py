"""Architecture matrix: which memory techniques each mlx-lm text architecture gets, and whether
it trains and answers with its adapters, run the way a user runs mlxgrpo.

For every tiny model of tests/architecture_zoo.py: write its model directory, run
``mlxgrpo train`` for two GRPO updates and ``mlxgrpo infer`` with the run's adapters as
subprocesses, read the memory techniques (``memory_paths``) from the first update record of
metrics.jsonl and the peak memory the updates recorded (``peak_memory_gb``). Where training
stops before its first record, the techniques come from ``mlxgrpo doctor --json --model``.
Prints a markdown table and two counts; ``--out`` also writes the rows as JSON.

Not a timing benchmark: the models are tiny and the figures are what the run itself logs.

    uv run python bench/architecture_matrix.py [--only llama,gemma3_text] [--out table.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from architecture_zoo import ZOO, write_model_dir, write_spread_reward  # noqa: E402

PATHS = ("tiled head", "shared prompt", "replay", "checkpointing")
PROMPT = "Repeat the letter q:"
# Two updates of two prompts, two answers each: enough to take every path once.
TRAIN_SETTINGS = (
    "data.dataset=synthetic:repeat",
    "rollout.num_generations=4",
    "rollout.max_new_tokens=6",
    "optim.batch_size=2",
    "optim.gradient_accumulation_steps=1",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "finetune.lora_layers=-1",
    "checkpoint.save_steps=0",
    "run.resume=never",
)
TIMEOUT_S = 600


def mlxgrpo(*args: str) -> subprocess.CompletedProcess[str]:
    """`mlxgrpo ARGS` in a fresh interpreter, as the console script runs it."""
    command = [sys.executable, "-m", "mlxgrpo", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


def last_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty line a failed command printed (its error message), shortened."""
    lines = [line.strip(" │╭╰─") for line in (result.stderr + result.stdout).splitlines()]
    lines = [line.removeprefix("error: ") for line in lines if line]
    text = lines[-1] if lines else f"exit {result.returncode}"
    return text if len(text) <= 80 else text[:77] + "..."


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "train"]


def doctor_paths(model_dir: Path, reward: str) -> tuple[dict[str, str], str]:
    """The memory techniques `mlxgrpo doctor` says training this model would use (none when
    it fails), and its error."""
    result = mlxgrpo("doctor", "--json", "--model", str(model_dir), "--set", reward)
    if result.returncode != 0:
        return {}, last_error_line(result)
    return json.loads(result.stdout)["memory_paths"], ""


def run_architecture(name: str, work: Path) -> dict[str, Any]:
    """Train and infer one architecture; the row of the table."""
    started = time.perf_counter()
    model_dir = write_model_dir(name, work / "model")
    reward = write_spread_reward(work)
    sets = [item for setting in (*TRAIN_SETTINGS, reward) for item in ("--set", setting)]
    train = mlxgrpo(
        "train", "--model", str(model_dir), "-o", str(work / "runs"), "--run-name", "run",
        "--max-steps", "2", "--seed", "0", *sets,
    )  # fmt: skip
    run_dir = work / "runs" / "run"
    records = train_records(run_dir)
    row: dict[str, Any] = {
        "architecture": name,
        "trains": train.returncode == 0 and len(records) == 2,
        "train_error": "" if train.returncode == 0 else last_error_line(train),
    }
    if records:
        row["memory_paths"] = records[0].get("memory_paths", {})
        row["peak_mb"] = max(r.get("peak_memory_gb", 0.0) for r in records) * 1000
    else:
        row["memory_paths"], row["doctor_error"] = doctor_paths(model_dir, reward)
        row["peak_mb"] = None
    row["infers"], row["infer_error"], row["answer"] = False, "skipped: no adapters", None
    if (run_dir / "final" / "adapters.safetensors").is_file():
        infer = mlxgrpo(
            "infer", "--model", str(model_dir), "--adapter", str(run_dir), "--max-tokens", "8",
            "--temperature", "0", "--json", PROMPT,
        )  # fmt: skip
        row["answer"] = answer_of(infer)
        row["infers"] = row["answer"] is not None
        row["infer_error"] = "" if row["infers"] else last_error_line(infer)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def answer_of(infer: subprocess.CompletedProcess[str]) -> str | None:
    """The completion `mlxgrpo infer --json` printed, when it exited 0 with one."""
    if infer.returncode != 0:
        return None
    try:
        record = json.loads(infer.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    ok = isinstance(record, dict) and record.get("completion_tokens", 0) >= 1
    return record.get("completion") if ok else None


def mark(ok: bool, why: str = "") -> str:
    return "✓" if ok else f"✗ {why}".rstrip()


def path_cell(value: str | None) -> str:
    """✓, ✗ and why, or ? where neither the run nor doctor could say."""
    if value is None:
        return "?"
    return "✓" if value == "on" else "✗ " + value.removeprefix("off: ")


def table(rows: list[dict[str, Any]]) -> str:
    header = ["architecture", "trains", "infers", *PATHS, "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        paths = row["memory_paths"]
        peak = "–" if row["peak_mb"] is None else f"{row['peak_mb']:.1f}"
        cells = [
            row["architecture"],
            mark(row["trains"], row["train_error"]),
            mark(row["infers"], row["infer_error"]),
            *(path_cell(paths.get(name)) for name in PATHS),
            peak,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def counts(rows: list[dict[str, Any]]) -> str:
    total = len(rows)
    on = [{name for name, value in row["memory_paths"].items() if value == "on"} for row in rows]
    all_four = sum(set(PATHS) <= paths for paths in on)
    beyond = sum(bool(paths - {"checkpointing"}) for paths in on)
    trains = sum(row["trains"] for row in rows)
    infers = sum(row["infers"] for row in rows)
    return (
        f"lean paths on all four: {all_four} of {total}\n"
        f"at least one lean path beyond checkpointing: {beyond} of {total}\n"
        f"trains: {trains} of {total}; infers with its adapters: {infers} of {total}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated zoo names (default: all)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else sorted(ZOO, key=str.lower)
    unknown = [name for name in names if name not in ZOO]
    if unknown:
        parser.error(f"not in the zoo: {', '.join(unknown)}")
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as work:
            row = run_architecture(name, Path(work))
        print(f"{name}: trains {row['trains']}, infers {row['infers']} ({row['seconds']}s)")
        rows.append(row)
    print()
    print(table(rows))
    print()
    print(counts(rows))
    for row in rows:
        if row.get("doctor_error"):
            print(f"{row['architecture']}: doctor --model failed too: {row['doctor_error']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
