"""The unit of training data and how it becomes chat messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The original project's instruction for GSM8K-style tasks; the built-in format rewards check it.
GSM8K_SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

Message = dict[str, str]


@dataclass
class Example:
    """One prompt: the question (text, or chat messages), its gold answer, and other columns."""

    prompt: str | list[Message]
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the data's other columns
    # A tool call the prompt ends with, pre-filled by a synthetic task: (tool, argument). Kept
    # apart from ``extra`` so that no data column can choose what a tool is given.
    prefill_call: tuple[str, str] | None = None

    @property
    def question(self) -> str | list[Message]:
        return self.prompt

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "extra": dict(self.extra)}


def build_messages(example: Example, system_prompt: str | None = None) -> list[Message]:
    """Role/content messages for the chat template: optional system prompt, then the user turn.

    A prompt that already is a message list is used as it is; the system prompt is added only
    when it has none of its own.
    """
    if isinstance(example.prompt, list):
        messages = [dict(m) for m in example.prompt]
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": example.prompt})
    return messages
