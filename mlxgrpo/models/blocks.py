"""What the memory techniques and the rollout's recorder know about a model's structure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.nn as nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (mlx-lm models expose them as ``model.layers``)."""
    blocks = getattr(model, "layers", None)
    return list(blocks) if blocks is not None else []


def _caches(model: nn.Module) -> list | None:
    """``model.make_cache()``, or None for models without one (mlx-lm then gives every layer a
    plain ``KVCache``)."""
    make_cache = getattr(model, "make_cache", None)
    return make_cache() if callable(make_cache) else None


def architecture(model: nn.Module) -> str:
    """The mlx-lm model type a model instance comes from (its module's name), or ''."""
    package, _, name = type(model).__module__.rpartition(".")
    return name if package == "mlx_lm.models" else ""


# Architectures whose blocks hand arrays to later blocks through objects the engine cannot see,
# so that a checkpointed block would lose their gradient: checkpointing is off, for this reason.
UNCHECKPOINTABLE = {
    "afm7": "its later blocks read keys and values that an earlier block leaves in its cache",
}


def checkpoint_blocker(model: nn.Module) -> str | None:
    """Why ``model``'s blocks cannot be checkpointed, or None when they can."""
    if not transformer_blocks(model):
        return "no transformer blocks at model.layers"
    return UNCHECKPOINTABLE.get(architecture(model))


# Where a trunk keeps its blocks, first name first (mlx-lm's Llama-style trunks, GPT-2-style
# ones, DBRX).
BLOCK_NAMES = ("layers", "h", "blocks")


def trunk_blocks(trunk: nn.Module) -> list[nn.Module]:
    """The blocks of a trunk (the module under the LM head), in order; [] when none are found."""
    for name in BLOCK_NAMES:
        blocks = getattr(trunk, name, None)
        if isinstance(blocks, (list, tuple)) and blocks:
            return list(blocks)
    return []


def plain_kv_caches(model: nn.Module) -> bool:
    """Whether every layer of ``model`` caches plain keys and values (mlx-lm's ``KVCache``): no
    sliding window (a rotating cache), no recurrent state."""
    from mlx_lm.models.cache import KVCache

    caches = _caches(model)
    return caches is None or all(type(cache) is KVCache for cache in caches)


def attention_caches(model: nn.Module) -> bool:
    """Whether every layer of ``model`` caches keys and values, all of them or a sliding
    window's worth (no recurrent or convolutional state, no cache of another kind)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    caches = _caches(model)
    return caches is None or all(type(cache) in (KVCache, RotatingKVCache) for cache in caches)


def sliding_windows(model: nn.Module) -> list[int]:
    """The window sizes of ``model``'s sliding-window layers (from their rotating caches)."""
    from mlx_lm.models.cache import RotatingKVCache

    caches = _caches(model) or []
    return [int(c.max_size) for c in caches if type(c) is RotatingKVCache]


def complete_module_state(model: nn.Module) -> None:
    """Give every module of ``model`` the state ``nn.Module.__init__`` sets, where its class
    skipped that call (mlx-lm's RecurrentGemma ``Model``): without it, freezing fails."""
    for _, module in model.named_modules():
        if "_no_grad" not in vars(module):
            module._no_grad = set()
        if "_training" not in vars(module):
            module._training = True


def _depth(named: tuple[str, nn.Module]) -> int:
    return named[0].count(".") + bool(named[0])  # the root's name is ""


@contextmanager
def without_dropout(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the context when a dropout of it is active (so that two
    forward passes compute the same function), then every module back in its own mode."""
    # Each module's mode, parents first: train() sets a whole subtree, so restoring in this
    # order leaves every module as it was.
    modes = [(module, module.training) for _, module in sorted(model.named_modules(), key=_depth)]
    switched = has_dropout(model, active_only=True)
    if switched:
        model.eval()
    try:
        yield
    finally:
        if switched:
            for module, training in modes:
                module.train(training)


def has_dropout(module: nn.Module, *, active_only: bool = False) -> bool:
    """Whether ``module`` holds a dropout that drops something (``p > 0``); with
    ``active_only``, only one in training mode counts."""
    return any(
        isinstance(m, nn.Dropout) and (m.training or not active_only) and m._p_1 < 1
        for _, m in module.named_modules()
    )
