"""`mlxgrpo config show | validate | keys`: inspect configuration without loading any model."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from mlxgrpo import ui
from mlxgrpo.cli.common import ConfigFiles, Overrides, load_config

app = typer.Typer(help="Show, check and explain configuration.", no_args_is_help=True)


class Format(StrEnum):
    toml = "toml"
    json = "json"


@app.command("show")
def show(
    config: ConfigFiles = None,
    set_: Overrides = None,
    resolved: Annotated[
        bool, typer.Option("--resolved", help="Print every key, not only those that differ.")
    ] = False,
    sources: Annotated[
        bool, typer.Option("--sources", help="Add a table of key, value and the layer that set it.")
    ] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.toml,
) -> None:
    """Print the configuration that the layers resolve to (default: only non-default keys).

    A staged config's stages follow, each as it runs: with --resolved every key of it,
    otherwise what the stage itself sets."""
    result = load_config(config, set_, check_paths=False)
    keys = list(result.sources) if resolved else result.changed_keys()
    data: dict[str, Any] = _sections(result.config, keys)
    if result.stages:
        data["stages"] = [
            {
                "name": name,
                **_sections(
                    stage.config,
                    list(stage.sources)
                    if resolved
                    else [k for k, s in stage.sources.items() if s.layer == "stage"],
                ),
            }
            for name, stage in result.stages
        ]
    if fmt is Format.json:
        ui.raw(json.dumps(data, indent=2) + "\n")
    else:
        ui.raw(ui.to_toml(data))
    if sources:
        rows = [
            (key, ui.format_value(result.config.get(key)), str(result.sources[key])) for key in keys
        ]
        ui.sources_table(rows)


def _sections(config: Any, keys: list[str]) -> dict[str, dict[str, Any]]:
    """``{section: {name: value}}`` of the config's ``keys``."""
    data: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = config.get(key)
    return data


@app.command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(help="Config files to check.", show_default=False)],
) -> None:
    """Check config files (types, ranges, cross-field rules) without loading a model."""
    from mlxgrpo.errors import ConfigError

    bad = 0
    for path in files:
        try:
            load_config([path], None, check_paths=True)
            ui.success(f"{path}: ok")
        except ConfigError as exc:
            bad += 1
            ui.validation_failure(str(path), getattr(exc, "problems", None) or [str(exc)])
    if bad:
        raise typer.Exit(code=2)


@app.command("keys")
def keys(
    section: Annotated[str | None, typer.Argument(help="Only this section.")] = None,
) -> None:
    """List every config key with its type, default and meaning (and the legacy names)."""
    from mlxgrpo.config import field_specs
    from mlxgrpo.config.legacy import LEGACY_KEYS
    from mlxgrpo.config.values import type_name

    legacy_by_target: dict[str, list[str]] = {}
    for name, spec in LEGACY_KEYS.items():
        legacy_by_target.setdefault(spec.target, []).append(name)
    rows = []
    for key, spec in field_specs().items():
        if section and spec.section != section:
            continue
        help_text = spec.help
        if spec.choices:
            help_text += " [" + "|".join(str(c) for c in spec.choices) + "]"
        if key in legacy_by_target:
            help_text += " (legacy: " + ", ".join(legacy_by_target[key]) + ")"
        rows.append((key, type_name(spec.type), ui.format_value(spec.default), help_text))
    ui.described_keys("config keys", rows)
