"""All console output: errors, tables, panels and progress (Rich).

Library code never prints; it returns values or calls a callback, and the CLI hands them here
(``from mlxgrpo import ui``; ``ui.note(...)``). The modules, by concern:

- :mod:`~mlxgrpo.ui.console`: the two consoles, escaping and number formats, messages, spinner;
- :mod:`~mlxgrpo.ui.config_view`: `mlxgrpo config` tables and TOML;
- :mod:`~mlxgrpo.ui.doctor`: the `mlxgrpo doctor` table;
- :mod:`~mlxgrpo.ui.training`: the training run's panel, progress bar and reward tables;
- :mod:`~mlxgrpo.ui.generation`: `infer` and `chat` output;
- :mod:`~mlxgrpo.ui.results`: evaluation tables and the run viewers;
- :mod:`~mlxgrpo.ui.conversion`: what `convert` and `fuse` produced.

``ui.out`` and ``ui.err`` name the consoles; every view looks them up in
:mod:`~mlxgrpo.ui.console` when it prints, so redirecting output means replacing
``ui.console.out`` / ``ui.console.err``.
"""

from mlxgrpo.ui import console
from mlxgrpo.ui.config_view import (
    described_keys,
    format_value,
    key_value_table,
    sources_table,
    to_toml,
    validation_failure,
)
from mlxgrpo.ui.console import (
    err,
    error,
    internal_error,
    interrupted,
    note,
    out,
    raw,
    sparkline,
    stage_status,
    success,
)
from mlxgrpo.ui.conversion import conversion_summary
from mlxgrpo.ui.doctor import doctor_report
from mlxgrpo.ui.generation import (
    CHAT_HELP,
    BatchProgress,
    batch_stats,
    chat_assistant_prefix,
    chat_banner,
    chat_help,
    chat_input,
    end_of_answer,
    generation_stats,
    stream_piece,
)
from mlxgrpo.ui.results import completions_table, eval_table, metric_sparklines, runs_table
from mlxgrpo.ui.training import TrainProgress, reward_table, reward_trend

__all__ = [
    "CHAT_HELP",
    "BatchProgress",
    "TrainProgress",
    "batch_stats",
    "chat_assistant_prefix",
    "chat_banner",
    "chat_help",
    "chat_input",
    "completions_table",
    "console",
    "conversion_summary",
    "described_keys",
    "doctor_report",
    "end_of_answer",
    "err",
    "error",
    "eval_table",
    "format_value",
    "generation_stats",
    "internal_error",
    "interrupted",
    "key_value_table",
    "metric_sparklines",
    "note",
    "out",
    "raw",
    "reward_table",
    "reward_trend",
    "runs_table",
    "sources_table",
    "sparkline",
    "stage_status",
    "stream_piece",
    "success",
    "to_toml",
    "validation_failure",
]
