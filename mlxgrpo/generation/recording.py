"""Recording the transformer blocks' outputs during the rollout, for the training pass.

Until the first optimizer step of an update the policy is the one that sampled the rollout, so
each block's output at a completion position is the value the rollout already computed there,
one decode step at a time. Inside :func:`recording` each block of the model hands its output to
an :class:`ActivationRecorder` at the single-token steps the rollout arms it for; the recorder
turns them into :class:`RecordedActivations`, which travel with the rollout
(``Rollout.activations``) to the training pass that replays them
(:mod:`~mlxgrpo.engine.memory.replay`, docs/architecture.md §5).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxgrpo.models.blocks import transformer_blocks
from mlxgrpo.models.class_swap import subclass_with_call

# The recorder of each block being recorded (by id), and the block's depth.
_ATTACHED: dict[int, tuple[ActivationRecorder, int]] = {}


@dataclass(frozen=True)
class RecordedActivations:
    """Block outputs at the suffix positions of a rollout's completions.

    ``flat[b]`` [M + 1, H]: block ``b``'s outputs at every recorded (row, position), then a zero
    row. ``index`` [N, S]: where completion ``n``'s suffix position ``s`` sits in ``flat`` (M
    where it was not recorded). Suffix position 0 is the prompt's last token, ``s > 0`` the
    completion's token ``s - 1``, as in
    :class:`~mlxgrpo.engine.memory.shared_prefix.SharedPrefixPlan`.
    """

    flat: list[mx.array]
    index: np.ndarray

    def take_rows(self, rows: Sequence[int]) -> RecordedActivations:
        """The records of completions ``rows`` (in that order); the arrays are shared."""
        return RecordedActivations(self.flat, self.index[np.asarray(list(rows), dtype=np.int64)])

    def block_outputs(self, width: int) -> list[mx.array]:
        """Per block, the outputs [N, width, H] of suffix positions 0 .. width - 1."""
        zero_row = int(self.flat[0].shape[0]) - 1
        index = np.full((self.index.shape[0], width), zero_row, dtype=np.int32)
        kept = min(width, self.index.shape[1])
        index[:, :kept] = self.index[:, :kept]
        where = mx.array(index)
        return [f[where] for f in self.flat]

    def gathered(self, rows: Sequence[int], width: int) -> GatheredActivations:
        """The outputs of completions ``rows`` at ``width`` positions, copied out now, so
        that these records can be let go."""
        outputs = self.take_rows(rows).block_outputs(width)
        mx.eval(outputs)
        return GatheredActivations(outputs)


@dataclass(frozen=True)
class GatheredActivations:
    """Block outputs [N, W, H] of one micro-batch's rows (see :class:`RecordedActivations`)."""

    outputs: list[mx.array]

    def block_outputs(self, width: int) -> list[mx.array]:
        have = int(self.outputs[0].shape[1])
        if width <= have:
            return [o[:, :width] for o in self.outputs]
        return [mx.pad(o, [(0, 0), (0, width - have), (0, 0)]) for o in self.outputs]


def join_activations(parts: Sequence[RecordedActivations | None]) -> RecordedActivations | None:
    """One record for rollouts joined one after another (None when a part has none)."""
    if not parts or any(p is None for p in parts):
        return None
    present = [p for p in parts if p is not None]
    if len(present) == 1:
        return present[0]
    blocks = len(present[0].flat)
    if any(len(p.flat) != blocks for p in present):
        return None
    width = max(p.index.shape[1] for p in present)
    offsets = np.cumsum([0] + [int(p.flat[0].shape[0]) for p in present])
    zero_row = int(offsets[-1]) - 1  # the last part's zero row
    index = np.full((sum(p.index.shape[0] for p in present), width), zero_row, dtype=np.int64)
    row = 0
    for part, offset in zip(present, offsets[:-1], strict=True):
        rows, steps = part.index.shape
        index[row : row + rows, :steps] = part.index + offset
        row += rows
    flat = [mx.concatenate([p.flat[b] for p in present]) for b in range(blocks)]
    mx.eval(flat)
    return RecordedActivations(flat, index)


class ActivationRecorder:
    """Collects every block's output at the single-token steps the rollout arms it for."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Per armed step: the completion rows it fed and each block's output [rows, 1, H].
        self.steps: list[tuple[list[list[int]], list[mx.array]]] = []
        self._armed: tuple[list[list[int]], list[mx.array]] | None = None
        self.given_up = False  # a call it did not understand: nothing of this rollout is kept

    def arm(self, completions_of_row: list[list[int]]) -> None:
        """Record the next model call; its batch row ``i`` is the suffix position of
        completions ``completions_of_row[i]`` numbered by the count of calls armed so far."""
        if self.given_up:
            return
        self._armed = (completions_of_row, [])
        self.steps.append(self._armed)

    def _take(self, depth: int, output: mx.array) -> None:
        if self._armed is None:
            return
        outputs = self._armed[1]
        if depth != len(outputs) or output.ndim != 3 or output.shape[1] != 1:
            # Not one block after another over one token per row. Later steps would be
            # numbered wrongly without this one: give up on the whole rollout.
            self.steps, self._armed, self.given_up = [], None, True
            return
        outputs.append(output)
        if len(outputs) == self.num_blocks:
            self._armed = None

    def records(self, completions: int) -> RecordedActivations | None:
        """The recorded outputs of ``completions`` rows (None when nothing usable was kept)."""
        steps = [s for s in self.steps if len(s[1]) == self.num_blocks]
        if self.given_up or not steps or len(steps) != len(self.steps):
            return None
        index = np.full((completions, len(steps)), -1, dtype=np.int64)
        count = 0
        for position, (rows, _) in enumerate(steps):
            for i, owners in enumerate(rows):
                index[owners, position] = count + i
            count += len(rows)
        index[index < 0] = count  # the zero row
        flat = []
        for block in range(self.num_blocks):
            pieces = [outputs[block].reshape(-1, outputs[block].shape[-1]) for _, outputs in steps]
            width = pieces[0].shape[-1]
            joined = mx.concatenate([*pieces, mx.zeros((1, width), dtype=pieces[0].dtype)])
            mx.eval(joined)  # block by block: the per-step arrays can go as we build
            flat.append(joined)
            for _, outputs in steps:
                outputs[block] = None  # type: ignore[call-overload]
        self.steps = []
        return RecordedActivations(flat, index)


def _recording_call(plain_call: Any) -> Any:
    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = plain_call(self, *args, **kwargs)
        attached = _ATTACHED.get(id(self))
        if attached is not None and isinstance(out, mx.array):
            recorder, depth = attached
            recorder._take(depth, out)
        return out

    return __call__


@contextmanager
def recording(model: nn.Module, enabled: bool = True) -> Iterator[ActivationRecorder | None]:
    """Record the blocks of ``model`` inside the context (yields None when not enabled)."""
    blocks = transformer_blocks(model) if enabled else []
    if not blocks:
        yield None
        return
    recorder = ActivationRecorder(len(blocks))
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for depth, block in enumerate(blocks):
            swapped.append((block, type(block)))
            block.__class__ = subclass_with_call(
                type(block), "Recording", lambda cls: _recording_call(cls.__call__)
            )
            _ATTACHED[id(block)] = (recorder, depth)
        yield recorder
    finally:
        for block, cls in swapped:
            block.__class__ = cls
            _ATTACHED.pop(id(block), None)
