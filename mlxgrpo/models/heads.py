"""Where a model's LM head is: the trunk/head split the memory techniques build on.

A causal LM in mlx-lm is ``Model(x) = head(trunk(x))`` for most architectures: ``trunk`` is
a child such as ``model.model`` (embeddings, blocks, final norm; :data:`TRUNK_NAMES`) and
``head`` a sibling such as ``model.lm_head`` (:data:`HEAD_NAMES`), or the embedding matrix read
as a linear layer when the embeddings are tied (``args.tie_word_embeddings`` or, as Gemma 3
does after loading a checkpoint without ``lm_head.weight``, the model's own
``tie_word_embeddings``). Splitting there lets the engine run the vocabulary-sized head on the
positions it needs only, in tiles (docs/architecture.md §5).

Some architectures do more around the head, position by position: a final-logit softcap
(Gemma 2 and 4), a logit scale (Cohere, Granite, Falcon-H1's tied head), features scaled down
before it (MiniCPM). :data:`LOGIT_MAPS` says, per architecture, what that is (a
:class:`LogitMap`); the head is then a :class:`MappedHead` that applies it in the model's own
order, and the tiled head applies the same map tile by tile. Rather than trust any of this,
:func:`split_head` checks once per model, on a few tokens, that ``head(trunk(x))`` reproduces
``model(x)`` exactly; a model that does anything else is not split, and the engine runs it
whole. Architectures known to be plain skip that check (:data:`PLAIN_HEAD_ARCHITECTURES`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.models.blocks import architecture, without_dropout

# mlx-lm model modules whose Model.__call__ is exactly ``head(self.model(inputs, cache))``.
PLAIN_HEAD_ARCHITECTURES = frozenset(
    {"llama", "qwen2", "qwen3", "qwen3_moe", "olmo2", "smollm3", "phi3"}
)
PROBE_TOKENS = 4


@dataclass(frozen=True)
class LogitMap:
    """What a model does around its head's matrix product, position by position:
    ``softcap(linear(f / input_divisor) * multiplier / divisor)``, with
    ``softcap(z) = tanh(z / c) * c``. None: that step is absent."""

    input_divisor: float | None = None
    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    def logit_scale(self) -> float:
        """The factor the logits are scaled by before the softcap."""
        scale = 1.0 if self.multiplier is None else float(self.multiplier)
        return scale if self.divisor is None else scale / float(self.divisor)

    def is_identity(self) -> bool:
        return self == LogitMap()


class MappedHead:
    """The LM head together with its :class:`LogitMap`, applied in the model's own order (so
    that ``head(trunk(x))`` is bit for bit ``model(x)``). ``linear`` is the vocabulary
    projection: the ``lm_head`` module or the tied embedding's ``as_linear``."""

    def __init__(self, linear: Callable, logit_map: LogitMap) -> None:
        self.linear, self.logit_map = linear, logit_map

    def __call__(self, features: mx.array) -> mx.array:
        m = self.logit_map
        if m.input_divisor is not None:
            features = features / m.input_divisor
        out = self.linear(features)
        if m.multiplier is not None:
            out = out * m.multiplier
        if m.divisor is not None:
            out = out / m.divisor
        if m.softcap is not None:
            out = mx.tanh(out / m.softcap) * m.softcap
        return out


def head_linear(head: Callable) -> Callable:
    """The vocabulary projection inside a head from :func:`split_head`."""
    return head.linear if isinstance(head, MappedHead) else head


def head_logit_map(head: Callable) -> LogitMap:
    """The :class:`LogitMap` of a head from :func:`split_head` (identity for a plain one)."""
    return head.logit_map if isinstance(head, MappedHead) else LogitMap()


def _args(model: nn.Module) -> object:
    return getattr(model, "args", None) or getattr(getattr(model, "model", None), "args", None)


def _softcap(model: nn.Module) -> LogitMap:
    cap = getattr(model, "final_logit_softcapping", None)
    return LogitMap(softcap=float(cap) if cap else None)


def _tied(model: nn.Module) -> bool:
    """Whether the head is the embedding matrix: ``args.tie_word_embeddings`` or, as Gemma 3
    sets after loading a checkpoint without ``lm_head.weight``, the model's own flag."""
    tied = getattr(model, "tie_word_embeddings", None)
    if isinstance(tied, bool):
        return tied
    return bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))


def _minicpm(model: nn.Module) -> LogitMap:
    args = _args(model)
    if _tied(model):
        return LogitMap()
    return LogitMap(input_divisor=args.hidden_size / args.dim_model_base)


def _falcon_h1(model: nn.Module) -> LogitMap:
    args = _args(model)
    if not _tied(model):
        return LogitMap()
    return LogitMap(multiplier=args.lm_head_multiplier / args.embedding_multiplier)


# mlx-lm model modules whose Model.__call__ maps the head's output (the one table of them);
# every other architecture's map is the identity.
LOGIT_MAPS: dict[str, Callable[[nn.Module], LogitMap]] = {
    "gemma2": _softcap,
    "gemma3n": _softcap,
    "gemma4_text": _softcap,
    "cohere": lambda m: LogitMap(multiplier=m.model.args.logit_scale),
    "cohere2": lambda m: LogitMap(multiplier=m.model.args.logit_scale),
    "granite": lambda m: LogitMap(divisor=m.logits_scaling),
    "granitemoe": lambda m: LogitMap(divisor=m.logits_scaling),
    "granitemoehybrid": lambda m: LogitMap(divisor=m.logits_scaling),
    "minicpm": _minicpm,
    "minicpm3": _minicpm,
    "falcon_h1": _falcon_h1,
    "nanochat": lambda m: LogitMap(softcap=15.0),  # mlx-lm's softcap() default
    "recurrent_gemma": lambda m: LogitMap(softcap=m.args.logits_soft_cap or None),
}

# id(model) -> (a weak reference to it, whether its head splits off exactly).
_VERDICTS: dict[int, tuple[weakref.ref, bool]] = {}


# Where mlx-lm's models keep their parts, first name first: the trunk among a model's
# children, the head beside it, the embedding inside the trunk (read as the head when tied).
TRUNK_NAMES = ("model", "transformer", "backbone", "language_model")
HEAD_NAMES = ("lm_head", "output", "embed_out")
EMBEDDING_NAMES = (
    "embed_tokens", "wte", "tok_embeddings", "token_embeddings", "embeddings", "word_embeddings"
)  # fmt: skip
_NESTING = 3  # wrappers (a vision model's language model) go this deep at most


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The first of ``names`` that is a child module of ``module`` (a stored child, not a
    property: Qwen 3.5's wrapper has a ``model`` property that skips its language model)."""
    for name in names:
        child = module.get(name)
        if isinstance(child, nn.Module):
            return child
    return None


def conventional_head(model: nn.Module) -> tuple[nn.Module, Callable] | None:
    """``(trunk, head)`` where mlx-lm's conventions put them, or None; not yet checked.

    The trunk is the model's child named in :data:`TRUNK_NAMES`; the head is its sibling named
    in :data:`HEAD_NAMES`, or, when the model ties its embeddings or has no such sibling, the
    trunk's embedding (:data:`EMBEDDING_NAMES`) read as a linear layer. A wrapper (a trunk
    that has a trunk of its own: a multimodal model around its language model) is looked
    into. The head is the vocabulary projection, or a :class:`MappedHead` where the
    architecture maps its output (:data:`LOGIT_MAPS`). The trunk is called as
    ``trunk(tokens, cache)``."""
    node = model
    for _ in range(_NESTING):
        trunk = _child(node, TRUNK_NAMES)
        if trunk is None:
            return None
        if _child(trunk, TRUNK_NAMES) is not None:  # a wrapper around a whole model
            node = trunk
            continue
        linear: Callable | None = _child(node, HEAD_NAMES)
        if linear is None or _tied(node):
            embedding = _child(trunk, EMBEDDING_NAMES)
            linear = embedding.as_linear if hasattr(embedding, "as_linear") else None
        return None if linear is None else (trunk, _with_map(model, node, linear))
    return None


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The token embedding inside the trunk (:data:`EMBEDDING_NAMES`), wrappers looked into;
    None where mlx-lm's conventions do not find one."""
    node = model
    for _ in range(_NESTING):
        trunk = _child(node, TRUNK_NAMES)
        if trunk is None:
            return None
        if _child(trunk, TRUNK_NAMES) is None:
            return _child(trunk, EMBEDDING_NAMES)
        node = trunk
    return None


def _with_map(model: nn.Module, node: nn.Module, linear: Callable) -> Callable:
    """``linear`` with the architecture's logit map read from ``node`` (the module that holds
    the trunk and head), or ``linear`` itself where the map is the identity."""
    reader = LOGIT_MAPS.get(architecture(model))
    try:
        logit_map = reader(node) if reader is not None else LogitMap()
    except (AttributeError, TypeError, ZeroDivisionError):
        logit_map = LogitMap()  # not as the table expects: the exactness check will say so
    return linear if logit_map.is_identity() else MappedHead(linear, logit_map)


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


def _probe(model: nn.Module) -> bool:
    found = conventional_head(model)
    if found is None:
        return False
    trunk, head = found
    with without_dropout(model):  # two forward passes must see the same function
        tokens = mx.arange(PROBE_TOKENS, dtype=mx.int32)[None]
        try:
            whole, split = model(tokens), head(trunk(tokens, None))
        except (TypeError, ValueError, AttributeError, IndexError):
            return False  # a trunk that cannot run alone (it wants a cache, say) is not split
        if not isinstance(whole, mx.array) or whole.shape != split.shape:
            return False
        return bool(mx.array_equal(whole.astype(mx.float32), split.astype(mx.float32)).item())
