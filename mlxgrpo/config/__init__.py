"""Configuration: schema, layered resolver with provenance, legacy keys, validation."""

from mlxgrpo.config.resolved import ResolvedConfig, Source
from mlxgrpo.config.resolver import ENV_VAR, ConfigProblems, resolve_config
from mlxgrpo.config.schema import SECTIONS, Config, field_specs

__all__ = [
    "ENV_VAR",
    "SECTIONS",
    "Config",
    "ConfigProblems",
    "ResolvedConfig",
    "Source",
    "field_specs",
    "resolve_config",
]
