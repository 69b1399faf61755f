"""What a model directory must hold before, and what a loaded model must satisfy after, mlx-lm
reads it: one line per problem instead of an error from deep inside mlx-lm or transformers.

- :func:`config_problem`: config.json's size and shape keys have the types mlx-lm computes
  with (``"hidden_size": "64"`` failed as ``int / str`` in the attention's scale).
- :func:`tokenizer_problem`: a local directory holds a tokenizer (without one, the first
  prompt encoded to nothing and the user read "the prompt is empty").
- :func:`weights_problem`: what mlx-lm's strict load says when the weights are another
  architecture's (``model_type`` llama over Qwen2 weights), as one line.
- :func:`loaded_problem`: the tokenizer's ids fit the embedding, and the chat template
  compiles.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# config.json keys that mlx-lm's model arguments use as counts or sizes, and as float factors.
INTEGER_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "n_embd", "n_layer", "n_head", "n_positions", "d_model", "n_layers", "n_heads",
    "sliding_window", "num_experts", "num_experts_per_tok",
)  # fmt: skip
FLOAT_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta")

# Files any of which is a tokenizer mlx-lm (through transformers or its own loaders) can read.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.pkl", "tiktoken.model",
    "vocab.txt", "spiece.model",
)  # fmt: skip


def config_problem(config: dict[str, Any]) -> str | None:
    """The first key of ``config`` whose value has the wrong type, worded; None when fine."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return f"model_type should be a name, got {model_type!r}"
    for key in INTEGER_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{key} should be an integer, got {value!r}"
        if isinstance(value, int) and value < 0:
            return f"{key} should not be negative, got {value}"
    for key in FLOAT_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{key} should be a number, got {value!r}"
    return None


def tokenizer_problem(path: Path) -> str | None:
    """Why the model directory ``path`` has no tokenizer mlx-lm could load (None when it has)."""
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    return f"it has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...)"


_PARAMETERS = re.compile(r"(Received|Missing) (\d+) parameters?")


def weights_problem(error: Exception, model_type: str) -> str | None:
    """mlx-lm's strict-load error about parameters, as one line; None for other errors."""
    text = str(error)
    found = _PARAMETERS.search(text)
    if found is None:
        return None
    names = [n.strip(" ,.\n") for n in text[found.end() :].split(":", 1)[-1].split(",")]
    first = next((n for n in names if n), "?")
    side = "not in" if found.group(1) == "Received" else "missing from the weights of"
    return (
        f"its weights do not match its config.json (model_type {model_type!r}): "
        f"{found.group(2)} parameters {side} that architecture (first: {first})"
    )


def loaded_problem(model: Any, tokenizer: Any) -> str | None:
    """Why a loaded model and tokenizer cannot work together; None when they can."""
    rows = _embedding_rows(model)
    used = _special_ids(tokenizer)
    if rows is not None and used and max(used.values()) >= rows:
        name, token = max(used.items(), key=lambda item: item[1])
        return (
            f"its tokenizer's {name} id {token} is past the embedding's {rows} rows: the "
            "tokenizer belongs to another model"
        )
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2's TemplateError family, or what a template raises
            where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
            first = (str(exc).splitlines() or [""])[0]
            return f"its chat template does not work: {type(exc).__name__}: {first}{where}"
    return None


def _embedding_rows(model: Any) -> int | None:
    from mlxgrpo.models.heads import input_embedding

    embedding = input_embedding(model)
    weight = getattr(embedding, "weight", None)
    return None if weight is None else int(weight.shape[0])


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """The ids the program feeds the model itself: EOS (each), BOS and padding."""
    found = {}
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            found[name.removesuffix("_token_id").upper()] = value
    for value in getattr(tokenizer, "eos_token_ids", None) or ():
        if isinstance(value, int) and not isinstance(value, bool):
            found["EOS"] = max(value, found.get("EOS", value))
    return found
