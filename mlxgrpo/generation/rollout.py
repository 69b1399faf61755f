"""GRPO rollout: G sampled completions for each of B prompts, generated as one batch.

Each prompt is prefilled once; the per-prompt caches are merged into one left-padded batch
cache whose rows are then repeated G times, and all B*G sequences decode together, one
sampled-token array per step. The host reads tokens back only every `sync_every` steps (to
apply stop rules and drop finished rows); `mx.async_eval` keeps the next step computing during
that bookkeeping. Rows that finished between two syncs keep decoding; their extra tokens are
discarded on the host. With ``max_rows`` the rows decode in groups of at most that many
(:func:`row_groups`, :func:`sample_slices`), one after another, each sampling what the single
batch would (the prefill lives in :mod:`~mlxgrpo.generation.prefill`).
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.generation.decode_state import (
    DecodeBatch,
    drop_finished_rows,
    first_step,
    queue_next_token,
)
from mlxgrpo.generation.prefill import inference_mode, prefill_prompts
from mlxgrpo.generation.recording import (
    RecordedActivations,
    join_activations,
    recording,
)
from mlxgrpo.generation.sampling import SamplingConfig
from mlxgrpo.generation.stop_rules import FINISH_LENGTH, StopTracker
from mlxgrpo.generation.tool_loop import ToolLoop


@dataclass(frozen=True)
class MicroBatch:
    """Training tensors for a set of completions (layout shared with the GRPO math).

    tokens: [N, T] int32, prompt + completion, right-padded with pad_id.
    completion_mask: [N, T] float32, 1.0 exactly at completion positions (EOS included).
    prompt_lengths: [N] int32. start: min(prompt_lengths), the first completion position.
    sampler_logp, sampler_entropy: [N, T - start] float32, the rollout's log-prob of each
    completion token and the entropy of the distribution it came from (aligned with the
    trainer's log-probs; 0 elsewhere), or None when not recorded.
    """

    tokens: mx.array
    completion_mask: mx.array
    prompt_lengths: mx.array
    start: int
    sampler_logp: mx.array | None = None
    sampler_entropy: mx.array | None = None


def build_micro_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int = 0,
    sampler_logprobs: Sequence[Sequence[float]] | None = None,
    sampler_entropies: Sequence[Sequence[float]] | None = None,
    forced: Sequence[Sequence[bool]] | None = None,
) -> MicroBatch:
    """Concatenate each prompt with its completion (one prompt per completion, same order).

    ``sampler_logprobs`` / ``sampler_entropies``: one value per completion token, as the
    rollout recorded them. ``forced``: per completion token, True where a tool's result was
    put in rather than sampled; those positions get mask 0, so no loss term, normaliser or
    metric counts them.
    """
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise MlxgrpoError(
            f"need one prompt per completion, got {len(prompt_ids)} prompts "
            f"and {len(completion_ids)} completions",
            hint="pass the prompt of every completion, repeated for samples of one group",
        )
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
    rows, masks = [], []
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        pad = width - len(prompt) - len(completion)
        rows.append([*prompt, *completion] + [pad_id] * pad)
        sampled = [1.0] * len(completion)
        if forced is not None:
            if len(forced[row]) != len(completion):
                raise ValueError(
                    f"row {row}: {len(forced[row])} forced flags for a completion of "
                    f"{len(completion)} tokens"
                )
            sampled = [0.0 if f else 1.0 for f in forced[row]]
        masks.append([0.0] * len(prompt) + sampled + [0.0] * pad)
    lengths = [len(p) for p in prompt_ids]
    start = min(lengths)
    return MicroBatch(
        tokens=mx.array(rows, dtype=mx.int32),
        completion_mask=mx.array(masks, dtype=mx.float32),
        prompt_lengths=mx.array(lengths, dtype=mx.int32),
        start=start,
        sampler_logp=_aligned(prompt_ids, completion_ids, sampler_logprobs, start, width),
        sampler_entropy=_aligned(prompt_ids, completion_ids, sampler_entropies, start, width),
    )


def _aligned(prompt_ids, completion_ids, values, start: int, width: int) -> mx.array | None:
    """Per-completion-token ``values`` laid out like the trainer's [N, width - start] log-probs."""
    if values is None:
        return None
    out = [[0.0] * (width - start) for _ in prompt_ids]
    for row, (prompt, row_values) in enumerate(zip(prompt_ids, values, strict=True)):
        if len(row_values) != len(completion_ids[row]):
            raise ValueError(
                f"row {row}: {len(row_values)} values for a completion of "
                f"{len(completion_ids[row])} tokens"
            )
        offset = len(prompt) - start
        out[row][offset : offset + len(row_values)] = list(row_values)
    return mx.array(out, dtype=mx.float32)


# Rollout fields with one entry per completion (None when not recorded): what taking groups
# out of a rollout, or joining rollouts, must carry along.
PER_COMPLETION_FIELDS = (
    "completion_ids",
    "truncated",
    "finish_reason",
    "completion_logprobs",
    "completion_entropies",
    "completion_forced",
    "tool_calls",
)


def _pick(values: list | None, rows: Sequence[int]) -> list | None:
    return None if values is None else [values[i] for i in rows]


def join_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """One rollout holding ``parts`` one after another (counts and timings summed); a
    per-completion field recorded in only some parts is dropped."""
    if len(parts) == 1:
        return parts[0]
    prompts = [ids for r in parts for ids in r.prompt_ids]
    return _joined(parts, prompts, parts[0].num_generations)


def join_samples(parts: Sequence[Rollout]) -> Rollout:
    """One rollout of the same prompts whose groups hold the samples of ``parts`` one after
    another: parts of one prompt each (its samples decoded in slices)."""
    if len(parts) == 1:
        return parts[0]
    if any(r.prompt_ids != parts[0].prompt_ids or len(r.prompt_ids) != 1 for r in parts):
        raise ValueError("join_samples joins slices of one prompt's group")
    return _joined(parts, parts[0].prompt_ids, sum(r.num_generations for r in parts))


def _joined(parts: Sequence[Rollout], prompts: list[list[int]], group: int) -> Rollout:
    count = sum(r.num_completions for r in parts)

    def joined(name: str) -> list | None:
        values = [getattr(r, name) for r in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    return Rollout(
        prompt_ids=prompts,
        num_generations=group,
        prompt_index=[i // group for i in range(count)],
        prefill_tokens=sum(r.prefill_tokens for r in parts),
        generated_tokens=sum(r.generated_tokens for r in parts),
        decode_steps=sum(r.decode_steps for r in parts),
        prefill_seconds=sum(r.prefill_seconds for r in parts),
        decode_seconds=sum(r.decode_seconds for r in parts),
        activations=join_activations([r.activations for r in parts]),
        **{name: joined(name) for name in PER_COMPLETION_FIELDS},
    )


@dataclass
class Rollout:
    """Completions of one rollout, flat and grouped: prompt 0's G samples come first.

    completion_ids keep the EOS id as their last token when they stopped on it; truncated is
    True when max_new_tokens ran out first (finish_reason "length", else "stop").
    """

    prompt_ids: list[list[int]]  # the B prompts
    num_generations: int
    prompt_index: list[int]  # per completion: index into prompt_ids
    completion_ids: list[list[int]]
    truncated: list[bool]
    finish_reason: list[str]
    prefill_tokens: int = 0  # prompt tokens run through the model (each prompt once)
    generated_tokens: int = 0  # completion tokens kept
    decode_steps: int = 0  # tokens drawn per row, including those past a stop
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # Per completion token, when recorded (see generate_groups): its log-prob and the entropy
    # of the distribution it was drawn from.
    completion_logprobs: list[list[float]] | None = None
    completion_entropies: list[list[float]] | None = None
    # With tools: per completion token, True where a tool's result was forced in (no loss
    # there), and each completion's calls (generation.tool_loop.ToolCall).
    completion_forced: list[list[bool]] | None = None
    tool_calls: list[list[Any]] | None = None
    # Each block's outputs at the completions' positions, when recorded (generation.recording).
    activations: RecordedActivations | None = None

    @property
    def num_completions(self) -> int:
        return len(self.completion_ids)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Kept completion tokens per second of the whole rollout (prefill included)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def take_groups(self, groups: Sequence[int]) -> Rollout:
        """The rollout of prompts ``groups`` only (in that order), every per-completion field
        with it; timings stay those of the whole rollout."""
        group = self.num_generations
        rows = [g * group + j for g in groups for j in range(group)]
        return replace(
            self,
            prompt_ids=[self.prompt_ids[g] for g in groups],
            prompt_index=[i // group for i in range(len(rows))],
            prefill_tokens=sum(len(self.prompt_ids[g]) for g in groups),
            generated_tokens=sum(len(self.completion_ids[i]) for i in rows),
            activations=None if self.activations is None else self.activations.take_rows(rows),
            **{name: _pick(getattr(self, name), rows) for name in PER_COMPLETION_FIELDS},
        )

    def training_batch(self, indices: Sequence[int] | None = None, pad_id: int = 0) -> MicroBatch:
        """The MicroBatch of the completions at `indices` (all when None)."""
        chosen = list(range(self.num_completions)) if indices is None else list(indices)
        logprobs, entropies = self.completion_logprobs, self.completion_entropies
        forced = self.completion_forced
        return build_micro_batch(
            [self.prompt_ids[self.prompt_index[i]] for i in chosen],
            [self.completion_ids[i] for i in chosen],
            pad_id=pad_id,
            sampler_logprobs=None if logprobs is None else [logprobs[i] for i in chosen],
            sampler_entropies=None if entropies is None else [entropies[i] for i in chosen],
            forced=None if forced is None else [forced[i] for i in chosen],
        )


# ---------------------------------------------------------------------------------------------
# The rollout


def _check_inputs(
    prompts: Sequence[Sequence[int]],
    num_generations: int,
    max_new_tokens: int,
    stop_strings: Sequence[str] | None,
    decode: Callable[[list[int]], str] | None,
    sync_every: int,
) -> None:
    if not prompts:
        raise ConfigError("no prompts to generate from", hint="pass at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt has no tokens", hint="render prompts with a chat template")
    if num_generations < 1:
        raise ConfigError(
            f"num_generations must be >= 1, got {num_generations}",
            hint="GRPO needs several samples per prompt, e.g. 8",
        )
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}", hint="e.g. 256")
    if stop_strings and decode is None:
        raise ConfigError(
            "stop strings need a decode function to read the generated text",
            hint="pass decode=tokenizer.decode",
        )
    if sync_every < 1:
        raise ConfigError(f"sync_every must be >= 1, got {sync_every}", hint="e.g. 8")


def completion_step_keys(
    base: mx.array,
    prompts: int,
    num_generations: int,
    steps: int,
    prompt_offset: int = 0,
    samples: Sequence[int] | None = None,
) -> mx.array:
    """[prompts * G, steps, 2] keys: completion j of prompt i draws step t with [i*G + j, t].

    Each completion's keys depend only on the base key, its prompt's global index
    (``prompt_offset + i``) and its sample index j, never on which other completions share
    the batch (or a rank), nor on when finished rows are dropped from it. ``samples`` takes
    only those sample indices j of each prompt (all ``num_generations`` when None).
    """
    words = [int(w) for w in base.tolist()]
    seeds = []
    for i in range(prompts):
        for j in range(num_generations) if samples is None else samples:
            digest = hashlib.blake2b(
                struct.pack("<IIQQ", *words, prompt_offset + i, j), digest_size=8
            ).digest()
            seeds.append(int.from_bytes(digest, "little") >> 1)  # a non-negative int64
    row_keys = mx.stack([mx.random.key(seed) for seed in seeds])
    return mx.vmap(lambda k: mx.random.split(k, steps))(row_keys)


def _initial_key(seed: int | None, key: mx.array | None) -> mx.array:
    if key is not None:
        return key
    if seed is not None:
        return mx.random.key(seed)
    # Draw from the global generator so that mx.random.seed() upstream still reproduces runs.
    return mx.random.randint(0, 2**31 - 1, shape=(2,), dtype=mx.uint32)


def generate_groups(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_token_ids: set[int] | Sequence[int],
    stop_sequences: Sequence[Sequence[int]] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    seed: int | None = None,
    key: mx.array | None = None,
    sync_every: int = 8,
    prefill_step_size: int = 512,
    record_logprobs: bool = False,
    record_entropies: bool = False,
    prompt_offset: int = 0,
    tools: Any = None,
    record_activations: bool = False,
    max_rows: int = 0,
) -> Rollout:
    """Sample `num_generations` completions for every prompt (token ids in, token ids out).

    A completion ends at the first EOS id (kept as its last token), stop token sequence or
    stop string (cut right after the token that completes it; stop strings are matched on
    `decode(ids)` text), or after `max_new_tokens` tokens (truncated). `seed` or an explicit
    mx.random `key` makes sampling reproducible; without either the global generator is used.
    Completion j of prompt i draws from its own keys (:func:`completion_step_keys`), derived
    from that seed or key, the prompt's global index ``prompt_offset + i`` and j, so a
    completion is the same whichever batch (or rank) it is sampled in.
    The model is run in eval mode and its training flags are restored afterwards.

    ``record_logprobs`` keeps each sampled token's log-prob under the distribution it was
    drawn from: the tempered logits (``logits / temperature``, after any repetition penalty),
    before top-k/top-p/min-p truncation (:func:`tempered_scores`); ``record_entropies`` also
    keeps that distribution's entropy. They are ``Rollout.completion_logprobs`` and
    ``completion_entropies``.

    ``tools`` (an :class:`~mlxgrpo.generation.tool_loop.ToolRunner`) runs the tool calls completions
    make and forces their results in (:mod:`mlxgrpo.generation.tool_loop`); the rollout then has
    ``completion_forced`` and ``tool_calls``.

    ``record_activations`` keeps every transformer block's output at each completion's
    positions (``Rollout.activations``) for the training pass to replay
    (:mod:`mlxgrpo.generation.recording`); not with ``tools``, whose results run as longer steps.

    ``max_rows`` (0 = all) bounds how many completions decode at once, and with it the decode
    cache: whole groups decode together as far as they fit, and a group larger than
    ``max_rows`` decodes in slices. Each completion is the one it would be in a single batch
    (its keys do not depend on the batch); fewer rows at once cost rollout speed.
    """
    _check_inputs(prompts, num_generations, max_new_tokens, stop_strings, decode, sync_every)
    if max_rows < 0:
        raise ConfigError(f"max_rows must be >= 0, got {max_rows}", hint="0 decodes all rows")
    prompts = [list(p) for p in prompts]
    job = _Decoding(
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        eos_token_ids=frozenset(eos_token_ids),
        stop_sequences=tuple(tuple(s) for s in stop_sequences or ()),
        stop_strings=tuple(stop_strings or ()),
        decode=decode,
        sync_every=sync_every,
        prefill_step_size=prefill_step_size,
        record=record_entropies if (record_logprobs or record_entropies) else None,
        tools=tools,
        record_activations=record_activations and not tools,
        base_key=None if sampling.greedy else _initial_key(seed, key),
    )
    groups = []
    for group in row_groups(len(prompts), num_generations, max_rows):
        parts = [
            _sample_rows(
                model, [prompts[i] for i in group], samples, prompt_offset + group.start, job
            )
            for samples in sample_slices(num_generations, max_rows)
        ]
        groups.append(join_samples(parts))
    return join_rollouts(groups)


def row_groups(prompts: int, num_generations: int, max_rows: int) -> list[range]:
    """The prompts decoded together: all of them when ``max_rows`` is 0 or holds every row,
    else as many whole groups as ``max_rows`` holds (one, where a group alone is larger)."""
    per = prompts if max_rows <= 0 else max(1, max_rows // num_generations)
    return [range(i, min(prompts, i + per)) for i in range(0, prompts, per)]


def sample_slices(num_generations: int, max_rows: int) -> list[range]:
    """A group's samples decoded together: all of them, or where a group alone holds more
    than ``max_rows`` rows, as few slices of near-equal size as fit."""
    if max_rows <= 0 or num_generations <= max_rows:
        return [range(num_generations)]
    count = -(-num_generations // max_rows)
    bounds = [num_generations * k // count for k in range(count + 1)]
    return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class _Decoding:
    """What every row group of one rollout decodes with (:func:`generate_groups`'s options)."""

    sampling: SamplingConfig
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    stop_sequences: tuple[tuple[int, ...], ...]
    stop_strings: tuple[str, ...]
    decode: Callable[[list[int]], str] | None
    sync_every: int
    prefill_step_size: int
    record: bool | None  # as first_step's record_entropy
    tools: Any
    record_activations: bool
    base_key: mx.array | None  # None when greedy


def _sample_rows(
    model: nn.Module,
    prompts: list[list[int]],
    samples: range,
    prompt_offset: int,
    job: _Decoding,
) -> Rollout:
    """Samples ``samples`` of every prompt, decoded as one batch (the rollout of those rows)."""
    group = len(samples)
    count = len(prompts) * group
    tracker = StopTracker(
        count,
        job.max_new_tokens,
        set(job.eos_token_ids),
        [list(s) for s in job.stop_sequences],
        list(job.stop_strings),
        job.decode,
    )
    step_keys = None
    if job.base_key is not None:
        step_keys = completion_step_keys(
            job.base_key, len(prompts), group, job.max_new_tokens, prompt_offset, samples
        )
    with inference_mode(model), recording(model, job.record_activations) as recorder:
        started = time.perf_counter()
        cache, logits = prefill_prompts(
            model, prompts, job.prefill_step_size, recorder, group, job.max_new_tokens
        )
        mx.eval(logits)
        prefilled = time.perf_counter()
        batch = first_step(
            prompts, group, cache, logits, job.sampling, step_keys, job.record, recorder
        )
        loop = None if job.tools is None else ToolLoop(job.tools, prompts, group)
        if loop is not None:
            steps = loop.decode(model, batch, tracker, job.max_new_tokens, job.sampling, step_keys)
        else:
            steps = _decode(
                model, batch, tracker, job.max_new_tokens, job.sampling, step_keys, job.sync_every
            )
        del batch, cache
        activations = None if recorder is None else recorder.records(count)
        seconds = (prefilled - started, time.perf_counter() - prefilled)
    return _finished_rollout(prompts, group, tracker, job.record, loop, steps, activations, seconds)


def _finished_rollout(
    prompts: list[list[int]],
    num_generations: int,
    tracker: StopTracker,
    record: bool | None,
    loop: ToolLoop | None,
    steps: int,
    activations: RecordedActivations | None,
    seconds: tuple[float, float],
) -> Rollout:
    """The rollout of a finished decode: ``record`` as :func:`first_step`'s ``record_entropy``,
    ``seconds`` the prefill's and the decode's."""
    tracker.close()
    count = len(prompts) * num_generations
    stats = tracker.stats if record is not None else None
    return Rollout(
        prompt_ids=prompts,
        num_generations=num_generations,
        prompt_index=[i // num_generations for i in range(count)],
        completion_ids=tracker.ids,
        truncated=[r == FINISH_LENGTH for r in tracker.reason],
        finish_reason=[r or FINISH_LENGTH for r in tracker.reason],
        prefill_tokens=sum(len(p) for p in prompts),
        generated_tokens=sum(len(ids) for ids in tracker.ids),
        decode_steps=steps,
        prefill_seconds=seconds[0],
        decode_seconds=seconds[1],
        completion_logprobs=None if stats is None else [[t[0] for t in row] for row in stats],
        completion_entropies=(
            [[t[1] for t in row] for row in stats] if stats is not None and record else None
        ),
        completion_forced=None if loop is None else loop.forced,
        tool_calls=None if loop is None else loop.calls,
        activations=activations,
    )


def _decode(
    model: nn.Module,
    batch: DecodeBatch,
    tracker: StopTracker,
    max_new_tokens: int,
    sampling: SamplingConfig,
    step_keys: mx.array | None,
    sync_every: int,
) -> int:
    """Decode until every row stopped or max_new_tokens were drawn; returns the step count."""
    step = 1
    while step < max_new_tokens:
        sync = step % sync_every == 0
        if sync:
            # Queued before the next step, so reading it back does not wait for that step.
            window, stats = batch.take_window()
        keys = None if step_keys is None else step_keys[mx.array(batch.rows), step]
        queue_next_token(model, batch, sampling, keys)
        step += 1
        if sync:
            tracker.add(batch.rows, window.tolist(), None if stats is None else stats.tolist())
            if not drop_finished_rows(batch, tracker):
                return step
        batch.pending.append(batch.tokens)
    window, stats = batch.take_window()
    tracker.add(batch.rows, window.tolist(), None if stats is None else stats.tolist())
    return step
