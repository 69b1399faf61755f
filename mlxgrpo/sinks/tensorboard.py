"""TensorBoard event files without TensorFlow or torch: TFRecord framing + a hand-encoded Event.

Why appending is safe (no temporary name and rename): every record carries its own length and
CRC, so a reader takes all complete records and stops at a partly written tail, which is what
TensorBoard expects of a live run. Each update's record is flushed, so a crash loses at most
that record, and a live TensorBoard sees the curves while training runs (a rename at close would
hide them until the end).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.sinks.names import scalars


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masking, so CRCs of data that itself holds CRCs stay well distributed."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    values: dict[str, float] | None = None,
) -> bytes:
    """tensorflow.Event{wall_time=1, step=2, file_version=3, summary=5{value=1{tag=1,
    simple_value=2}}} in protobuf wire format."""
    event = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        event += _length_delimited(3, file_version.encode())
    if values:
        value = (  # Summary.Value{tag, simple_value} per scalar
            _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", v)
            for tag, v in values.items()
        )
        summary = b"".join(_length_delimited(1, v) for v in value)
        event += _length_delimited(5, summary)
    return event


def frame_record(data: bytes) -> bytes:
    """TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventFileWriter:
    """One events.out.tfevents.* file per training session in `directory`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # A resumed run adds a file next to the first; TensorBoard reads them in name order.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = directory / name
        self._fh = self.path.open("ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._fh.write(frame_record(event))
        self._fh.flush()

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._write(encode_event(time.time(), step, values=values))

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class TensorBoardSink(Callback):
    """Scalars of every update and evaluation, at step = update, in <run>/tensorboard/."""

    def __init__(self) -> None:
        self.writer: EventFileWriter | None = None

    def on_start(self, info: dict[str, Any]) -> None:
        self.writer = EventFileWriter(Path(info["run_dir"]) / "tensorboard")

    def on_update(self, update: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_scalars(update, scalars(metrics))

    def on_eval(self, update: int, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_scalars(update, scalars(metrics, prefix="eval/"))

    def on_end(self, summary: dict[str, Any]) -> None:
        self.abort()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
