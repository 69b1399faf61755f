"""What `mlxgrpo convert` and `mlxgrpo fuse` produced, as a table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mlxgrpo.ui import console
from mlxgrpo.ui.console import escape, human_size


def conversion_summary(title: str, summary: dict[str, Any]) -> None:
    """What a conversion or fuse produced: sizes, bits per weight, parameters, time."""
    table = Table(title=escape(title), title_justify="left", header_style="bold", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = []
    for key, label in _SUMMARY_ROWS:
        if summary.get(key) is None or (key in _ROWS_HIDDEN_WHEN_FALSY and not summary[key]):
            continue
        value = summary[key]
        if key.endswith("_bytes"):
            value = human_size(value)
        elif key == "n_parameters":
            value = f"{value:,}"
        elif key == "bits_per_weight":
            value = f"{value:.2f}"
        elif key == "seconds":
            value = f"{value:.1f}"
        elif key == "quantization" and isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        rows.append((label, str(value)))
    for label, value in rows:
        table.add_row(label, escape(value))
    console.out.print(table)


_ROWS_HIDDEN_WHEN_FALSY = ("skipped_layers", "dequantized")
_SUMMARY_ROWS = (
    ("source", "source"),
    ("adapters", "adapters"),
    ("step", "step"),
    ("model_file", "checkpoint"),
    ("tokenizer_file", "tokenizer"),
    ("output", "output"),
    ("n_parameters", "parameters"),
    ("dtype", "dtype"),
    ("quantization", "quantization"),
    ("quantized_layers", "quantized layers"),
    ("skipped_layers", "not quantized (width)"),
    ("fused_layers", "fused layers"),
    ("dequantized", "dequantized"),
    ("size_before_bytes", "size before"),
    ("size_after_bytes", "size after"),
    ("size_bytes", "size"),
    ("bits_per_weight", "bits per weight"),
    ("seconds", "seconds"),
)
