"""A weighted set of reward functions that scores a batch of completions.

A function that fails on a batch -- raises, breaks the contract (one number or None per
completion) or exceeds the time limit -- does not stop training by itself: its values become None
for that batch and the failure is recorded, so the UI can show it once. Whether repeated failures
end the run is the trainer's decision (``rewards.max_consecutive_failures``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import reprlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxgrpo.errors import ConfigError
from mlxgrpo.rewards.registry import ResolvedReward, RewardFn, resolve_reward


@dataclass
class RewardFailure:
    """How often one reward function failed so far; ``count == 1`` means this is the first time."""

    count: int
    first_message: str
    last_message: str


class RewardContractError(Exception):
    """A reward function returned something other than one number or None per completion."""


class RewardTimeoutError(Exception):
    """A reward call ran past the time limit."""


@dataclass
class RewardResult:
    """Scores of one batch: weighted totals plus each function's raw values (None = n/a)."""

    names: list[str]
    weights: list[float]
    totals: list[float]
    values: dict[str, list[float | None]]
    errors: dict[str, RewardFailure] = field(default_factory=dict)

    def mean(self, name: str) -> float | None:
        present = _present(self.values[name])
        return sum(present) / len(present) if present else None

    def std(self, name: str) -> float | None:
        """Population standard deviation over the values that are not None."""
        present = _present(self.values[name])
        if not present:
            return None
        mean = sum(present) / len(present)
        return math.sqrt(sum((v - mean) ** 2 for v in present) / len(present))

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        """Per function: mean, std and count of applicable values."""
        return {
            name: {
                "mean": self.mean(name),
                "std": self.std(name),
                "count": len(_present(self.values[name])),
            }
            for name in self.names
        }


class RewardSet:
    """Reward functions with weights; ``score`` applies all of them to a batch.

    ``functions`` are specs (see ``resolve_reward``) or callables; ``weights`` default to 1.0.
    ``timeout_s`` bounds each call (0 = no limit): a call still running then counts as a failure
    and is abandoned in its daemon thread -- Python cannot kill a thread, so it may keep running
    (and using CPU) in the background until it returns or the process exits.
    """

    def __init__(
        self,
        functions: Sequence[str | Callable[..., Any]],
        weights: Sequence[float] | None = None,
        *,
        base_dir: str | Path | None = None,
        timeout_s: float = 0.0,
    ) -> None:
        if not functions:
            raise ConfigError(
                "No reward functions configured.",
                hint="set rewards.functions, e.g. ['correctness', 'xmlcount']",
            )
        self.rewards = _resolve_all(functions, base_dir)
        self.names = [r.name for r in self.rewards]
        self.weights = _check_weights(weights, len(self.rewards))
        self.failures: dict[str, RewardFailure] = {}
        self.timeout_s = float(timeout_s)
        self._column_filters = [_accepted_columns(r.fn) for r in self.rewards]

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        answers: Sequence[str | None],
        **columns: Any,
    ) -> RewardResult:
        count = len(completions)
        if len(prompts) != count or len(answers) != count:
            raise ValueError(
                f"score() got {len(prompts)} prompts, {count} completions, {len(answers)} answers"
            )
        values: dict[str, list[float | None]] = {}
        errors: dict[str, RewardFailure] = {}
        for reward, accepted in zip(self.rewards, self._column_filters, strict=True):
            kwargs = (
                columns if accepted is None else {k: columns[k] for k in accepted & columns.keys()}
            )
            try:
                raw = self._call(reward.fn, list(prompts), list(completions), list(answers), kwargs)
                values[reward.name] = _validated(raw, count)
            except Exception as exc:  # user code: any failure must not end the run here
                values[reward.name] = [None] * count
                errors[reward.name] = self._record_failure(reward.name, exc)
        totals = [
            sum(w * (values[n][i] or 0.0) for n, w in zip(self.names, self.weights, strict=True))
            for i in range(count)
        ]
        return RewardResult(list(self.names), list(self.weights), totals, values, errors)

    def _call(self, fn: RewardFn, prompts, completions, answers, kwargs: dict[str, Any]) -> Any:
        if self.timeout_s <= 0:
            return fn(prompts, completions, answers, **kwargs)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["value"] = fn(prompts, completions, answers, **kwargs)
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc

        # Daemon: a call that never returns must not keep the process alive at exit.
        worker = threading.Thread(target=work, name="mlxgrpo-reward", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RewardTimeoutError(
                f"did not return within rewards.timeout_s = {self.timeout_s:g} s "
                "(the call was abandoned and may still be running)"
            )
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def _record_failure(self, name: str, exc: Exception) -> RewardFailure:
        # A verb phrase, read after the function's name: "reward function f raised ...".
        if isinstance(exc, (RewardContractError, RewardTimeoutError)):
            message = str(exc)
        else:
            message = f"raised {type(exc).__name__}: {exc}"
            if self.timeout_s > 0 and "main thread" in str(exc):
                # signal-based timeouts (e.g. in math verifiers) only work on the main thread.
                message += " (set rewards.timeout_s = 0 to call it on the main thread)"
        failure = self.failures.get(name)
        if failure is None:
            failure = RewardFailure(count=1, first_message=message, last_message=message)
            self.failures[name] = failure
        else:
            failure.count += 1
            failure.last_message = message
        return RewardFailure(failure.count, failure.first_message, failure.last_message)


def _resolve_all(
    functions: Sequence[str | Callable[..., Any]], base_dir: str | Path | None
) -> list[ResolvedReward]:
    resolved: list[ResolvedReward] = []
    for item in functions:
        if isinstance(item, str):
            resolved.append(resolve_reward(item, base_dir))
        elif callable(item):
            name = getattr(item, "__name__", type(item).__name__)
            resolved.append(ResolvedReward(name=name, fn=item, spec=name))
        else:
            raise ConfigError(f"Reward entry {item!r} is neither a name nor a callable.")
    names = [r.name for r in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"Reward function(s) listed twice: {', '.join(duplicates)}.",
            hint="list each function once and use rewards.weights to scale it",
        )
    return resolved


def _check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0] * count
    if len(weights) != count:
        raise ConfigError(
            f"rewards.weights has {len(weights)} entries but rewards.functions has {count}.",
            hint="give one weight per reward function, or leave weights empty for all 1.0",
        )
    checked = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in checked):
        raise ConfigError(f"rewards.weights must be finite numbers, got {list(weights)}.")
    return checked


def _accepted_columns(fn: RewardFn) -> frozenset[str] | None:
    """Keyword columns ``fn`` accepts; None when it takes ``**kwargs`` (gets everything)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in keyword_kinds)


_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxtuple = 4
_SHORT.maxstring = _SHORT.maxother = 40


def _expected(count: int) -> str:
    return f"expected a list of {count} numbers, one per completion (None = not applicable)"


def _validated(raw: Any, count: int) -> list[float | None]:
    """The values as floats, or RewardContractError naming what came back and what was due."""
    if hasattr(raw, "tolist"):  # numpy / mlx arrays
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise RewardContractError(
            f"returned {type(raw).__name__} {_SHORT.repr(raw)}; {_expected(count)}"
        )
    if len(raw) != count:
        raise RewardContractError(
            f"returned {len(raw)} value(s) for {count} completions: {_SHORT.repr(raw)}; "
            f"{_expected(count)}"
        )
    values: list[float | None] = []
    for i, item in enumerate(raw):
        if item is None:
            values.append(None)
            continue
        # Strings are refused even when float() would parse them: "0.5" is almost always a bug.
        if isinstance(item, (str, bytes)) or not isinstance(item, numbers.Real):
            raise RewardContractError(
                f"returned a non-numeric value at position {i}: {type(item).__name__} "
                f"{_SHORT.repr(item)} in {_SHORT.repr(raw)}; {_expected(count)}"
            )
        value = float(item)
        if not math.isfinite(value):
            raise RewardContractError(
                f"returned a non-finite value {value} at position {i}; {_expected(count)}"
            )
        values.append(value)
    return values


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]
