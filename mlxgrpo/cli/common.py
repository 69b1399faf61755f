"""Options every command shares (-c, --set) and the one way commands resolve their config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mlxgrpo.config import ResolvedConfig, resolve_config

ConfigFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file or preset name (repeatable; later files win). "
        "Default: $MLX_GRPO_CONFIG if set.",
        show_default=False,
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one key, e.g. --set rollout.temperature=0.8 "
        "(repeatable; legacy flat keys work too).",
        show_default=False,
    ),
]


def adapter_dir(adapter: str | None, config: Any) -> str | None:
    """The adapters a command applies: --adapter (an adapter dir, a run dir or `last`), else
    model.adapter_path; None when neither is given."""
    from mlxgrpo.engine.io.checkpoint import resolve_adapter_source

    spec = adapter if adapter is not None else config.model.adapter_path
    return str(resolve_adapter_source(spec, config.run.output_dir)) if spec else None


def load_config(
    config_files: list[Path] | None,
    overrides: list[str] | None,
    flags: dict[str, tuple[str, Any]] | None = None,
    *,
    check_paths: bool = True,
) -> ResolvedConfig:
    """Resolve defaults < files < --set < flags ({dotted key: (flag name, value or None)})."""
    return resolve_config(config_files or (), overrides or (), flags or {}, check_paths=check_paths)
