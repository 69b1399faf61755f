"""PNG curves of training runs (matplotlib, the optional `mlxgrpo[plot]` extra).

One panel per metric; each run is one colour, its train values a line and its eval values
diamonds; one legend names the runs. Rendering uses the Agg backend: no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxgrpo.errors import ConfigError
from mlxgrpo.runlog import RunLog

FORMATS = ("png", "svg", "pdf")


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "mlxgrpo plot needs matplotlib, which is not installed",
            hint="pip install 'mlxgrpo[plot]' (or uv sync --extra plot), or use --terminal",
        ) from None
    matplotlib.use("Agg", force=True)  # headless: no window, works over SSH
    import matplotlib.pyplot as plt

    return plt


def build_figure(logs: list[RunLog], metrics: list[str]) -> Any:
    """The figure: a grid of panels (two columns from two metrics on), runs overlaid."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    cols = 1 if len(metrics) == 1 else 2
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, any_eval = [], False
    for i, log in enumerate(logs):
        color = colors[i % len(colors)]
        handles.append(Line2D([], [], color=color, lw=2, label=log.name))
        for ax, metric in zip(axes.flat, metrics, strict=False):
            xs, ys = log.series(metric)
            if xs:
                # A marker per point only when there are few, so short runs stay readable.
                ax.plot(xs, ys, color=color, lw=1.6, marker="o" if len(xs) <= 30 else None, ms=3)
            ex, ey = log.series(metric, kind="eval")
            if ex:
                any_eval = True
                ax.plot(ex, ey, color=color, ls="--", lw=1, marker="D", ms=6, mec="black")
    from matplotlib.ticker import MaxNLocator

    for ax, metric in zip(axes.flat, metrics, strict=False):
        ax.set_title(metric)
        ax.set_xlabel("update")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # updates are whole numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    if any_eval:
        handles.append(Line2D([], [], color="grey", ls="--", marker="D", mec="black", label="eval"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), frameon=False)
    # Leave room at the top for the legend row(s).
    legend_rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.07 * legend_rows) / rows))
    return fig


def save_figure(fig: Any, output: Path, dpi: int = 100) -> Path:
    """Write the figure atomically: a temporary file in the same directory, then a rename, so a
    viewer that reloads the file while training goes on never sees half a PNG."""
    fmt = output.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(
            f"cannot write '{output}': unknown image type '{output.suffix or '(none)'}'",
            hint="end the file name in .png, .svg or .pdf",
        )
    if not output.parent.is_dir():
        raise ConfigError(
            f"cannot write '{output}': no such directory '{output.parent}'",
            hint="create it first or pick another -o",
        )
    from mlxgrpo.safe_io import atomic_write

    try:
        # An exclusive fresh temporary (never a planted symlink), renamed over the output.
        with atomic_write(output, binary=True) as fh:
            fig.savefig(fh, format=fmt, dpi=dpi)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return output
