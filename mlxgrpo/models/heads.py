"""Where a model's LM head is: the trunk/head split the memory techniques build on.

A causal LM in mlx-lm is ``Model(x) = head(trunk(x))`` for most architectures: ``trunk`` is
``model.model`` (embeddings, blocks, final norm) and ``head`` is ``model.lm_head``, or the
embedding matrix read as a linear layer when the embeddings are tied (``args.tie_word_embeddings``
or, as Gemma 3 does after loading a checkpoint without ``lm_head.weight``, the model's own
``tie_word_embeddings``). Splitting there lets the engine run the vocabulary-sized head on the
positions it needs only, in tiles (docs/architecture.md §5).

Some architectures do more after the head: a final-logit softcap (Gemma 2), a logit scale
(Granite, Cohere), extra inputs. Rather than list every architecture, :func:`split_head` finds
the conventional trunk and head and then checks once per model, on a few tokens, that
``head(trunk(x))`` reproduces ``model(x)`` exactly; a model that does anything else is not
split, and the engine runs it whole. Architectures known to be plain skip that check
(:data:`PLAIN_HEAD_ARCHITECTURES`, the one override table).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.models.blocks import has_dropout

# mlx-lm model modules whose Model.__call__ is exactly ``head(self.model(inputs, cache))``.
PLAIN_HEAD_ARCHITECTURES = frozenset(
    {"llama", "qwen2", "qwen3", "qwen3_moe", "olmo2", "smollm3", "phi3"}
)
PROBE_TOKENS = 4

# id(model) -> (a weak reference to it, whether its head splits off exactly).
_VERDICTS: dict[int, tuple[weakref.ref, bool]] = {}


def architecture(model: nn.Module) -> str:
    """The mlx-lm model type a model instance comes from (its module's name), or ''."""
    package, _, name = type(model).__module__.rpartition(".")
    return name if package == "mlx_lm.models" else ""


def conventional_head(model: nn.Module) -> tuple[nn.Module, Callable] | None:
    """``(trunk, head)`` where mlx-lm's conventions put them, or None; not yet checked."""
    trunk = getattr(model, "model", None)
    if not isinstance(trunk, nn.Module):
        return None
    lm_head = getattr(model, "lm_head", None)
    tied = getattr(model, "tie_word_embeddings", None)
    if not isinstance(tied, bool):
        tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    if isinstance(lm_head, nn.Module) and not tied:
        return trunk, lm_head
    embedding = getattr(trunk, "embed_tokens", None)
    if embedding is not None and hasattr(embedding, "as_linear"):
        return trunk, embedding.as_linear
    return None


def split_head(model: nn.Module) -> tuple[nn.Module, Callable] | None:
    """``(trunk, head)`` with ``model(x) == head(trunk(x))``, or None when the model does
    anything else after its head (or has no conventional head).

    Looked up on every call, so swapped adapter modules are honoured; the check behind it runs
    once per model (:func:`head_splits`)."""
    found = conventional_head(model)
    if found is None or not head_splits(model):
        return None
    return found


def head_splits(model: nn.Module) -> bool:
    """Whether ``model``'s conventional head reproduces its output exactly (cached per model).

    Call it once outside any gradient transformation (the engine does, when a run is set up):
    the first call runs the model on a few tokens."""
    if architecture(model) in PLAIN_HEAD_ARCHITECTURES:
        return conventional_head(model) is not None
    seen = _VERDICTS.get(id(model))
    if seen is not None and seen[0]() is model:
        return seen[1]
    verdict = _probe(model)
    key = id(model)
    _VERDICTS[key] = (weakref.ref(model, lambda _ref: _VERDICTS.pop(key, None)), verdict)
    return verdict


def _depth(named: tuple[str, nn.Module]) -> int:
    return named[0].count(".") + bool(named[0])  # the root's name is ""


def _probe(model: nn.Module) -> bool:
    found = conventional_head(model)
    if found is None:
        return False
    trunk, head = found
    # Each module's mode, parents first: train() sets a whole subtree, so restoring in this
    # order leaves every module as it was.
    modes = [(module, module.training) for _, module in sorted(model.named_modules(), key=_depth)]
    switched = has_dropout(model, active_only=True)
    if switched:
        model.eval()  # two forward passes must see the same function
    try:
        tokens = mx.arange(PROBE_TOKENS, dtype=mx.int32)[None]
        try:
            whole, split = model(tokens), head(trunk(tokens))
        except (TypeError, ValueError, AttributeError, IndexError):
            return False  # a trunk that cannot run alone (it wants a cache, say) is not split
        if not isinstance(whole, mx.array) or whole.shape != split.shape:
            return False
        return bool(mx.array_equal(whole.astype(mx.float32), split.astype(mx.float32)).item())
    finally:
        if switched:
            for module, training in modes:
                module.train(training)
