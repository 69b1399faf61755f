"""Stop conditions of the training loop: repeated NaN/inf updates and repeated reward failures.

One bad update or one failing reward batch is survivable, so it is reported and training goes on;
the same failure several updates in a row means the run is learning nothing, so it stops with a
one-line error instead of finishing as if it had trained. The counters are not checkpointed: a
resumed run starts them from zero.
"""

from __future__ import annotations

from typing import Any

from mlxgrpo.engine.io.callbacks import Callback
from mlxgrpo.errors import RewardFunctionError, TrainingDivergedError


class RunGuards:
    """Consecutive non-finite updates and, per reward function, consecutive failed updates."""

    def __init__(self, max_nonfinite_updates: int, max_reward_failures: int) -> None:
        self.max_nonfinite = max_nonfinite_updates
        self.max_reward_failures = max_reward_failures
        self.nonfinite_streak = 0
        self.reward_streaks: dict[str, int] = {}

    def report(self, update: int, result: Any, cb: Callback) -> None:
        """Count this update's failures and say what happened (before its progress line)."""
        for name, message in result.reward_errors.items():
            cb.on_message(
                f"reward function {name} {message} (its values count as None for that batch)"
            )
        failed = result.reward_failures
        self.reward_streaks = {n: self.reward_streaks.get(n, 0) + 1 for n in failed}
        metrics = result.metrics
        if metrics.get("nonfinite_skipped"):
            self.nonfinite_streak += 1
            loss = metrics.get("policy_loss", metrics.get("loss"))  # GRPO's, or SFT's
            cb.on_message(
                f"update {update} skipped: loss {loss:.3g}, gradient norm "
                f"{metrics.get('grad_norm'):.3g} (not finite); the weights were left unchanged "
                f"({self.nonfinite_streak} of {self.max_nonfinite} allowed in a row)"
            )
        else:
            self.nonfinite_streak = 0

    def enforce(self, update: int, result: Any) -> None:
        """Raise once a failure has repeated for as many updates as the config allows."""
        if self.nonfinite_streak >= self.max_nonfinite:
            raise TrainingDivergedError(
                f"training diverged: the last {self.nonfinite_streak} updates (to update "
                f"{update}) had a NaN/inf loss or gradient norm and were skipped; no final "
                "weights were written",
                hint="lower optim.learning_rate; raise optim.max_nonfinite_updates to "
                "tolerate more skips",
            )
        for name, streak in sorted(self.reward_streaks.items()):
            if streak >= self.max_reward_failures:
                raise RewardFunctionError(
                    f"reward function {name} failed on every call for {streak} consecutive "
                    f"updates: {result.reward_failures[name]}",
                    hint="fix the function (it must return one number or None per completion); "
                    "rewards.max_consecutive_failures sets how many failed updates stop a run",
                )
