"""Several short demonstrations in one row (``sft.packing``), none attending to another
(docs/architecture.md §5).

Supervised fine-tuning on short examples pads every row to the longest; packing fills rows
up to a length instead, so the trunk runs fewer padding tokens. Each layer's cache in the
packed pass (:class:`SegmentCache`) gives the model a block-diagonal causal mask: a token sees
the earlier tokens of its own demonstration only, as mlx-lm's models ask their caches for
masks (sliding windows included). Positions run on through the row; with rotary or no
position embeddings attention depends only on the distance between tokens, so every
demonstration's log-probs are those it has alone, up to float rounding. Rather than trust a
list of model classes, each model is checked once (:func:`packing_blocker`) on a probe row:
absolute position embeddings, or layers that carry a state from token to token (recurrent and
convolutional ones), fail it and the run trains unpacked, saying why.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxgrpo.engine.memory.shared_prefix import states_agree
from mlxgrpo.models.blocks import attention_caches, trunk_blocks, without_dropout

PROBE_LENGTHS = (7, 5, 4)  # the probe row's demonstrations
PROBE_VOCAB = 31  # ids every vocabulary has

# id(model) -> (a weak reference to it, why not, or None)
_VERDICTS: dict[int, tuple[weakref.ref, str | None]] = {}


class SegmentCache:
    """A layer's cache in a packed pass: keys and values pass through unchanged, and the mask
    it gives lets a token see earlier tokens of its own segment only."""

    offset = 0

    def __init__(self, masks: Callable[[int | None], mx.array]) -> None:
        self.masks = masks

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return self.masks(window_size)

    # The checkpointing protocol (mlxgrpo.engine.memory.recompute.CarriedState): no arrays.
    def checkpoint_inputs(self) -> list[mx.array]:
        return []

    def replica(self, inputs: list[mx.array]) -> SegmentCache:
        return self

    def recorded(self) -> list[mx.array]:
        return []

    def adopt(self, recorded: list[mx.array]) -> None:
        pass

    def known_output(self) -> mx.array | None:
        return None


def segment_mask(segments: np.ndarray, window: int | None = None) -> mx.array:
    """[N, 1, T, T] bool: query t sees key s when both are in one segment and s <= t (and, with
    a ``window``, t - s < window). Each padding position is a segment of its own."""
    segments = np.asarray(segments)
    steps = np.arange(segments.shape[1])[:, None] - np.arange(segments.shape[1])[None, :]
    visible = (segments[:, :, None] == segments[:, None, :]) & (steps >= 0)[None]
    if window is not None:
        visible &= (steps < window)[None]
    return mx.array(visible[:, None])


def segment_caches(trunk: nn.Module, segments: np.ndarray) -> list[SegmentCache]:
    """One :class:`SegmentCache` per block of ``trunk`` for a pass over rows whose positions
    belong to ``segments`` [N, T] (the pass's input positions)."""
    built: dict[int | None, mx.array] = {}

    def masks(window: int | None) -> mx.array:
        if window not in built:
            built[window] = segment_mask(segments, window)
        return built[window]

    cache = SegmentCache(masks)
    return [cache] * len(trunk_blocks(trunk))


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most ``capacity`` tokens, longest first,
    each into the first row it fits (a sequence longer than ``capacity`` gets a row alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def packing_blocker(model: nn.Module, trunk: nn.Module | None) -> str | None:
    """Why demonstrations cannot share a row in ``model`` (``trunk``: the module under its LM
    head, None when it has none to split off), or None when they can. Checked once per model,
    outside any gradient transformation."""
    if trunk is None or not trunk_blocks(trunk):
        return "the trunk cannot run alone under its LM head"
    if not attention_caches(model):
        return (
            "some layers cache more than keys and values (a recurrent, convolutional or "
            "chunked state), which would carry from one example to the next"
        )
    seen = _VERDICTS.get(id(model))
    if seen is not None and seen[0]() is model:
        return seen[1]
    with without_dropout(model):
        verdict = _probe(trunk)
    key = id(model)
    _VERDICTS[key] = (weakref.ref(model, lambda _ref: _VERDICTS.pop(key, None)), verdict)
    return verdict


def _probe(trunk: nn.Module) -> str | None:
    """None when a packed probe row gives each of its demonstrations' hidden states alone."""
    ids = (np.arange(sum(PROBE_LENGTHS)) * 5 + 2) % PROBE_VOCAB
    segments = np.repeat(np.arange(len(PROBE_LENGTHS)), PROBE_LENGTHS)[None]
    try:
        packed = trunk(mx.array(ids[None]), segment_caches(trunk, segments))[0]
        alone, begin = [], 0
        for length in PROBE_LENGTHS:
            alone.append(trunk(mx.array(ids[None, begin : begin + length]), None)[0])
            begin += length
        agree = states_agree(mx.concatenate(alone), packed)
    except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        return f"its attention cannot take a per-row mask ({type(e).__name__})"
    if not agree:
        return "a token's hidden state depends on its absolute position or on other examples"
    return None
