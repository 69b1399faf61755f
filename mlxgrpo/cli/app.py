"""The `mlxgrpo` Typer application.

Command modules are imported here, but each keeps heavy imports (mlx, mlx-lm, datasets) inside
its function bodies so `mlxgrpo --help` and `mlxgrpo config ...` start fast and work anywhere.
"""

from __future__ import annotations

import sys

import typer

from mlxgrpo.cli import (
    chat,
    completions,
    config_cmd,
    convert,
    doctor,
    eval_cmd,
    infer,
    plot,
    runs,
    train,
)
from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.version import __version__

app = typer.Typer(
    name="mlxgrpo",
    help="GRPO reinforcement fine-tuning for language models on Apple MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mlxgrpo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_show_version, is_eager=True, help="Print the version."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """GRPO reinforcement fine-tuning for language models on Apple MLX."""
    _state["debug"] = debug


app.command("train")(train.train)
app.add_typer(convert.app, name="convert")
app.command("infer")(infer.infer)
app.command("chat")(chat.chat)
app.command("eval")(eval_cmd.eval_)
app.command("doctor")(doctor.doctor)
app.command("plot")(plot.plot)
app.command("runs")(runs.runs)
app.command("completions")(completions.completions)
app.add_typer(config_cmd.app, name="config")


@app.command(
    "launch",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def launch(ctx: typer.Context) -> int:
    """Start data-parallel ranks with mlx.launch; exit with the first failing rank's code."""
    from mlxgrpo import launcher

    return launcher.main(list(ctx.args))


def _launch_arguments(argv: list[str]) -> list[str] | None:
    """What follows `launch`, verbatim: Click would drop the `--` that mlx.launch needs."""
    if "launch" not in argv:
        return None
    at = argv.index("launch")
    return argv[at + 1 :] if all(a == "--debug" for a in argv[:at]) else None


def _debug_requested(argv: list[str]) -> bool:
    return _state["debug"] or "--debug" in argv


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app and map every failure to an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if (launch_args := _launch_arguments(argv)) is not None:
        from mlxgrpo import launcher

        return launcher.main(launch_args)
    from mlxgrpo import ui

    try:
        result = app(args=argv, prog_name="mlxgrpo", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except KeyboardInterrupt:
        if _debug_requested(argv):
            raise
        ui.interrupted()
        return 130
    except MlxgrpoError as exc:
        if _debug_requested(argv):
            raise
        ui.error(exc)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last-resort mapping to one readable line
        code = _framework_exit(exc)
        if code is not None:
            return code
        if _debug_requested(argv):
            raise
        if isinstance(exc, ImportError) and "libmlx" in str(exc):
            # On Linux the mlx package needs a backend wheel, which the cpu/cuda extras install.
            ui.error(
                ConfigError(
                    "MLX has no backend library (libmlx.so) on this machine",
                    hint="install one: pip install 'mlxgrpo[cpu]' (or 'mlxgrpo[cuda]' for an "
                    "NVIDIA GPU); with uv: uv sync",
                )
            )
            return 2
        ui.internal_error(exc)
        return 1


def _framework_exit(exc: Exception) -> int | None:
    """Exit code for Typer/Click's own exits and usage errors (their classes vary by version)."""
    from mlxgrpo import ui

    name = type(exc).__name__
    if name == "Exit":
        return int(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    if name == "Abort":
        ui.interrupted()
        return 130
    if hasattr(exc, "show") and hasattr(exc, "exit_code"):
        exc.show()
        return int(exc.exit_code)
    return None


def run() -> None:
    sys.exit(main())
