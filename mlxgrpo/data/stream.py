"""Batches of prompts per update, reshuffled each epoch, with a cursor that resumes exactly.

The last incomplete batch of an epoch is dropped: every update sees ``batch_size`` prompts, so
group counts, shapes and the LR schedule's step count stay fixed. Dropped examples come back in
later epochs because each epoch is a fresh permutation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from mlxgrpo.errors import ConfigError

T = TypeVar("T")


def num_updates(num_examples: int, batch_size: int, num_epochs: int) -> int:
    """Updates in a full run: full batches per epoch times epochs (incomplete batches dropped)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    return (num_examples // batch_size) * max(num_epochs, 0)


@dataclass(frozen=True)
class StreamCursor:
    """Where the stream stands: the next batch starts at ``index`` of epoch ``epoch``'s order."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamCursor:
        return cls(epoch=int(data["epoch"]), index=int(data["index"]))


class PromptStream(Generic[T]):
    """Iterate batches of ``batch_size`` items for ``num_epochs`` epochs.

    Epoch ``e`` uses a permutation seeded by (seed, e), so a stream restored from ``state()``
    yields exactly the batches the original would have yielded next.
    """

    def __init__(
        self,
        items: Sequence[T],
        batch_size: int,
        *,
        seed: int = 0,
        num_epochs: int = 1,
        shuffle: bool = True,
        cursor: StreamCursor | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        if len(items) < batch_size:
            raise ConfigError(
                f"The dataset has {len(items)} examples, fewer than batch_size {batch_size}.",
                hint="lower optim.batch_size or use more training samples",
            )
        self.items = list(items)
        self.batch_size = batch_size
        self.seed = seed
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.batches_per_epoch = len(self.items) // batch_size
        self.cursor = cursor or StreamCursor()
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def total_updates(self) -> int:
        return num_updates(len(self.items), self.batch_size, self.num_epochs)

    @property
    def updates_done(self) -> int:
        return self.cursor.epoch * self.batches_per_epoch + self.cursor.index // self.batch_size

    def state(self) -> dict[str, Any]:
        """JSON-ready state: the cursor plus what must match when it is restored."""
        return {
            **self.cursor.to_dict(),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.items),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``; ConfigError if it was saved for different data or batches."""
        for key, current in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("num_examples", len(self.items)),
        ):
            if key in state and state[key] != current:
                raise ConfigError(
                    f"Cannot resume the data stream: saved {key}={state[key]}, now {current}.",
                    hint="resume with the same dataset, seed and batch size, or start a new run",
                )
        self.cursor = StreamCursor.from_dict(state)

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> list[T] | None:
        """The next batch (advancing the cursor), or None when all epochs are done."""
        epoch, index = self.cursor.epoch, self.cursor.index
        if index + self.batch_size > self.batches_per_epoch * self.batch_size:
            epoch, index = epoch + 1, 0
        if epoch >= self.num_epochs:
            return None
        order = self._epoch_order(epoch)
        batch = [self.items[i] for i in order[index : index + self.batch_size]]
        self.cursor = StreamCursor(epoch, index + self.batch_size)
        return batch

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(range(len(self.items)))
            if self.shuffle:
                # String seeds are hashed with SHA-512: the same order in every process.
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order


def batches(
    items: Sequence[T], batch_size: int, seed: int = 0, num_epochs: int = 1
) -> Iterator[list[T]]:
    """Shorthand for iterating a fresh ``PromptStream``."""
    return iter(PromptStream(items, batch_size, seed=seed, num_epochs=num_epochs))
