"""The batched prompt cache a rollout decodes from (docs/architecture.md §6).

Each prompt is prefilled once, on its own and unpadded; the per-prompt caches are merged into
one left-padded batch cache (mlx-lm's ``merge``) whose last tokens run as one step, and the
cache grows once by the decode budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mlxgrpo.errors import MlxgrpoError
from mlxgrpo.generation.decode_state import batched_step
from mlxgrpo.generation.recording import ActivationRecorder
from mlxgrpo.models.blocks import architecture


def _merge_caches(model: nn.Module, caches: list[list[Any]]) -> list[Any]:
    """One batched (left-padded) cache per layer from per-sequence caches, via mlx-lm's merge."""
    batch_cache = []
    for layer, layer_cache in enumerate(caches[0]):
        if not hasattr(layer_cache, "merge"):
            raise MlxgrpoError(
                f"layer {layer} of {architecture(model) or type(model).__name__} uses "
                f"{type(layer_cache).__name__}, "
                "which cannot run batched generation",
                hint="use a model architecture that mlx-lm's batch_generate supports",
            )
        batch_cache.append(layer_cache.merge([c[layer] for c in caches]))
    return batch_cache


def prefill_prompts(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    step_size: int = 512,
    recorder: ActivationRecorder | None = None,
    num_generations: int = 1,
    decode_tokens: int = 0,
) -> tuple[list[Any], mx.array]:
    """Run every prompt once; return the batched cache and next-token logits [B, V].

    Each prompt but its last token is prefilled on its own, unpadded (recurrent layers have
    no padding mask, so a padded batch would corrupt their state), in chunks of `step_size`.
    The caches are then merged into one left-padded batch that feeds all last tokens at once;
    a ``recorder`` records that step for each prompt's ``num_generations`` completions. With
    ``decode_tokens``, the merged cache grows once by that many positions and the last token's
    (:func:`grow_by`) instead of mlx-lm's steps of 256.
    """
    caches = []
    for prompt in prompts:
        cache = make_prompt_cache(model)
        head = mx.array(prompt[:-1], dtype=mx.uint32)[None]
        for begin in range(0, head.shape[1], step_size):
            model(head[:, begin : begin + step_size], cache=cache)
            mx.eval([c.state for c in cache])
        caches.append(cache)
    batch_cache = _merge_caches(model, caches)
    if decode_tokens > 0:  # room for the last prompt tokens and the decode, grown once
        grow_by(batch_cache, decode_tokens + 1)
    last = mx.array([p[-1] for p in prompts], dtype=mx.uint32)
    if recorder is not None:
        group = num_generations
        recorder.arm([list(range(p * group, (p + 1) * group)) for p in range(len(prompts))])
    logits = batched_step(model, last[:, None], batch_cache)[:, -1, :]
    return batch_cache, logits


def grow_by(cache: list[Any], tokens: int) -> None:
    """Let each layer's key/value cache grow by ``tokens`` positions when it fills up: the
    decode budget, so that decoding grows it once, to the size it needs. mlx-lm's caches grow
    by 256 positions: after a 131-token prompt, 128 new tokens left a cache of 387 positions
    of which 259 were used (at Qwen3-0.6B's 8 KV heads of 128, float32, 16 rows: 0.47 GB)."""
    for layer_cache in cache:
        if isinstance(getattr(layer_cache, "step", None), int):
            layer_cache.step = max(1, tokens)


@contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Switch dropout etc. off for the rollout and restore every module's flag afterwards."""
    flags = [(module, module.training) for _, module in model.named_modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in flags:
            module._set_training_mode(was_training)
