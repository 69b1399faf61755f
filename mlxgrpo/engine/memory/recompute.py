"""Activation checkpointing for the training forward pass (docs/architecture.md §5).

Autodiff keeps every intermediate of every transformer block for the backward pass: rows x
tokens x blocks x (~10 hidden + 3 MLP) floats, gigabytes at Qwen2.5-0.5B's shape. Inside
:func:`checkpointed_blocks` each block keeps only its input and recomputes its activations when
the backward pass reaches it, one block at a time (:func:`recompute_in_backward`).

Only the blocks of the given model instance change, and only inside the context: their class is
swapped for a subclass whose ``__call__`` checkpoints, so rollouts, evaluation and the reference
pass outside the context run the plain forward.

A block's MLP is position-wise, and its [tokens, intermediate] buffers dominate what one block
needs during its backward pass. When they would exceed :data:`MLP_BUDGET_BYTES`, the MLP runs in
chunks of tokens, one in memory at a time, each recomputed in the backward pass. In a pre-norm
block the MLP's output is only added to the residual, so the block's recomputation never needs
its value, only its gradient: the chunks cost no extra compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.engine.memory.chunked_head import flat_params, rebuilt_params, recomputing
from mlxgrpo.models.blocks import checkpoint_blocker, has_dropout, transformer_blocks
from mlxgrpo.models.class_swap import subclass_with_call

# Memory the MLP of one block may take during its backward pass: about eight float32
# [tokens, intermediate] buffers (gate, up, activation, product and their gradients). 431
# tokens at Qwen2.5-0.5B's width, 234 at 1.5B's: chunks still large enough for full-speed
# matmuls (measured: no slower than one piece at the 0.5B shape).
MLP_BUDGET_BYTES = 64 * 2**20
_MLP_BUFFERS = 8


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


def recompute_in_backward(
    fn: Callable[..., tuple[mx.array, ...]], known: tuple[mx.array, ...] | None = None
) -> Callable:
    """``fn(params, x, extra) -> outputs`` that keeps nothing for the backward pass but its inputs.

    ``extra`` is a list of further array inputs and ``outputs`` a tuple of arrays (a block's
    hidden state, plus what a :class:`CarriedState` records). Like ``mx.checkpoint``, except
    that the recomputation waits for the outputs' gradients: ``mx.checkpoint`` only orders it
    after the forward pass, so MLX is free to recompute many blocks at once and keep all their
    activations. Here block k is recomputed only once the backward pass has reached it: one
    block at a time by construction, not by scheduling luck (at the 0.5B shape both peaked the
    same).

    ``known``: the outputs, already computed elsewhere for these very inputs (the rollout's,
    :mod:`~mlxgrpo.engine.memory.replay`). The forward pass then returns them without running
    ``fn``; the backward pass recomputes as always.
    """

    @mx.custom_function
    def checkpointed(params: Any, x: mx.array, extra: list[mx.array]) -> tuple[mx.array, ...]:
        if known is not None:
            return known
        return tuple(fn(params, x, extra))

    @checkpointed.vjp
    def checkpointed_vjp(primals, cotangents, outputs):
        params, x, extra = primals
        cotangents = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        names, values = flat_params(params)
        count = len(values)
        inputs = mx.depends([x, *values, *extra], cotangents)

        def again(x: mx.array, *rest: mx.array) -> list[mx.array]:
            return list(fn(rebuilt_params(names, rest[:count], params), x, list(rest[count:])))

        _, grads = mx.vjp(again, inputs, cotangents)
        return rebuilt_params(names, grads[1 : 1 + count], {}), grads[0], list(grads[1 + count :])

    return checkpointed


@runtime_checkable
class CarriedState(Protocol):
    """A block argument (e.g. a cache) that feeds arrays into the block or records some.

    Arrays a checkpointed block reads from it must be explicit inputs of the checkpointed
    function, and arrays it records there must be outputs, or gradients would not flow through
    the recomputation. See :mod:`mlxgrpo.engine.memory.shared_prefix` for the one user.
    """

    def checkpoint_inputs(self) -> list[mx.array]:
        """The arrays the block reads from this state."""
        ...

    def replica(self, inputs: list[mx.array]) -> CarriedState:
        """A fresh state like this one that reads ``inputs`` instead."""
        ...

    def recorded(self) -> list[mx.array]:
        """The arrays the block recorded into this (replica) state during its call."""
        ...

    def adopt(self, recorded: list[mx.array]) -> None:
        """Take the recorded arrays, as the checkpointed function returned them."""
        ...

    def known_output(self) -> mx.array | None:
        """The block's output when it is already known (replayed from the rollout), else None."""
        ...


def _carried_position(args: tuple, kwargs: dict) -> int | str | None:
    """Where among a block's arguments a :class:`CarriedState` is (index or keyword)."""
    for i, value in enumerate(args):
        if isinstance(value, CarriedState):
            return i
    return next((k for k, v in kwargs.items() if isinstance(v, CarriedState)), None)


def _floating(value: Any) -> bool:
    return isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating)


def _map_leaves(value: Any, is_leaf: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """``value`` with each leaf (``is_leaf``) inside its tuples, lists and dicts replaced by
    ``fn(leaf)``, depth first in order; everything else kept as is."""
    if is_leaf(value):
        return fn(value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_map_leaves(v, is_leaf, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, is_leaf, fn) for k, v in value.items()}
    return value


def map_floating(value: Any, fn: Callable[[mx.array], Any]) -> Any:
    """``value`` with every floating array inside its tuples, lists and dicts replaced by
    ``fn(array)``, in a fixed order; everything else (masks, offsets, caches) kept as is."""
    return _map_leaves(value, _floating, fn)


def floating_leaves(value: Any) -> list[mx.array]:
    """The floating arrays :func:`map_floating` visits, in its order."""
    found: list[mx.array] = []
    map_floating(value, found.append)
    return found


def _checkpointing_call(plain_call: Callable) -> Callable:
    """A block's ``__call__`` that keeps only the block's inputs for the backward pass.

    Any block signature: the hidden state comes first; every other floating array among the
    arguments (another layer's keys and values, a per-layer input) is an input of the
    checkpointed function too, so its gradient flows; the block may return one array or a
    tuple of them with other values (Gemma 4 returns its keys and values and an offset)."""

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not args or not isinstance(args[0], mx.array):  # no hidden state to checkpoint on
            return plain_call(self, *args, **kwargs)
        # Trainable weights must be explicit inputs of the checkpointed function, or their
        # gradients would not flow through its recomputation.
        params = self.trainable_parameters()
        # A captured constant, not an input: autodiff must not trace into the random bits.
        # Drawn only with active dropout: without it the global random stream stays as is.
        key = None
        if has_dropout(self, active_only=True):
            key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        where = _carried_position(args, kwargs)
        carried = None
        if where is not None:
            carried = args[where] if isinstance(where, int) else kwargs[where]
        rest = (list(args[1:]), dict(kwargs))
        others = floating_leaves(rest)
        carried_inputs = carried.checkpoint_inputs() if carried is not None else []
        shape: list[Any] = []  # the output's structure, its floating arrays taken out

        def run(params: Any, x: mx.array, extra: list[mx.array]) -> tuple[mx.array, ...]:
            self.update(params)
            fed = iter(extra[len(carried_inputs) :])
            call_args, call_kwargs = map_floating(rest, lambda _: next(fed))
            local = None
            if carried is not None:
                local = carried.replica(extra[: len(carried_inputs)])
                if isinstance(where, int):
                    call_args[where - 1] = local
                else:
                    call_kwargs[where] = local
            outer, _KeyStream.key = _KeyStream.key, key
            try:
                out = plain_call(self, x, *call_args, **call_kwargs)
            finally:
                _KeyStream.key = outer
            shape[:] = [map_floating(out, lambda _: _SLOT)]
            return (*floating_leaves(out), *(local.recorded() if local is not None else []))

        known = carried.known_output() if carried is not None and key is None else None
        if known is not None and known.shape != args[0].shape:
            raise ValueError(
                f"a replayed block output of shape {known.shape} for an input of shape "
                f"{args[0].shape}"
            )
        try:
            outputs = recompute_in_backward(run, None if known is None else (known,))(
                params, args[0], [*carried_inputs, *others]
            )
        finally:
            self.update(params)  # leave the module holding its own arrays, not traced copies
        if known is not None:
            out, recorded = outputs[0], list(outputs[1:])
        else:
            produced = iter(outputs)
            out = _refill(shape[0], produced)
            recorded = list(produced)
        if carried is not None:
            carried.adopt(recorded)
        return out

    return __call__


_SLOT = object()  # where an output's floating array was taken out


def _refill(template: Any, values: Iterator[mx.array]) -> Any:
    """``template`` (an output with :data:`_SLOT` where its floating arrays were) with the
    next ``values`` put back in :func:`map_floating`'s order."""
    return _map_leaves(template, lambda v: v is _SLOT, lambda _: next(values))


def _mlp_width(mlp: nn.Module) -> int:
    """The widest output of the MLP's matrices (its intermediate size)."""
    widths = [
        int(m.weight.shape[0])
        for _, m in mlp.named_modules()
        if isinstance(getattr(m, "weight", None), mx.array) and m.weight.ndim == 2
    ]
    return max(widths, default=1)


def mlp_chunk_tokens(mlp: nn.Module, budget_bytes: int | None = None) -> int:
    """Tokens per MLP chunk so that one chunk's buffers stay within the budget."""
    budget = MLP_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (_MLP_BUFFERS * 4 * _mlp_width(mlp)))


def _chunked_mlp_call(plain_call: Callable) -> Callable:
    """An MLP's ``__call__`` that runs large inputs in chunks of tokens."""

    def __call__(self: nn.Module, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        tokens, step = x.size // x.shape[-1], mlp_chunk_tokens(self)
        if tokens <= step or args or kwargs:  # small, or not a plain position-wise call
            return plain_call(self, x, *args, **kwargs)
        params = self.trainable_parameters()

        def run(params: Any, chunk: mx.array, lo: int, hi: int) -> tuple[mx.array]:
            self.update(params)
            return (plain_call(self, chunk),)

        try:
            (out,) = recomputing(run, tokens, step)(params, x.reshape(tokens, x.shape[-1]))
        finally:
            self.update(params)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return __call__


@contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Checkpoint every transformer block of ``model`` inside the context; yields their count."""
    blocks = transformer_blocks(model) if enabled and checkpoint_blocker(model) is None else []
    if not blocks:
        yield 0
        return
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for block in blocks:
            swapped.append((block, type(block)))
            block.__class__ = subclass_with_call(
                type(block), "Checkpointed", lambda cls: _checkpointing_call(cls.__call__)
            )
            mlp = getattr(block, "mlp", None)
            if isinstance(mlp, nn.Module):
                swapped.append((mlp, type(mlp)))
                mlp.__class__ = subclass_with_call(
                    type(mlp), "Chunked", lambda cls: _chunked_mlp_call(cls.__call__)
                )
            for _, module in block.named_modules():
                if type(module) is nn.Dropout:
                    swapped.append((module, nn.Dropout))
                    module.__class__ = _KeyedDropout
        yield len(blocks)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
