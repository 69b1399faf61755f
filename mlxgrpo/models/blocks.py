"""What the memory techniques and the rollout's recorder know about a model's structure."""

from __future__ import annotations

import mlx.nn as nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (mlx-lm models expose them as ``model.layers``)."""
    blocks = getattr(model, "layers", None)
    return list(blocks) if blocks is not None else []


def plain_kv_caches(model: nn.Module) -> bool:
    """Whether every layer of ``model`` caches plain keys and values (mlx-lm's ``KVCache``): no
    sliding window (a rotating cache), no recurrent state. Models without ``make_cache`` get
    one ``KVCache`` per layer from mlx-lm, so they count as plain."""
    make_cache = getattr(model, "make_cache", None)
    if not callable(make_cache):
        return True
    from mlx_lm.models.cache import KVCache

    return all(type(cache) is KVCache for cache in make_cache())


def has_dropout(module: nn.Module, *, active_only: bool = False) -> bool:
    """Whether ``module`` holds a dropout that drops something (``p > 0``); with
    ``active_only``, only one in training mode counts."""
    return any(
        isinstance(m, nn.Dropout) and (m.training or not active_only) and m._p_1 < 1
        for _, m in module.named_modules()
    )
