"""Subclasses that change how a module is called, made once per class.

The memory techniques (:mod:`~mlxgrpo.engine.memory.recompute`), the rollout's activation
recorder (:mod:`~mlxgrpo.generation.recording`) and the CPU kernels
(:mod:`~mlxgrpo.models.cpu_kernels`) change what a module's ``__call__`` does by switching the
module's class (``module.__class__ = ...``) to a subclass with another ``__call__``: only that
instance changes, and switching the class back undoes it. Each subclass is made once per
(class, prefix) and kept, so a model switched twice gets the same classes.
"""

from __future__ import annotations

from collections.abc import Callable

# (class, prefix) -> the subclass made for it, or the class itself when it stays.
_SUBCLASSES: dict[tuple[type, str], type] = {}


def subclass_with_call(
    cls: type, prefix: str, make_call: Callable[[type], Callable | None]
) -> type:
    """``cls`` with ``__call__`` replaced by ``make_call(cls)``, named ``prefix + cls.__name__``.

    Made on the first request for (``cls``, ``prefix``) and the same class returned after that.
    When ``make_call`` returns None, ``cls`` itself is kept (and returned from then on).
    """
    key = (cls, prefix)
    if key not in _SUBCLASSES:
        call = make_call(cls)
        made = cls if call is None else type(f"{prefix}{cls.__name__}", (cls,), {"__call__": call})
        _SUBCLASSES[key] = made
    return _SUBCLASSES[key]
