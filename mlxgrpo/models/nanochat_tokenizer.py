"""nanochat's tokenizer: a pickled tiktoken Encoding, loaded safely and presented to mlx-lm.

`tokenizer.pkl` is unpickled with an allow-list: the only global it may name is
`tiktoken.core.Encoding`, and even that is replaced by a stand-in that merely records the
pickled state. The state is then checked (a dict of name, split pattern, byte ranks and special
tokens) and only then handed to tiktoken. So a pickle that would call `os.system` or anything
else is refused before any of its code runs.

An Encoding pickled *by name* (tiktoken does this for its registered encodings such as
`cl100k_base`) is refused too: resolving the name would download files, and nanochat never
writes such a file (its tokenizer is trained, not registered).

`NanochatTokenizer` gives the Encoding the surface of a Hugging Face tokenizer (encode, decode,
apply_chat_template, vocab, special ids), and `load_nanochat_tokenizer` wraps it in mlx-lm's
`TokenizerWrapper`, so mlx-lm's generation, our rollout / log-prob code and chat all see the
same ids.
"""

from __future__ import annotations

import codecs
import functools
import os
import pickle
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.safe_pickle import AllowListUnpickler

if TYPE_CHECKING:
    import tiktoken

TOKENIZER_FILE = "tokenizer.pkl"
BOS = "<|bos|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
OUTPUT_START, OUTPUT_END = "<|output_start|>", "<|output_end|>"
REQUIRED_SPECIAL_TOKENS = (BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END)
# nanochat merges a system message into the first user turn, separated by a blank line.
SYSTEM_SEPARATOR = "\n\n"

_ENCODING_KEYS = {"name", "pat_str", "mergeable_ranks", "special_tokens", "explicit_n_vocab"}
_PICKLE_HINT = "only load a tokenizer.pkl written by nanochat (a pickled tiktoken Encoding)"


# ---------------------------------------------------------------------------------------------
# Safe loading of tokenizer.pkl


class _PickledEncoding:
    """Stand-in for `tiktoken.core.Encoding` while unpickling: records the state, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state


def _reconstructor(cls: Any, base: Any, state: Any) -> _PickledEncoding:
    # Protocol 0/1 pickles build objects through copyreg._reconstructor(cls, object, None).
    if cls is not _PickledEncoding or base is not object or state is not None:
        raise MlxgrpoError("tokenizer pickle rebuilds an unexpected object", hint=_PICKLE_HINT)
    return _PickledEncoding()


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol 0-2 pickles store bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise MlxgrpoError("tokenizer pickle encodes bytes unexpectedly", hint=_PICKLE_HINT)
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("tiktoken.core", "Encoding"): _PickledEncoding,
    ("tiktoken", "Encoding"): _PickledEncoding,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    # Protocol 0-2 pickles spell these with Python 2 module names, and encode bytes.
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
}


class _EncodingUnpickler(AllowListUnpickler):
    allowed = _ALLOWED_GLOBALS
    needed_by = "a tiktoken Encoding"
    hint = _PICKLE_HINT

    def persistent_load(self, pid: Any) -> Any:
        raise MlxgrpoError(f"'{self._source}' is not a tokenizer pickle", hint=_PICKLE_HINT)


def _encoding_arguments(state: Any, source: str) -> dict[str, Any]:
    """The checked keyword arguments for tiktoken.Encoding from a pickled state."""
    if isinstance(state, str):
        raise MlxgrpoError(
            f"'{source}' names tiktoken's registered encoding '{state}' instead of holding a "
            "vocabulary; resolving that name would download files, so it is not loaded",
            hint="nanochat's tokenizer.pkl holds its own ranks; point at that file",
        )
    if not isinstance(state, dict) or not {"name", "pat_str", "mergeable_ranks"} <= set(state):
        raise MlxgrpoError(f"'{source}' holds a malformed tiktoken Encoding", hint=_PICKLE_HINT)
    unknown = set(state) - _ENCODING_KEYS
    ranks, special = state["mergeable_ranks"], state.get("special_tokens", {})
    well_typed = (
        not unknown
        and isinstance(state["name"], str)
        and isinstance(state["pat_str"], str)
        and isinstance(ranks, dict)
        and len(ranks) > 0
        and all(type(k) is bytes and type(v) is int for k, v in ranks.items())
        and isinstance(special, dict)
        and all(type(k) is str and type(v) is int for k, v in special.items())
        and isinstance(state.get("explicit_n_vocab"), int | None)
    )
    if not well_typed:
        raise MlxgrpoError(f"'{source}' holds a malformed tiktoken Encoding", hint=_PICKLE_HINT)
    return {**state, "special_tokens": special}


def load_nanochat_encoding(path: str | os.PathLike[str]) -> tiktoken.Encoding:
    """The tiktoken Encoding in a nanochat `tokenizer.pkl`, unpickled with an allow-list.

    Raises ConfigError when the file is missing, MlxgrpoError when it holds anything but a
    tiktoken Encoding with an explicit vocabulary (nothing from the file runs in that case).
    """
    import tiktoken

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer file '{path}' not found", hint=_PICKLE_HINT)
    try:
        with open(path, "rb") as fh:
            loaded = _EncodingUnpickler(fh, str(path)).load()
    except MlxgrpoError:
        raise
    except Exception as err:  # truncated or foreign files fail in many ways
        raise MlxgrpoError(f"'{path}' is not a readable pickle ({err})", hint=_PICKLE_HINT) from err
    if not isinstance(loaded, _PickledEncoding) or not hasattr(loaded, "pickled_state"):
        raise MlxgrpoError(
            f"'{path}' holds a {type(loaded).__name__}, not a tiktoken Encoding",
            hint=_PICKLE_HINT,
        )
    arguments = _encoding_arguments(loaded.pickled_state, str(path))
    try:
        return tiktoken.Encoding(**arguments)
    except (ValueError, AssertionError) as err:
        raise MlxgrpoError(f"'{path}' holds an invalid tiktoken Encoding: {err}") from err


# ---------------------------------------------------------------------------------------------
# The Hugging Face-like tokenizer surface


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (how HF names byte-level tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class NanochatTokenizer:
    """A nanochat tiktoken Encoding with the methods mlx-lm expects of a HF tokenizer.

    `encode` treats special-token text as the special token (as HF tokenizers do) and prepends
    `<|bos|>` when `add_special_tokens`; chat rendering encodes message contents as plain text,
    so a user typing `<|assistant_end|>` cannot inject a special token.
    """

    # Rendering is done in code (nanochat's format); a non-None value tells callers it exists.
    chat_template = "nanochat"

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in encoding.special_tokens_set]
        if missing:
            raise MlxgrpoError(
                f"tokenizer '{encoding.name}' lacks nanochat's special tokens {', '.join(missing)}",
                hint="use the tokenizer.pkl that nanochat trained for this model",
            )
        self.encoding = encoding
        self.special_ids = {t: encoding.encode_single_token(t) for t in encoding.special_tokens_set}
        self._special_values = frozenset(self.special_ids.values())
        self.bos_token, self.eos_token, self.pad_token = BOS, ASSISTANT_END, ASSISTANT_END
        self.unk_token = None
        self.bos_token_id = self.special_ids[BOS]
        self.eos_token_id = self.special_ids[ASSISTANT_END]
        self.pad_token_id = self.eos_token_id  # nanochat pads SFT batches with <|assistant_end|>
        self.unk_token_id = None
        self.name_or_path = encoding.name

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    @property
    def all_special_tokens(self) -> list[str]:
        return sorted(self.special_ids, key=self.special_ids.__getitem__)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.special_ids.values())

    @cached_property
    def _vocab(self) -> dict[str, int]:
        alphabet = _byte_level_alphabet()
        vocab = {}
        for token_id in range(self.encoding.n_vocab):
            if token_id in self._special_values:
                continue
            raw = self.encoding.decode_single_token_bytes(token_id)
            vocab["".join(alphabet[b] for b in raw)] = token_id
        vocab.update(self.special_ids)
        return vocab

    @cached_property
    def _id_to_token(self) -> dict[int, str]:
        return {i: t for t, i in self._vocab.items()}

    def get_vocab(self) -> dict[str, int]:
        """Token strings (byte-level spelled, as HF byte-level BPEs name them) to ids."""
        return dict(self._vocab)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        if isinstance(tokens, str):
            return self._vocab.get(tokens)
        return [self._vocab.get(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, int):
            return self._id_to_token.get(ids)
        return [self._id_to_token.get(int(i)) for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        ids = self.encoding.encode(text, allowed_special="all")
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with special-token text encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in _as_list(ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_values]
        return self.encoding.decode(ids)

    def batch_decode(self, sequences: Sequence[Any], **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        continue_final_message: bool = False,
        **_: Any,
    ) -> Any:
        """nanochat's chat format; extra keyword arguments (tools, enable_thinking) are ignored."""
        pieces = render_pieces(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        if not tokenize:
            return "".join(text for _, text in pieces)
        ids: list[int] = []
        for is_special, text in pieces:
            if is_special:
                ids.append(self._special_id(text))
            else:
                ids.extend(self.encoding.encode_ordinary(text))
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    def _special_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise ConfigError(
                f"this nanochat tokenizer has no {token} token",
                hint="tool-call parts need a tokenizer with nanochat's python/output tokens",
            )
        return self.special_ids[token]

    def save_pretrained(self, save_directory: str | os.PathLike[str], **_: Any) -> tuple[str]:
        """Write `tokenizer.pkl` (what `load_nanochat_tokenizer` reads back)."""
        dest = Path(save_directory)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / TOKENIZER_FILE
        with open(path, "wb") as fh:
            pickle.dump(self.encoding, fh)
        return (str(path),)


def _as_list(ids: Any) -> list[Any]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids)


Piece = tuple[bool, str]  # (is a special token, text)


def _merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages or messages[0]["role"] != "system":
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ConfigError(
            "a nanochat system message must be followed by a user message",
            hint="nanochat merges the system text into the first user turn",
        )
    merged = {"role": "user", "content": f"{messages[0]['content']}{SYSTEM_SEPARATOR}"}
    merged["content"] += str(messages[1]["content"])
    return [merged, *messages[2:]]


def _assistant_pieces(content: Any) -> list[Piece]:
    if isinstance(content, str):
        return [(False, content)]
    pieces: list[Piece] = []
    for part in content:  # nanochat's tool-use parts
        kind, text = part.get("type"), str(part.get("text", ""))
        if kind == "text":
            pieces.append((False, text))
        elif kind == "python":
            pieces += [(True, PYTHON_START), (False, text), (True, PYTHON_END)]
        elif kind == "python_output":
            pieces += [(True, OUTPUT_START), (False, text), (True, OUTPUT_END)]
        else:
            raise ConfigError(f"unknown assistant content part type {kind!r}")
    return pieces


def render_pieces(
    conversation: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
) -> list[Piece]:
    """nanochat's rendering: bos, user_start…user_end, assistant_start…assistant_end turns.

    A leading system message merges into the first user turn; turns must alternate user /
    assistant starting with the user; the generation prompt is `<|assistant_start|>`.
    """
    messages = _merge_system([dict(m) for m in conversation])
    if not messages:
        raise ConfigError("cannot render an empty conversation", hint="give a user message")
    pieces: list[Piece] = [(True, BOS)]
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise ConfigError(
                f"nanochat message {index} has role {message.get('role')!r}, expected {expected!r}",
                hint="nanochat conversations alternate user and assistant, starting with user",
            )
        if expected == "user":
            pieces += [(True, USER_START), (False, str(message["content"])), (True, USER_END)]
            continue
        pieces += [(True, ASSISTANT_START), *_assistant_pieces(message["content"])]
        is_last = index == len(messages) - 1
        if not (continue_final_message and is_last):
            pieces.append((True, ASSISTANT_END))
    if add_generation_prompt and messages[-1]["role"] == "user":
        pieces.append((True, ASSISTANT_START))
    return [(special, text) for special, text in pieces if special or text]


# ---------------------------------------------------------------------------------------------
# Streaming detokenization and the mlx-lm wrapper


@functools.cache
def _streaming_detokenizer_class() -> type:
    from mlx_lm.tokenizer_utils import StreamingDetokenizer

    class NanochatStreamingDetokenizer(StreamingDetokenizer):
        """Byte-exact streaming: token bytes feed an incremental UTF-8 decoder, so a character
        split across tokens appears whole once its last byte arrives (linear time)."""

        def __init__(self, tokenizer: NanochatTokenizer) -> None:
            self._token_bytes = tokenizer.token_bytes
            self.reset()

        def reset(self) -> None:
            # New objects, not cleared ones: TokenizerWrapper hands out shallow copies.
            self.offset = 0
            self.tokens = []
            self.text = ""
            self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def add_token(self, token: int) -> None:
            self.tokens.append(token)
            self.text += self._decoder.decode(self._token_bytes(token))

        def finalize(self) -> None:
            self.text += self._decoder.decode(b"", final=True)

    return NanochatStreamingDetokenizer


def wrap_nanochat_tokenizer(encoding: tiktoken.Encoding) -> Any:
    """mlx-lm's TokenizerWrapper around `encoding`; generation stops at assistant_end or bos."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = NanochatTokenizer(encoding)
    return TokenizerWrapper(
        tokenizer,
        detokenizer_class=_streaming_detokenizer_class(),
        eos_token_ids=[tokenizer.special_ids[ASSISTANT_END], tokenizer.special_ids[BOS]],
    )


def is_nanochat_model_dir(path: str | os.PathLike[str]) -> bool:
    """A converted nanochat model: tokenizer.pkl and no Hugging Face tokenizer files."""
    path = Path(path)
    hf_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return (path / TOKENIZER_FILE).is_file() and not any((path / f).exists() for f in hf_files)


def load_nanochat_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The wrapped tokenizer of a model directory (its tokenizer.pkl) or of a tokenizer.pkl."""
    path = Path(path)
    return wrap_nanochat_tokenizer(
        load_nanochat_encoding(path / TOKENIZER_FILE if path.is_dir() else path)
    )
