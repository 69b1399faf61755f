"""TensorBoard and W&B sinks: read back by their own readers, matching metrics.jsonl."""

from __future__ import annotations

import errno
import json
import struct
import sys

import pytest

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.sinks import build_sinks
from mlxgrpo.sinks.names import TRL_NAMES, scalars

TINY = [
    "model.path=builtin:tiny-qwen2",
    "data.dataset=synthetic:repeat?letters=x",
    "rollout.num_generations=4",
    "rollout.max_new_tokens=8",
    "rollout.temperature=1.0",
    "optim.learning_rate=1e-2",
    "optim.batch_size=2",
    "optim.gradient_accumulation_steps=1",
    "finetune.lora_layers=-1",
    "checkpoint.save_steps=0",
    "run.resume=never",
    "run.run_name=run",
]


def resolved(tmp_path, *sets):
    return resolve_config((), [*TINY, f"run.output_dir={tmp_path}", *sets], environ={})


def train_records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_crc32c_check_value():
    from mlxgrpo.sinks.tensorboard import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path, cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = [*TINY, f"run.output_dir={tmp_path}", "run.max_steps=3", "logging.tensorboard=true"]
    sets += ["algorithm.kl_coeff=0.1", "eval.every_updates=3", "eval.samples=2"]
    sets += ["eval.max_new_tokens=4"]
    code, _, err = cli("train", *(a for s in sets for a in ("--set", s)))
    assert code == 0, err
    run_dir = tmp_path / "run"
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    logged = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}

    def series(tag):
        return [(e.step, e.value) for e in logged[tag]]

    records = train_records(run_dir)
    assert [r["update"] for r in records] == [1, 2, 3]
    # TRL's names, spelled out once more here so that a wrong table entry fails.
    for name, get in {
        "reward": lambda r: r["reward_mean"],
        "rewards/char_match/mean": lambda r: r["rewards"]["char_match"]["mean"],
        "rewards/char_match/std": lambda r: r["rewards"]["char_match"]["std"],
        "frac_reward_zero_std": lambda r: r["zero_std_groups"],
        "loss": lambda r: r["policy_loss"],
        "kl": lambda r: r["kl"],
        "clip_ratio/low_mean": lambda r: r["clip_low"],
        "completions/mean_length": lambda r: r["completion_length_mean"],
        "completions/clipped_ratio": lambda r: r["truncated_share"],
        "grad_norm": lambda r: r["grad_norm"],
        "peak_memory_gb": lambda r: r["peak_memory_gb"],
    }.items():
        expected = [(r["update"], pytest.approx(get(r), rel=1e-6, abs=1e-12)) for r in records]
        assert series(name) == expected, name
    # Every finite number of every record is there, at its update (float32 in the file).
    for r in records:
        metrics = {k: v for k, v in r.items() if k not in ("kind", "update")}
        for tag, value in scalars(metrics).items():
            assert (r["update"], pytest.approx(value, rel=1e-6, abs=1e-12)) in series(tag), tag
    renamed = {key for key, name in TRL_NAMES.items() if key != name}
    assert not renamed & set(logged)  # no duplicates under the JSONL name
    (ev,) = train_records(run_dir, kind="eval")
    assert series("eval/reward") == [(3, pytest.approx(ev["reward_mean"], rel=1e-6, abs=1e-12))]
    assert series("eval/completions/mean_length")[0][1] == pytest.approx(
        ev["completion_length_mean"]
    )


def read_wandb_records(path):
    """Records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_metrics_and_completions(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    wants = ["logging.wandb_project=sinks-test", "logging.log_completions_steps=2"]
    config = resolved(tmp_path, "run.max_steps=2", *wants)
    notes: list[str] = []
    sinks = build_sinks(config.config, warn=notes.append)
    assert len(sinks) == 1
    train(config, sinks)
    # The wandb-core process writes the transaction log on its own; its teardown waits for it
    # (once a read here missed the last step).
    import wandb

    wandb.teardown()
    assert len(notes) == 1 and notes[0].startswith("W&B offline run in "), notes
    (log,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[int, dict[str, object]] = {}
    for record in read_wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            history.setdefault(items["_step"], {}).update(items)
    records = train_records(tmp_path / "run")
    for r in records:
        row = history[r["update"]]
        assert row["reward"] == pytest.approx(r["reward_mean"])
        assert row["rewards/char_match/mean"] == pytest.approx(r["rewards"]["char_match"]["mean"])
        assert row["loss"] == pytest.approx(r["policy_loss"])
        metrics = {k: v for k, v in r.items() if k not in ("kind", "update")}
        for tag, value in scalars(metrics).items():
            assert row[tag] == pytest.approx(value), tag
    # The completions table at update 2 only (every 2 updates): 2 prompts x 4 samples.
    assert "completions/nrows" not in history[1] and history[2]["completions/nrows"] == 8
    (table_file,) = log.parent.glob("files/media/table/completions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["update", "prompt", "completion"]
    assert {row[0] for row in table["data"]} == {2}
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() in log.name


def test_failing_sink_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    from mlxgrpo.sinks import tensorboard

    real = tensorboard.EventFileWriter.add_scalars

    def disk_full_at_update_2(self, step, values):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, step, values)

    monkeypatch.setattr(tensorboard.EventFileWriter, "add_scalars", disk_full_at_update_2)
    config = resolved(tmp_path, "run.max_steps=3", "logging.tensorboard=true")
    warnings: list[str] = []
    (sink,) = build_sinks(config.config, warn=warnings.append)
    summary = train(config, [sink])
    assert summary["updates"] == 3 and not summary["interrupted"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("TensorBoard logging stopped (OSError: [Errno 28] No space")
    assert "logging.tensorboard = false" in warnings[0]
    assert sink.sink.writer._fh.closed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("reward")] == [1]  # written before the failure only


def test_missing_wandb_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    assert build_sinks(resolved(tmp_path).config, warn=pytest.fail) == []  # off by default
    warnings: list[str] = []
    sinks = build_sinks(resolved(tmp_path, "logging.wandb_project=p").config, warnings.append)
    assert sinks == []
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "wandb cannot be imported" in warnings[0]
    assert "pip install 'mlxgrpo[wandb]'" in warnings[0]
