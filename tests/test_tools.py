"""Tool calls inside rollouts: formats, the runner's error strings, the batched loop, the
training mask, and a tool task that GRPO learns."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest
from random_models import random_lm

from mlxgrpo.config import resolve_config
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.engine.loss import grpo
from mlxgrpo.errors import ConfigError
from mlxgrpo.generation.rollout import SamplingConfig, build_micro_batch, generate_groups
from mlxgrpo.generation.tool_loop import ToolRunner
from mlxgrpo.tools import Tool, resolve_tools
from mlxgrpo.tools.formats import ToolFormat, parse_json_call, tool_format

# --- a small format over plain ids, for the loop ------------------------------------------

START, END, OUT_START, OUT_END = 5, 7, 8, 9


def _encode(text: str) -> list[int]:
    # Ids 10..29: inside the test model's vocabulary of 32 (an id past it would read garbage
    # from the embedding), clear of EOS and the markers.
    return [10 + ord(ch) % 20 for ch in text]


def _format() -> ToolFormat:
    markers = {START: "<s>", END: "</s>", OUT_START: "<o>", OUT_END: "</o>"}
    return ToolFormat("nanochat", START, END, markers, _encode, ([OUT_START], [OUT_END]))


def _runner(fn=lambda text: f"={len(text)}", **kwargs) -> ToolRunner:
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)  # noqa: E731
    return ToolRunner(_format(), [Tool("echo", fn)], decode, **kwargs)


# Every prompt ends inside an open call, so any sampled END (id 7) runs the tool.
PROMPTS = [[1, 2, START, 3], [4, START], [6, 6, 6, START, 11, 12], [13, START]]


@pytest.fixture(scope="module")
def model():
    return random_lm("qwen2", seed=3, hidden=32, vocab=32)


def _sample(model, prompts, offset, **kwargs):
    return generate_groups(
        model,
        prompts,
        num_generations=4,
        max_new_tokens=24,
        sampling=SamplingConfig(temperature=1.0),
        eos_token_ids=[0],
        seed=5,
        prompt_offset=offset,
        tools=_runner(**kwargs),
        record_logprobs=True,
    )


def test_a_row_that_calls_a_tool_matches_itself_alone(model):
    whole = _sample(model, PROMPTS, 0)
    calls = [len(c) for c in whole.tool_calls]
    assert any(calls) and not all(calls)  # both kinds of neighbours are in the batch
    for i, prompt in enumerate(PROMPTS):
        alone = _sample(model, [prompt], i)
        rows = slice(4 * i, 4 * i + 4)
        assert alone.completion_ids == whole.completion_ids[rows]
        assert alone.completion_forced == whole.completion_forced[rows]


def test_results_are_forced_after_the_call_and_flagged(model):
    rollout = _sample(model, PROMPTS, 0)
    seen = 0
    for ids, forced, calls, logps in zip(
        rollout.completion_ids,
        rollout.completion_forced,
        rollout.tool_calls,
        rollout.completion_logprobs,
        strict=True,
    ):
        assert len(forced) == len(ids) == len(logps)
        for call in calls:
            result = [OUT_START, *_encode(call.output), OUT_END]
            at = ids.index(END) + 1  # the first call: its result follows its END at once
            got = ids[at : at + len(result)]
            assert got == result[: len(got)]
            assert forced[at : at + len(got)] == [True] * len(got)
            assert not any(forced[:at])
            seen += 1
            break
    assert seen
    assert sum(map(sum, rollout.completion_forced)) > 0


def test_forced_tokens_have_mask_zero_and_no_share_in_normalisers():
    prompts = [[1, 2], [1, 2, 3]]
    completions = [[4, 5, 6, 7], [8, 9]]
    forced = [[False, True, True, False], [False, False]]
    batch = build_micro_batch(prompts, completions, forced=forced)
    assert batch.completion_mask.tolist() == [
        [0, 0, 1, 0, 0, 1],
        [0, 0, 0, 1, 1, 0],
    ]
    norm = grpo.LossNorm.for_update([batch.completion_mask], max_new_tokens=4)
    assert (norm.num_sequences, norm.num_tokens) == (2, 4)  # 2 + 2 sampled tokens, not 6
    with pytest.raises(ValueError, match="forced flags"):
        build_micro_batch(prompts, completions, forced=[[False], [False, False]])


def test_the_loss_does_not_depend_on_forced_positions():
    """Changing the log-probs of forced tokens changes neither the loss nor its gradient
    anywhere but there (where it is 0)."""
    batch = build_micro_batch([[1, 2]], [[4, 5, 6, 7]], forced=[[False, True, True, False]])
    mask = batch.completion_mask[:, batch.start :]
    adv = mx.array([1.5])
    norm = grpo.LossNorm.for_update([batch.completion_mask], max_new_tokens=4)

    def loss(logp):
        value, _ = grpo.policy_loss(logp, mx.stop_gradient(logp), adv, mask, norm=norm)
        return value

    assert mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    base = mx.array([[-1.0, -2.0, -0.5, -0.7]])
    moved = base + mx.array([[0.0, 3.0, 3.0, 0.0]])  # only the forced positions
    assert loss(base).item() == pytest.approx(loss(moved).item(), abs=1e-7)
    grad = mx.grad(loss)(base)
    assert grad[0, 1].item() == 0.0 and grad[0, 2].item() == 0.0 and grad[0, 0].item() != 0.0


# --- the runner's error strings -------------------------------------------------------------


def test_failing_slow_and_excess_calls_become_error_strings():
    def boom(text):
        raise RuntimeError("no such thing")

    assert _runner(boom).call([1, 2], 0).output == "error: RuntimeError: no such thing"
    started = time.perf_counter()
    slow = _runner(lambda t: time.sleep(5) or "late", timeout_s=0.2).call([1], 0)
    assert "timed out" in slow.output and not slow.ok
    assert time.perf_counter() - started < 1.5
    limited = _runner(max_calls=2).call([1], 2)
    assert limited.output == "error: at most 2 tool calls per answer" and not limited.ok
    ok = _runner().call([1, 2, 3], 0)
    assert (ok.output, ok.ok, ok.input) == ("=3", True, "BCD")


def test_calculator_runs_through_the_runner():
    (calc,) = resolve_tools(["calculator"])
    runner = ToolRunner(_format(), [calc], lambda ids: "12*12")
    assert runner.call([1], 0).output == "144"
    runner = ToolRunner(_format(), [calc], lambda ids: "__import__('os')")
    assert runner.call([1], 0).output.startswith("error: refused")


def test_json_calls_parse_or_fail_with_a_message():
    assert parse_json_call('{"name": "calc", "arguments": {"expression": "1+1"}}') == (
        "calc",
        "1+1",
    )
    assert parse_json_call('{"name": "f", "arguments": {"a": 1, "b": 2}}') == (
        "f",
        '{"a": 1, "b": 2}',
    )
    for bad in ("not json", '{"arguments": {}}', "[1]"):
        with pytest.raises(ValueError):
            parse_json_call(bad)


def test_unknown_and_malformed_json_calls_are_error_strings():
    fmt = ToolFormat("chat-template", START, END, {}, _encode, "{RESULT}")
    runner = ToolRunner(fmt, [Tool("echo", str.upper)], lambda ids: '{"name": "nope"}')
    assert runner.call([1], 0).output == "error: unknown tool 'nope' (tools: echo)"
    runner = ToolRunner(fmt, [Tool("echo", str.upper)], lambda ids: "{oops")
    assert runner.call([1], 0).output.startswith("error: the tool call is not valid JSON")
    # Nesting deeper than Python's parser can recurse is an error string too, not a crash.
    deep = '{"name": "echo", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}"
    runner = ToolRunner(fmt, [Tool("echo", str.upper)], lambda ids: deep)
    assert "more than 16 levels deep" in runner.call([1], 0).output
    runner = ToolRunner(
        fmt, [Tool("echo", str.upper)], lambda ids: '{"name": "echo", "arguments": "hi"}'
    )
    assert runner.call([1], 0).output == "HI"


# --- formats from real tokenizers -----------------------------------------------------------


def test_nanochat_tokenizer_gives_the_python_block_format():
    from mlxgrpo.models.loading import load_model

    _, tokenizer = load_model("builtin:tiny-nanochat")
    fmt = tool_format(tokenizer)
    ids = tokenizer.encode("<|python_start|>1+1<|python_end|>", add_special_tokens=False)
    assert fmt.kind == "nanochat" and (ids[0], ids[-1]) == (fmt.call_start, fmt.call_end)
    result = fmt.result_ids("2")
    assert tokenizer.decode(result) == "<|output_start|>2<|output_end|>"
    plain = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    assert fmt.render(ids + result, plain) == "<|python_start|>1+1<|python_end|>" + (
        "<|output_start|>2<|output_end|>"
    )
    assert plain(ids + result) == "1+12"  # why rewards read the rendered text


QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}"
    "<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}\n<tool_call>\n{{ c.function | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_like_tokenizer():
    from mlxgrpo.models.builtin import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    tokenizer.chat_template = QWEN_LIKE_TEMPLATE
    return tokenizer


def test_chat_template_format_renders_the_tool_turn():
    tokenizer = _qwen_like_tokenizer()
    fmt = tool_format(tokenizer)
    assert fmt.kind == "chat-template"
    assert tokenizer.convert_ids_to_tokens([fmt.call_start, fmt.call_end]) == [
        "<tool_call>",
        "</tool_call>",
    ]
    assert tokenizer.decode(fmt.result_ids("42")) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    opened = tokenizer.decode(fmt.prefill_ids("calculator", "2*3"))
    assert opened == '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n'


def test_a_tokenizer_without_tool_tokens_is_a_config_error():
    from mlxgrpo.models.builtin import build_char_tokenizer

    with pytest.raises(ConfigError, match="no tool-call tokens"):
        tool_format(build_char_tokenizer())


def test_tool_specs_resolve_or_fail_in_one_line(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text('def shout(text):\n    """Upper case."""\n    return text.upper()\n')
    calc, shout = resolve_tools(["calculator", f"{path}:shout"])
    assert (calc.name, shout.name, shout.fn("a"), shout.description) == (
        "calculator",
        "shout",
        "A",
        "Upper case.",
    )
    with pytest.raises(ConfigError, match="unknown tool 'abacus'"):
        resolve_tools(["abacus"])
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        resolve_tools([f"{path}:nope"])
    with pytest.raises(ConfigError, match="twice"):
        resolve_tools(["calculator", "calculator"])


# --- the tool task --------------------------------------------------------------------------

TOOL_TASK = [
    "model.path=builtin:tiny-nanochat",
    "data.dataset=synthetic:arithmetic?tool=calculator&prefill=call",
    "rollout.tools=['calculator']",
    "rollout.num_generations=16",
    "rollout.max_new_tokens=16",
    "rollout.temperature=1.0",
    "finetune.lora_layers=-1",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "optim.batch_size=8",
    "optim.gradient_accumulation_steps=1",
    "checkpoint.save_steps=0",
    "run.resume=never",
    "run.run_name=run",
]


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"train"' in line]


def test_grpo_learns_to_use_the_calculator(cli, tmp_path):
    """Accuracy and the share of completions that call the tool both rise; completions log
    their calls; `infer` runs the same loop with what was trained, streamed or not."""
    sets = [*TOOL_TASK, f"run.output_dir={tmp_path}", "run.max_steps=16"]
    sets.append("logging.log_completions=true")
    train(resolve_config((), sets, environ={}))
    records = _train_records(tmp_path / "run")
    first, last = records[:4], records[-4:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    assert mean(last, "accuracy") > mean(first, "accuracy") + 0.5, [r["accuracy"] for r in records]
    assert mean(last, "tool_use_share") > mean(first, "tool_use_share") + 0.5
    assert all(0 <= r["tool_errors_mean"] <= r["tool_calls_mean"] for r in records)
    logged = [
        json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    ]
    called = [c for r in logged for c in r.get("tool_calls", [])]
    assert called and all(set(c) == {"tool", "input", "output", "ok"} for c in called)
    good = [c for c in called if c["ok"]]
    products = [str(int(a) * int(b)) for a, b in (c["input"].split("*") for c in good)]
    assert good and [c["output"] for c in good] == products

    # The trained adapters in `infer`: the prompt opens a call, as in training.
    args = ["infer", "-m", "builtin:tiny-nanochat", "--adapter", str(tmp_path / "run"), "-t", "0"]
    args += ["--tool", "calculator", "--no-chat-template", "--max-tokens", "12"]
    prompt = "<|python_start|>1234*5678"
    code, out, err = cli(*args, "--json", prompt)
    assert code == 0, err
    record = json.loads(out)
    assert record["tool_calls"] == [
        {"tool": "calculator", "input": "1234*5678", "output": "7006652", "ok": True}
    ]
    assert record["completion"].startswith("<|python_end|><|output_start|>7006652<|output_end|>")
    code, streamed, err = cli(*args, "--stream", prompt)
    assert code == 0 and streamed.startswith(record["completion"]), (streamed, err)


def test_tool_task_without_tools_is_one_line(cli, tmp_path):
    code, _, err = cli(
        "train", "-m", "builtin:tiny-nanochat", "-o", tmp_path, "--max-steps", "1",
        "--set", "data.dataset=synthetic:arithmetic?tool=calculator",
    )  # fmt: skip
    assert code == 2 and "rollout.tools is empty" in err and "Traceback" not in err


def test_tools_on_a_model_without_tool_tokens_is_one_line(cli, tmp_path):
    code, _, err = cli(
        "train", "-m", "builtin:tiny-qwen2", "-o", tmp_path, "--max-steps", "1",
        "--set", "rollout.tools=['calculator']", "--set", "data.dataset=synthetic:repeat",
    )  # fmt: skip
    assert code == 2 and "no tool-call tokens" in err and "Traceback" not in err


# --- the streaming loop of infer and chat ---------------------------------------------------


def _closing_format(tokenizer, prompt_ids, first_token) -> ToolRunner:
    """A format whose call opens at the prompt's last token and closes on `first_token`, so
    the greedy answer's first token runs the call at once."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    fmt = ToolFormat("nanochat", prompt_ids[-1], first_token, {}, encode, ([], []))
    return ToolRunner(fmt, [Tool("echo", lambda text: "xyz")], lambda ids: "")


def test_streamed_and_chat_answers_prefill_the_result_like_a_full_forward():
    """infer --stream and chat: after a call, the result goes through the model into the
    cache, and the answer goes on exactly as a cache-free greedy loop over
    prompt + call + result does."""
    from test_inference import greedy_reference
    from test_rollout import _strengthen

    from mlxgrpo.inference import (
        ChatSession,
        GenerationOptions,
        StreamState,
        encode_prompt,
        stream_answer,
    )
    from mlxgrpo.models.loading import load_model
    from mlxgrpo.models.tokenizer import eos_token_ids

    model, tokenizer = load_model("builtin:tiny-qwen2")
    _strengthen(model)  # so that the answer depends on more than the last token
    options = GenerationOptions(max_tokens=10, temperature=0.0)
    eos = eos_token_ids(tokenizer)
    ids = encode_prompt(tokenizer, "What is 2+2?")
    first = greedy_reference(model, ids, 1, set())[0]
    tools = _closing_format(tokenizer, ids, first)
    result = tokenizer.encode("xyz", add_special_tokens=False)
    expected = [first, *result]
    expected += greedy_reference(model, ids + expected, 10 - len(expected), eos)

    state = StreamState()
    text = "".join(stream_answer(model, tokenizer, ids, options, state=state, tools=tools))
    assert state.generated == expected
    assert state.answer.tool_calls == [{"tool": "echo", "input": "", "output": "xyz", "ok": True}]
    assert "xyz" in text

    session = ChatSession(model, tokenizer, options, tools=tools)
    chat_state = StreamState()
    "".join(session.send("What is 2+2?", chat_state))
    assert chat_state.generated == expected


def test_batched_rollout_continues_after_a_result_like_a_full_forward():
    """The batched loop's forced tokens go through the model one per step: the greedy
    completion after a call equals a cache-free loop over prompt + call + result."""
    from test_inference import greedy_reference
    from test_rollout import _strengthen

    from mlxgrpo.inference import encode_prompt
    from mlxgrpo.models.loading import load_model

    model, tokenizer = load_model("builtin:tiny-qwen2")
    _strengthen(model)
    prompts = [encode_prompt(tokenizer, q) for q in ("What is 2+2?", "Say hi")]
    first = greedy_reference(model, prompts[0], 1, set())[0]
    tools = _closing_format(tokenizer, prompts[0], first)
    rollout = generate_groups(
        model,
        prompts,
        num_generations=1,
        max_new_tokens=10,
        sampling=SamplingConfig(temperature=0.0),
        eos_token_ids=[],
        tools=tools,
    )
    result = tokenizer.encode("xyz", add_special_tokens=False)
    expected = [first, *result]
    expected += greedy_reference(model, prompts[0] + expected, 10 - len(expected), set())
    assert rollout.completion_ids[0] == expected
    assert rollout.completion_forced[0] == [False] + [True] * len(result) + [False] * (
        10 - 1 - len(result)
    )


def test_taking_and_joining_rollouts_keep_every_per_completion_field():
    """Dynamic sampling takes groups out of rollouts and joins them: forced-token flags and
    tool calls must travel with their completions (else forced tokens would be trained on)."""
    from dataclasses import fields

    from mlxgrpo.generation.rollout import PER_COMPLETION_FIELDS, Rollout, join_rollouts

    per_rollout = {
        "prompt_ids", "num_generations", "prompt_index", "prefill_tokens", "generated_tokens",
        "decode_steps", "prefill_seconds", "decode_seconds",
    }  # fmt: skip
    # Per completion, but arrays that take_groups and join_rollouts carry by their own methods
    # (tests/test_replay.py).
    recorded = {"activations"}
    # A new field must be sorted into one kind or another.
    assert {f.name for f in fields(Rollout)} == per_rollout | recorded | set(PER_COMPLETION_FIELDS)
    rows = range(4)
    rollout = Rollout(
        prompt_ids=[[1, 2], [3]],
        num_generations=2,
        prompt_index=[0, 0, 1, 1],
        completion_ids=[[10 + i, 20 + i] for i in rows],
        truncated=[False, True, False, True],
        finish_reason=["stop", "length", "stop", "length"],
        completion_logprobs=[[-0.1 * i, -0.2] for i in rows],
        completion_entropies=[[0.5, 0.5 * i] for i in rows],
        completion_forced=[[False, i % 2 == 0] for i in rows],
        tool_calls=[[f"call {i}"] for i in rows],
    )
    second = rollout.take_groups([1])
    assert second.prompt_ids == [[3]] and second.prompt_index == [0, 0]
    for name in PER_COMPLETION_FIELDS:
        assert getattr(second, name) == getattr(rollout, name)[2:], name
    joined = join_rollouts([rollout.take_groups([0]), second])
    for name in PER_COMPLETION_FIELDS:
        assert getattr(joined, name) == getattr(rollout, name), name
    assert (
        joined.training_batch().completion_mask.tolist()
        == rollout.training_batch().completion_mask.tolist()
    )


def test_a_chat_template_call_in_the_loop_forces_the_tool_turn():
    """`<tool_call>{json}</tool_call>` written token by token: the named tool runs on the
    argument, and the template's tool turn (with the result) is queued to be forced in."""
    from mlxgrpo.generation.tool_loop import ToolLoop

    tokenizer = _qwen_like_tokenizer()
    fmt = tool_format(tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    tools = [Tool("echo", str.upper), Tool("calculator", resolve_tools(["calculator"])[0].fn)]
    loop = ToolLoop(ToolRunner(fmt, tools, decode), [[1, 2]], group=1)
    call = '{"name": "calculator", "arguments": {"expression": "6*7"}}'
    written = [fmt.call_start, *tokenizer.encode(call, add_special_tokens=False), fmt.call_end]
    for token in written:
        loop.observe(0, token)
    (made,) = loop.calls[0]
    assert (made.tool, made.input, made.output, made.ok) == ("calculator", "6*7", "42", True)
    forced = [loop.take(0, -1)[0] for _ in range(len(loop.rows[0].queue))]
    assert tokenizer.decode(forced) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert loop.take(0, 99) == (99, False)  # then it samples again


def test_chat_template_prompts_list_the_tools():
    from mlxgrpo.data import Example
    from mlxgrpo.task import text_codec

    tokenizer = _qwen_like_tokenizer()
    (calc,) = resolve_tools(["calculator"])
    runner = ToolRunner(tool_format(tokenizer), [calc], str)
    cfg = resolve_config((), ("data.dataset=synthetic:repeat",), {}).config
    with_tools = tokenizer.decode(text_codec(tokenizer, cfg, runner).encode(Example("q", "a")))
    without = tokenizer.decode(text_codec(tokenizer, cfg).encode(Example("q", "a")))
    assert '"name": "calculator"' in with_tools and '"expression"' in with_tools
    assert "calculator" not in without


def test_nanochat_history_keeps_calls_as_the_model_wrote_them():
    """A chat answer with a call goes into the history as nanochat's parts, so the next turn
    renders exactly the tokens the model produced (not the markers as plain text)."""
    from mlxgrpo.models.loading import load_model

    _, tokenizer = load_model("builtin:tiny-nanochat")
    fmt = tool_format(tokenizer)
    plain = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    answer = tokenizer.encode(
        "so <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> it is 42",
        add_special_tokens=False,
    )
    content = fmt.history_content(answer, plain)
    assert content == [
        {"type": "text", "text": "so "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": " it is 42"},
    ]
    from mlxgrpo.models.tokenizer import render_prompt

    user = [{"role": "user", "content": "q"}]
    head = render_prompt(tokenizer, user)
    turns = [*user, {"role": "assistant", "content": content}, {"role": "user", "content": "r"}]
    both = render_prompt(tokenizer, turns)
    assert both[len(head) : len(head) + len(answer)] == answer


def test_a_bad_tool_fails_before_any_model_loads(cli, tmp_path):
    """Cheap checks first: the model named here (a hub id, offline) is never fetched."""
    missing = "mlxgrpo-tests/no-such-model"
    code, _, err = cli("infer", "-m", missing, "--tool", "abacus", "hi")
    assert code == 2 and "unknown tool 'abacus'" in err and "Traceback" not in err
    code, _, err = cli(
        "train", "-m", missing, "-o", tmp_path, "--set", "rollout.tools=['abacus']",
        "--set", "data.dataset=synthetic:repeat",
    )  # fmt: skip
    assert code == 2 and "unknown tool 'abacus'" in err


def test_a_hostile_tool_call_inside_a_real_rollout_is_an_error_string(model):
    """Whatever the rows write inside a call reads back as JSON nested 100,000 deep (deeper
    than Python's parser can recurse): the rollout finishes, and every call gets an error
    string as its result instead of ending the run."""
    hostile = '{"name": "echo", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}"
    fmt = ToolFormat("chat-template", START, END, {}, _encode, "{RESULT}")
    runner = ToolRunner(fmt, [Tool("echo", str.upper)], lambda ids: hostile)
    rollout = generate_groups(
        model, PROMPTS, num_generations=4, max_new_tokens=24,
        sampling=SamplingConfig(temperature=1.0), eos_token_ids=[0], seed=5, tools=runner,
    )  # fmt: skip
    calls = [call for row in rollout.tool_calls for call in row]
    assert calls and rollout.num_completions == 4 * len(PROMPTS)
    for call in calls:
        assert not call.ok
        assert call.output.startswith("error: the tool call nests arrays or objects more than")
