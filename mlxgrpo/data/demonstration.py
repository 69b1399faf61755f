"""Demonstrations for supervised fine-tuning (``algorithm.type = "sft"``): what they are, how a
data row becomes one, and how one becomes token ids with the mask of the tokens it trains.

Three forms, as the rows of a data file give them:

- a conversation (a ``messages`` column of role/content turns): every assistant turn trains;
- a prompt and its completion (``data.prompt_field`` and ``sft.completion_field``): rendered as
  a user turn and an assistant turn, with the run's system prompt, as GRPO renders prompts;
- plain ``text``: every token trains.

With ``train_on_prompt`` every token of a conversation trains too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlxgrpo.data.example import Example, Message, build_messages
from mlxgrpo.errors import ConfigError

MESSAGES_FIELD = "messages"
TEXT_FIELD = "text"


@dataclass(frozen=True)
class Demonstration:
    """One demonstration: a conversation whose assistant turns train, or a plain text."""

    messages: tuple[Message, ...] = ()
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (not self.messages):
            raise ValueError("a demonstration is a conversation or a text, exactly one")

    @classmethod
    def of_example(
        cls, example: Example, completion: str, system_prompt: str | None
    ) -> Demonstration:
        """The conversation of a GRPO prompt (rendered as its rollouts are) and its answer."""
        messages = build_messages(example, system_prompt)
        return cls(tuple([*messages, {"role": "assistant", "content": completion}]))


@dataclass(frozen=True)
class EncodedDemonstration:
    """Token ids and, per id, 1 where it is a training target (0: context only)."""

    ids: list[int]
    targets: list[int]
    truncated: bool = False

    @property
    def trained(self) -> int:
        return sum(self.targets[1:])  # the first token is never predicted


def rows_to_demonstrations(
    table: Any,
    label: str,
    prompt_field: str,
    completion_field: str,
    system_prompt: str | None,
) -> list[Demonstration]:
    """The demonstrations of a table's rows, in the form its columns give (see the module)."""
    columns = list(table.column_names)
    if MESSAGES_FIELD in columns:
        kind = MESSAGES_FIELD
    elif prompt_field in columns and completion_field in columns:
        kind = completion_field
    elif TEXT_FIELD in columns:
        kind = TEXT_FIELD
    else:
        raise ConfigError(
            f"Dataset {label} has no demonstrations: it needs a {MESSAGES_FIELD!r} column, "
            f"{prompt_field!r} and {completion_field!r} columns, or a {TEXT_FIELD!r} column. "
            f"Columns present: {', '.join(columns)}.",
            hint="set data.prompt_field and sft.completion_field to the columns that hold them",
        )
    out = []
    for number, row in enumerate(table, start=1):
        where = f"{label}, row {number}"
        if kind == MESSAGES_FIELD:
            out.append(Demonstration(_conversation(row[MESSAGES_FIELD], where)))
        elif kind == TEXT_FIELD:
            out.append(Demonstration(text=_text(row[TEXT_FIELD], f"{where}, field 'text'")))
        else:
            prompt = _text(row[prompt_field], f"{where}, field {prompt_field!r}")
            completion = _text(row[completion_field], f"{where}, field {completion_field!r}")
            out.append(Demonstration.of_example(Example(prompt), completion, system_prompt))
    return out


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = "empty text" if isinstance(value, str) else type(value).__name__
        raise ConfigError(f"{where}: expected text, got {shown}", hint="give every row its text")
    return value


def _conversation(value: Any, where: str) -> tuple[Message, ...]:
    ok = isinstance(value, list) and all(
        isinstance(m, Mapping)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok or not any(m["role"] == "assistant" for m in value):
        raise ConfigError(
            f"{where}: 'messages' must be a list of role/content turns with an assistant turn",
            hint='write it as [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]',
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def encode_demonstration(
    demo: Demonstration,
    *,
    render: Any,
    encode_text: Any,
    eos_ids: set[int],
    eos_id: int,
    train_on_prompt: bool,
    max_length: int,
) -> EncodedDemonstration:
    """Token ids and target mask of ``demo``, cut to ``max_length`` tokens.

    ``render(messages, add_generation_prompt) -> ids`` renders a conversation as the model's
    chat template does; ``encode_text(text) -> ids`` encodes plain text. An assistant turn
    trains from where the template's generation prompt ends to where the turn ends (its
    end-of-turn marker included), found by rendering the conversation up to it; a template
    that renders a conversation's start differently once more turns follow cannot be masked
    this way, and says so. A demonstration none of whose target tokens is one of ``eos_ids``
    (a chat template's end-of-turn marker usually is) gets ``eos_id`` appended, trained, so
    the model learns to stop.
    """
    if demo.text is not None:
        ids = list(encode_text(demo.text))
        targets = [1] * len(ids)
    else:
        ids = list(render(list(demo.messages), False))
        targets = [1 if train_on_prompt else 0] * len(ids)
        for turn, message in enumerate(() if train_on_prompt else demo.messages):
            if message["role"] == "assistant":
                begin = _known_prefix(render(list(demo.messages[:turn]), True), ids, turn)
                end = _known_prefix(render(list(demo.messages[: turn + 1]), False), ids, turn)
                targets[begin:end] = [1] * (end - begin)
    if not any(t and i in eos_ids for i, t in zip(ids, targets, strict=True)):
        ids.append(eos_id)
        targets.append(1)
    truncated = len(ids) > max_length
    return EncodedDemonstration(ids[:max_length], targets[:max_length], truncated)


def _known_prefix(part: Sequence[int], ids: Sequence[int], turn: int) -> int:
    """len(part), once ``part`` is checked to start ``ids``."""
    if list(ids[: len(part)]) != list(part):
        raise ConfigError(
            f"the chat template renders the conversation before turn {turn} differently "
            "once later turns follow, so the assistant's tokens cannot be told apart",
            hint="set sft.train_on_prompt = true to train on every token, or use a model "
            "whose chat template renders turns one after another",
        )
    return len(part)
