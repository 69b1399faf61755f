"""Drawing the next token: sampling settings, the exponential-race sampler and its log-probs.

Used by :mod:`~mlxgrpo.generation.rollout` (batched, one key per completion) and by inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlxgrpo.errors import ConfigError
from mlxgrpo.generation.logprobs import tempered, token_logprobs, token_logprobs_and_entropy
from mlxgrpo.models.cpu_kernels import exp, joined_row_parts, parallel_row_parts


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is drawn. temperature 0 means greedy (argmax).

    Filters follow the Hugging Face / vLLM order: temperature first, then top-k, top-p and
    min-p on the tempered distribution. top_p of 0 or 1 and top_k of 0 disable those filters.
    repetition_penalty divides positive (multiplies negative) logits of every token already
    present in the prompt or the completion so far; 1.0 disables it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(
                f"temperature must be >= 0, got {self.temperature}",
                hint="use 0 for greedy decoding or a positive value such as 0.7",
            )
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(
                f"top_p must be in [0, 1], got {self.top_p}", hint="use 1.0 to disable top-p"
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}", hint="use 0 to disable")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}", hint="use 0.0")
        if self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                hint="use 1.0 to disable it",
            )

    @classmethod
    def from_section(cls, section: Any) -> SamplingConfig:
        """The sampling settings of any config section or options object that names them
        (`[rollout]`, `[generate]`, inference's GenerationOptions): the one place that knows
        which fields those are."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """CTRL-style penalty per row: seen [N, V] bool marks tokens already in that row's context."""
    penalized = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, penalized, logits)


def sample_tokens(logits: mx.array, key: mx.array | None, sampling: SamplingConfig) -> mx.array:
    """Draw one token per row of logits [N, V] with an mx.random key; returns [N] uint32."""
    if sampling.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.uint32)
    return _draw(tempered_scores(logits, sampling), key, sampling)


def tempered_scores(logits: mx.array, sampling: SamplingConfig) -> mx.array:
    """float32 ``logits / temperature`` (temperature 1 when greedy): the distribution sampled
    from before any top-k/top-p/min-p truncation, and the one the trainer's log-probs use."""
    return tempered(logits, 1.0 if sampling.greedy else sampling.temperature)


def sample_recorded(
    logits: mx.array, key: mx.array | None, sampling: SamplingConfig, with_entropy: bool
) -> tuple[mx.array, mx.array]:
    """``(tokens [N], stats [N, k])``: a token per row as :func:`sample_tokens` draws it, with
    its log-prob (and, when ``with_entropy``, the entropy) under :func:`tempered_scores`."""
    scores = tempered_scores(logits, sampling)
    if not (sampling.greedy or with_entropy or _truncates(sampling)):
        return _race_with_logprobs(scores, key)
    if sampling.greedy:
        tokens = mx.argmax(scores, axis=-1).astype(mx.uint32)
    else:
        tokens = _draw(scores, key, sampling)
    targets = tokens.astype(mx.int32)
    if with_entropy:
        logp, entropy = token_logprobs_and_entropy(scores, targets, entropy_grad=False)
        return tokens, mx.stack([logp, entropy], axis=-1)
    return tokens, token_logprobs(scores, targets)[:, None]


def _truncates(sampling: SamplingConfig) -> bool:
    return 0 < sampling.top_k or 0.0 < sampling.top_p < 1.0 or sampling.min_p > 0.0


def _draw(scores: mx.array, key: mx.array | None, sampling: SamplingConfig) -> mx.array:
    """Truncate the tempered ``scores`` as configured and draw one token per row."""
    # top-p exponentiates, so shift by the max (much cheaper than logsumexp on CPU) to keep
    # exp() from overflowing.
    if 0.0 < sampling.top_p < 1.0:
        scores = scores - mx.max(scores, axis=-1, keepdims=True)
    if 0 < sampling.top_k < scores.shape[-1]:
        scores = apply_top_k(scores, sampling.top_k)
    if 0.0 < sampling.top_p < 1.0:
        scores = apply_top_p(scores, sampling.top_p)
    if sampling.min_p > 0.0:
        scores = apply_min_p(scores, sampling.min_p)
    if key is not None and key.ndim == 2:  # one key per row: rows split over CPU streams
        parts = parallel_row_parts(lambda z, k: (_race(z, k)[0],), scores, key)
        return joined_row_parts(parts)[0]
    return _race(scores, key)[0]


# Vocabularies at least this large draw in two stages (see :func:`_race`).
TWO_STAGE_MIN_VOCAB = 4096
# Entries per block of the two-stage draw, when no larger power of two divides the vocabulary
# (it is then padded with zero-probability entries).
RACE_BLOCK = 256


def _uniform(shape: tuple[int, ...], key: mx.array | None) -> mx.array:
    """Uniform [0, 1) draws: one key per row (key [N, 2]) or one for the whole shape."""
    if key is not None and key.ndim == 2:
        width = shape[-1]
        return mx.vmap(lambda k: mx.random.uniform(shape=(width,), key=k))(key)
    return mx.random.uniform(shape=shape, key=key)


def _split_key(key: mx.array | None) -> tuple[mx.array | None, mx.array | None]:
    """Two independent keys from ``key`` (each row's own when key is [N, 2])."""
    if key is None:
        return None, None
    if key.ndim == 2:
        pairs = mx.vmap(lambda k: mx.random.split(k))(key)  # [N, 2, 2]
        return pairs[:, 0], pairs[:, 1]
    first, second = mx.random.split(key)
    return first, second


def race_block(vocab: int) -> tuple[int, int]:
    """(entries per block, padding) for the two-stage draw over ``vocab`` entries."""
    for size in (512, 256, 128):
        if vocab % size == 0:
            return size, 0
    return RACE_BLOCK, -vocab % RACE_BLOCK


def _winner(weights: mx.array, key: mx.array | None) -> mx.array:
    """argmax of ``weights / E`` with ``E = -log(u)`` exponential: index i wins with
    probability weights_i / sum(weights). ``u = 0`` gives ``E = inf``: that entry cannot win."""
    return mx.argmax(weights / -mx.log(_uniform(weights.shape, key)), axis=-1)


def _race(scores: mx.array, key: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
    """``(tokens, shifted scores, sum of exps)``: the exponential race, the Gumbel-max trick
    without its logs of logs. Token v wins with ``exp(s_v) / E_v`` largest, ``E_v = -log(u_v)``
    being exponential draws: the same winner as ``argmax(s_v - log E_v)``, the Gumbel-max draw
    of ``mx.random.categorical``, with one log per entry instead of two.

    A large vocabulary races in two stages, which draw the same distribution from a fraction
    of the random numbers (generating them was two thirds of the sampler's time at 151,936
    entries): blocks race by their total mass, then the winning block's entries race. Block b
    wins with probability S_b / S and entry v of it with e_v / S_b: e_v / S in all."""
    shifted = scores - mx.max(scores, axis=-1, keepdims=True)
    e = exp(shifted)
    vocab = scores.shape[-1]
    if vocab < TWO_STAGE_MIN_VOCAB:
        return _winner(e, key).astype(mx.uint32), shifted, mx.sum(e, axis=-1, keepdims=True)
    size, padding = race_block(vocab)
    rows = scores.shape[:-1]
    if padding:
        e = mx.concatenate([e, mx.zeros((*rows, padding), dtype=e.dtype)], axis=-1)
    blocks = e.reshape(*rows, -1, size)
    mass = mx.sum(blocks, axis=-1)
    block_key, entry_key = _split_key(key)
    chosen = _winner(mass, block_key)
    inside = mx.take_along_axis(blocks, chosen[..., None, None], axis=-2).squeeze(-2)
    tokens = chosen * size + _winner(inside, entry_key)
    return tokens.astype(mx.uint32), shifted, mx.sum(mass, axis=-1, keepdims=True)


def _race_with_logprobs(scores: mx.array, key: mx.array | None) -> tuple[mx.array, mx.array]:
    """``(tokens [N], stats [N, 1])``: a draw of :func:`_race` and its log-prob under scores."""

    def draw(z: mx.array, k: mx.array | None) -> tuple[mx.array, mx.array]:
        tokens, shifted, total = _race(z, k)
        picked = mx.take_along_axis(shifted, tokens[:, None].astype(mx.int32), axis=-1)
        return tokens, picked - mx.log(total)

    if key is not None and key.ndim == 2:
        return joined_row_parts(parallel_row_parts(draw, scores, key))
    return draw(scores, key)


def mark_seen(seen: mx.array, tokens: mx.array) -> mx.array:
    return mx.put_along_axis(seen, tokens[:, None].astype(mx.int32), mx.array(True), axis=-1)


def prompt_presence(prompts: Sequence[Sequence[int]], vocab_size: int) -> mx.array:
    rows = [sorted(set(p)) for p in prompts]
    seen = mx.zeros((len(prompts), vocab_size), dtype=mx.bool_)
    for i, ids in enumerate(rows):
        seen[i, mx.array(ids, dtype=mx.int32)] = True
    return seen
