"""Preset configs shipped with mlxgrpo, addressable by name (`-c demo`)."""

from __future__ import annotations

from pathlib import Path


def presets_dir() -> Path | None:
    """`mlxgrpo/presets` in an installed wheel, the repository's `configs/` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "presets", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def preset_names() -> list[str]:
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder else []


def find_preset(name: str) -> Path | None:
    """The preset file for a bare name such as `demo` or `demo.toml`, if there is one."""
    folder = presets_dir()
    if folder is None or "/" in name or "\\" in name:
        return None
    path = folder / (name if name.endswith(".toml") else f"{name}.toml")
    return path if path.is_file() else None
