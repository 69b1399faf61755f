"""Generation for people: batched answers for `mlxgrpo infer`, streaming and chat for `chat`.

Batched answers go through the engine's rollout (`generate_groups` with one sample per prompt),
so what `infer --file` produces is sampled exactly as training samples. Streaming runs one
sequence through a prompt cache that the caller may keep: `ChatSession` keeps it across turns
and only prefills what the conversation added since the last answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mlxgrpo.errors import ConfigError
from mlxgrpo.models.tokenizer import (
    Message,
    decode,
    eos_token_ids,
    normalize_messages,
    render_fallback_text,
    render_prompt,
    strip_eos,
)

Prompt = str | Sequence[Message]


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings for one answer; temperature 0 is greedy."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_config(cls, generate: Any) -> GenerationOptions:
        """From the `[generate]` config section (every field here has its namesake there)."""
        values = {f.name: getattr(generate, f.name) for f in fields(cls)}
        return cls(**{**values, "stop": tuple(values["stop"])})

    def sampling(self) -> Any:
        from mlxgrpo.generation.sampling import SamplingConfig

        return SamplingConfig.from_section(self)


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "interrupted"
    seconds: float = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # with tools: each call

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    *,
    system: str | None = None,
    chat_template: bool = True,
    tools: Any = None,
) -> list[int]:
    """Token ids of a prompt: chat-rendered (with `system` first, and the schemas of `tools`,
    a ToolRunner, for templates that list them) or the raw text."""
    if not chat_template:
        if not isinstance(prompt, str):
            raise ConfigError(
                "a chat message list needs the chat template",
                hint="drop --no-chat-template or give the prompt as plain text",
            )
        ids = list(tokenizer.encode(prompt))
    else:
        messages = normalize_messages(prompt)
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        ids = render_prompt(tokenizer, messages, tools=_schemas(tools))
    if not ids:
        raise ConfigError("the prompt is empty", hint="give a prompt with some text")
    return ids


def _schemas(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None or tools.format.kind != "chat-template":
        return None
    from mlxgrpo.tools.formats import tool_schemas

    return tool_schemas(tools.tools)


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    options: GenerationOptions,
    *,
    system: str | None = None,
    chat_template: bool = True,
    batch_size: int = 8,
    on_batch: Any = None,
    tools: Any = None,
) -> list[Answer]:
    """Answers for many prompts, `batch_size` prompts per decode batch, in prompt order.

    `on_batch(answers, done, total)` gets each batch's answers as soon as they exist (for
    progress, or to write them out before the next batch starts). `tools` (a ToolRunner)
    runs the answers' tool calls as training rollouts do.
    """
    from mlxgrpo.backend import memory_budget_bytes
    from mlxgrpo.generation.budget import check_decode_budget
    from mlxgrpo.generation.rollout import generate_groups

    encoded = [
        encode_prompt(tokenizer, p, system=system, chat_template=chat_template, tools=tools)
        for p in prompts
    ]
    eos = eos_token_ids(tokenizer)
    sampling = options.sampling()
    check_decode_budget(
        model,
        rows=min(batch_size, len(encoded)),
        prompt_tokens=max((len(ids) for ids in encoded), default=0),
        new_tokens=options.max_tokens,
        available=memory_budget_bytes(),
        keys=f"--max-tokens {options.max_tokens}",
    )
    answers: list[Answer] = []
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        started = time.perf_counter()
        rollout = generate_groups(
            model,
            chunk,
            num_generations=1,
            max_new_tokens=options.max_tokens,
            sampling=sampling,
            eos_token_ids=eos,
            stop_strings=list(options.stop) or None,
            decode=lambda ids: decode(tokenizer, ids),
            seed=options.seed + begin,
            tools=tools,
        )
        seconds = time.perf_counter() - started
        calls = rollout.tool_calls or [[] for _ in chunk]
        batch = [
            Answer(
                _cut_at_stop(decode(tokenizer, strip_eos(ids, eos)), options.stop),
                len(prompt_ids),
                len(ids),
                reason,
                seconds,
                [c.as_record() for c in made],
            )
            for prompt_ids, ids, reason, made in zip(
                chunk, rollout.completion_ids, rollout.finish_reason, calls, strict=True
            )
        ]
        answers += batch
        if on_batch is not None:
            on_batch(batch, len(answers), len(encoded))
    return answers


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    return min((text.find(s) for s in stops if s and s in text), default=-1)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = _first_stop(text, stops)
    return text if cut < 0 else text[:cut]


# ---------------------------------------------------------------------------------------------
# Streaming one sequence through a (reusable) prompt cache


def _token_stream(
    model: Any,
    feed: list[int],
    cache: list[Any],
    options: GenerationOptions,
    context_ids: Sequence[int],
    prefill_step: int = 512,
) -> Iterator[int]:
    """Tokens after `feed`; every token is run through the model before it is yielded.

    So when the consumer stops after token t, the cache holds the feed and every token up to
    and including t, which is what lets a chat continue from it. The next step is queued
    before the current token is handed out, to keep the device busy while Python works.
    """
    import mlx.core as mx

    from mlxgrpo.generation.sampling import apply_repetition_penalty, sample_tokens

    sampling = options.sampling()
    penalize = sampling.repetition_penalty != 1.0
    tokens = mx.array(feed, dtype=mx.uint32)[None]
    while tokens.shape[1] > 1:  # prefill all but the last token in chunks
        step = min(prefill_step, tokens.shape[1] - 1)
        model(tokens[:, :step], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[:, step:]
    seen: Any = None

    def advance(step_tokens: Any, key: Any) -> tuple[Any, Any]:
        nonlocal seen
        logits = model(step_tokens, cache=cache)[:, -1, :].astype(mx.float32)
        if penalize:
            if seen is None:  # the vocabulary size is known once logits exist
                seen = mx.zeros(logits.shape, dtype=mx.bool_)
                seen[0, mx.array(sorted({*context_ids, *feed}), dtype=mx.int32)] = True
            logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
        key, sub = mx.random.split(key)
        return sample_tokens(logits, sub, sampling), key

    token, key = advance(tokens, mx.random.key(options.seed))
    mx.async_eval(token)
    while True:
        if penalize:
            seen[0, token.astype(mx.int32)] = True
        upcoming, key = advance(token[:, None], key)
        mx.async_eval(upcoming)
        forced = yield int(token.item())
        if forced:  # a tool's result: it goes into the cache, and replaces what was drawn
            run = mx.array(forced, dtype=mx.uint32)[None]
            if penalize:
                seen[0, run[0].astype(mx.int32)] = True
            upcoming, key = advance(run, key)
            mx.async_eval(upcoming)
        token = upcoming


class _StopText:
    """Streams decoded text but holds back what could still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        self.text += piece
        cut = _first_stop(self.text, self.stops)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self.flush()
        safe = len(self.text) - self.hold
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


@dataclass
class StreamState:
    """What a finished stream leaves behind for the caller."""

    answer: Answer | None = None
    generated: list[int] = field(default_factory=list)


def stream_answer(
    model: Any,
    tokenizer: Any,
    feed: list[int],
    options: GenerationOptions,
    *,
    cache: list[Any] | None = None,
    context_ids: Sequence[int] = (),
    state: StreamState | None = None,
    tools: Any = None,
) -> Iterator[str]:
    """Yield the answer's text piece by piece; fills `state` when the stream ends.

    `cache` (optional) already holds `context_ids`; `feed` is what to run on top of it. Without
    a cache a fresh one is used, so `feed` must then be the whole prompt. With `tools` (a
    ToolRunner) a call the answer closes is run, and its result is shown and run through the
    model (prefilled into the cache) before the answer goes on.
    """
    from mlx_lm.models.cache import make_prompt_cache

    if not feed:
        raise ConfigError("nothing to generate from", hint="give a non-empty prompt")
    state = state if state is not None else StreamState()
    cache = cache if cache is not None else make_prompt_cache(model)
    eos = eos_token_ids(tokenizer)
    detok = tokenizer.detokenizer
    detok.reset()
    stop_text = _StopText(options.stop)
    started = time.perf_counter()
    reason = "length"
    calls = tools.opened_in([*context_ids, *feed]) if tools is not None else None
    stream = _token_stream(model, feed, cache, options, context_ids)
    try:
        token = next(stream)
        while True:
            state.generated.append(token)
            if token in eos:
                reason = "stop"
                break
            forced = tools.follow(calls, token) if tools is not None else []
            # The result is shown as the model reads it; the budget counts it too.
            forced = forced[: max(0, options.max_tokens - len(state.generated))]
            state.generated.extend(forced)
            for shown in [token, *forced]:
                detok.add_token(shown)
                piece = stop_text.add(detok.last_segment)
                if piece:
                    yield piece
            if stop_text.stopped:
                reason = "stop"
                break
            if len(state.generated) >= options.max_tokens:
                break
            token = stream.send(forced) if forced else next(stream)
        if not stop_text.stopped:
            detok.finalize()
            tail = stop_text.add(detok.last_segment) + stop_text.flush()
            if tail:
                yield tail
    except KeyboardInterrupt:
        reason = "interrupted"
        raise
    finally:
        state.answer = Answer(
            stop_text.text,
            len(context_ids) + len(feed),
            len(state.generated),
            reason,
            time.perf_counter() - started,
            [] if calls is None else [c.as_record() for c in calls.calls],
        )


# ---------------------------------------------------------------------------------------------
# Chat


class ChatSession:
    """A conversation whose prompt cache survives between turns.

    Each turn renders the whole conversation, keeps the longest prefix the cache already holds,
    trims what differs (e.g. a re-tokenized answer) and prefills only the rest.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        options: GenerationOptions,
        *,
        system: str | None = None,
        chat_template: bool = True,
        tools: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.system = system
        self.chat_template = chat_template
        self.tools = tools  # a ToolRunner: the answers' tool calls run
        self.messages: list[dict[str, Any]] = []
        self.turns = 0
        self.last_prefill = 0
        self._fresh_cache()

    def _fresh_cache(self) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        self.cached_ids: list[int] = []

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = []
        self._fresh_cache()

    def set_system(self, text: str | None) -> None:
        """A new system message; the conversation starts over with it."""
        self.system = text or None
        self.reset()

    def _conversation(self, user_text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, {"role": "user", "content": user_text}]

    def _prompt_ids(self, user_text: str) -> list[int]:
        if self.chat_template:
            conversation = self._conversation(user_text)
            return render_prompt(self.tokenizer, conversation, tools=_schemas(self.tools))
        # Without a template the history is plain text, one turn after another.
        return encode_prompt(
            self.tokenizer, render_fallback_text(self._conversation(user_text)), chat_template=False
        )

    def _reuse_prefix(self, full: list[int]) -> int:
        """Trim the cache to its longest prefix shared with `full`; returns that length."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        common = 0
        limit = min(len(self.cached_ids), len(full) - 1)  # always feed at least one token
        while common < limit and self.cached_ids[common] == full[common]:
            common += 1
        excess = len(self.cached_ids) - common
        if excess and not can_trim_prompt_cache(self.cache):
            self._fresh_cache()
            return 0
        if excess:
            trim_prompt_cache(self.cache, excess)
        self.cached_ids = self.cached_ids[:common]
        return common

    def send(self, user_text: str, state: StreamState | None = None) -> Iterator[str]:
        """Stream the answer to `user_text`; the turn joins the history when the stream ends.

        Interrupted answers (Ctrl-C) join the history as far as they got; the cache, which may
        have been caught mid-update, is rebuilt on the next turn.
        """
        full = self._prompt_ids(user_text)
        common = self._reuse_prefix(full)
        feed = full[common:]
        self.last_prefill = len(feed)
        state = state if state is not None else StreamState()
        completed = False
        try:
            yield from stream_answer(
                self.model,
                self.tokenizer,
                feed,
                self.options,
                cache=self.cache,
                context_ids=self.cached_ids,
                state=state,
                tools=self.tools,
            )
            completed = True
        finally:
            answer: Any = state.answer.text if state.answer else ""
            if self.tools is not None and self.chat_template and state.generated:
                # Calls and results as the model wrote and read them, not as plain text.
                ids = strip_eos(state.generated, eos_token_ids(self.tokenizer))
                answer = self.tools.format.history_content(ids, self.tools.decode)
            self.messages += [
                {"role": "user", "content": user_text},
                {"role": "assistant", "content": answer},
            ]
            self.turns += 1
            if completed:
                self.cached_ids = [*self.cached_ids, *feed, *state.generated]
            else:
                self._fresh_cache()


def peak_memory_bytes() -> int | None:
    """Peak memory MLX has allocated in this process, when the backend reports it."""
    import mlx.core as mx

    try:
        return int(mx.get_peak_memory())
    except (AttributeError, RuntimeError):
        return None


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Prompt | Sequence[Prompt],
    *,
    system: str | None = None,
    chat_template: bool = True,
    **options: Any,
) -> str | list[str]:
    """Answer text for one prompt (a string or a chat) or a list of them; options as in
    `GenerationOptions` (max_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
    stop, seed)."""
    if "stop" in options:
        options["stop"] = tuple(options["stop"])
    single = isinstance(prompts, str) or (
        bool(prompts) and isinstance(prompts[0], dict)  # one chat: a list of messages
    )
    batch = [prompts] if single else list(prompts)
    answers = generate_answers(
        model,
        tokenizer,
        batch,
        GenerationOptions(**options),
        system=system,
        chat_template=chat_template,
    )
    texts = [a.text for a in answers]
    return texts[0] if single else texts
