"""Generation for infer and chat, checked against a plain greedy loop without any cache."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tolerance import summation_tolerance

from mlxgrpo.inference import (
    ChatSession,
    GenerationOptions,
    StreamState,
    encode_prompt,
    generate_answers,
    stream_answer,
)
from mlxgrpo.models.loading import load_model
from mlxgrpo.models.tokenizer import eos_token_ids, render_prompt

GREEDY = GenerationOptions(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def tiny():
    return load_model("builtin:tiny-qwen2")


def greedy_reference(model, ids: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """Argmax of a full forward pass over the whole sequence, one token at a time."""
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(mx.array([ids + out]))[0, -1]
        token = int(mx.argmax(logits).item())
        out.append(token)
        if token in eos:
            break
    return out


def reference_text(model, tokenizer, prompt, max_tokens=12, **kw) -> str:
    eos = eos_token_ids(tokenizer)
    ids = greedy_reference(model, encode_prompt(tokenizer, prompt, **kw), max_tokens, eos)
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids)


def greedy_departures(model, tokenizer, prompt, text, max_tokens, **kw) -> list[str]:
    """Where ``text``, a greedy answer from another implementation of ``model`` (another
    kernel, a quantized or fused copy), departs from this model's greedy choice by more than
    float rounding: [] when each of its tokens, and its end, is the argmax here or ties it.
    Two implementations may break a near-tie either way, so comparing texts alone is fragile."""
    ids = encode_prompt(tokenizer, prompt, **kw)
    answer = tokenizer.encode(text, add_special_tokens=False)
    eos = eos_token_ids(tokenizer)
    logits = model(mx.array([ids + answer]))[0, len(ids) - 1 :].astype(mx.float32)
    hidden = int(model.args.hidden_size)
    choices = [(step, {token}) for step, token in enumerate(answer)]
    if len(answer) < max_tokens:  # it ended: one of the EOS ids came next
        choices.append((len(answer), eos))
    departures = []
    for step, allowed in choices:
        row = logits[step]
        best, got = float(row.max()), max(float(row[t]) for t in allowed)
        tolerance = summation_tolerance(float(mx.abs(row).max()), terms=hidden)
        if best - got > tolerance:
            departures.append(f"step {step}: {best - got:.3g} below the argmax (> {tolerance:.3g})")
    return departures


def test_batched_answers_match_a_plain_greedy_loop(tiny):
    model, tokenizer = tiny
    prompts = ["hi", "a much longer prompt than the first", [{"role": "user", "content": "xyz"}]]
    answers = generate_answers(model, tokenizer, prompts, GREEDY, system="be brief", batch_size=2)
    expected = [reference_text(model, tokenizer, p, system="be brief") for p in prompts]
    assert [a.text for a in answers] == expected
    assert all(a.completion_tokens <= GREEDY.max_tokens for a in answers)
    assert answers[1].prompt_tokens > answers[0].prompt_tokens


def test_system_prompt_and_raw_text_are_rendered_as_asked(tiny):
    _, tokenizer = tiny
    with_system = encode_prompt(tokenizer, "hi", system="S")
    expected = render_prompt(
        tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    )
    assert with_system == expected
    assert encode_prompt(tokenizer, "hi", chat_template=False) == list(tokenizer.encode("hi"))


def test_streaming_yields_the_same_text_as_batched_generation(tiny):
    model, tokenizer = tiny
    ids = encode_prompt(tokenizer, "stream me")
    state = StreamState()
    pieces = list(stream_answer(model, tokenizer, ids, GREEDY, state=state))
    batched = generate_answers(model, tokenizer, ["stream me"], GREEDY)[0]
    assert "".join(pieces) == batched.text == state.answer.text
    assert state.answer.completion_tokens == batched.completion_tokens
    assert state.answer.finish_reason == batched.finish_reason


def test_stop_strings_cut_the_answer_in_both_paths(tiny):
    model, tokenizer = tiny
    full = generate_answers(model, tokenizer, ["stop test"], GREEDY)[0].text
    assert len(full) >= 6
    stop = full[3:5]
    options = GenerationOptions(max_tokens=12, temperature=0.0, stop=(stop,))
    cut = full[: full.find(stop)]
    batched = generate_answers(model, tokenizer, ["stop test"], options)[0]
    state = StreamState()
    ids = encode_prompt(tokenizer, "stop test")
    streamed = "".join(stream_answer(model, tokenizer, ids, options, state=state))
    assert batched.text == cut and streamed == cut
    assert batched.finish_reason == "stop" and state.answer.finish_reason == "stop"


def test_chat_reuses_its_cache_and_answers_like_a_fresh_prefill(tiny):
    model, tokenizer = tiny
    chat = ChatSession(model, tokenizer, GREEDY, system="sys")
    first = "".join(chat.send("hello"))
    "".join(chat.send("second turn"))
    third = "".join(chat.send("third"))
    history = chat.messages[:-2]
    full_prompt = render_prompt(
        tokenizer,
        [{"role": "system", "content": "sys"}, *history, {"role": "user", "content": "third"}],
    )
    assert chat.last_prefill < len(full_prompt) // 2  # only the new turn was prefilled
    assert third == reference_text(
        model, tokenizer, [*history, {"role": "user", "content": "third"}], system="sys"
    )
    chat.reset()
    assert chat.messages == []
    assert "".join(chat.send("hello")) == first


def test_interrupted_answer_keeps_the_chat_usable(tiny):
    model, tokenizer = tiny
    chat = ChatSession(model, tokenizer, GenerationOptions(max_tokens=30, temperature=0.0))
    stream = chat.send("interrupt me")
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)
    assert chat.messages[-1]["role"] == "assistant" and chat.cached_ids == []
    history = list(chat.messages)
    answer = "".join(chat.send("and now?"))
    expected = reference_text(
        model, tokenizer, [*history, {"role": "user", "content": "and now?"}], max_tokens=30
    )
    assert answer == expected


def test_set_system_starts_over_with_the_new_message(tiny):
    model, tokenizer = tiny
    chat = ChatSession(model, tokenizer, GREEDY)
    "".join(chat.send("hello"))
    chat.set_system("You are terse.")
    answer = "".join(chat.send("hello"))
    assert len(chat.messages) == 2
    assert answer == reference_text(model, tokenizer, "hello", system="You are terse.")


def test_public_generate_takes_one_prompt_or_many(tiny):
    import mlxgrpo

    model, tokenizer = tiny
    one = mlxgrpo.generate(model, tokenizer, "hi", max_tokens=12, temperature=0.0)
    chat = mlxgrpo.generate(
        model, tokenizer, [{"role": "user", "content": "hi"}], max_tokens=12, temperature=0.0
    )
    many = mlxgrpo.generate(model, tokenizer, ["hi", "ho"], max_tokens=12, temperature=0.0)
    assert one == chat == many[0] == reference_text(model, tokenizer, "hi")
    assert many[1] == reference_text(model, tokenizer, "ho")
