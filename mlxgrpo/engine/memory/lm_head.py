"""Per-token log-probs of a sequence under a model, with a chunked LM head
(docs/architecture.md §4 and §5).

The vocabulary-sized LM head dominates memory at real shapes: at Qwen2.5's 151,936 tokens one
micro-batch of 8 x 128 completion positions has 0.6 GB of float32 logits, and autodiff keeps the
logits, their probabilities and their gradient. Here the head runs only on the positions whose
log-prob is used (completion tokens, when a mask is given), in chunks of positions, one in
memory at a time (:mod:`~mlxgrpo.engine.memory.chunked_head`). A frozen linear head
(:mod:`~mlxgrpo.engine.memory.frozen_head`) takes long chunks, walks the vocabulary in small tiles
and prepares each chunk's gradient in the forward pass; a trainable one takes chunks whose
logits fit :data:`HEAD_BUDGET_BYTES` and recomputes them in the backward pass. The results are
the same numbers, only the memory and speed differ."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxgrpo.engine.memory import chunked_head, packing, shared_prefix
from mlxgrpo.engine.memory.frozen_head import (
    FROZEN_HEAD_POSITIONS,
    frozen_head_logprobs,
    target_rows,
)
from mlxgrpo.generation.logprobs import tempered, token_logprobs, token_logprobs_and_entropy
from mlxgrpo.models.heads import head_linear, split_head

# Memory one chunk of the head may take. A chunk holds about eight float32 [chunk, V] buffers
# at its peak (logits, shifted logits, exponentials, probabilities, the logits' gradient and
# temporaries), measured; at Qwen2.5's vocabulary that is 69 positions, a size at which the
# head's matmul still runs near full speed on CPU.
HEAD_BUDGET_BYTES = 320 * 2**20
_BUFFERS_PER_CHUNK = 8


def split_lm_head(model: nn.Module) -> tuple[Callable, Callable] | None:
    """``(trunk, head)`` with ``model(x) == head(trunk(x))``, or None when the model does more
    after its head (:func:`mlxgrpo.models.heads.split_head`).

    Lets callers apply the (vocabulary-sized, often dominant) LM head to the positions they
    need only. Looked up on every call, so swapped adapter modules are honoured.
    """
    return split_head(model)


def head_chunk_positions(
    vocab_size: int, budget_bytes: int = HEAD_BUDGET_BYTES, buffers: int = _BUFFERS_PER_CHUNK
) -> int:
    """Positions per head chunk so that one chunk's float32 buffers stay within the budget."""
    return max(1, budget_bytes // (buffers * 4 * max(1, vocab_size)))


def _identity(x: mx.array) -> mx.array:
    return x


def _head_owner(head: Callable) -> nn.Module | None:
    """The module whose weights the head uses (an `as_linear` method's embedding, or itself)."""
    linear = head_linear(head)
    owner = getattr(linear, "__self__", linear)
    return owner if isinstance(owner, nn.Module) else None


def _vocab_size(owner: nn.Module | None, fallback: int) -> int:
    weight = getattr(owner, "weight", None)
    return int(weight.shape[0]) if weight is not None else fallback


def _chunk_function(
    head: Callable,
    owner: nn.Module | None,
    with_entropy: bool,
    entropy_grad,
    temperature: float,
    with_top: bool = False,
):
    """(params, features [C, H], targets [C]) -> (logp [C], [entropy [C],] [top [C]])."""

    def run(params: Any, features: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
        if owner is not None:
            owner.update(params)  # trainable head weights are explicit inputs
        logits = head(features)
        if temperature != 1.0:  # as the sampler tempers them
            logits = tempered(logits, temperature)
        if with_entropy:
            outputs = token_logprobs_and_entropy(logits, targets, entropy_grad=entropy_grad)
        else:
            outputs = (token_logprobs(logits, targets),)
        if with_top:  # 1 where the target has the highest logit (ties included)
            picked = mx.take_along_axis(logits, targets[:, None], axis=-1).squeeze(-1)
            top = picked >= mx.max(logits, axis=-1)
            outputs = (*outputs, mx.stop_gradient(top.astype(mx.float32)))
        return tuple(outputs)

    return run


def _apply_head(
    head: Callable,
    features: mx.array,
    targets: mx.array,
    *,
    chunk_size: int | None,
    with_entropy: bool,
    entropy_grad: bool,
    differentiable: bool,
    temperature: float,
    with_top: bool = False,
) -> tuple[mx.array, ...]:
    """Log-probs (and entropies, and whether each target is the top token) of flat
    ``features`` [P, H] -> [P], chunk by chunk."""
    owner = _head_owner(head)
    positions = int(targets.shape[0])
    params = owner.trainable_parameters() if owner is not None else {}
    if not params and not (with_entropy and entropy_grad) and target_rows(head) is not None:
        # A frozen linear head: the written-out path tiles the vocabulary, so its chunks of
        # positions can be long.
        return frozen_head_logprobs(
            head,
            features,
            targets,
            step=chunk_size or FROZEN_HEAD_POSITIONS,
            with_entropy=with_entropy,
            differentiable=differentiable,
            temperature=temperature,
            with_top=with_top,
        )
    step = chunk_size or head_chunk_positions(_vocab_size(owner, positions))
    run = _chunk_function(head, owner, with_entropy, entropy_grad, temperature, with_top)
    try:
        if positions <= step:  # one chunk: keep its logits for the backward pass
            return run(params, features, targets)

        def chunk(params: Any, features: mx.array, lo: int, hi: int) -> tuple[mx.array, ...]:
            return run(params, features, targets[lo:hi])

        if differentiable and not params and not (with_entropy and entropy_grad):
            outputs = 1 + with_entropy + with_top
            prepared = chunked_head.gradient_in_forward(chunk, positions, step, outputs)
            return prepared(params, features)
        return chunked_head.recomputing(chunk, positions, step)(params, features)
    finally:
        if owner is not None:
            owner.update(params)  # leave the module holding its own arrays, not traced copies


def _selected_positions(mask: mx.array | None, rows: int, length: int) -> np.ndarray | None:
    """Flat indices of the [rows, length] positions whose log-prob is wanted (None = all)."""
    if mask is None:
        return None
    selected = np.flatnonzero(np.asarray(mask).reshape(-1) > 0)
    return None if selected.size == rows * length else selected


@overload
def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: Literal[False] = False,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
    mask: mx.array | None = None,
    differentiable: bool = True,
    prompt_lengths: Any = None,
    temperature: float = 1.0,
    known: shared_prefix.KnownOutputs | None = None,
    segments: Any = None,
    with_top: Literal[False] = False,
) -> mx.array: ...


@overload
def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: Literal[True],
    chunk_size: int | None = None,
    entropy_grad: bool = True,
    mask: mx.array | None = None,
    differentiable: bool = True,
    prompt_lengths: Any = None,
    temperature: float = 1.0,
    known: shared_prefix.KnownOutputs | None = None,
    segments: Any = None,
    with_top: Literal[False] = False,
) -> tuple[mx.array, mx.array]: ...


@overload
def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
    mask: mx.array | None = None,
    differentiable: bool = True,
    prompt_lengths: Any = None,
    temperature: float = 1.0,
    known: shared_prefix.KnownOutputs | None = None,
    segments: Any = None,
    *,
    with_top: Literal[True],
) -> tuple[mx.array, ...]: ...


def sequence_logprobs(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
    mask: mx.array | None = None,
    differentiable: bool = True,
    prompt_lengths: Any = None,
    temperature: float = 1.0,
    known: shared_prefix.KnownOutputs | None = None,
    segments: Any = None,
    with_top: bool = False,
) -> mx.array | tuple[mx.array, ...]:
    """Per-token log-probs of ``tokens[:, start:]`` with the whole prompt in context.

    Runs the model once over ``tokens[:, :-1]`` (mlx-lm call convention) and keeps positions
    ``start-1 .. T-2`` (those predicting ``tokens[:, start:]``). For mlx-lm architectures whose
    output is just ``lm_head(model.model(x))`` (see :func:`split_lm_head`) the LM head only runs
    on those positions, ``chunk_size`` at a time (None = from the vocabulary and
    :data:`HEAD_BUDGET_BYTES`); other models run whole and are sliced.

    ``mask`` [N, T] (e.g. the completion mask): only positions where it is non-zero are
    computed; the others are 0 in the results. With ``prompt_lengths`` [N] too, rows that share
    a prompt run it through the trunk once (:mod:`~mlxgrpo.engine.memory.shared_prefix`).
    ``differentiable=False`` says no gradient will be taken (a reference pass), so a frozen
    head's chunks skip preparing one (a gradient taken anyway is still right, only slower).
    Returns logp [N, T-start] float32, or ``(logp, entropy)`` when ``with_entropy`` is true
    (``entropy_grad=False``: the entropy is a metric, not differentiated). With ``temperature``
    T the log-probs and entropies are those of ``softmax(logits / T)``, the distribution the
    rollout samples from. ``known``: the blocks' outputs in the shared-prefix layout's suffix
    pass, already computed by the rollout (:mod:`~mlxgrpo.engine.memory.replay`); ignored when that
    layout does not apply. ``segments`` [N, T]: which demonstration each position of a packed
    row belongs to (:mod:`~mlxgrpo.engine.memory.packing`); none attends to another's, and the
    model must pass :func:`~mlxgrpo.engine.memory.packing.packing_blocker`. ``with_top``: also
    return, last, 1.0 where the target token has the highest logit (ties included), without
    gradient (token accuracy).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows, length = tokens.shape
    if not 1 <= start < length:
        raise ValueError(f"start must be in [1, {length - 1}] for {length} tokens, got {start}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    width = length - start
    head, features, selected = _head_features(
        model, tokens, start, mask, prompt_lengths, known, segments
    )
    targets = tokens[:, start:].reshape(-1)
    if selected is not None:
        targets = targets[mx.array(selected, dtype=mx.int32)]
    outputs = _apply_head(
        head or _identity,
        features,
        targets,
        # Without a split head the features are the logits: nothing to chunk.
        chunk_size=chunk_size or (None if head else int(targets.shape[0])),
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        differentiable=differentiable,
        temperature=temperature,
        with_top=with_top,
    )
    if selected is not None:
        outputs = [_scatter(values, selected, rows * width) for values in outputs]
    logp, *rest = (values.reshape(rows, width) for values in outputs)
    return (logp, *rest) if with_entropy or with_top else logp


def _head_features(
    model: nn.Module,
    tokens: mx.array,
    start: int,
    mask: mx.array | None,
    prompt_lengths: Any,
    known: shared_prefix.KnownOutputs | None,
    segments: Any = None,
) -> tuple[Callable | None, mx.array, np.ndarray | None]:
    """``(head, features, selected)``: the LM head (None when the model is not split and the
    features are its logits), the flat features [P, H] of the positions whose log-prob is
    wanted, and those positions' flat indices in [N, T-start] (None = all)."""
    rows, length = tokens.shape
    width = length - start
    split = split_lm_head(model)
    layout = None
    if segments is None:
        layout = _shared_prefix_layout(model, split, tokens, mask, prompt_lengths)
    if layout is not None:
        assert split is not None and mask is not None
        trunk, head = split
        hidden = shared_prefix.suffix_hidden(trunk, layout, known)
        features = hidden.reshape(-1, hidden.shape[-1])[mx.array(layout.source)]
        selected = _selected_positions(mask[:, start:], rows, width)
        if selected is None:
            selected = np.arange(rows * width)
        return head, features, selected
    selected = _selected_positions(None if mask is None else mask[:, start:], rows, width)
    if segments is not None:
        if split is None:
            raise ValueError("packed rows need a model whose trunk runs under its LM head")
        trunk, head = split
        caches = packing.segment_caches(trunk, np.asarray(segments)[:, :-1])
        hidden = trunk(tokens[:, :-1], caches)[:, start - 1 :]
        features = hidden.reshape(rows * width, hidden.shape[-1])
    elif split is None:
        logits = model(tokens[:, :-1])[:, start - 1 :]
        features, head = logits.reshape(rows * width, -1), None
    else:
        trunk, head = split
        hidden = trunk(tokens[:, :-1], None)[:, start - 1 :]
        features = hidden.reshape(rows * width, hidden.shape[-1])
    if selected is not None:
        features = features[mx.array(selected, dtype=mx.int32)]
    return head, features, selected


def _shared_prefix_layout(
    model: nn.Module,
    split: tuple[Callable, Callable] | None,
    tokens: mx.array,
    mask: mx.array | None,
    prompt_lengths: Any,
) -> shared_prefix.SharedPrefixPlan | None:
    """The shared-prompt layout of the rows, when the model, the mask and the prompt lengths
    allow one (:mod:`~mlxgrpo.engine.memory.shared_prefix`)."""
    if split is None or mask is None or prompt_lengths is None:
        return None
    if not shared_prefix.supports(split[0], model):
        return None
    return shared_prefix.plan(np.asarray(tokens), np.asarray(prompt_lengths), np.asarray(mask) > 0)


def _scatter(values: mx.array, selected: np.ndarray, size: int) -> mx.array:
    """[P] ``values`` placed at flat ``selected`` positions of a zero [size] array (a gather)."""
    inverse = np.full(size, len(selected), dtype=np.int32)  # unselected -> the appended zero
    inverse[selected] = np.arange(len(selected), dtype=np.int32)
    padded = mx.concatenate([values, mx.zeros((1,), dtype=values.dtype)])
    return padded[mx.array(inverse)]
