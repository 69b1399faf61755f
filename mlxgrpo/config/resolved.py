"""What resolving a configuration gives: the Config and where each of its values came from.

Its own module so that the resolver (which builds it) and the cross-field checks (which read it)
both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlxgrpo.config.schema import Config


@dataclass(frozen=True)
class Source:
    """Which layer set a value, and where exactly."""

    layer: str  # default | file | env | stage | --set | flag
    detail: str = ""

    def __str__(self) -> str:
        return self.layer if not self.detail else f"{self.layer} {self.detail}"


@dataclass
class ResolvedConfig:
    config: Config
    sources: dict[str, Source]
    files: list[Path] = field(default_factory=list)
    # A staged config's stages, in order: (name, the stage's own resolved config). The
    # top-level config is then only what the stages inherit.
    stages: list[tuple[str, ResolvedConfig]] = field(default_factory=list)
    stage: str | None = None  # the name of the stage this config is, if it is one

    def changed_keys(self) -> list[str]:
        return [k for k, s in self.sources.items() if s.layer != "default"]

    def base_dir(self) -> Path:
        """Directory that relative paths in the config are read against (the last file's)."""
        return self.files[-1].parent if self.files else Path.cwd()
