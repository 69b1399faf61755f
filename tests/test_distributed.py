"""Data-parallel training: pure parts in-process, the rest with 2 real ranks.

The rules tested here are in docs/architecture.md §7.

Multi-rank runs go through `mlx.launch --backend ring` on loopback, or start the ranks directly
(MLX_RANK + MLX_HOSTFILE) where a test must signal or kill one rank by its process id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

from mlxgrpo import distributed
from mlxgrpo.distributed import Dist
from mlxgrpo.errors import ConfigError
from mlxgrpo.rewards.reward_set import RewardFailure, RewardResult

REPO = Path(__file__).resolve().parent.parent
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
# Learns visibly within a few updates; a small learning rate keeps Adam from magnifying the
# float rounding that differs between one and two ranks (see test_two_ranks_match_one).
ARGS = [
    "-m",
    "builtin:tiny-qwen2",
    "--set",
    "data.dataset=synthetic:repeat?letters=x",
    "--set",
    "finetune.lora_layers=-1",
    "--set",
    "rollout.num_generations=8",
    "--set",
    "rollout.max_new_tokens=12",
    "--set",
    "rollout.temperature=1.0",
    "--set",
    "optim.batch_size=4",
    "--set",
    "optim.gradient_accumulation_steps=2",
    "--set",
    "optim.lr_scheduler_type=constant",
    "--set",
    "optim.warmup_ratio=0",
    "--set",
    "checkpoint.save_steps=0",
    "--run-name",
    "r",
]


# --- pure parts ---------------------------------------------------------------------------


def test_shard_is_contiguous_and_disjoint():
    batch = list(range(8))
    parts = [distributed.shard(batch, r, 4) for r in range(4)]
    assert [p for p, _ in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [offset for _, offset in parts] == [0, 2, 4, 6]
    with pytest.raises(ConfigError):
        distributed.shard(batch, 0, 3)


def test_batch_size_must_divide_by_ranks():
    dist = Dist()
    dist.size = 2  # only the arithmetic is used
    dist.check_batch_size(4)
    with pytest.raises(ConfigError, match=r"optim.batch_size = 3 does not divide by the 2 ranks"):
        dist.check_batch_size(3)


def test_buckets_keep_order_split_by_dtype_and_size():
    f32, f16 = mx.float32, mx.float16
    items = [(f32, 10), (f32, 10), (f32, 10), (f16, 4), (f16, 50), (f32, 1)]
    assert distributed.buckets(items, 25) == [[0, 1], [2], [3], [4], [5]]
    assert distributed.buckets([], 25) == []


def test_single_process_collectives_are_identities():
    dist = Dist()
    assert not dist.active and dist.is_main
    grads = {"a": mx.ones((2, 3)), "b": [mx.zeros((4,))]}
    assert dist.sum_gradients(grads) is grads
    assert dist.gather_floats([1.5, 2.0]) == [[1.5, 2.0]]
    assert dist.sum_floats([1.5, 2.0]) == [1.5, 2.0]
    assert dist.any(True) and not dist.any(False)
    assert dist.broadcast_text("/x/y") == "/x/y"
    assert dist.gather_json({"k": [1, None]}) == [{"k": [1, None]}]
    assert distributed.common_failures(dist, {"f": "boom"}) == {"f": "boom"}


def test_bucketed_sum_round_trips_the_tree(monkeypatch):
    """The bucket path (flatten, concat, all_sum, split, reshape) over a real size-1 group,
    whose all_sum is the identity: every array comes back in its place, shape and dtype."""
    monkeypatch.setattr(distributed, "BUCKET_BYTES", 40)  # several buckets
    dist = Dist(mx.distributed.init())
    dist.size = 2  # take the multi-rank path; the group itself has one member
    grads = {
        "a": mx.arange(6, dtype=mx.float32).reshape(2, 3),
        "b": [mx.ones((4,), dtype=mx.float16), mx.full((3, 1), 2.5)],
        "c": mx.arange(20, dtype=mx.float32),
    }
    out = dist.sum_gradients(grads)
    from mlx.utils import tree_flatten

    for (k1, v1), (k2, v2) in zip(tree_flatten(grads), tree_flatten(out), strict=True):
        assert k1 == k2 and v1.shape == v2.shape and v1.dtype == v2.dtype
        assert mx.array_equal(v1, v2).item()


class _FakeGroup:
    def __init__(self, size: int) -> None:
        self._size = size

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return self._size


def _silently_failing(monkeypatch, fill: int) -> Dist:
    """Rank 0 of two whose collectives return ``fill`` bytes without raising, as the ring
    backend may after a peer died."""

    def all_gather(x, group=None):
        return mx.full((2 * x.shape[0], *x.shape[1:]), fill, dtype=x.dtype)

    def all_sum(x, group=None):
        return mx.full(x.shape, fill, dtype=x.dtype)

    monkeypatch.setattr(mx.distributed, "all_gather", all_gather)
    monkeypatch.setattr(mx.distributed, "all_sum", all_sum)
    return Dist(_FakeGroup(2))


@pytest.mark.parametrize("fill", [0, 7])
def test_a_collective_that_fails_silently_is_a_distributed_error(monkeypatch, fill):
    dist = _silently_failing(monkeypatch, fill)
    calls = [
        lambda: dist.gather_floats([1.5, 2.0]),
        lambda: dist.gather_json({"k": 1}),
        lambda: dist.broadcast_text("/run"),
        lambda: dist.sum_gradients({"w": mx.ones((3,))}),
    ]
    for call in calls:
        with pytest.raises(distributed.DistributedError, match="arrived incomplete"):
            call()


def test_gathered_rows_are_checked_per_rank(monkeypatch):
    """A gather whose rows are whole but come from the wrong ranks is refused too."""

    def all_gather(x, group=None):
        return mx.concatenate([x, x])  # rank 0's row twice: rank 1's mark is missing

    monkeypatch.setattr(mx.distributed, "all_gather", all_gather)
    with pytest.raises(distributed.DistributedError, match="gather metrics"):
        Dist(_FakeGroup(2)).gather_floats([3.0])


def test_gathered_rows_pass_the_check_when_whole(monkeypatch):
    def all_gather(x, group=None):
        words = np.array(x).view(np.float64).copy()
        other = words.copy()
        other[-1] += 1  # rank 1's mark
        other[:-1] *= 10
        return mx.array(np.concatenate([words, other]).view(np.int32))

    monkeypatch.setattr(mx.distributed, "all_gather", all_gather)
    assert Dist(_FakeGroup(2)).gather_floats([3.0, -1.25]) == [[3.0, -1.25], [30.0, -12.5]]


class _TwoRanks(Dist):
    """Rank ``rank`` of a pretend 2-rank group whose other rank's payloads are given."""

    def __init__(self, rank: int, others: list) -> None:
        super().__init__()
        self.rank, self.size, self._others = rank, 2, list(others)

    def gather_json(self, obj):
        other = self._others.pop(0)
        return [obj, other] if self.rank == 0 else [other, obj]


def _sample(rewards, truncated, lengths, values, errors=None):
    scored = RewardResult(
        names=["a"], weights=[1.0], totals=list(rewards), values={"a": values}, errors=errors or {}
    )
    rollout = SimpleNamespace(truncated=truncated, completion_ids=[[0] * n for n in lengths])
    return SimpleNamespace(rollout=rollout, scored=scored, rewards=list(rewards))


def test_global_rows_join_ranks_in_order():
    """Rank 1's view of the update equals the one-process view; its rows start at 2."""
    whole = _sample([1.0, 0.0, 2.0, 0.5], [False, True, False, False], [3, 5, 2, 7],
                    [1.0, None, 2.0, 0.5])  # fmt: skip
    first = _sample([1.0, 0.0], [False, True], [3, 5], [1.0, None])
    second = _sample([2.0, 0.5], [False, False], [2, 7], [2.0, 0.5],
                     {"a": RewardFailure(2, "x", "y")})  # fmt: skip
    payload = {
        "rewards": first.rewards,
        "truncated": first.rollout.truncated,
        "lengths": [3, 5],
        "totals": first.scored.totals,
        "values": first.scored.values,
        "errors": {"a": 1},
    }
    rows = distributed.global_rows(_TwoRanks(1, [payload]), second)
    assert rows.rewards == whole.rewards and rows.truncated == whole.rollout.truncated
    assert rows.lengths == [3, 5, 2, 7] and rows.offset == 2
    assert rows.scored.values == whole.scored.values and rows.scored.totals == whole.rewards
    assert rows.scored.errors["a"].count == 3  # both ranks' failures
    assert rows.scored.mean("a") == whole.scored.mean("a")
    adv, keep = distributed.local_part(rows, 2, [0.1, 0.2, 0.3, 0.4], [0, 2, 3])
    assert adv == [0.3, 0.4] and keep == [0, 1]


def test_global_norm_and_failures_sum_over_ranks():
    from mlxgrpo.engine.loss.grpo import LossNorm

    class Sums(_TwoRanks):
        def sum_floats(self, values):
            return [v + o for v, o in zip(values, self._others.pop(0), strict=True)]

    norm = distributed.global_norm(Sums(0, [[16, 40, 2]]), LossNorm(16, 50, 2, 12))
    assert norm == LossNorm(32, 90, 4, 12)
    failures = {"f": "boom", "g": "bang"}
    assert distributed.common_failures(_TwoRanks(0, [["g"]]), failures) == {"g": "bang"}


def test_rates_sum_tokens_over_the_slowest_rank():
    class Floats(_TwoRanks):
        def gather_floats(self, values):
            return [list(values), self._others.pop(0)]

    rates = distributed.global_rates(
        Floats(0, [[300.0, 3.0, 10.0, 0.5]]), [(100.0, 2.0), (50.0, 1.0)]
    )
    assert rates == [(400 / 3, 3.0), (60.0, 1.0)]
    assert distributed.global_rates(Dist(), [(8.0, 0.0)]) == [(0.0, 0.0)]


# --- two real ranks -----------------------------------------------------------------------


def _env(**extra) -> dict:
    # Build the model into the cache first: a run that builds it draws from MLX's random
    # generator on the way and so differs from runs that load it (not a distributed effect).
    from mlxgrpo.models.builtin import resolve_model_path

    resolve_model_path("builtin:tiny-qwen2")
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _launch(out: Path, *args: str, ranks: int = 2, env=None, timeout=60):
    """`mlx.launch -n ranks -- python -m mlxgrpo train ...`, or the plain command for 1."""
    cmd = [sys.executable, "-m", "mlxgrpo", "train", *ARGS, "-o", str(out), *args]
    if ranks > 1:
        cmd = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--", *cmd]
    return subprocess.run(
        cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_ranks(tmp: Path, out: Path, *args: str, env_extra=None) -> list[subprocess.Popen]:
    """Two ranks started by hand (no launcher), so a test can signal one of them."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    cmd = [sys.executable, "-m", "mlxgrpo", "train", *ARGS, "-o", str(out), *args]
    return [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), **(env_extra or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]


def _wait_for_updates(metrics: Path, count: int, procs, limit: float = 40.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    for p in procs:
        p.kill()
    pytest.fail(f"no {count} updates logged in {metrics}")


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"train"' in line]


def _adapters(run: Path) -> dict:
    return mx.load(str(run / "final" / "adapters.safetensors"))


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    """Same config and seed, and each rank's micro-batches are the one process's (2 ranks x 1
    vs 1 x 2 accumulation steps): bit-identical adapters and metrics; the two ranks hold
    identical weights after every update; rank 1 writes nothing. Replaying the rollout's
    activations is off here: they come from decode batches of 8 rows on a rank and 16 in one
    process, equal only to rounding (the next test covers layouts that differ so)."""
    sums = tmp_path / "sums"
    sums.mkdir()
    steps = ["--set", "optim.learning_rate=1e-2", "--max-steps", "3"]
    steps += ["--set", "finetune.reuse_rollout_activations=false"]
    two = _launch(
        tmp_path / "two",
        *steps,
        "--set",
        "optim.gradient_accumulation_steps=1",
        env=_env(MLXGRPO_TEST_WEIGHT_SUMS=str(sums)),
    )
    assert two.returncode == 0 and "WARN" not in two.stderr, two.stderr[-2000:]
    one = _launch(tmp_path / "one", *steps, ranks=1)
    assert one.returncode == 0, one.stderr[-2000:]
    r1, r2 = _train_records(tmp_path / "one" / "r"), _train_records(tmp_path / "two" / "r")
    assert len(r2) == 3  # rank 0 alone logged
    keys = ("reward_mean", "reward_std", "completion_length_mean", "advantage_std", "grad_norm")
    for key in (*keys, "entropy", "policy_loss", "micro_batches"):
        assert [r[key] for r in r2] == [r[key] for r in r1], key
    a1, a2 = _adapters(tmp_path / "one" / "r"), _adapters(tmp_path / "two" / "r")
    assert a1.keys() == a2.keys() and all(mx.array_equal(a1[k], a2[k]).item() for k in a1)
    assert r2[-1]["reward_mean"] > r2[0]["reward_mean"]  # it did learn something
    assert all(0 < r["comm_seconds"] < r["step_seconds"] for r in r2)
    assert "comm_seconds" not in r1[0]
    rank0 = (sums / "rank-0.txt").read_text().splitlines()
    assert len(rank0) == 3 and rank0 == (sums / "rank-1.txt").read_text().splitlines()
    # Rank 1 logged nothing (no doubled records above) and wrote no file rank 0 would not.
    assert _listing(tmp_path / "two") == _listing(tmp_path / "one")


@pytest.mark.slow
def test_two_ranks_match_one_with_four_steps_per_rollout(tmp_path):
    """One rollout of 4 x 4 prompts feeds 4 optimizer steps. The groups of a step are every
    fourth of the rollout's, so each rank's half holds half of every step's groups and its one
    micro-batch is one of the single process's two: bit-identical metrics and adapters."""
    steps = ["--set", "optim.learning_rate=1e-2", "--max-steps", "8"]
    steps += ["--set", "finetune.reuse_rollout_activations=false"]
    steps += ["--set", "optim.steps_per_generation=4"]
    two = _launch(tmp_path / "two", *steps, "--set", "optim.gradient_accumulation_steps=1")
    assert two.returncode == 0 and "WARN" not in two.stderr, two.stderr[-2000:]
    one = _launch(tmp_path / "one", *steps, ranks=1)
    assert one.returncode == 0, one.stderr[-2000:]
    r1, r2 = _train_records(tmp_path / "one" / "r"), _train_records(tmp_path / "two" / "r")
    assert [r["generation_step"] for r in r2] == [0, 1, 2, 3] * 2
    keys = ("reward_mean", "advantage_std", "grad_norm", "policy_loss", "ratio", "entropy")
    for key in (*keys, "micro_batches"):
        assert [r[key] for r in r2] == [r[key] for r in r1], key
    a1, a2 = _adapters(tmp_path / "one" / "r"), _adapters(tmp_path / "two" / "r")
    assert a1.keys() == a2.keys() and all(mx.array_equal(a1[k], a2[k]).item() for k in a1)


@pytest.mark.slow
def test_other_micro_batch_layout_matches_to_rounding(tmp_path):
    """2 ranks x 2 accumulation steps vs 1 x 2: other matmul shapes and sum order, so equal
    only to float rounding (a small learning rate keeps Adam from magnifying it)."""
    steps = ["--set", "optim.learning_rate=1e-4", "--max-steps", "3"]
    two = _launch(tmp_path / "two", *steps)
    assert two.returncode == 0, two.stderr[-2000:]
    one = _launch(tmp_path / "one", *steps, ranks=1)
    assert one.returncode == 0, one.stderr[-2000:]
    r1, r2 = _train_records(tmp_path / "one" / "r"), _train_records(tmp_path / "two" / "r")
    assert [r["reward_mean"] for r in r2] == [r["reward_mean"] for r in r1]
    tokens = 4 * 8 * 12  # the gradient sums over batch_size x num_generations x max_new_tokens
    norms = [[r["grad_norm"] for r in records] for records in (r2, r1)]
    assert_close(*norms, terms=tokens, what="grad_norm")
    a1, a2 = _adapters(tmp_path / "one" / "r"), _adapters(tmp_path / "two" / "r")
    _assert_adapters_close(a1, a2, tokens)


def _assert_adapters_close(a1: dict, a2: dict, tokens: int) -> None:
    """Equal up to the rounding of gradients summed over an update's ``tokens`` in another
    order. Adam moves every weight by about the learning rate, whatever its gradient's size,
    so that rounding shows on the scale of the largest weights, not on each tensor's own."""
    assert a1.keys() == a2.keys()
    scale = max(float(mx.max(mx.abs(a1[k]))) for k in a1)
    for k in a1:
        assert_close(a2[k], a1[k], terms=tokens, scale=scale, what=k)


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.slow
def test_rank_that_keeps_nothing_still_matches_one(tmp_path):
    """One prompt per rank with zero-std groups filtered: some updates leave a rank with no
    completion to train; it joins the sums with zero gradients and the result still matches."""
    sets = ["--set", "optim.batch_size=2", "--set", "algorithm.filter_zero_std_groups=true"]
    sets += ["--set", "optim.learning_rate=1e-4", "--max-steps", "6"]
    two = _launch(tmp_path / "two", *sets, "--set", "optim.gradient_accumulation_steps=1")
    assert two.returncode == 0 and "WARN" not in two.stderr, two.stderr[-2000:]
    one = _launch(tmp_path / "one", *sets, ranks=1)
    assert one.returncode == 0, one.stderr[-2000:]
    r1, r2 = _train_records(tmp_path / "one" / "r"), _train_records(tmp_path / "two" / "r")
    assert 0.5 in [r["trained_share"] for r in r2]  # the case under test did happen
    for key in ("reward_mean", "trained_share"):
        assert [r[key] for r in r2] == [r[key] for r in r1], key
    a1, a2 = _adapters(tmp_path / "one" / "r"), _adapters(tmp_path / "two" / "r")
    _assert_adapters_close(a1, a2, tokens=2 * 8 * 12)  # batch_size 2 x 8 generations x 12


@pytest.mark.slow
def test_stop_on_one_rank_then_resume_equals_uninterrupted(tmp_path):
    """SIGINT to rank 1 alone stops both ranks after the same update with one checkpoint;
    resuming ends with exactly the weights and rewards of an uninterrupted run."""
    steps = ["--set", "optim.learning_rate=1e-2", "--max-steps", "12"]
    straight = _launch(tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "cut"
    procs = _start_ranks(tmp_path, out, *steps, "--resume", "auto")
    _wait_for_updates(out / "r" / "metrics.jsonl", 1, procs)
    procs[1].send_signal(signal.SIGINT)
    try:
        codes = [p.wait(timeout=40) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [130, 130], [p.stderr.read()[-1500:] for p in procs]
    checkpoints = sorted((out / "r" / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < 12 and not (out / "r" / "final").exists()
    resumed = _launch(out, *steps, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _adapters(tmp_path / "straight" / "r"), _adapters(out / "r")
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    rewards = [r["reward_mean"] for r in _train_records(out / "r")]
    assert rewards == [r["reward_mean"] for r in _train_records(tmp_path / "straight" / "r")]


@pytest.mark.slow
def test_batch_size_not_divisible_fails_in_one_line(tmp_path):
    procs = _start_ranks(tmp_path, tmp_path / "o", "--set", "optim.batch_size=3")
    try:
        results = [p.communicate(timeout=40) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 2, err
        assert "optim.batch_size = 3 does not divide by the 2 ranks" in err
        assert "Traceback" not in err
    # mlx.launch itself exits 0 whatever its ranks do; it must not hang and says the code.
    launched = _launch(tmp_path / "o2", "--set", "optim.batch_size=3", timeout=40)
    assert "does not divide by the 2 ranks" in launched.stderr
    assert "exited with code 2" in launched.stderr and "Traceback" not in launched.stderr


@pytest.mark.slow
def test_killed_rank_stops_the_other_with_a_clear_error(tmp_path):
    out = tmp_path / "o"
    # The ring backend may fail the pending collective or wait forever; the watchdog bounds it.
    procs = _start_ranks(
        tmp_path, out, "--set", "optim.learning_rate=1e-2", "--max-steps", "200",
        env_extra={"MLXGRPO_DIST_TIMEOUT": "5"},
    )  # fmt: skip
    _wait_for_updates(out / "r" / "metrics.jsonl", 1, procs)
    procs[1].kill()
    started = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=30)
    finally:
        for p in procs:
            p.kill()  # no stray rank when the bound is missed
    assert time.monotonic() - started < 30
    assert procs[0].returncode == 1, err
    assert "across ranks" in err or "no answer from the other ranks" in err, err[-1000:]
    assert "Traceback" not in err


def test_split_gives_every_item_once_in_order():
    for count in (0, 1, 5, 8):
        parts = [Dist() for _ in range(3)]
        for rank, dist in enumerate(parts):
            dist.rank, dist.size = rank, 3
        shares = [d.split(list(range(count))) for d in parts]
        assert [i for share, _ in shares for i in share] == list(range(count))
        assert [offset for _, offset in shares] == [
            sum(len(s) for s, _ in shares[:r]) for r in range(3)
        ]
        assert max(len(s) for s, _ in shares) - min(len(s) for s, _ in shares) <= 1


class _Recorder(Dist):
    """A pretend rank of 2 that records what it sends and receives the given payloads."""

    def __init__(self, rank: int, others: list) -> None:
        super().__init__()
        self.rank, self.size, self.others, self.sent = rank, 2, list(others), []

    def gather_json(self, obj):
        self.sent.append(obj)
        other = self.others.pop(0)
        return [obj, other] if self.rank == 0 else [other, obj]


def test_eval_shares_give_the_one_process_figures(monkeypatch):
    """Each rank evaluates its share of the prompts, in other batches than one process does;
    joined, greedy records and sampled pass@k are the one-process ones."""
    from mlxgrpo import evaluation
    from mlxgrpo.config import resolve_config
    from mlxgrpo.data import Example
    from mlxgrpo.models.loading import load_model
    from mlxgrpo.rewards import RewardSet
    from mlxgrpo.task import text_codec

    # char_match > 0 as "correct": a random model solves some prompts in 4 samples, not all.
    monkeypatch.setattr(evaluation, "ACCURACY_REWARDS", ("char_match",))
    model, tokenizer = load_model("builtin:tiny-qwen2")
    sets = ("eval.pass_k=4", "eval.temperature=1.0", "eval.max_new_tokens=6")
    cfg = resolve_config((), sets, {}).config
    codec, rewards = text_codec(tokenizer, cfg), RewardSet(["char_match"])
    examples = [Example(f"Repeat the letter {c}:", c) for c in "aeiost"[:5]]

    def run(dist, batch_size):
        return evaluation.evaluate_task(
            model, examples, rewards, codec, cfg, batch_size=batch_size, dist=dist
        )

    whole = run(None, 16)
    nothing = {k: [] for k in ("totals", "lengths", "truncated", "accuracy", "format")}
    nothing |= {"solved": [], "records": [], "tokens": 0, "seconds": 0.0}
    second = _Recorder(1, [nothing])
    run(second, 4)
    joined = run(_Recorder(0, second.sent), 4)
    assert len(second.sent[0]["records"]) == 2  # 5 prompts: 3 on rank 0, 2 on rank 1
    assert joined.records == whole.records
    timing = ("seconds", "tokens_per_sec")
    assert {k: v for k, v in joined.metrics.items() if k not in timing} == {
        k: v for k, v in whole.metrics.items() if k not in timing
    }
    assert 0 < whole.metrics["pass@4"] < 1 and whole.metrics["samples"] == 5


@pytest.mark.slow
def test_eval_on_two_ranks_reports_the_global_figures(tmp_path):
    """`mlx.launch -n 2 -- mlxgrpo eval`: one report and one records file (rank 0's), equal to
    one process's; 5 prompts do not divide by 2 ranks, and need not."""
    args = [sys.executable, "-m", "mlxgrpo", "eval", "-m", "builtin:tiny-qwen2", "--json"]
    args += ["-d", "synthetic:repeat?letters=aeiost", "--limit", "5", "--max-tokens", "6"]
    runs = {}
    for name, head in (("one", []), ("two", [LAUNCH, "-n", "2", "--backend", "ring", "--"])):
        done = subprocess.run(
            [*head, *args, "-o", str(tmp_path / f"{name}.jsonl")],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        assert len(lines) == 1, done.stdout  # rank 1 printed nothing
        runs[name] = json.loads(lines[0])["results"][0]
    timing = ("seconds", "tokens_per_sec")
    one, two = ({k: v for k, v in r.items() if k not in timing} for r in runs.values())
    assert two == one and two["samples"] == 5
    records = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "two.jsonl").read_text() == records and len(records.splitlines()) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]


def test_launcher_failure_lines_give_exit_codes():
    from mlxgrpo.launcher import failed_rank_code

    assert failed_rank_code("[WARN] Node with rank 1 exited with code 2\n") == 2
    assert failed_rank_code("\x1b[33m[WARN] Node with rank 0 was killed\x1b[0m") == 1
    assert failed_rank_code("Node with rank 0 exited with code -9") == 1
    assert failed_rank_code("Node with rank 0 completed") is None
    assert failed_rank_code("update 3: reward 0.5") is None


def _mlxgrpo_launch(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlxgrpo", "launch", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_mlxgrpo_launch_exits_with_the_failing_ranks_code(tmp_path):
    """`mlx.launch` exits 0 whatever its ranks do; `mlxgrpo launch` passes the same arguments
    and output through and exits with the ranks' code: 2 for a config error, 0 for success."""
    train = [sys.executable, "-m", "mlxgrpo", "train", *ARGS, "--max-steps", "1"]
    bad = _mlxgrpo_launch("-n", "2", "--backend", "ring", "--", *train, "-o", str(tmp_path / "a"),
                          "--set", "optim.batch_size=3")  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "optim.batch_size = 3 does not divide by the 2 ranks" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = _mlxgrpo_launch("-n", "2", "--backend", "ring", "--", *train, "-o", str(tmp_path / "b"))
    assert good.returncode == 0, good.stderr[-2000:]
    assert (tmp_path / "b" / "r" / "final").is_dir()


def test_missing_hostfile_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "hosts.json"
    done = _mlxgrpo_launch("--hostfile", str(missing), "--", sys.executable, "-c", "pass")
    assert done.returncode == 2
    assert f"hostfile '{missing}' does not exist" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr


def test_rank_with_a_missing_hostfile_is_one_line_and_exit_2(tmp_path):
    env = _env(MLX_RANK="0", MLX_HOSTFILE=str(tmp_path / "hosts.json"))
    cmd = [sys.executable, "-m", "mlxgrpo", "train", *ARGS, "-o", str(tmp_path / "o")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"MLX_HOSTFILE '{tmp_path / 'hosts.json'}' does not exist" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_launcher_drops_its_own_ctrl_c_traceback_only():
    from mlxgrpo.launcher import _HeldTraceback

    held = _HeldTraceback()
    lines = [
        "update 3\n",
        "Traceback (most recent call last):\n",
        '  File "launch.py", line 267, in _launch_with_io\n',
        "    stdin_buffer = os.read(fd, 8192)\n",
        "[WARN] Node with rank 1 exited with code 130\n",
        "KeyboardInterrupt\n",
        "[WARN] Node with rank 0 exited with code 130\n",
    ]
    shown = [out for line in lines for out in held.feed(line, interrupted=True)]
    assert shown == [lines[0], lines[4], lines[6]]
    # Before Ctrl-C, or a traceback of another error: everything passes through.
    assert held.feed(lines[1], interrupted=False) == [lines[1]]
    other = ["Traceback (most recent call last):\n", '  File "x.py"\n', "ValueError: bad\n"]
    assert [out for line in other for out in held.feed(line, True)] + held.flush() == other


@pytest.mark.slow
def test_tool_runs_on_two_ranks_match_one(tmp_path):
    """The calculator task on 2 ranks (each with the micro-batch one process forms): the same
    tool calls, forced-token masks and updates, so bit-identical adapters and metrics."""
    task = ["-m", "builtin:tiny-nanochat", "--max-steps", "3", "--run-name", "r"]
    for item in (
        "data.dataset=synthetic:arithmetic?tool=calculator&prefill=call",
        "rollout.tools=['calculator']",
        "rollout.num_generations=8",
        "rollout.max_new_tokens=16",
        "rollout.temperature=1.0",
        "optim.batch_size=4",
        "optim.learning_rate=1e-2",
        "checkpoint.save_steps=0",
    ):
        task += ["--set", item]
    runs = {}
    for name, ranks, accumulation in (("one", 1, 2), ("two", 2, 1)):
        cmd = [sys.executable, "-m", "mlxgrpo", "train", *task, "-o", str(tmp_path / name)]
        cmd += ["--set", f"optim.gradient_accumulation_steps={accumulation}"]
        if ranks > 1:
            cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--", *cmd]
        done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = _train_records(tmp_path / name / "r")
    for key in (
        "reward_mean",
        "tool_calls_mean",
        "tool_errors_mean",
        "tool_use_share",
        "grad_norm",
    ):
        assert [r[key] for r in runs["two"]] == [r[key] for r in runs["one"]], key
    assert any(r["tool_calls_mean"] > 0 for r in runs["one"])
    a1, a2 = _adapters(tmp_path / "one" / "r"), _adapters(tmp_path / "two" / "r")
    assert all(mx.array_equal(a1[k], a2[k]).item() for k in a1)
