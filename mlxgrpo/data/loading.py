"""Load examples (and demonstrations for supervised fine-tuning) from synthetic tasks, local
files or directories, or the Hugging Face Hub.

``datasets`` is imported inside the functions that need it, so config tooling that imports this
package stays fast and works without it.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlxgrpo import parsing
from mlxgrpo.data.demonstration import Demonstration, rows_to_demonstrations
from mlxgrpo.data.example import GSM8K_SYSTEM_PROMPT, Example
from mlxgrpo.data.synthetic import (
    generate_synthetic,
    is_synthetic,
    parse_synthetic_spec,
    synthetic_demonstrations,
)
from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.rewards.gsm8k import GSM8K_REWARDS, parse_gsm8k_answer

GSM8K_NAMES = ("gsm8k", "openai/gsm8k")
GSM8K_HUB_ID = "openai/gsm8k"
GSM8K_CONFIG = "main"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Same keywords as the Hub's split inference: a token of the file (or folder) name picks the split.
SPLIT_KEYWORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}


def load_examples(
    dataset: str,
    split: str = "train",
    *,
    subset: str | None = None,
    prompt_field: str = "question",
    answer_field: str | None = "answer",
    max_samples: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    base_dir: str | Path | None = None,
) -> list[Example]:
    """Examples of one split, shuffled with ``seed`` (if ``shuffle``), then cut to max_samples.

    ``dataset``: ``synthetic:NAME[?options]``, a local .jsonl/.json/.parquet/.csv file or a
    directory of them, ``gsm8k``, or any other Hub id. ``answer_field`` None or "" means the data
    has no answers. ``max_samples`` None or 0 keeps everything.
    """
    if max_samples is not None and max_samples < 0:
        raise ConfigError(f"max_samples must be >= 0 (0 = all), got {max_samples}.")
    if is_synthetic(dataset):
        examples = generate_synthetic(dataset, split)
    else:
        table, label = _load_table(dataset, split, subset, base_dir)
        examples = _rows_to_examples(
            table, label, prompt_field, answer_field or None, gsm8k=dataset in GSM8K_NAMES
        )
    if shuffle:
        random.Random(seed).shuffle(examples)
    if max_samples:
        examples = examples[:max_samples]
    return examples


def load_demonstrations(
    dataset: str,
    split: str = "train",
    *,
    system_prompt: str | None,
    subset: str | None = None,
    prompt_field: str = "question",
    completion_field: str = "completion",
    max_samples: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    base_dir: str | Path | None = None,
) -> list[Demonstration]:
    """Demonstrations of one split for supervised fine-tuning, shuffled and cut as
    :func:`load_examples` does; a synthetic task writes its own (its prompts with their ideal
    completions, rendered with ``system_prompt`` as its GRPO prompts are)."""
    if max_samples is not None and max_samples < 0:
        raise ConfigError(f"max_samples must be >= 0 (0 = all), got {max_samples}.")
    if is_synthetic(dataset):
        examples = generate_synthetic(dataset, split)
        completions = synthetic_demonstrations(dataset, examples)
        demos = [
            Demonstration.of_example(ex, completion, system_prompt)
            for ex, completion in zip(examples, completions, strict=True)
        ]
    else:
        table, label = _load_table(dataset, split, subset, base_dir)
        demos = rows_to_demonstrations(table, label, prompt_field, completion_field, system_prompt)
    if shuffle:
        random.Random(seed).shuffle(demos)
    return demos[:max_samples] if max_samples else demos


def default_rewards(dataset: str) -> list[str]:
    """Reward functions to use when the config lists none: the task's own, else the GSM8K set."""
    if is_synthetic(dataset):
        task, options = parse_synthetic_spec(dataset)
        return list(task.rewards(options))
    return list(GSM8K_REWARDS)


def default_system_prompt(dataset: str) -> str | None:
    """The system prompt a dataset is meant to be trained with (None: no system message)."""
    if is_synthetic(dataset):
        task, options = parse_synthetic_spec(dataset)
        return task.system(options)
    return GSM8K_SYSTEM_PROMPT


def resolve_local_path(dataset: str, base_dir: str | Path | None = None) -> Path | None:
    """The local file/dir ``dataset`` names, None for a Hub id; ConfigError if a path is missing."""
    raw = Path(dataset).expanduser()
    bases = [Path(base_dir)] if base_dir is not None else []
    bases.append(Path.cwd())
    candidates = [raw] if raw.is_absolute() else [base / raw for base in bases]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    if _looks_like_path(dataset):
        raise ConfigError(
            f"Dataset file not found: {candidates[0]}",
            hint="check the path (relative paths are resolved against the config file's "
            "directory, then the current directory)",
        )
    return None


def _looks_like_path(dataset: str) -> bool:
    return (
        Path(dataset).suffix.lower() in FILE_BUILDERS
        or dataset.startswith((".", "/", "~"))
        or dataset.endswith("/")
        or dataset.count("/") > 1
    )


def _load_table(
    dataset: str, split: str, subset: str | None, base_dir: str | Path | None
) -> tuple[Any, str]:
    path = resolve_local_path(dataset, base_dir)
    if path is None:
        return _load_hub(dataset, split, subset), dataset
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved(path, split), str(path)
    files_by_split = _split_files(path)
    base_split = split.split("[")[0]
    # One named file is the data for any split: `eval --dataset my.jsonl` evaluates that file.
    files = [path] if path.is_file() else files_by_split.get(base_split)
    if not files:
        raise ConfigError(
            f"Dataset {path} has no split {base_split!r}.",
            hint=f"splits found: {', '.join(sorted(files_by_split)) or '(no data files)'}; in "
            "a folder, file names like train*.jsonl and test*.jsonl name the splits (a single "
            "file serves every split)",
        )
    builders = {FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ConfigError(
            f"Split {base_split!r} of {path} mixes file types: {', '.join(f.name for f in files)}.",
            hint="keep one format (jsonl, json, parquet or csv) per split",
        )
    for file in files:
        _require_content(file)
    _require_utf8(files)
    import datasets

    try:
        with _quiet_datasets():
            table = datasets.load_dataset(
                builders.pop(), data_files={base_split: [str(f) for f in files]}, split=split
            )
    except Exception as exc:  # malformed files surface as many exception types
        if "corresponds to no data" in str(exc):  # a split of zero rows, e.g. a header-only CSV
            raise _no_rows(path, split) from exc
        raise ConfigError(
            f"Cannot read dataset {path} (split {split!r}): {type(exc).__name__}: {exc}",
            hint="check the file's format",
        ) from exc
    if table.num_rows == 0:
        raise _no_rows(path, split)
    return table, str(path)


def _no_rows(path: Path, split: str) -> ConfigError:
    return ConfigError(
        f"Dataset {path} has no rows (split {split!r}).",
        hint="add examples to the file, or point data.dataset at another file",
    )


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from ``datasets`` while it reads local files: a bad file
    is reported once, as one error line, not also as its ERROR log line and a progress bar."""
    import datasets
    from datasets.utils import are_progress_bars_disabled
    from datasets.utils import logging as datasets_logging

    bars_were_off = are_progress_bars_disabled()
    verbosity = datasets_logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _require_content(file: Path) -> None:
    """A ConfigError naming `file` when it is empty or holds only whitespace (no rows)."""
    with file.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return
    raise ConfigError(
        f"Dataset file {file} is empty: it has no rows.",
        hint="add examples (e.g. one JSON object per line in a .jsonl file), or point "
        "data.dataset at another file",
    )


def _require_utf8(files: list[Path]) -> None:
    """Text data files must be UTF-8; the first bad byte is reported by file and line (the
    datasets readers fail later, naming neither)."""
    import codecs

    for file in files:
        if file.suffix.lower() == ".parquet":
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        line = 1
        with file.open("rb") as fh:
            try:
                while chunk := fh.read(1 << 20):
                    decoder.decode(chunk)
                    line += chunk.count(b"\n")
                decoder.decode(b"", final=True)  # a multi-byte character cut off at the end
            except UnicodeDecodeError as err:
                # err.object = the few held-back bytes (never a newline) + this chunk.
                line += err.object[: err.start].count(b"\n")
                raise ConfigError(
                    f"dataset file {file}:{line} is not valid UTF-8 "
                    f"(byte 0x{err.object[err.start]:02x})",
                    hint="save the file as UTF-8",
                ) from None


def _split_files(path: Path) -> dict[str, list[Path]]:
    if path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ConfigError(
                f"Unsupported dataset file type: {path}",
                hint="use .jsonl, .json, .parquet or .csv",
            )
        return {"train": [path]}
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix.lower() in FILE_BUILDERS
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )
    by_split: dict[str, list[Path]] = {}
    for file in files:
        split = _split_of(file.relative_to(path))
        if split is not None:
            by_split.setdefault(split, []).append(file)
    # No file names a split: the whole folder is the training data.
    if not by_split and files:
        by_split["train"] = files
    return by_split


def _split_of(relative: Path) -> str | None:
    names = [*relative.parts[:-1], relative.stem]
    for name in reversed(names):
        for token in re.split(r"[^a-z0-9]+", name.lower()):
            if token in SPLIT_KEYWORDS:
                return SPLIT_KEYWORDS[token]
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _load_saved(path: Path, split: str) -> Any:
    import datasets

    hint = "save it again with datasets' save_to_disk, or point at the data files"
    for name in ("dataset_dict.json", "state.json", "dataset_info.json"):
        if (path / name).is_file():  # what load_from_disk parses, read within limits first
            try:
                parsing.json_file(path / name)
            except parsing.ParseError as exc:
                raise ConfigError(f"saved dataset {path}: {exc.message}", hint=hint) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(
            f"saved dataset {path} does not load: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]}",
            hint=hint,
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(
                f"Dataset {path} has no split {split!r}.",
                hint=f"splits found: {', '.join(loaded)}",
            )
        return loaded[split]
    if split != "train":
        raise ConfigError(f"Dataset {path} is a single split; ask for 'train', not {split!r}.")
    return loaded


def _load_hub(dataset: str, split: str, subset: str | None) -> Any:
    import datasets

    hub_id, config = dataset, subset
    if dataset in GSM8K_NAMES:
        hub_id, config = GSM8K_HUB_ID, subset or GSM8K_CONFIG
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # network, missing repo, bad config or split
        raise MlxgrpoError(
            f"Could not load dataset {hub_id!r} (subset {config!r}, split {split!r}) from the "
            f"Hugging Face Hub: {type(exc).__name__}: {exc}",
            hint="check the name and your network, or use a local file or 'synthetic:arithmetic'",
        ) from exc


def _rows_to_examples(
    table: Any, label: str, prompt_field: str, answer_field: str | None, *, gsm8k: bool
) -> list[Example]:
    columns = list(table.column_names)
    _require_column(columns, prompt_field, "prompt_field", label)
    if answer_field is not None:
        _require_column(columns, answer_field, "answer_field", label)
    examples = []
    for number, row in enumerate(table, start=1):
        where = f"{label}, row {number}"
        prompt = _typed_prompt(row[prompt_field], f"{where}, field {prompt_field!r}")
        extra = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
        answer = None
        if answer_field is not None and row[answer_field] is not None:
            raw = _typed_answer(row[answer_field], f"{where}, field {answer_field!r}")
            answer = _normalize_answer(raw, extra, gsm8k=gsm8k)
        examples.append(Example(prompt, answer, extra))
    return examples


def _typed_prompt(value: Any, where: str) -> str | list[dict[str, str]]:
    """A prompt is text, or chat messages ({"role": ..., "content": ...} with text values)."""
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{where}: the prompt is empty", hint="give every row a prompt")
        return value
    messages_ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if messages_ok:
        return [{"role": m["role"], "content": m["content"]} for m in value]
    shown = "null" if value is None else type(value).__name__
    raise ConfigError(
        f"{where}: the prompt must be text or a list of chat messages, got {shown}",
        hint='write it as a string, or as [{"role": "user", "content": "..."}]',
    )


def _typed_answer(value: Any, where: str) -> str:
    """A reference answer is text or a number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(
            f"{where}: the answer must be text or a number, got {type(value).__name__}",
            hint="write the reference answer as a string or a number",
        )
    return str(value)


def _normalize_answer(raw: str, extra: dict[str, Any], *, gsm8k: bool) -> str:
    """A GSM8K solution ("... #### 72") becomes its gold value; the text stays in ``solution``."""
    parsed = parse_gsm8k_answer(raw)
    if parsed is None:
        return raw.strip() if gsm8k else raw
    extra.setdefault("solution", raw)
    return parsed


def _require_column(columns: list[str], name: str, role: str, label: str) -> None:
    if name not in columns:
        raise ConfigError(
            f"Dataset {label} has no column {name!r} (data.{role}). "
            f"Columns present: {', '.join(columns)}.",
            hint=f"set data.{role} to one of the columns",
        )
