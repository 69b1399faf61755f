"""Data-parallel GRPO over MLX's distributed group (docs/architecture.md §7).

`mlx.launch -n N -- mlxgrpo train ...` starts N ranks; each takes a contiguous share of every
update's prompts, rolls out and scores it locally, and the ranks meet only here:

- per-completion figures (rewards, lengths, ...) are gathered, so advantages with batch scaling
  and every logged metric are computed from the same global numbers as one process would;
- loss normalisers are summed, so each rank's loss is its share of the one-process loss;
- gradients are summed (not averaged: the normalisers are global already) in buckets.

Launched alone, `init()` gives a size-1 group and every function here returns its input
unchanged without touching MLX's collectives, so a plain run is exactly what it was.
A peer that dies makes MLX's ring backend fail the pending collective ("connection to a peer
was lost"); that surfaces as a one-line :class:`DistributedError` on the surviving ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from mlxgrpo import parsing
from mlxgrpo.errors import ConfigError, MlxgrpoError

T = TypeVar("T")

# Gradients are reduced in buckets of about this many bytes: one collective per tiny LoRA
# matrix costs more in latency than the bytes it moves.
BUCKET_BYTES = 32 * 1024 * 1024
TEXT_BYTES = 4096  # longest path rank 0 can broadcast (run directory, checkpoint)
# Every gathered row ends with this plus its rank, and every summed bucket with a 1 per rank:
# when a peer dies, the ring backend may fail a collective without raising and hand back
# stale or zero bytes, which these checks turn into a DistributedError.
ROW_MARK = 917_503.0


class DistributedError(MlxgrpoError):
    """A collective failed: another rank died or the connection between ranks broke."""


class Dist:
    """This process's place in the group; size 1 when not launched."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.comm_seconds = 0.0  # spent in collectives: moving data and waiting for peers

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Wait for a collective under the watchdog, timed into comm_seconds; the ring
        backend's failure becomes one line."""
        started = time.perf_counter()
        _WATCHDOG.arm(what)
        try:
            yield
        except RuntimeError as exc:
            raise DistributedError(
                f"could not {what} across ranks: {exc} (another rank stopped or crashed)",
                hint="look at the other ranks' output for the first error",
            ) from None
        finally:
            _WATCHDOG.disarm()
            self.comm_seconds += time.perf_counter() - started

    def _broken(self, what: str) -> DistributedError:
        return DistributedError(
            f"could not {what} across ranks: the result arrived incomplete "
            "(another rank stopped or crashed)",
            hint="look at the other ranks' output for the first error",
        )

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- sharding -------------------------------------------------------------------------

    def check_batch_size(self, batch_size: int) -> None:
        """Every rank gets the same number of prompts, or groups could not stay whole."""
        if batch_size % self.size:
            raise ConfigError(
                f"optim.batch_size = {batch_size} does not divide by the {self.size} ranks",
                hint=f"use a multiple of {self.size}",
            )

    def shard(self, batch: Sequence[T]) -> tuple[list[T], int]:
        """(this rank's contiguous share of ``batch``, global index of its first prompt)."""
        return shard(batch, self.rank, self.size)

    def split(self, items: Sequence[T]) -> tuple[list[T], int]:
        """Like :meth:`shard` for any length: the first ``len % size`` ranks take one more
        (eval prompts, which have no groups to keep whole); a share may be empty."""
        base, extra = divmod(len(items), self.size)
        begin = self.rank * base + min(self.rank, extra)
        end = begin + base + (self.rank < extra)
        return list(items[begin:end]), begin

    # --- collectives ----------------------------------------------------------------------

    def gather_floats(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (equal lengths), in rank order; exact float64."""
        local = np.asarray(values, dtype=np.float64)
        if not self.active:
            return [local.tolist()]
        import mlx.core as mx

        marked = np.append(local, ROW_MARK + self.rank)
        # float64 travels as int32 pairs: bit-exact, whatever the backend does with doubles.
        words = mx.array(marked.view(np.int32))
        with self._collective("gather metrics"):
            out = np.array(mx.distributed.all_gather(words, group=self.group))
        rows = out.view(np.float64).reshape(self.size, -1)
        if not np.array_equal(rows[:, -1], ROW_MARK + np.arange(self.size)):
            raise self._broken("gather metrics")
        return [row[:-1].tolist() for row in rows]

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks, added in rank order (the same bits on every rank)."""
        parts = self.gather_floats(values)
        return [float(sum(column)) for column in zip(*parts, strict=True)] if parts else []

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-ready ``obj``, in rank order (completion records, reward tables)."""
        if not self.active:
            return [obj]
        import mlx.core as mx

        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        lengths = [int(part[0]) for part in self.gather_floats([data.size])]
        padded = np.zeros(max(lengths), dtype=np.uint8)
        padded[: data.size] = data
        with self._collective("gather records"):
            out = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group))
        rows = out.reshape(self.size, -1)
        try:
            return [
                parsing.json_text(bytes(row[:n]), "a gathered record")
                for row, n in zip(rows, lengths, strict=True)
            ]
        except parsing.ParseError:  # undecodable bytes: the gather failed without raising
            raise self._broken("gather records") from None

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (stop requests)."""
        return any(v for v in self.sum_floats([1.0 if flag else 0.0]))

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank."""
        if not self.active:
            return text
        data = text.encode() if self.is_main else b""
        if len(data) > TEXT_BYTES:
            raise ConfigError(f"path longer than {TEXT_BYTES} bytes: {text[:80]}...")
        codes = np.zeros(TEXT_BYTES + 1, dtype=np.float64)
        codes[0] = len(data)
        codes[1 : len(data) + 1] = np.frombuffer(data, dtype=np.uint8)
        summed = np.asarray(self.sum_floats(codes.tolist()))  # only rank 0 is non-zero
        return bytes(summed[1 : int(summed[0]) + 1].astype(np.uint8)).decode()

    def sum_gradients(self, grads: Any) -> Any:
        """The gradient tree summed over ranks (evaluated), in buckets of ~BUCKET_BYTES."""
        if not self.active:
            return grads
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        flat = tree_flatten(grads)
        mx.eval([v for _, v in flat])  # the backward pass is not communication time
        reduced: list[Any] = [None] * len(flat)
        counts = []  # each bucket's trailing 1, summed: the number of ranks that took part
        for bucket in buckets([(v.dtype, v.nbytes) for _, v in flat], BUCKET_BYTES):
            arrays = [flat[i][1] for i in bucket]
            one = mx.ones((1,), dtype=arrays[0].dtype)
            joined = mx.concatenate([a.reshape(-1) for a in arrays] + [one])
            total = mx.distributed.all_sum(joined, group=self.group)
            offsets = np.cumsum([a.size for a in arrays]).tolist()
            parts = mx.split(total, offsets)
            for i, part, a in zip(bucket, parts[:-1], arrays, strict=True):
                reduced[i] = part.reshape(a.shape)
            counts.append(parts[-1])
        with self._collective("sum gradients"):
            mx.eval(reduced, counts)
        ranks = self.group.size()
        if any(c.item() != ranks for c in counts):
            raise self._broken("sum gradients")
        return tree_unflatten([(k, r) for (k, _), r in zip(flat, reduced, strict=True)])


def shard(batch: Sequence[T], rank: int, size: int) -> tuple[list[T], int]:
    """Rank ``rank``'s contiguous share of ``batch`` and the global index of its first item."""
    if len(batch) % size:
        raise ConfigError(f"{len(batch)} prompts do not divide by the {size} ranks")
    share = len(batch) // size
    return list(batch[rank * share : (rank + 1) * share]), rank * share


def buckets(items: Sequence[tuple[Any, int]], limit: int) -> list[list[int]]:
    """Indices of ``(dtype, nbytes)`` items grouped into runs of one dtype and <= ``limit``
    bytes (an item larger than ``limit`` gets a bucket of its own); order is kept."""
    out: list[list[int]] = []
    current: list[int] = []
    size, dtype = 0, None
    for i, (kind, nbytes) in enumerate(items):
        if current and (kind != dtype or size + nbytes > limit):
            out.append(current)
            current, size = [], 0
        current.append(i)
        size, dtype = size + nbytes, kind
    if current:
        out.append(current)
    return out


TIMEOUT_ENV = "MLXGRPO_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0  # longer than any rank should wait for a slower peer's update


class _Watchdog:
    """Ends the process when one collective waits longer than the timeout: a peer that died
    may leave MLX's ring backend waiting forever instead of failing the collective."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: tuple[str, float] | None = None
        self.thread: threading.Thread | None = None

    def timeout(self) -> float:
        try:
            return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            return DEFAULT_TIMEOUT_S

    def arm(self, what: str) -> None:
        with self.lock:
            self.pending = (what, time.monotonic() + self.timeout())
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, daemon=True)
                self.thread.start()

    def disarm(self) -> None:
        with self.lock:
            self.pending = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self.lock:
                pending = self.pending
            if pending is not None and time.monotonic() > pending[1]:
                sys.stderr.write(
                    f"error: no answer from the other ranks for {self.timeout():g} s while "
                    f"trying to {pending[0]}; another rank died or hangs "
                    f"(${TIMEOUT_ENV} sets the limit)\n"
                )
                sys.stderr.flush()
                os._exit(1)  # the main thread is stuck inside MLX; nothing else can end it


_WATCHDOG = _Watchdog()


_CURRENT: Dist | None = None


def init() -> Dist:
    """The process's group, found once (size 1 unless started by `mlx.launch`)."""
    global _CURRENT
    if _CURRENT is None:
        import mlx.core as mx

        try:
            group = mx.distributed.init()
        except RuntimeError as exc:  # a bad MLX_HOSTFILE, an unreachable peer
            raise _join_error(exc) from None
        _CURRENT = Dist(group if group.size() > 1 else None)
    return _CURRENT


def _join_error(exc: Exception) -> ConfigError:
    hostfile = os.environ.get("MLX_HOSTFILE", "")
    if hostfile and not os.path.isfile(hostfile):
        problem = f"MLX_HOSTFILE '{hostfile}' does not exist"
    else:
        problem = f"could not join the group of ranks: {exc}"
    return ConfigError(
        problem,
        hint="start the ranks with mlx.launch or mlxgrpo launch, or unset MLX_HOSTFILE and "
        "MLX_RANK to run in one process",
    )


def reject_unsupported(cfg: Any, dist: Dist) -> None:
    """Options whose per-update decisions would need more than the shared figures above."""
    if not dist.active:
        return
    dist.check_batch_size(cfg.optim.batch_size)
    if cfg.algorithm.type != "grpo":
        raise ConfigError(
            f"algorithm.type = {cfg.algorithm.type} is not supported with several ranks yet",
            hint="train in one process",
        )
    if cfg.algorithm.dynamic_sampling:
        raise ConfigError(
            "algorithm.dynamic_sampling is not supported with several ranks yet",
            hint="turn it off, or train in one process",
        )
    if cfg.algorithm.top_entropy_quantile < 1.0:
        raise ConfigError(
            "algorithm.top_entropy_quantile < 1 is not supported with several ranks yet",
            hint="set it to 1.0, or train in one process",
        )


# --- the global view of one update --------------------------------------------------------


@dataclass
class Rows:
    """Per-completion figures of the whole update (all ranks, global order), and where this
    rank's rows start in them."""

    rewards: list[float]
    truncated: list[bool]
    lengths: list[int]
    scored: Any  # RewardResult over all rows
    offset: int = 0


def global_rows(dist: Dist, sample: Any) -> Rows:
    """``sample``'s (a ScoredRollout) rows joined over ranks; the sample itself when alone."""
    rollout, scored = sample.rollout, sample.scored
    local = Rows(
        list(sample.rewards),
        list(rollout.truncated),
        [len(ids) for ids in rollout.completion_ids],
        scored,
    )
    if not dist.active:
        return local
    from mlxgrpo.rewards.reward_set import RewardFailure, RewardResult

    parts = dist.gather_json(
        {
            "rewards": local.rewards,
            "truncated": local.truncated,
            "lengths": local.lengths,
            "totals": list(scored.totals),
            "values": scored.values,
            "errors": {name: f.count for name, f in scored.errors.items()},
        }
    )
    errors = {}
    for name in scored.names:
        count = sum(p["errors"].get(name, 0) for p in parts)
        if count:
            mine = scored.errors.get(name)
            other = "failed on another rank"
            errors[name] = RewardFailure(
                count, mine.first_message if mine else other, mine.last_message if mine else other
            )
    joined = RewardResult(
        names=list(scored.names),
        weights=list(scored.weights),
        totals=[t for p in parts for t in p["totals"]],
        values={n: [v for p in parts for v in p["values"][n]] for n in scored.names},
        errors=errors,
    )
    return Rows(
        [r for p in parts for r in p["rewards"]],
        [bool(t) for p in parts for t in p["truncated"]],
        [int(n) for p in parts for n in p["lengths"]],
        joined,
        offset=dist.rank * len(local.rewards),
    )


def local_part(
    rows: Rows, count: int, advantages: list[float], keep: list[int]
) -> tuple[list[float], list[int]]:
    """This rank's advantages and kept indices (local numbering) out of the global ones."""
    lo, hi = rows.offset, rows.offset + count
    if (lo, hi) == (0, len(advantages)):
        return advantages, keep
    return advantages[lo:hi], [i - lo for i in keep if lo <= i < hi]


def global_norm(dist: Dist, norm: Any) -> Any:
    """The update's loss normalisers counted over every rank's micro-batches."""
    if not dist.active:
        return norm
    sequences, tokens, microbatches = dist.sum_floats(
        [norm.num_sequences, norm.num_tokens, norm.num_microbatches]
    )
    return replace(
        norm,
        num_sequences=int(sequences),
        num_tokens=int(tokens),
        num_microbatches=int(microbatches),
    )


def global_rates(dist: Dist, pairs: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(tokens, seconds) per phase -> (tokens per second, seconds) of all ranks together:
    tokens summed, seconds those of the slowest rank (the others wait for it)."""
    parts = dist.gather_floats([v for pair in pairs for v in pair])
    out = []
    for k in range(len(pairs)):
        tokens = sum(p[2 * k] for p in parts)
        seconds = max(p[2 * k + 1] for p in parts)
        out.append((tokens / seconds if seconds > 0 else 0.0, seconds))
    return out


def common_failures(dist: Dist, failures: dict[str, str]) -> dict[str, str]:
    """Reward functions that failed on every call on every rank (the guards' streaks must
    agree, or one rank would stop alone)."""
    if not dist.active:
        return failures
    names = set.intersection(*(set(p) for p in dist.gather_json(sorted(failures))))
    return {n: failures[n] for n in sorted(names)}


def join_records(dist: Dist, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's completion records in global order (rank 0 logs them)."""
    if not dist.active:
        return records
    return [r for part in dist.gather_json(records) for r in part]


WEIGHT_SUMS_ENV = "MLXGRPO_TEST_WEIGHT_SUMS"


def record_weights(dist: Dist, model: Any, update: int) -> None:
    """Test hook: with $MLXGRPO_TEST_WEIGHT_SUMS = DIR, each rank appends a hash of its trainable
    weights after every update to DIR/rank-R.txt, so a test can see the ranks stay identical."""
    import os

    folder = os.environ.get(WEIGHT_SUMS_ENV)
    if not folder:
        return
    import hashlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.trainable_parameters())):
        digest.update(name.encode())
        digest.update(np.array(value.astype(mx.float32)).tobytes())
    with open(os.path.join(folder, f"rank-{dist.rank}.txt"), "a") as out:
        out.write(f"{update} {digest.hexdigest()}\n")
