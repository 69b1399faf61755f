"""Where conversions write: checked output paths, staging beside them, and the final swap.

A model is built in a temporary directory next to its output and moved into place only when
complete, so a failure never leaves half a model and `--force` never loses the old one first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlxgrpo.errors import ConfigError


def check_output_dir(output: str | os.PathLike[str], force: bool, inputs: Sequence[Path]) -> Path:
    """The output path, refused when it exists (unless `force`) or would swallow an input."""
    path = Path(output).expanduser()
    resolved = path.resolve()
    for source in (p.resolve() for p in inputs):
        if resolved == source or resolved in source.parents or source in resolved.parents:
            hint = "write the result to a directory of its own"
            raise ConfigError(f"output '{output}' overlaps the input '{source}'", hint=hint)
    if resolved in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ConfigError(f"refusing to replace '{output}', which holds the current directory")
    if path.is_file():
        raise ConfigError(f"output '{output}' is a file", hint="choose a directory path")
    blocker = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(
            f"output '{output}' is below '{blocker}', which is a file, not a directory",
            hint="choose an output path whose parent folders are directories",
        )
    if (path.exists() or path.is_symlink()) and not force:
        hint = "pass --force to replace it, or choose another output directory"
        raise ConfigError(f"output directory '{output}' already exists", hint=hint)
    return path


@contextlib.contextmanager
def staging(output: Path) -> Iterator[Path]:
    """A not-yet-existing path in a temporary directory beside `output`, removed afterwards."""
    output.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield holder / "model"
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def install(staged: Path, output: Path) -> None:
    """Move the finished model into place; an old output is set aside only now, and restored
    when the move fails (it is deleted with the staging directory otherwise)."""
    previous = staged.parent / "previous"
    had_previous = output.exists() or output.is_symlink()
    if had_previous:
        os.replace(output, previous)
    try:
        os.replace(staged, output)
    except OSError:
        if had_previous:
            os.replace(previous, output)
        raise
