"""`mlxgrpo launch`: MLX's `mlx.launch` with an exit status that says whether the ranks succeeded.

`mlx.launch` (MLX 0.32) starts the ranks, forwards their output and reports a failed rank only
as a warning line ("Node with rank 1 exited with code 2"); its own exit status is 0 either
way, so a script or CI job cannot tell a failed run from a finished one. This runs the same
launcher with the same arguments, passes its output through unchanged, and exits with the
first failing rank's code (1 for a rank that was killed), else with the launcher's own.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

USAGE = """Usage: mlxgrpo launch [MLX.LAUNCH OPTIONS] -- COMMAND [ARGS]...

  Start COMMAND on several ranks with MLX's launcher (same options as mlx.launch: -n N,
  --backend ring|jaccl|mpi|nccl, --hosts, --hostfile, ...) and exit with the first failing
  rank's exit code, or 0 when every rank succeeded.

  mlxgrpo launch -n 2 --backend ring -- mlxgrpo train -c configs/demo.toml
  mlxgrpo launch --hostfile hosts.json -- mlxgrpo train -c run.toml

  Options of mlx.launch: mlxgrpo launch --launcher-help
"""

_RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def launcher_command() -> list[str]:
    """How to start MLX's launcher from this Python environment."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.is_file():
        return [str(script)]
    code = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
    return [sys.executable, "-c", code]


def failed_rank_code(line: str) -> int | None:
    """The exit code a launcher line reports for a failed rank (1 when it was killed)."""
    match = _RANK_FAILED.search(line)
    if match is None:
        return None
    code = int(match.group(2)) if match.group(2) is not None else 1
    return code if code > 0 else 1  # a negative code is a signal


def hostfile_argument(args: list[str]) -> str | None:
    """The launcher's --hostfile value, looked for before the command's `--`."""
    options = args[: args.index("--")] if "--" in args else args
    for i, arg in enumerate(options):
        if arg == "--hostfile" and i + 1 < len(options):
            return options[i + 1]
        if arg.startswith("--hostfile="):
            return arg.split("=", 1)[1]
    return None


def hostfile_problem(path: Path) -> str | None:
    """Why ``path`` is no hostfile mlx.launch can start ranks from: missing, not JSON, or not
    a non-empty list of hosts; None when it is one."""
    from mlxgrpo import parsing

    if not path.is_file():
        return "does not exist"
    try:
        hosts = parsing.json_file(path)
    except parsing.ParseError as exc:
        return exc.problem
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not isinstance(hosts, list) or not hosts:
        return "lists no hosts (it should be a JSON list with one entry per machine)"
    return None


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    if args[0] == "--launcher-help":
        args = ["--help"]
    hostfile = hostfile_argument(args)
    problem = None if hostfile is None else hostfile_problem(Path(hostfile).expanduser())
    if problem is not None:
        # mlx.launch says so too, under its whole usage text (or runs nothing and exits 0).
        from mlxgrpo import ui
        from mlxgrpo.errors import ConfigError

        ui.error(
            ConfigError(
                f"hostfile '{hostfile}' {problem}",
                hint="write one (README: Training on several machines) or run "
                "mlx.distributed_config",
            )
        )
        return 2
    # Ctrl-C reaches the launcher and the ranks through the terminal; this process only waits
    # for them to stop (a handler, not SIG_IGN, which the launcher would inherit).
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    first_failure: int | None = None
    held = _HeldTraceback()
    try:
        with subprocess.Popen(
            [*launcher_command(), *args], stderr=subprocess.PIPE, text=True, errors="replace"
        ) as proc:
            assert proc.stderr is not None
            for line in proc.stderr:
                for shown in held.feed(line, bool(interrupted)):
                    sys.stderr.write(shown)
                sys.stderr.flush()
                code = failed_rank_code(line)
                if code is not None and first_failure is None:
                    first_failure = code
            for shown in held.flush():
                sys.stderr.write(shown)
            returncode = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if first_failure is not None:
        return first_failure
    return returncode if returncode >= 0 else 128 - returncode  # the launcher got a signal


class _HeldTraceback:
    """After Ctrl-C, mlx.launch dies with a KeyboardInterrupt traceback of its own while the
    ranks stop cleanly. Its traceback lines are held back and dropped when they end in
    KeyboardInterrupt; any other traceback, and the ranks' lines, pass through."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def feed(self, line: str, interrupted: bool) -> list[str]:
        if not self.lines:
            if interrupted and line.startswith("Traceback (most recent call last):"):
                self.lines = [line]
                return []
            return [line]
        if line.startswith("KeyboardInterrupt"):
            kept = [x for x in self.lines[1:] if not _traceback_line(x)]
            self.lines = []
            return kept
        self.lines.append(line)
        return []

    def flush(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _traceback_line(line: str) -> bool:
    return line.startswith(" ") or line.strip() == ""
