"""How a model writes a tool call and reads the result, found from its tokenizer.

- **nanochat**: the model writes ``<|python_start|>EXPR<|python_end|>``; the result comes back
  as ``<|output_start|>RESULT<|output_end|>``. Every call goes to the first configured tool
  (the calculator by default), as nanochat's engine does.
- **chat template** (Qwen2.5 and other templates with a tool role): the model writes
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and the result is rendered by
  the template's own tool turn (for Qwen2.5: the assistant turn ends, a user turn carries
  ``<tool_response>RESULT</tool_response>``, and a new assistant turn opens).

The markers must be single tokens, so a call is noticed on the token that closes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlxgrpo import parsing
from mlxgrpo.errors import ConfigError

# Levels of nesting a tool call's JSON may have: a model that nests deeper gets an error
# string back as the tool's result, never a crash of the rollout.
TOOL_CALL_DEPTH = 16

NANOCHAT_MARKERS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
CHAT_CALL_MARKERS = ("<tool_call>", "</tool_call>")
_PLACEHOLDER = "\u0000RESULT\u0000"


@dataclass(frozen=True)
class ToolFormat:
    kind: str  # "nanochat" or "chat-template"
    call_start: int
    call_end: int
    markers: dict[int, str]  # ids shown as text when a completion is rendered for rewards
    encode: Callable[[str], list[int]] = field(repr=False)
    result_template: tuple[list[int], list[int]] | str = field(repr=False)

    def parse_call(self, text: str) -> tuple[str | None, str]:
        """(tool name or None for "the default tool", its argument text)."""
        if self.kind == "nanochat":
            return None, text.strip()
        return parse_json_call(text)

    def result_ids(self, result: str) -> list[int]:
        """The tokens forced into the sequence after a call: the result in the model's format."""
        if isinstance(self.result_template, str):
            return self.encode(self.result_template.replace(_PLACEHOLDER, result))
        head, tail = self.result_template
        return [*head, *self.encode(result), *tail]

    def prefill_ids(self, tool: str, argument: str) -> list[int]:
        """A call opened and written up to its closing marker (a prompt that pre-fills it)."""
        if self.kind == "nanochat":
            return [self.call_start, *self.encode(argument)]
        call = json.dumps({"name": tool, "arguments": {"expression": argument}})
        return [self.call_start, *self.encode(f"\n{call}\n")]

    def history_content(
        self, ids: Sequence[int], decode: Callable[[list[int]], str]
    ) -> str | list[dict[str, str]]:
        """An answer's content for the chat history, so the next turn renders its calls as
        the model wrote them: nanochat's parts (text, python, python_output), else the text
        with the markers."""
        opens = {"<|python_start|>": "python", "<|output_start|>": "python_output"}
        kinds = {i: opens.get(m, "text") for i, m in self.markers.items()}
        if self.kind != "nanochat" or len(kinds) != len(NANOCHAT_MARKERS):
            return self.render(ids, decode)
        parts = []
        for marker, run in self._runs(ids):
            kind = "text" if marker is None else kinds[marker]
            if run or kind != "text":
                parts.append({"type": kind, "text": decode(run)})
        return parts

    def render(self, ids: Sequence[int], decode: Callable[[list[int]], str]) -> str:
        """A completion's text with the call markers visible (a plain decode drops special
        tokens, which would glue a call's expression to its result)."""
        return "".join(
            ("" if marker is None else self.markers[marker]) + decode(run)
            for marker, run in self._runs(ids)
        )

    def _runs(self, ids: Sequence[int]) -> list[tuple[int | None, list[int]]]:
        """The tokens between markers, each with the marker before it (None for the first)."""
        runs: list[tuple[int | None, list[int]]] = [(None, [])]
        for token in ids:
            if token in self.markers:
                runs.append((token, []))
            else:
                runs[-1][1].append(token)
        return runs


def parse_json_call(text: str) -> tuple[str | None, str]:
    """``{"name": N, "arguments": A}`` -> (N, A as text); A with one string value gives that
    string, other arguments their JSON. A ValueError names what is wrong."""
    try:
        call = parsing.json_text(text, "the tool call", max_depth=TOOL_CALL_DEPTH)
    except parsing.ParseError as exc:
        raise ValueError(f"the tool call {exc.problem}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError('the tool call needs {"name": ..., "arguments": ...}')
    arguments = call.get("arguments", "")
    if isinstance(arguments, str):
        return call["name"], arguments
    if isinstance(arguments, dict) and len(arguments) == 1:
        (value,) = arguments.values()
        if isinstance(value, str):
            return call["name"], value
    return call["name"], json.dumps(arguments)


def tool_format(tokenizer: Any) -> ToolFormat:
    """The tokenizer's tool-call format; ConfigError when it has none."""
    vocab = _vocabulary(tokenizer)

    def encode(text: str) -> list[int]:
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]

    if all(m in vocab for m in NANOCHAT_MARKERS):
        start, end, out_start, out_end = (vocab[m] for m in NANOCHAT_MARKERS)
        return ToolFormat(
            "nanochat",
            start,
            end,
            {vocab[m]: m for m in NANOCHAT_MARKERS},
            encode,
            ([out_start], [out_end]),
        )
    if all(m in vocab for m in CHAT_CALL_MARKERS):
        start, end = (vocab[m] for m in CHAT_CALL_MARKERS)
        return ToolFormat(
            "chat-template",
            start,
            end,
            {start: CHAT_CALL_MARKERS[0], end: CHAT_CALL_MARKERS[1]},
            encode,
            _template_result(tokenizer),
        )
    raise ConfigError(
        "this model's tokenizer has no tool-call tokens (nanochat's <|python_start|> or a "
        "chat template's <tool_call>)",
        hint="use a nanochat model or a tool-calling chat model such as Qwen2.5-Instruct, or "
        "leave rollout.tools empty",
    )


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    own = getattr(tokenizer, "special_ids", None)  # nanochat's specials are not in get_vocab
    vocab = dict(tokenizer.get_vocab())
    if isinstance(own, dict):
        vocab.update(own)
    return vocab


def _template_result(tokenizer: Any) -> str:
    """What the chat template writes between a call's ``</tool_call>`` and the next assistant
    text, with a placeholder for the result (rendered once, with a stand-in call)."""
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
    }
    turns = [{"role": "user", "content": "q"}, call]
    try:
        text = tokenizer.apply_chat_template(
            [*turns, {"role": "tool", "content": _PLACEHOLDER}],
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # a template without a tool role raises its own errors
        raise ConfigError(
            f"the chat template cannot render a tool result ({type(exc).__name__}: {exc})",
            hint="use a tool-calling chat model such as Qwen2.5-Instruct",
        ) from None
    close = text.rfind(CHAT_CALL_MARKERS[1])
    if close < 0 or _PLACEHOLDER not in text[close:]:
        raise ConfigError(
            "the chat template does not show a tool result after the call",
            hint="use a tool-calling chat model such as Qwen2.5-Instruct",
        )
    return text[close + len(CHAT_CALL_MARKERS[1]) :]


def tool_schemas(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON schemas for a chat template's tool list: each tool takes one text argument."""
    import inspect

    out = []
    for tool in tools:
        params = list(inspect.signature(tool.fn).parameters)
        arg = params[0] if params else "input"
        out.append(
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": {
                        "type": "object",
                        "properties": {arg: {"type": "string"}},
                        "required": [arg],
                    },
                },
            }
        )
    return out
