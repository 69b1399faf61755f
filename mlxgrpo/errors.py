"""Error types that the CLI maps to exit codes and one-line messages."""

from __future__ import annotations


class MlxgrpoError(Exception):
    """A failure the user can act on: rendered as one red line plus a hint, exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(MlxgrpoError):
    """Bad usage or configuration: exit code 2."""

    exit_code = 2


class TrainingDivergedError(MlxgrpoError):
    """Training produced NaN/inf (loss, gradients or weights) and cannot go on: exit code 1."""


class RewardFunctionError(MlxgrpoError):
    """A reward function failed (raised, broke its contract or timed out) too often: exit 1."""
