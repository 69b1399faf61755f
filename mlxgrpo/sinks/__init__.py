"""External metric sinks (TensorBoard, Weights & Biases), wired in by `mlxgrpo train`.

The engine knows nothing of them: each sink is a `Callback`, wrapped in `Guarded` so that a
sink that fails, or whose package is missing, costs one warning and never the training run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlxgrpo.config.schema import Config
from mlxgrpo.engine.io.callbacks import Callback


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Guarded(Callback):
    """Runs a sink's hooks; at its first exception, warns once and drops the sink."""

    def __init__(self, sink: Any, name: str, fix: str, warn: Callable[[str], None]) -> None:
        self.sink, self.name, self.fix, self.warn = sink, name, fix, warn
        self.failed = False

    def _call(self, hook: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.sink, hook)(*args)
        except Exception as exc:  # a logging problem must never end the training run
            self.failed = True
            self.warn(
                f"{self.name} logging stopped ({_one_line(exc)}); training goes on without it "
                f"— {self.fix}"
            )
            try:  # release its file or process; a second failure changes nothing
                self.sink.abort()
            except Exception:
                pass

    def on_start(self, info: dict[str, Any]) -> None:
        self._call("on_start", info)

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        self._call("on_update", update, metrics)

    def on_completions(self, update: int, records: list[dict[str, Any]]) -> None:
        self._call("on_completions", update, records)

    def on_eval(self, update: int, metrics: dict[str, Any]) -> None:
        self._call("on_eval", update, metrics)

    def on_checkpoint(self, update: int, path: Any) -> None:
        self._call("on_checkpoint", update, path)

    def on_end(self, summary: dict[str, Any]) -> None:
        self._call("on_end", summary)


def build_sinks(cfg: Config, warn: Callable[[str], None]) -> list[Callback]:
    """The sinks `[logging]` asks for; `warn` receives one line per problem."""
    sinks: list[Callback] = []
    if cfg.logging.tensorboard:
        from mlxgrpo.sinks.tensorboard import TensorBoardSink

        fix = "check that <run>/tensorboard is writable, or set logging.tensorboard = false"
        sinks.append(Guarded(TensorBoardSink(), "TensorBoard", fix, warn))
    if cfg.logging.wandb_project:
        try:
            import wandb
        except Exception as exc:  # ImportError, or a broken install that fails on import
            warn(
                f"logging.wandb_project is set but wandb cannot be imported ({_one_line(exc)}); "
                "training goes on without W&B — pip install 'mlxgrpo[wandb]', or unset "
                "logging.wandb_project"
            )
        else:
            from mlxgrpo.sinks.wandb import WandbSink

            sink = WandbSink(
                wandb,
                cfg.logging.wandb_project,
                cfg.to_dict(drop_none=True),
                cfg.logging.log_completions_steps,
                note=warn,
            )
            fix = "check `wandb login` / WANDB_MODE=offline, or unset logging.wandb_project"
            sinks.append(Guarded(sink, "W&B", fix, warn))
    return sinks
