"""One process per run directory: a lock that a second `train` on the same run meets.

Two trainers writing one run directory interleave their logs and checkpoints (a run of 100
updates ended with 149 metric records). :func:`hold_run` takes an exclusive ``flock`` on
``<run>/.lock`` for as long as the run lasts and writes the holder's pid into it. The kernel
drops the lock when its process dies, however it dies, so a lock left by a killed run is
simply taken over; a live holder makes the second process fail at once with one line that
names its pid.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlxgrpo.errors import MlxgrpoError
from mlxgrpo.safe_io import io_errors

LOCK_FILE = ".lock"


class RunInUse(MlxgrpoError):
    """Another live process holds the run directory: exit code 1."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    return f"process {text}" if text.isdigit() else "another process"


@contextmanager
def hold_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process inside the context; :class:`RunInUse` when a live
    process holds it already."""
    path = run_dir / LOCK_FILE
    with io_errors(path, "create the run lock", "pick a writable run.output_dir (-o)"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(
                f"run directory {run_dir} is in use by {_holder(path)}",
                hint="wait for that run to finish, stop it, or pick another run.run_name",
            ) from None
        with io_errors(path, "write the run lock"):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays for the next holder
