"""Layered configuration: defaults < config files (with `extends`) < --set < command flags.

A file's ``[[stages]]`` tables make a staged config: each stage resolves as defaults < files <
the stage's own sections < --set < flags, and is checked on its own.

Each layer contributes (dotted key, raw value, source) entries; the last entry for a key wins.
Then `${env:NAME,default}` and `${section.key}` references are expanded, every value is
converted to its field's type, and the whole is validated. Every problem found is collected, so
one run reports all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxgrpo import parsing
from mlxgrpo.config import legacy
from mlxgrpo.config.resolved import ResolvedConfig, Source
from mlxgrpo.config.schema import SECTIONS, FieldSpec, build_config, field_specs
from mlxgrpo.config.validate import check_config
from mlxgrpo.config.values import (
    ValueProblem,
    check_bounds,
    closest,
    coerce,
    parse_cli_text,
    path_component_problem,
)
from mlxgrpo.errors import ConfigError

ENV_VAR = "MLX_GRPO_CONFIG"
SPECS: dict[str, FieldSpec] = field_specs()
DEFAULT = Source("default")


class ConfigProblems(ConfigError):
    """One or more configuration problems, each a complete sentence naming key and fix."""

    def __init__(self, problems: list[str], hint: str | None = None) -> None:
        super().__init__(
            problems[0] if len(problems) == 1 else f"{len(problems)} config problems", hint
        )
        self.problems = problems


@dataclass
class _Entry:
    key: str
    value: Any
    source: Source


@dataclass
class _Collector:
    entries: list[_Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    # [[stages]]: per stage, its name and its own entries (the last file that has some wins).
    stages: list[tuple[str, list[_Entry]]] = field(default_factory=list)


# Settings of the whole staged run, which no stage may change (the sinks are built once).
STAGE_GLOBAL_KEYS = (
    "run.output_dir",
    "run.run_name",
    "run.resume",
    "run.resume_despite_changes",
    "logging.tensorboard",
    "logging.wandb_project",
    "logging.log_completions_steps",
)
# A stage after the first starts from the weights the one before it ended with.
STAGE_CHAINED_KEYS = ("model.path", "model.adapter_path")


def resolve_config(
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    flags: Mapping[str, tuple[str, Any]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    check_paths: bool = True,
) -> ResolvedConfig:
    """Resolve every layer into a validated Config with the source of each value.

    `flags` maps dotted keys to (flag as the user typed it, value); a None value = not given.
    """
    environ = os.environ if environ is None else environ
    col = _Collector()
    if config_files:
        for name in config_files:
            path = _find_file(name, "-c/--config")
            _load_file(path, col, Source("file", str(path)), chain=())
    elif environ.get(ENV_VAR):
        path = _find_file(environ[ENV_VAR], f"${ENV_VAR}")
        _load_file(path, col, Source("env", f"{ENV_VAR}={path}"), chain=())
    from_files = len(col.entries)
    legacy_sets: dict[str, Any] = {}
    for text in overrides:
        _parse_override(text, col, legacy_sets)
    _add_legacy(legacy_sets, col, Source("--set", ""))
    for key, (flag, value) in (flags or {}).items():
        if value is not None:
            col.entries.append(_Entry(key, value, Source("flag", flag)))
    resolved, problems = _finish(col, environ)
    if resolved is not None and col.stages:
        problems += _resolve_stages(resolved, col, from_files, environ, check_paths)
    elif resolved is not None and check_paths:
        problems += check_config(resolved)
    if problems:
        raise ConfigProblems(problems)
    assert resolved is not None
    return resolved


def _resolve_stages(
    resolved: ResolvedConfig,
    col: _Collector,
    from_files: int,
    environ: Mapping[str, str],
    check_paths: bool,
) -> list[str]:
    """Resolve each stage (the files' entries, then the stage's, then --set and flags) into
    ``resolved.stages``; the problems, each naming its stage."""
    problems: list[str] = []
    for name, entries in col.stages:
        layered = [*col.entries[:from_files], *entries, *col.entries[from_files:]]
        stage, found = _finish(_Collector(layered, [], col.files), environ)
        if stage is not None:
            stage.stage = name
            found += check_config(stage) if check_paths else []
            resolved.stages.append((name, stage))
        problems += [f"stage {name}: {p}" for p in found]
    if resolved.config.run.resume not in ("auto", "never"):
        problems.append(
            f"run.resume = '{resolved.config.run.resume}': a staged run resumes with auto, "
            "which continues at the stage and update it reached (never starts afresh)"
        )
    kinds = {stage.config.finetune.type for _, stage in resolved.stages}
    if len(kinds) > 1:
        problems.append(
            "the stages train with different finetune.type values "
            f"({', '.join(sorted(kinds))}); a stage starts from the weights the one before it "
            "ended with, so set one finetune.type for all of them"
        )
    return problems


def _stage_entries(stages: Any, path: Path, col: _Collector) -> list[tuple[str, list[_Entry]]]:
    """The ``[[stages]]`` tables of one file: each a name and the config sections it changes."""
    if not isinstance(stages, list) or not stages or not all(isinstance(t, dict) for t in stages):
        col.problems.append(f"{path}: `stages` must be [[stages]] tables, each with a name")
        return []
    out: list[tuple[str, list[_Entry]]] = []
    for number, table in enumerate(stages, start=1):
        body = dict(table)
        name = body.pop("name", None)
        trinity = body.pop("stage_name", None)  # Trinity-RFT's name for it
        if name is None:
            name = trinity
        elif trinity is not None:
            col.problems.append(f"{path}: stage {name!r} sets both name and stage_name; keep one")
        problem = path_component_problem(name) if isinstance(name, str) else "no name"
        if not name or problem:
            col.problems.append(
                f"{path}: stage {number} needs a name that is a plain directory name "
                f'(name = "sft"), got {name!r}'
            )
            continue
        if name in (seen for seen, _ in out):
            col.problems.append(f"{path}: two stages are named {name!r}; give each its own name")
            continue
        own = _Collector()
        _flatten(body, f"{path} [stage {name}]", own, Source("stage", f"{name} in {path.name}"))
        col.problems += own.problems
        for entry in own.entries:
            if entry.key in STAGE_GLOBAL_KEYS:
                col.problems.append(
                    f"{path}: stage {name} sets {entry.key}, which belongs to the whole run; "
                    "set it at the top level"
                )
            elif entry.key in STAGE_CHAINED_KEYS and out:
                col.problems.append(
                    f"{path}: stage {name} sets {entry.key}, but a stage after the first starts "
                    "from the weights the stage before it ended with; set it at the top level "
                    "or in the first stage"
                )
        out.append((name, own.entries))
    return out


def _find_file(name: str | Path, how: str) -> Path:
    path = Path(os.path.expanduser(str(name)))
    if path.is_file():
        return path
    from mlxgrpo.config.presets import find_preset, preset_names

    preset = find_preset(str(name))
    if preset is not None:
        return preset
    if path.is_dir():
        raise ConfigError(f"config path '{name}' ({how}) is a directory", hint="pass a .toml file")
    names = ", ".join(preset_names())
    raise ConfigError(
        f"config file '{name}' ({how}) not found",
        hint=f"check the path, or use a preset name: {names}" if names else "check the path",
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return parsing.toml_file(path)
    except parsing.ParseError as exc:
        hint = "pass a TOML file saved as UTF-8" if "UTF-8" in exc.problem else exc.hint
        if exc.problem.startswith("is "):
            raise ConfigError(f"config file {exc.source} {exc.problem}", hint=hint) from None
        raise ConfigError(str(exc.message), hint=hint) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def _load_file(path: Path, col: _Collector, source: Source, chain: tuple[Path, ...]) -> None:
    """Load one file (its `extends` bases first); `source` says how to label its values."""
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(str(p) for p in (*chain, real))
        raise ConfigError(f"`extends` loop: {cycle}", hint="remove one of the extends lines")
    data = _read_toml(path)
    bases = data.pop("extends", None)
    stages = data.pop("stages", None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is not None and not (
        isinstance(bases, list) and all(isinstance(b, str) for b in bases)
    ):
        col.problems.append(f"{path}: `extends` must be a file name or a list of them")
        bases = []
    for base in bases or ():
        base_path = path.parent / os.path.expanduser(base)
        if not base_path.is_file():
            from mlxgrpo.config.presets import find_preset

            base_path = find_preset(base) or base_path
        if not base_path.is_file():
            raise ConfigError(
                f"{path}: extends '{base}', which does not exist", hint="fix the path"
            )
        label = Source(source.layer, f"{base_path} (extended by {path.name})")
        _load_file(base_path, col, label, (*chain, real))
    col.files.append(path)
    if stages is not None:  # a file's stages replace those of the files it extends
        col.stages = _stage_entries(stages, path, col)
    _flatten(data, path, col, source)


def _flatten(data: dict[str, Any], path: Path | str, col: _Collector, source: Source) -> None:
    legacy_flat: dict[str, Any] = {}
    sectioned: list[tuple[str, Any]] = []
    for name, value in data.items():
        if name in SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                key = f"{name}.{sub}"
                if key in SPECS:
                    sectioned.append((key, subvalue))
                else:
                    col.problems.append(_unknown_key(path, key, section=name))
        elif name == legacy.LEGACY_TABLE and isinstance(value, dict):
            for sub, subvalue in value.items():
                if sub in legacy.LEGACY_KEYS:
                    legacy_flat[sub] = subvalue
                else:
                    col.problems.append(_unknown_key(path, f"{name}.{sub}", section=name))
        elif name in legacy.LEGACY_KEYS:
            legacy_flat[name] = value
        elif isinstance(value, dict):
            guess = closest(name, [*SECTIONS, legacy.LEGACY_TABLE])
            hint = f" — did you mean [{guess}]?" if guess else f"; sections: {', '.join(SECTIONS)}"
            col.problems.append(f"{path}: unknown section [{name}]{hint}")
        else:
            col.problems.append(_unknown_key(path, name, section=None))
    _add_legacy(legacy_flat, col, source)
    col.entries.extend(_Entry(key, value, source) for key, value in sectioned)


def _add_legacy(flat: dict[str, Any], col: _Collector, source: Source) -> None:
    for name, value in legacy.ordered_legacy_items(flat):
        if name == "batch_size":
            continue
        key, converted = legacy.translate(name, value)
        col.entries.append(_Entry(key, converted, _legacy_source(source, name)))
    batch = legacy.prompts_per_update(flat)
    if batch is not None:
        label = "batch_size x gradient_accumulation_steps"
        col.entries.append(_Entry("optim.batch_size", batch, _legacy_source(source, label)))


def _legacy_source(source: Source, name: str) -> Source:
    if source.layer == "--set":
        return Source("--set", f"{name} (legacy key)")
    return Source(source.layer, f"{source.detail} (legacy key {name})")


def _unknown_key(path: Path | str, key: str, section: str | None) -> str:
    name = key.rsplit(".", 1)[-1]
    suggestion = suggest_key(key, section)
    where = f"[{section}] " if section else ""
    text = f"{path}: unknown key {where}'{key if section is None else name}'"
    return text + (f" — did you mean '{suggestion}'?" if suggestion else "")


def suggest_key(key: str, section: str | None = None) -> str | None:
    """The closest valid key for an unknown one (in `[section]` of a file, when given): the same
    field name in another section first, then spelling among dotted and legacy keys, then the
    bare field name."""
    name = key.rsplit(".", 1)[-1]
    same_name = [k for k in SPECS if k.endswith("." + name)]
    if section in SECTIONS and same_name:
        return same_name[0]
    suggestion = closest(key, [*SPECS, *legacy.LEGACY_KEYS])
    if suggestion is None and same_name:
        suggestion = same_name[0]
    if suggestion is None and section in SECTIONS:
        suggestion = closest(f"{section}.{name}", SPECS)
    if suggestion is None:
        suggestion = _qualify(closest(name, [k.split(".", 1)[1] for k in SPECS] + list(SECTIONS)))
    return suggestion


def _qualify(name: str | None) -> str | None:
    if name is None or name in SECTIONS or "." in name:
        return name
    matches = [k for k in SPECS if k.endswith("." + name)]
    return matches[0] if matches else name


def _parse_override(text: str, col: _Collector, legacy_sets: dict[str, Any]) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        col.problems.append(
            f"--set '{text}': expected KEY=VALUE, e.g. --set rollout.temperature=0.8"
        )
        return
    source = Source("--set", f"{key}={raw}")
    if key in legacy.LEGACY_KEYS:
        value = parse_cli_text(SPECS[legacy.LEGACY_KEYS[key].target], raw)
        if key in legacy.BATCH_KEYS:  # translated as a pair once all --set are read
            legacy_sets[key] = value
        else:
            _add_legacy({key: value}, col, source)
    elif key in SPECS:
        col.entries.append(_Entry(key, parse_cli_text(SPECS[key], raw), source))
    else:
        suggestion = suggest_key(key)
        hint = f" — did you mean '{suggestion}'?" if suggestion else ""
        col.problems.append(f"--set: unknown key '{key}'{hint}")


_REF = re.compile(r"\$\{([^}]*)\}")


def _finish(col: _Collector, environ: Mapping[str, str]) -> tuple[ResolvedConfig | None, list[str]]:
    raw: dict[str, Any] = {k: s.default for k, s in SPECS.items()}
    sources: dict[str, Source] = {k: DEFAULT for k in SPECS}
    for entry in col.entries:
        raw[entry.key] = entry.value
        sources[entry.key] = entry.source
    expander = _Expander(raw, sources, environ)
    typed: dict[str, Any] = {}
    problems: list[str] = list(col.problems)
    for key, spec in SPECS.items():
        try:
            value = coerce(spec, expander.expand(key))
            check_bounds(spec, value)
            typed[key] = value
        except ValueProblem as exc:
            problems.append(f"{key} = {raw[key]!r} (from {sources[key]}): {exc}")
        except _ExpandProblem as exc:
            problems.append(f"{key} (from {sources[key]}): {exc}")
    if problems:
        return None, problems
    return ResolvedConfig(build_config(typed), sources, col.files), []


class _ExpandProblem(ValueError):
    pass


class _Expander:
    """Expands ${env:NAME,default} and ${section.key} references, detecting cycles."""

    def __init__(self, raw: dict[str, Any], sources: dict[str, Source], environ: Mapping[str, str]):
        self.raw, self.sources, self.environ = raw, sources, environ
        self.done: dict[str, Any] = {}
        self.active: list[str] = []

    def expand(self, key: str) -> Any:
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise _ExpandProblem("reference loop: " + " -> ".join([*self.active, key]))
        self.active.append(key)
        try:
            value = self.raw[key]
            if isinstance(value, list):
                value = [self._expand_text(v) if isinstance(v, str) else v for v in value]
            elif isinstance(value, str):
                value = self._expand_text(value)
        finally:
            self.active.pop()
        self.done[key] = value
        return value

    def _expand_text(self, text: str) -> Any:
        whole = _REF.fullmatch(text)
        if whole:  # a lone reference keeps the referenced value's type
            return self._lookup(whole.group(1))
        return _REF.sub(lambda m: str(self._lookup(m.group(1))), text)

    def _lookup(self, ref: str) -> Any:
        ref = ref.strip()
        if ref.startswith("env:"):
            name, _, default = ref[4:].partition(",")
            name = name.strip()
            if name in self.environ:
                return self.environ[name]
            if _:
                return default
            raise _ExpandProblem(
                f"environment variable {name} is not set; set it or write ${{env:{name},DEFAULT}}"
            )
        if ref not in SPECS:
            suggestion = closest(ref, SPECS)
            hint = f"; did you mean '{suggestion}'?" if suggestion else ""
            raise _ExpandProblem(f"unknown reference ${{{ref}}}{hint}")
        return self.expand(ref)
