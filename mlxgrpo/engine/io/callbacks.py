"""How the trainer reports: callbacks receive plain dicts; the UI and the log files subscribe.

The engine never imports Rich or Typer. `ui.TrainProgress` implements this interface for the
console; `JsonlLogger` and `CompletionsLogger` write the run directory's log files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlxgrpo import parsing, safe_io
from mlxgrpo.runlog import update_of
from mlxgrpo.safe_io import io_errors


class Callback:
    """Every hook is optional; the trainer calls them in this order of a run's life."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_update(self, update: int, metrics: dict[str, Any]) -> None: ...

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None: ...

    def on_eval(self, update: int, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, update: int, path: Path) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_end(self, summary: dict[str, Any]) -> None: ...


class CallbackList(Callback):
    """Hands each hook call to every callback, in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def _each(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def on_start(self, info: dict[str, Any]) -> None:
        self._each("on_start", info)

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        self._each("on_update", update, metrics)

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None:
        self._each("on_completions", update, records)

    def on_eval(self, update: int, metrics: dict[str, Any]) -> None:
        self._each("on_eval", update, metrics)

    def on_checkpoint(self, update: int, path: Path) -> None:
        self._each("on_checkpoint", update, path)

    def on_message(self, text: str) -> None:
        self._each("on_message", text)

    def on_end(self, summary: dict[str, Any]) -> None:
        self._each("on_end", summary)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class JsonlLogger(Callback):
    """metrics.jsonl: one object per update, plus eval records (kind = "eval"). The first
    update record of a run (or of a resumed run) also carries the run's ``memory_paths``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._start_fields: dict[str, Any] = {}
        with io_errors(path.parent, "create"):
            path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        with io_errors(self.path), self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record), ensure_ascii=False) + "\n")

    def on_start(self, info: dict[str, Any]) -> None:
        if "memory_paths" in info:
            self._start_fields = {"memory_paths": info["memory_paths"]}

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        self._write({"kind": "train", "update": update, **metrics, **self._start_fields})
        self._start_fields = {}

    def on_eval(self, update: int, metrics: dict[str, Any]) -> None:
        self._write({"kind": "eval", "update": update, **metrics})


class CompletionsLogger(Callback):
    """completions.jsonl: prompt, completion, rewards and advantage of every sample."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None:
        with io_errors(self.path), self.path.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(_jsonable({"update": update, **record}), ensure_ascii=False))
                fh.write("\n")


def truncate_jsonl(path: Path, last_update: int) -> None:
    """On resume, drop records of updates after the checkpoint so logs are not doubled.

    The kept records go to a new file renamed over the old one: a kill midway leaves either
    log whole, never a half-truncated one."""
    if not path.is_file():
        return
    kept = []
    with io_errors(path, "read"):
        text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = parsing.json_text(line, f"{path}:{number}")
        except parsing.ParseError:
            continue  # a line cut by a crash
        update = update_of(record) if isinstance(record, dict) else None
        if update is not None and update <= last_update:
            kept.append(line)
    safe_io.write_text(path, "".join(k + "\n" for k in kept))
