"""Run viewers: `mlxgrpo plot`, `mlxgrpo runs`, `mlxgrpo completions` and the train sparkline.

Most runs here are small run directories written by hand, so the numbers are known exactly;
one test trains the demo for a few updates to check the commands on a real run.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(
    root: Path,
    name: str,
    rewards: list[float],
    *,
    evals: dict[int, float] | None = None,
    final: bool = False,
    checkpoints: tuple[int, ...] = (),
    kl: bool = True,
    completions: dict[int, list[float]] | None = None,
) -> Path:
    """A run directory as the trainer leaves it: config, metrics, checkpoints, final/."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.resolved.toml").write_text('[run]\nrun_name = "x"\n')
    lines = []
    for update, reward in enumerate(rewards, start=1):
        record = {
            "kind": "train",
            "update": update,
            "reward_mean": reward,
            "rewards": {"match": {"mean": reward, "std": 0.1}},
            "entropy": 3.0 - 0.1 * update,
            "completion_length_mean": 10.0 + update,
            "step_seconds": 2.0,
        }
        if kl:
            record["kl"] = 0.01 * update
        lines.append(json.dumps(record))
        if evals and update in evals:
            lines.append(
                json.dumps(
                    {
                        "kind": "eval",
                        "update": update,
                        "accuracy": evals[update],
                        "reward_mean": evals[update],
                        "seconds": 1.0,
                    }
                )
            )
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    for update in checkpoints:
        step = run / "checkpoints" / f"step-{update:06d}"
        step.mkdir(parents=True)
        (step / "trainer_state.json").write_text(json.dumps({"update": update}))
    if final:
        (run / "final").mkdir()
        (run / "final" / "adapters.safetensors").write_bytes(b"")
    if completions:
        with (run / "completions.jsonl").open("w") as fh:
            for update, values in completions.items():
                for i, reward in enumerate(values):
                    record = {
                        "update": update,
                        "prompt": f"prompt {i}",
                        "completion": f"answer-{update}-{i}",
                        "reward": reward,
                        "rewards": {"match": reward},
                        "advantage": reward - 0.5,
                    }
                    fh.write(json.dumps(record) + "\n")
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- plot ------------------------------------------------------------------------------------


def test_plot_writes_a_png_with_curves(cli, tmp_path):
    run = _write_run(tmp_path / "runs", "alpha", [0.1, 0.4, 0.8, 0.9], evals={2: 0.5, 4: 0.95})
    out = tmp_path / "curves.png"
    code, _, err = cli("plot", run, "-o", out)
    assert code == 0, err
    # Four default metrics in a 2 x 2 grid of 6 x 3.4 inch panels at 100 dpi.
    assert _png_size(out) == (1200, 680)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(out)
    # Not blank: the curves and text give many pixels that differ from the white background.
    assert (pixels[..., :3].std(axis=2) > 0.1).sum() > 500  # coloured (curve) pixels
    assert (pixels[..., :3] < 0.5).all(axis=2).sum() > 1000  # dark (text, axes) pixels
    # Written through a temporary file that is gone afterwards.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "runs"]
    assert "4 metric(s) of 1 run(s)" in err


def test_figure_overlays_runs_with_a_legend_and_marks_eval(tmp_path):
    from mlxgrpo import plotting, runlog

    a = _write_run(tmp_path, "alpha", [0.1, 0.5, 0.9], evals={3: 0.7})
    b = _write_run(tmp_path, "beta", [0.2, 0.3], kl=False)
    logs = [runlog.load_metrics(a), runlog.load_metrics(b)]
    metrics = runlog.pick_metrics(logs, None)
    assert metrics == ["reward_mean", "kl", "entropy", "completion_length_mean"]
    fig = plotting.build_figure(logs, metrics)
    try:
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["alpha", "beta", "eval"]
        reward_ax = fig.axes[0]
        assert reward_ax.get_title() == "reward_mean"
        lines = reward_ax.get_lines()
        # alpha's train line, alpha's eval diamonds, beta's train line.
        assert [list(line.get_ydata()) for line in lines] == [[0.1, 0.5, 0.9], [0.7], [0.2, 0.3]]
        assert lines[1].get_marker() == "D" and lines[0].get_marker() == "o"
        assert lines[0].get_color() != lines[2].get_color()
        # kl is logged by alpha only: one line in that panel.
        assert len(fig.axes[1].get_lines()) == 1
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_plot_several_runs_by_name_under_output_dir(cli, tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "alpha", [0.1, 0.2])
    _write_run(root, "beta", [0.3, 0.4])
    out = tmp_path / "both.png"
    code, _, err = cli(
        "plot",
        "alpha",
        "beta",
        "--metrics",
        "reward",
        "-o",
        out,
        "--set",
        f"run.output_dir={root}",
    )
    assert code == 0, err
    assert _png_size(out) == (600, 340)  # one metric: one 6 x 3.4 inch panel
    assert "1 metric(s) of 2 run(s)" in err


def test_plot_terminal_shows_metric_names_and_values(cli, tmp_path):
    run = _write_run(tmp_path, "alpha", [0.0, 0.3, 0.7, 0.6], evals={4: 0.625})
    code, out, _ = cli("plot", run, "--terminal", "--metrics", "reward,kl")
    assert code == 0
    assert "curves: alpha" in out
    reward_row = next(line for line in out.splitlines() if "reward_mean" in line)
    # min, max, last of the reward, and a rising-then-falling sparkline.
    assert reward_row.split()[-7:] == ["│", "0.000", "│", "0.700", "│", "0.600", "│"]
    assert "▁▄█▇" in reward_row
    eval_row = next(line for line in out.splitlines() if "↳ eval" in line)
    assert "0.625" in eval_row
    kl_row = next(line for line in out.splitlines() if "│ kl " in line)
    assert "0.010" in kl_row and "0.040" in kl_row
    assert "entropy" not in out  # only the requested metrics


def test_plot_without_matplotlib_says_how_to_install(cli, tmp_path, monkeypatch):
    run = _write_run(tmp_path, "alpha", [0.1, 0.2])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, _, err = cli("plot", run, "-o", tmp_path / "x.png")
    assert code == 2
    assert err.count("\n") == 1 and "mlxgrpo[plot]" in err and "--terminal" in err
    assert not (tmp_path / "x.png").exists()
    # The terminal view needs no matplotlib.
    code, out, _ = cli("plot", run, "--terminal")
    assert code == 0 and "reward_mean" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "has no metrics.jsonl"),
        ("", "is empty: the run has logged no update yet"),
        (
            '{"kind": "train", "update": 1, "reward_mean": 0.5}\n{not json\n{"update": 3}\n',
            "line 2 is not valid JSON",
        ),
    ],
)
def test_bad_metrics_are_one_line_errors(cli, tmp_path, content, message):
    run = tmp_path / "broken"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    code, out, err = cli("plot", run, "--terminal")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


def test_a_half_written_last_line_is_skipped(cli, tmp_path):
    run = _write_run(tmp_path, "alpha", [0.25, 0.5])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "update": 3, "rew')  # the trainer is mid-write
    code, out, _ = cli("plot", run, "--terminal", "--metrics", "reward")
    assert code == 0
    assert "1–2" in out and "0.500" in out


def test_unknown_run_and_unknown_metric_errors(cli, tmp_path):
    _write_run(tmp_path, "alpha", [0.1, 0.2])
    code, _, err = cli("plot", "nope", "--set", f"run.output_dir={tmp_path}")
    assert code == 2 and "no run 'nope'" in err and "mlxgrpo runs" in err
    code, _, err = cli("plot", "alpha", "--metrics", "rewrd", "--set", f"run.output_dir={tmp_path}")
    assert code == 2 and "no run logs a metric 'rewrd'" in err and "reward_mean" in err
    code, _, err = cli("plot", tmp_path / "alpha", "-o", tmp_path / "x.gif")
    assert code == 2 and "unknown image type '.gif'" in err


def test_last_is_the_most_recently_modified_run(cli, tmp_path):
    old = _write_run(tmp_path, "old", [0.1, 0.2])
    _write_run(tmp_path, "new", [0.3, 0.7])
    os.utime(old, (1, 1))
    code, out, _ = cli(
        "plot", "last", "-t", "--metrics", "reward", "--set", f"run.output_dir={tmp_path}"
    )
    assert code == 0 and "curves: new" in out and "0.700" in out


# --- runs -------------------------------------------------------------------------------------


def test_runs_lists_status_rewards_and_time(cli, tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "done", [0.2, 0.9, 0.6], evals={2: 0.75}, checkpoints=(3,), final=True)
    _write_run(root, "paused", [0.1, 0.3, 0.2, 0.4], checkpoints=(2, 4))
    _write_run(root, "died", [0.1, 0.3, 0.5], checkpoints=(2,))
    _write_run(root, "early", [0.1])
    (root / "not-a-run").mkdir()
    code, out, err = cli("runs", root, "--json")
    assert code == 0, err
    runs = {r["name"]: r for r in json.loads(out)}
    assert set(runs) == {"done", "paused", "died", "early"}
    assert {n: r["status"] for n, r in runs.items()} == {
        "done": "finished",
        "paused": "stopped",
        "died": "crashed",
        "early": "crashed",
    }
    done = runs["done"]
    assert (done["updates"], done["last_reward"]) == (3, 0.6)
    assert (done["best_reward"], done["best_reward_update"]) == (0.9, 2)
    assert done["best_eval"] == {"metric": "accuracy", "value": 0.75, "update": 2}
    assert done["wall_seconds"] == pytest.approx(3 * 2.0 + 1.0)  # step_seconds + eval seconds
    assert runs["paused"]["updates"] == 4 and runs["paused"]["best_eval"] is None

    code, out, _ = cli("runs", "--set", f"run.output_dir={root}")  # default: run.output_dir
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert "finished" in rows["done"] and "stopped" in rows["paused"]
    assert "0.900 @2" in rows["done"] and "0.750 acc @2" in rows["done"]
    assert "7s" in rows["done"]


def test_runs_reports_a_corrupt_log_and_a_missing_dir(cli, tmp_path):
    _write_run(tmp_path, "good", [0.5], final=True)
    bad = _write_run(tmp_path, "bad", [0.5], final=True)
    (bad / "metrics.jsonl").write_text("oops\n")
    code, out, err = cli("runs", tmp_path)
    assert code == 0
    assert "bad: " in err and "line 1 is not valid JSON" in err
    code, _, err = cli("runs", tmp_path / "missing")
    assert code == 2 and "no such directory" in err and err.count("\n") == 1


# --- completions -------------------------------------------------------------------------------


def test_completions_top_and_worst(cli, tmp_path):
    run = _write_run(
        tmp_path,
        "alpha",
        [0.1, 0.2],
        completions={1: [0.9, 0.1], 2: [0.25, 1.0, 0.0, 0.75]},
    )
    code, out, err = cli("completions", run, "--top", "2")
    assert code == 0, err
    assert "update 2, top 2" in out
    shown = [line for line in out.splitlines() if "answer-" in line]
    assert [line.split("│")[2].strip() for line in shown] == ["answer-2-1", "answer-2-3"]
    assert [line.split("│")[3].strip() for line in shown] == ["1.000", "0.750"]
    assert "0.500" in shown[0]  # advantage of the best sample

    code, out, _ = cli("completions", run, "--update", "1", "--worst", "1")
    shown = [line for line in out.splitlines() if "answer-" in line]
    assert len(shown) == 1 and "answer-1-1" in shown[0] and "0.100" in shown[0]

    code, out, _ = cli("completions", run)  # all of the last update, in logged order
    assert [x for x in out.split() if x.startswith("answer-")] == [
        "answer-2-0",
        "answer-2-1",
        "answer-2-2",
        "answer-2-3",
    ]


def test_completions_errors(cli, tmp_path):
    run = _write_run(tmp_path, "alpha", [0.1], completions={1: [0.5], 2: [0.5], 3: [0.5]})
    code, _, err = cli("completions", run, "--update", "7")
    assert code == 2 and "no completions logged for update 7" in err and "1–3" in err
    code, _, err = cli("completions", run, "--top", "1", "--worst", "1")
    assert code == 2 and "exclude each other" in err
    no_log = _write_run(tmp_path, "beta", [0.1])
    code, _, err = cli("completions", no_log)
    assert code == 2 and "has no completions.jsonl" in err and "log_completions=true" in err
    assert err.count("\n") == 1


# --- a real run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_viewers_on_a_trained_demo_run(cli, tmp_path):
    code, _, err = cli(
        "train",
        "-c",
        "demo",
        "--max-steps",
        "4",
        "--output-dir",
        tmp_path,
        "--set",
        "logging.log_completions=true",
        "--set",
        "checkpoint.save_steps=2",
    )
    assert code == 0, err
    (trend,) = [line for line in err.splitlines() if line.startswith("reward ")]
    sparks, first, arrow, last = trend.split()[1:]  # reward ▁▄█▅ 0.003 → 0.015
    assert len(sparks) == 4 and set(sparks) <= set("▁▂▃▄▅▆▇█") and arrow == "→"
    assert float(first) >= 0 and float(last) >= 0
    code, out, _ = cli("runs", tmp_path, "--json")
    (run,) = json.loads(out)
    assert (run["name"], run["status"], run["updates"]) == ("demo", "finished", 4)
    code, out, _ = cli("completions", "demo", "--top", "2", "--set", f"run.output_dir={tmp_path}")
    assert code == 0 and "update 4, top 2" in out
    code, _, err = cli("plot", tmp_path / "demo", "-o", tmp_path / "demo.png")
    assert code == 0, err
    assert _png_size(tmp_path / "demo.png")[0] == 1200
