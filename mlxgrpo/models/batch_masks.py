"""Attention code in mlx-lm that cannot take one mask per row, adapted so that it can.

A batched rollout (a merged cache of prompts of different lengths) and the shared-prompt pass
give attention a mask per row, [rows, 1, queries, keys]. Most of mlx-lm's attention passes it
to ``scaled_dot_product_attention``, which broadcasts it over the heads. Gemma 2 computes its
scores itself, grouped as [rows, kv heads, queries per kv head, queries, keys], and a
four-axis mask lines up with the wrong axes there. :data:`GROUPED_SCORE_ATTENTION` names such
classes; :func:`fit_batch_masks` gives those modules of a model a ``__call__`` that adds the
group axis to a per-row mask first. The result is the same function: a mask of one row
(mlx-lm's own ``[queries, keys]`` masks) is passed on as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.models.class_swap import subclass_with_call

# (mlx-lm module, class) of attentions that group their scores by KV head before masking.
GROUPED_SCORE_ATTENTION = frozenset({("mlx_lm.models.gemma2", "Attention")})


def _grouped_mask_call(plain_call: Callable) -> Callable:
    def __call__(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if isinstance(mask, mx.array) and mask.ndim == 4 and getattr(self, "repeats", 1) > 1:
            mask = mx.expand_dims(mask, 2)  # [rows, 1, 1, queries, keys]
        return plain_call(self, x, mask, cache)

    return __call__


def fit_batch_masks(model: nn.Module) -> int:
    """Adapt the attention modules of ``model`` that need it; returns how many were."""
    count = 0
    for _, module in model.named_modules():
        cls = type(module)
        if (cls.__module__, cls.__name__) in GROUPED_SCORE_ATTENTION:
            module.__class__ = subclass_with_call(
                cls, "RowMasked", lambda c: _grouped_mask_call(c.__call__)
            )
            count += 1
    return count
