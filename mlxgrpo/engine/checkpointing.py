"""Activation checkpointing for the training forward pass (DESIGN §9b).

Autodiff keeps every intermediate of every transformer block for the backward pass: rows x
tokens x blocks x (~10 hidden + 3 MLP) floats, gigabytes at Qwen2.5-0.5B's shape. Inside
:func:`checkpointed_blocks` each block keeps only its input and recomputes its activations when
the backward pass reaches it (``mx.checkpoint``), one block at a time.

Only the blocks of the given model instance change, and only inside the context: their class is
swapped for a subclass whose ``__call__`` checkpoints, so rollouts, evaluation and the reference
pass outside the context run the plain forward. Dropout inside a block draws its mask from a key
that is an input of the checkpointed call, so the recomputation sees the same mask as the
forward pass (a fresh draw would make the gradient belong to another mask).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn

_CHECKPOINTING_CLASSES: dict[type, type] = {}


class _KeyStream:
    """The key the keyed dropouts of the block being run split their masks from."""

    key: mx.array | None = None

    @classmethod
    def next(cls) -> mx.array:
        if cls.key is None:
            raise RuntimeError("keyed dropout used outside a checkpointed block")
        cls.key, sub = mx.random.split(cls.key)
        return sub


class _KeyedDropout(nn.Dropout):
    """nn.Dropout whose mask comes from the checkpointed block's key (same mask on recompute)."""

    def __call__(self, x: mx.array) -> mx.array:
        if self._p_1 == 1 or not self.training:
            return x
        if _KeyStream.key is None:  # outside a block with active dropout (e.g. embeddings)
            return super().__call__(x)
        mask = mx.random.bernoulli(self._p_1, x.shape, key=_KeyStream.next())
        return (mask * x) * (1 / self._p_1)


def _has_active_dropout(block: nn.Module) -> bool:
    return any(
        isinstance(m, nn.Dropout) and m.training and m._p_1 < 1 for _, m in block.named_modules()
    )


def _checkpointing_class(cls: type) -> type:
    """A subclass of the block class ``cls`` whose forward is wrapped in ``mx.checkpoint``."""
    if cls in _CHECKPOINTING_CLASSES:
        return _CHECKPOINTING_CLASSES[cls]
    plain_call = cls.__call__

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Trainable weights must be explicit inputs of the checkpointed function, or their
        # gradients would not flow through its recomputation.
        params = self.trainable_parameters()
        # A captured constant, not an input: autodiff must not trace into the random bits.
        key = None
        if _has_active_dropout(self):  # drawn only then: the global random stream stays as is
            key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)

        def run(params: Any, *args: Any, **kwargs: Any) -> Any:
            self.update(params)
            outer, _KeyStream.key = _KeyStream.key, key
            try:
                return plain_call(self, *args, **kwargs)
            finally:
                _KeyStream.key = outer

        try:
            return mx.checkpoint(run)(params, *args, **kwargs)
        finally:
            self.update(params)  # leave the module holding its own arrays, not traced copies

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    _CHECKPOINTING_CLASSES[cls] = sub
    return sub


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (mlx-lm models expose them as ``model.layers``)."""
    blocks = getattr(model, "layers", None)
    return list(blocks) if blocks is not None else []


@contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Checkpoint every transformer block of ``model`` inside the context; yields their count."""
    blocks = transformer_blocks(model) if enabled else []
    if not blocks:
        yield 0
        return
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for block in blocks:
            swapped.append((block, type(block)))
            block.__class__ = _checkpointing_class(type(block))
            for _, module in block.named_modules():
                if type(module) is nn.Dropout:
                    swapped.append((module, nn.Dropout))
                    module.__class__ = _KeyedDropout
        yield len(blocks)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
