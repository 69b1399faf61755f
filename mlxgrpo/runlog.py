"""Read what a training run left on disk: its metrics, completions, checkpoints and status.

Behind `mlxgrpo plot`, `mlxgrpo runs` and `mlxgrpo completions`. Plain Python only (no mlx),
so these commands start fast and work on a machine that only holds copies of run directories.

A run's status, from what its directory holds:
- finished: `final/` exists (the trainer writes it last, by an atomic rename);
- stopped: no `final/`, and the newest complete checkpoint is at the last logged update; this
  is what Ctrl-C leaves (the trainer saves at the update it stops at), and `--resume` loses
  nothing;
- crashed: no `final/`, and either no checkpoint or updates logged after the newest one (the
  process died between checkpoints; a resume restarts from the checkpoint).
A run that is still training shows as crashed or stopped until it writes `final/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxgrpo import parsing
from mlxgrpo.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
CONFIG_FILE = "config.resolved.toml"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"  # same name as engine.io.checkpoint.STATE_FILE (that imports mlx)
LAST_RUN = "last"

# Shown on the plot when the user names none: the reward, then the health signals when logged.
DEFAULT_METRICS = ("reward_mean", "kl", "entropy", "completion_length_mean")


# --- finding runs --------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """A directory the trainer wrote into (a run that died during setup has only its config)."""
    return path.is_dir() and any(
        (path / name).exists() for name in (METRICS_FILE, CONFIG_FILE, CHECKPOINTS_DIR, FINAL_DIR)
    )


def stage_runs(path: Path) -> list[Path]:
    """The stages of a staged run (``[[stages]]``: one run directory per stage inside it), in
    the order they started; [] when ``path`` is not a staged run."""
    if not path.is_dir() or is_run_dir(path):
        return []
    stages = [p for p in path.iterdir() if not p.name.startswith(".") and is_run_dir(p)]
    return sorted(stages, key=lambda p: (_started_at(p), p.name))


def runs_under(root: Path) -> list[Path]:
    """Run directories under `root`: those directly in it, and each staged run's stages."""
    found: list[Path] = []
    for path in root.iterdir() if root.is_dir() else []:
        if path.name.startswith("."):
            continue
        found += [path] if is_run_dir(path) else stage_runs(path)
    return found


def run_label(run_dir: Path, root: Path) -> str:
    """How a run is named under `root`: its directory name, `run/stage` for a stage."""
    try:
        return run_dir.relative_to(root).as_posix()
    except ValueError:
        return run_dir.name


def list_runs(root: Path) -> list[Path]:
    """Run directories under `root` (a staged run's stages included), oldest first (by when
    their config was written)."""
    if not root.is_dir():
        raise ConfigError(
            f"no such directory '{root}'",
            hint="pass the directory that holds your runs (run.output_dir)",
        )
    return sorted(runs_under(root), key=lambda p: (_started_at(p), p.as_posix()))


def resolve_run(spec: str, output_dir: str) -> Path:
    """A run directory from a path, a run name under `output_dir`, or `last`.

    `last` is the most recently modified run under `output_dir`, as for `--adapter last`.
    """
    root = Path(output_dir).expanduser()
    if spec == LAST_RUN:
        runs = runs_under(root)
        if not runs:
            raise ConfigError(
                f"no runs under '{root}' (run.output_dir)",
                hint="train first, or pass a run directory",
            )
        return max(runs, key=lambda p: p.stat().st_mtime)
    for candidate in (Path(spec).expanduser(), root / spec):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"no run '{spec}': not a directory and not a run name under '{root}' (run.output_dir)",
        hint="list runs with `mlxgrpo runs`, or pass a run directory",
    )


def display_names(run_dirs: list[Path]) -> list[str]:
    """Short unique labels: the directory name, with its parent when two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


# --- reading the logs ----------------------------------------------------------------------------


def update_of(record: dict[str, Any]) -> int | None:
    """A log record's update number (0 when it names none); None when it is not a whole
    number (null, text, a bool), so that readers skip such a record."""
    update = record.get("update", 0)
    return None if isinstance(update, bool) or not isinstance(update, int) else update


def read_jsonl(
    path: Path, what: str, fix: str, skipped: list[str] | None = None
) -> list[dict[str, Any]]:
    """Records of a JSONL log. A last line without its newline that does not parse is a record
    still being written (or cut by a crash) and is skipped; any other bad line is an error. A
    record whose ``update`` is not a whole number is skipped and named in ``skipped``."""
    if not path.is_file():
        raise ConfigError(f"'{path.parent}' has no {path.name}", hint=fix)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = parsing.json_text(line, f"{path} line {number}")
        except parsing.ParseError as exc:
            if number == len(lines):  # no newline after it: an unfinished write
                continue
            raise ConfigError(
                f"{path} line {number} {exc.problem}",
                hint=f"fix or delete that line of the {what}",
            ) from None
        if not isinstance(record, dict):
            raise ConfigError(
                f"{path} line {number} is not a JSON object",
                hint=f"fix or delete that line of the {what}",
            )
        if update_of(record) is None:
            if skipped is not None:
                shown = record.get("update")
                skipped.append(f"skipped {path} line {number}: its update is {shown!r}")
            continue
        records.append(record)
    if not records:
        raise ConfigError(
            f"{path} is empty: the run has logged no update yet",
            hint="wait for the first update to finish, or pick another run",
        )
    return records


@dataclass
class RunLog:
    """One run's metrics: train records (one per update) and eval records, flattened."""

    path: Path
    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # records left out, each named

    def series(self, metric: str, kind: str = "train") -> tuple[list[int], list[float]]:
        """(updates, values) where `metric` is logged as a finite number."""
        xs, ys = [], []
        for record in self.train if kind == "train" else self.eval:
            value = record.get(metric)
            if _is_number(value):
                xs.append(int(record.get("update", len(xs) + 1)))
                ys.append(float(value))
        return xs, ys

    def numeric_keys(self) -> set[str]:
        return {k for r in self.train + self.eval for k, v in r.items() if _is_number(v)}


def load_metrics(run_dir: Path, name: str | None = None) -> RunLog:
    """A run's metrics.jsonl, split into train and eval records; errors name the fix."""
    log = RunLog(path=run_dir, name=name or run_dir.name)
    records = read_jsonl(
        run_dir / METRICS_FILE,
        "metrics log",
        fix="is this a run directory? metrics are written when logging.jsonl = true",
        skipped=log.skipped,
    )
    for record in records:
        flat = _flatten(record)
        # "kind" is what JsonlLogger writes; "type" is accepted for logs from other writers.
        kind = record.get("kind", record.get("type", "train"))
        (log.eval if kind == "eval" else log.train).append(flat)
    if not log.train and not log.eval:
        raise ConfigError(f"{run_dir / METRICS_FILE} holds no train or eval records")
    return log


def load_completions(run_dir: Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    return read_jsonl(
        run_dir / COMPLETIONS_FILE,
        "completions log",
        fix="completions are logged when training with --set logging.log_completions=true",
        skipped=skipped,
    )


def completions_of_update(
    records: list[dict[str, Any]], update: int | None, order: str | None, count: int | None
) -> tuple[int, list[dict[str, Any]]]:
    """The records of one update (default: the last logged), best or worst first if asked."""
    updates = sorted({int(r["update"]) for r in records if isinstance(r.get("update"), int)})
    if not updates:
        raise ConfigError("completions.jsonl has no records with an update number")
    chosen = updates[-1] if update is None else update
    if chosen not in updates:
        raise ConfigError(
            f"no completions logged for update {chosen}",
            hint=f"logged updates: {_ranges(updates)}",
        )
    rows = [r for r in records if r.get("update") == chosen]
    if order is not None:
        # Samples whose reward failed (None) sort last either way.
        scored = [r for r in rows if _is_number(r.get("reward"))]
        unscored = [r for r in rows if not _is_number(r.get("reward"))]
        scored.sort(key=lambda r: r["reward"], reverse=(order == "top"))
        rows = scored + unscored
    return chosen, rows[:count] if count is not None else rows


def pick_metrics(logs: list[RunLog], requested: list[str] | None) -> list[str]:
    """Metric keys to show: the requested ones (`reward` finds reward_mean) or the defaults."""
    available = set().union(*(log.numeric_keys() for log in logs)) - {"update"}
    if not requested:
        picked = [m for m in DEFAULT_METRICS if m in available]
        if not picked:
            raise ConfigError(
                "the runs log none of the default metrics (reward_mean, kl, entropy, "
                "completion_length_mean)",
                hint="name some with --metrics; logged: " + ", ".join(sorted(available)[:12]),
            )
        return picked
    picked = []
    for name in requested:
        key = next((k for k in (name, f"{name}_mean", f"{name}.mean") if k in available), None)
        if key is None:
            raise ConfigError(
                f"no run logs a metric '{name}'",
                hint="logged metrics include " + ", ".join(_suggest(name, available)),
            )
        if key not in picked:
            picked.append(key)
    return picked


# --- summaries for `mlxgrpo runs` ----------------------------------------------------------------


def checkpoint_updates(run_dir: Path) -> list[int]:
    """Update numbers of the complete checkpoints (those with their state file)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("step-*"):
        if (path / STATE_FILE).is_file() and path.name[5:].isdigit():
            found.append(int(path.name[5:]))
    return sorted(found)


def run_status(run_dir: Path, last_update: int) -> str:
    """finished / stopped / crashed: the rule in this module's docstring."""
    if (run_dir / FINAL_DIR).is_dir():
        return "finished"
    saved = checkpoint_updates(run_dir)
    if saved and saved[-1] >= last_update:
        return "stopped"
    return "crashed"


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One row of `mlxgrpo runs`: status, updates, rewards, best eval and wall time."""
    summary: dict[str, Any] = {
        "name": run_dir.name,
        "path": str(run_dir),
        "status": None,
        "updates": 0,
        "last_reward": None,
        "best_reward": None,
        "best_reward_update": None,
        "best_eval": None,
        "wall_seconds": None,
        "problem": None,
    }
    log = None
    try:
        log = load_metrics(run_dir)
    except ConfigError as exc:
        if (run_dir / METRICS_FILE).is_file():  # unreadable, not just absent: say so
            summary["problem"] = exc.message
    if log is not None:
        updates, rewards = log.series("reward_mean")
        logged = [int(r["update"]) for r in log.train if isinstance(r.get("update"), int)]
        summary["updates"] = max(logged, default=0)
        if rewards:
            best = max(range(len(rewards)), key=lambda i: rewards[i])
            summary["last_reward"] = rewards[-1]
            summary["best_reward"], summary["best_reward_update"] = rewards[best], updates[best]
        summary["best_eval"] = _best_eval(log)
        summary["skipped"] = log.skipped
        summary["wall_seconds"] = _wall_seconds(log, run_dir)
    saved = checkpoint_updates(run_dir)
    # Without metrics (logging.jsonl = false) the checkpoints still tell how far it got.
    summary["updates"] = max(summary["updates"], saved[-1] if saved else 0)
    summary["status"] = run_status(run_dir, summary["updates"])
    return summary


def _best_eval(log: RunLog) -> dict[str, Any] | None:
    """Best held-out score: accuracy when the task has answers, else the eval reward."""
    for metric in ("accuracy", "reward_mean"):
        updates, values = log.series(metric, kind="eval")
        if values:
            best = max(range(len(values)), key=lambda i: values[i])
            return {"metric": metric, "value": values[best], "update": updates[best]}
    return None


def _wall_seconds(log: RunLog, run_dir: Path) -> float | None:
    """Time spent in updates and evals (summed timing fields, so resumed runs add up right);
    file times (first write to last write) when the records carry no timings."""
    timed = [r["step_seconds"] for r in log.train if _is_number(r.get("step_seconds"))]
    if timed:
        return sum(timed) + sum(r["seconds"] for r in log.eval if _is_number(r.get("seconds")))
    start, end = _started_at(run_dir), (run_dir / METRICS_FILE).stat().st_mtime
    return max(0.0, end - start)


def _started_at(run_dir: Path) -> float:
    config = run_dir / CONFIG_FILE
    return (config if config.is_file() else run_dir).stat().st_mtime


# --- helpers --------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"rewards": {"f": {"mean": 1}}} -> {"rewards.f.mean": 1}."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _suggest(name: str, available: set[str]) -> list[str]:
    import difflib

    close = difflib.get_close_matches(name, sorted(available), n=4, cutoff=0.4)
    common = [m for m in DEFAULT_METRICS if m in available]
    return list(dict.fromkeys(close + common))[:6] or sorted(available)[:6]


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1–3, 5"."""
    parts, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None], strict=True):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
            start = cur
    return ", ".join(parts)
