"""Chat rendering, EOS ids and decoding over any tokenizer mlx-lm hands out.

Works with mlx-lm's TokenizerWrapper, a bare transformers tokenizer, or any object with the same
`encode` / `decode` / `apply_chat_template` surface (the nanochat wrapper provides one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mlxgrpo.errors import ConfigError

Message = Mapping[str, str]

# Plain format for tokenizers without a chat template (base models).
FALLBACK_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def normalize_messages(messages: str | Sequence[Message]) -> list[dict[str, Any]]:
    """A conversation as a list of {"role", "content"} dicts; a bare string is one user turn.
    Content is text, or a list of parts (nanochat's tool-call parts) kept as it is."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ConfigError(
                f"message {index} is not a chat message: {message!r}",
                hint='give each message as {"role": "user", "content": "..."}',
            )
        content = message["content"]
        if not (isinstance(content, list) and all(isinstance(p, Mapping) for p in content)):
            content = str(content)
        normalized.append({"role": str(message["role"]), "content": content})
    return normalized


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer renders conversations itself."""
    flag = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's TokenizerWrapper
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def render_fallback_text(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """`System: …\\nUser: …\\nAssistant:`, the format used when there is no chat template."""
    lines = [
        f"{FALLBACK_ROLE_LABELS.get(m['role'], m['role'].capitalize())}: {m['content']}"
        for m in messages
    ]
    if add_generation_prompt:
        lines.append(f"{FALLBACK_ROLE_LABELS['assistant']}:")
    return "\n".join(lines)


def render_prompt(
    tokenizer: Any,
    messages: str | Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a conversation, through the chat template when the tokenizer has one
    (`tools`: JSON schemas the template lists for tool-calling models)."""
    conversation = normalize_messages(messages)
    if has_chat_template(tokenizer):
        extra = {"tools": list(tools)} if tools else {}
        rendered = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
        )
        return _as_id_list(rendered)
    text = render_fallback_text(conversation, add_generation_prompt=add_generation_prompt)
    # Special tokens on: a base model still wants its BOS in front of the plain format.
    return _as_id_list(tokenizer.encode(text))


def render_prompt_text(
    tokenizer: Any,
    messages: str | Sequence[Message],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt as text (for display and logs); `render_prompt` is what the model sees."""
    conversation = normalize_messages(messages)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    return render_fallback_text(conversation, add_generation_prompt=add_generation_prompt)


def eos_token_ids(tokenizer: Any) -> set[int]:
    """Every id that ends generation: the wrapper's EOS set plus the tokenizer's own EOS."""
    ids: set[int] = set()
    known = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm's TokenizerWrapper
    if known is not None:
        ids.update(int(i) for i in ([known] if isinstance(known, int) else known))
    own = getattr(tokenizer, "eos_token_id", None)
    if isinstance(own, int):
        ids.add(own)
    elif isinstance(own, Iterable):
        ids.update(int(i) for i in own)
    return ids


def strip_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """A completion without its final EOS token (kept in training ids, not in its text)."""
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def decode(tokenizer: Any, ids: Any, *, skip_special_tokens: bool = False) -> str:
    """Text of token ids (a list, an mx.array or a numpy array)."""
    if skip_special_tokens:
        return tokenizer.decode(_as_id_list(ids), skip_special_tokens=True)
    return tokenizer.decode(_as_id_list(ids))


def _as_id_list(ids: Any) -> list[int]:
    """Flatten what tokenizers return (lists, BatchEncoding, arrays, a batch of one) to ints."""
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    if len(ids) == 1 and isinstance(ids[0], list | tuple):
        ids = list(ids[0])
    return [int(i) for i in ids]
