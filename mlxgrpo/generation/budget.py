"""The memory a rollout will allocate, checked before it allocates any.

A rollout allocates per token: the decode cache (every layer's keys and values for every
position of every row decoded at once) and each row's sampling keys for every step
(:func:`~mlxgrpo.generation.rollout.completion_step_keys`, 8 bytes per row and step). A
budget the machine cannot hold (``rollout.max_new_tokens = 10**9``) would otherwise fail deep
inside MLX, or be killed by the kernel. :func:`decode_bytes` measures a model's cache cost
with a two-step probe, so caches of any kind (sliding windows, recurrent state) count as they
really grow; :func:`check_decode_budget` compares the total with the machine's memory.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from mlxgrpo.errors import ConfigError
from mlxgrpo.generation.prefill import grow_by, inference_mode

KEY_BYTES_PER_STEP = 8  # one uint32 pair per row and step


def _cache_bytes(cache: list) -> int:
    total = 0
    for layer in cache:
        state = layer.state
        arrays = state if isinstance(state, list | tuple) else [state]
        total += sum(a.nbytes for a in arrays if isinstance(a, mx.array))
    return total


def decode_bytes(model: nn.Module, positions: int) -> int:
    """Bytes of one row's decode cache at ``positions`` positions: a fixed part (recurrent
    state) plus a per-position part (keys and values), measured after one and two tokens on
    caches that grow one position at a time."""
    with inference_mode(model):
        cache = make_prompt_cache(model)
        grow_by(cache, 1)
        model(mx.zeros((1, 1), dtype=mx.uint32), cache=cache)
        mx.eval([c.state for c in cache])
        one = _cache_bytes(cache)
        model(mx.zeros((1, 1), dtype=mx.uint32), cache=cache)
        mx.eval([c.state for c in cache])
        two = _cache_bytes(cache)
    per_position = max(0, two - one)
    return max(0, one - per_position) + per_position * positions


def check_decode_budget(
    model: nn.Module,
    *,
    rows: int,
    prompt_tokens: int,
    new_tokens: int,
    available: int | None,
    keys: str,
) -> int:
    """The bytes a rollout of ``rows`` rows at once, prompts of up to ``prompt_tokens`` and
    ``new_tokens`` new tokens will allocate; a ConfigError naming ``keys`` (the settings
    behind those numbers) when that is more than ``available`` bytes."""
    needed = rows * (
        decode_bytes(model, prompt_tokens + new_tokens + 1) + KEY_BYTES_PER_STEP * new_tokens
    )
    if available is not None and needed > available:
        raise ConfigError(
            f"{keys}: a rollout of {rows} rows at once with up to {prompt_tokens} prompt and "
            f"{new_tokens} new tokens needs about {needed / 1e9:,.1f} GB for its decode cache "
            f"and sampling keys, more than the {available / 1e9:,.1f} GB this machine has",
            hint="lower the token budget, or decode fewer rows at once (rollout.max_rows)",
        )
    return needed
