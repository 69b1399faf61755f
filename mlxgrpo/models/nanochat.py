"""nanochat support in one import: checkpoint conversion, safe tokenizer loading, the wrapper.

The code lives in `nanochat_convert` (checkpoint → MLX model) and `nanochat_tokenizer`
(tokenizer.pkl → a tokenizer mlx-lm can drive); `torch_checkpoint` reads `.pt` files.
"""

from mlxgrpo.models.nanochat_convert import convert_nanochat, find_checkpoints, find_tokenizer
from mlxgrpo.models.nanochat_tokenizer import (
    NanochatTokenizer,
    is_nanochat_model_dir,
    load_nanochat_encoding,
    load_nanochat_tokenizer,
    wrap_nanochat_tokenizer,
)

__all__ = [
    "NanochatTokenizer",
    "convert_nanochat",
    "find_checkpoints",
    "find_tokenizer",
    "is_nanochat_model_dir",
    "load_nanochat_encoding",
    "load_nanochat_tokenizer",
    "wrap_nanochat_tokenizer",
]
