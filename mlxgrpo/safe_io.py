"""Writing files safely: fresh temporaries renamed into place, and OS errors as one-line errors.

Every file the CLI writes goes through `atomic_write` (or a temporary directory from
`make_temp_dir`): the temporary is created with O_CREAT | O_EXCL | O_NOFOLLOW in the target's
directory, so a symlink planted at a predictable name is never followed, and readers only ever
see the old file or the complete new one. Temporaries carry the writer's pid in their name, so a
later start can tell those left by a killed process (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from mlxgrpo.errors import MlxgrpoError

# errno -> (what went wrong, what to do), for the failures a user can fix.
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free some disk space or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write somewhere else"),
    errno.EROFS: ("read-only file system", "write to a writable location"),
    errno.EACCES: ("permission denied", "check the permissions or write somewhere else"),
    errno.EPERM: ("operation not permitted", "check the permissions or write somewhere else"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("it is a directory", "choose a file path"),
    errno.ELOOP: ("it is a symbolic link, which is never followed", "remove the link"),
    errno.EEXIST: ("it already exists", "remove it or choose another path"),
}

# `.NAME.tmp-PID-RANDOM`, and the older `.tmp-step-NNNNNN-PID` checkpoint temporaries.
_TEMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[a-z0-9]+$|^\.tmp-step-\d+-(?P<old>\d+)$")


def os_error(
    exc: OSError, path: str | os.PathLike[str], action: str = "write", hint: str | None = None
) -> MlxgrpoError:
    """One-line error naming the path (the one the OS reported, when it did) and the cause."""
    where = exc.filename if exc.filename else path
    if _TEMP_RE.match(Path(where).name):
        where = path  # name what the user asked for, not our temporary
    cause, default_hint = _CAUSES.get(exc.errno or 0, (exc.strerror or str(exc), None))
    return MlxgrpoError(f"cannot {action} '{where}': {cause}", hint=hint or default_hint)


@contextlib.contextmanager
def io_errors(
    path: str | os.PathLike[str], action: str = "write", hint: str | None = None
) -> Iterator[None]:
    """Turn an OSError raised inside the block into a one-line MlxgrpoError."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, path, action, hint) from exc


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _open_exclusive(path: Path, binary: bool, encoding: str | None) -> IO[Any]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)  # the umask applies, as for open()
    try:
        return os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else encoding)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str],
    *,
    binary: bool = False,
    encoding: str = "utf-8",
    keep_partial: Path | None = None,
) -> Iterator[IO[Any]]:
    """A file object for `target`: a fresh exclusive temporary, renamed onto `target` when the
    block ends normally. On failure the temporary is removed, or renamed to `keep_partial`
    (a rename replaces a symlink there; it never writes through one). OSErrors become
    one-line errors naming the path."""
    target = Path(target)
    tmp = _temp_name(target)
    with io_errors(target):
        fh = _open_exclusive(tmp, binary, encoding)
    try:
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            if exc.filename not in (None, str(tmp), str(target)):
                raise  # some other file's problem, raised inside the block
            raise os_error(exc, target) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            if keep_partial is not None and tmp.exists():
                os.replace(tmp, keep_partial)
            else:
                tmp.unlink()
        raise


def write_text(target: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """`Path.write_text`, atomic and never through a symlink."""
    with atomic_write(target, encoding=encoding) as fh:
        fh.write(text)


def make_temp_dir(target: Path) -> Path:
    """A new, empty directory beside `target` (named after it and this process) to build it in."""
    with io_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = _temp_name(target)
            try:
                tmp.mkdir()
            except FileExistsError:
                continue
            return tmp
    raise MlxgrpoError(f"cannot create a temporary directory beside '{target}'")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # at start-up nothing of ours is in flight: it is an earlier, killed run's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove temporaries in `directory` whose writer process is gone; returns what went."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMP_RE.match(entry.name)
        if match is None or _alive(int(match.group("pid") or match.group("old"))):
            continue
        with io_errors(entry, "remove"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        removed.append(entry)
    return removed
