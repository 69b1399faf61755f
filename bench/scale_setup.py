"""What the scale section measures on, built once into the bench cache: random-weight models
with the exact configurations of Qwen2.5-0.5B and -1.5B, Gemma-3-270M, Gemma-3-1B and
Qwen3-0.6B (float32, the `words` tokenizer of bench_model at each model's vocabulary size), a
JSONL file of equal-length prompts made of vocabulary words, and the fixed settings every
shape runs with.

The cache is `$MLXGRPO_BENCH_CACHE`, else ~/.cache/mlxgrpo-bench. Entries are keyed by what
determines their files and renamed into place only when complete (a 1.5B model is 6.2 GB).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import bench_model
from bench_model import ModelShape

CACHE_ENV = "MLXGRPO_BENCH_CACHE"
CACHE_VERSION = 1  # bump when what is written into the cache changes
REWARD_FILE = Path(__file__).resolve().parent / "scale_reward.py"
REWARD_FUNCTION = "distinct_words"
GEMMA3_VOCAB = 262144
QWEN_VOCAB = 151936


def _qwen25(name: str, hidden: int, layers: int, heads: int, inter: int, vocab: int) -> ModelShape:
    # Qwen2.5: 2 KV heads, q/k/v biases, tied embeddings, rope_theta 1e6, rms_norm_eps 1e-6.
    return ModelShape(name, hidden, layers, heads, 2, inter, vocab, 1e6, 32768, "words")


def _qwen3(
    name: str, hidden: int, layers: int, heads: int, kv: int, inter: int, **kw: Any
) -> ModelShape:
    # Qwen3 (dense, small): head_dim 128 whatever the width, q/k norms, no biases, tied
    # embeddings, rope_theta 1e6, no RoPE scaling, 40,960 positions, rms_norm_eps 1e-6.
    settings = {"vocab": QWEN_VOCAB, "rope_theta": 1e6, "max_positions": 40960, "head_dim": 128}
    settings |= kw
    return ModelShape(
        name, hidden, layers, heads, kv, inter, tokenizer="words", model_type="qwen3", **settings
    )


def _gemma3(name: str, hidden: int, layers: int, inter: int, **kw: Any) -> ModelShape:
    # Gemma 3 text (270M, 1B): 4 query heads and 1 KV head of width 256, queries scaled by
    # 256**-0.5, 5 local layers (window 512, RoPE base 1e4) per global one (base 1e6, no
    # scaling at 32,768 positions), tied embeddings, rms_norm_eps 1e-6.
    window, pattern = kw.pop("window", 512), kw.pop("pattern", 6)
    settings = {"vocab": GEMMA3_VOCAB, "head_dim": 256} | kw
    extra = (
        ("query_pre_attn_scalar", settings["head_dim"]),
        ("rope_local_base_freq", 10000.0),
        ("sliding_window", window),
        ("sliding_window_pattern", pattern),
    )
    return ModelShape(
        name,
        hidden,
        layers,
        4,
        1,
        inter,
        rope_theta=1e6,
        max_positions=32768,
        tokenizer="words",
        model_type="gemma3_text",
        extra=extra,
        **settings,
    )


SHAPES = {  # the first is the one compared with the peer, the last gets the prod micro-batch
    "0.5b": _qwen25("qwen2.5-0.5b-random", 896, 24, 14, 4864, QWEN_VOCAB),
    "gemma3-270m": _gemma3("gemma3-270m-random", 640, 18, 2048),
    "qwen3-0.6b": _qwen3("qwen3-0.6b-random", 1024, 28, 16, 8, 3072),
    "gemma3-1b": _gemma3("gemma3-1b-random", 1152, 26, 6912),
    "1.5b": _qwen25("qwen2.5-1.5b-random", 1536, 28, 12, 8960, QWEN_VOCAB),
}
QUICK_SHAPES = {  # one tiny shape of each family; the loop, first- and last-shape figures run
    "tiny-a": _qwen25("scale-tiny-a", 64, 2, 4, 128, 4096),
    # A window shorter than the quick prompts, so the local layer's mask does cut.
    "tiny-gemma3": _gemma3(
        "scale-tiny-gemma3", 64, 2, 128, vocab=4096, head_dim=32, window=16, pattern=2
    ),
    "tiny-qwen3": _qwen3("scale-tiny-qwen3", 64, 2, 4, 2, 128, vocab=4096, head_dim=32),
    "tiny-b": _qwen25("scale-tiny-b", 96, 3, 4, 192, 4096),
}


def select_shapes(names: str | None, quick: bool) -> dict[str, ModelShape]:
    """The shapes a run measures: all of them, or the comma list `names` of their keys (in the
    order given)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    if not names:
        return dict(shapes)
    keys = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [key for key in keys if key not in shapes]
    if unknown or not keys:
        raise ValueError(f"unknown shapes {unknown}; choose from {', '.join(shapes)}")
    return {key: shapes[key] for key in keys}


@dataclass(frozen=True)
class Settings:
    generations: int = 8
    prompts_per_update: int = 2
    max_new_tokens: int = 128
    micro_batches: int = 2
    kl_coeff: float = 0.1
    temperature: float = 1.0
    lora_rank: int = 8
    lora_scale: float = 20.0
    system_words: int = 16  # with the chat template and an 80-word question: ~130 tokens,
    question_words: int = 80  # a GSM8K question with a system prompt
    answer_words: int = 3
    data_rows: int = 64
    prod_rows: int = 16
    prod_prompt_tokens: int = 150
    prod_completion_tokens: int = 256


FULL = Settings()
QUICK = Settings(
    max_new_tokens=16,
    system_words=3,
    question_words=12,
    data_rows=16,
    prod_rows=4,
    prod_prompt_tokens=20,
    prod_completion_tokens=16,
)


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mlxgrpo-bench"


def cache_key(*parts: Any) -> str:
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cached_dir(final: Path, build: Callable[[Path], Any]) -> Path:
    """`final`, built by `build(tmp)` in a sibling temp dir and renamed into place when complete,
    so a killed run never leaves a half-written model where a later run would use it."""
    marker = final / ".complete"
    if marker.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        if final.exists():
            shutil.rmtree(final)  # an incomplete copy from an older layout
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def shape_key(shape: ModelShape) -> str:
    """The cache key of a shape's model: its fields, less those still at their defaults among
    the ones added for non-Qwen2 families, so the Qwen2.5 models keep their cache entries."""
    added = ("model_type", "head_dim", "extra")
    parts = asdict(shape)
    for field in fields(shape):
        if field.name in added and parts[field.name] == field.default:
            del parts[field.name]
    return cache_key(parts)


def model_dir(shape: ModelShape) -> Path:
    root = cache_root() / "models" / f"{shape.name}-{shape_key(shape)}"
    return cached_dir(root, lambda tmp: bench_model.build_model_dir(shape, tmp))


def system_prompt(vocab: int, s: Settings) -> str:
    words = bench_model.vocab_words(vocab)
    return "".join(random.Random(1).choices(words, k=s.system_words)).strip()


def data_dir(vocab: int, s: Settings) -> Path:
    """train.jsonl (prompt, answer, system) of equal-length prompts made of vocabulary words.

    Equal lengths make every update the same work whichever prompts a trainer draws; the peer
    reads `system`, mlxgrpo gets the same text as data.system_prompt. No valid.jsonl: the peer
    would otherwise validate during training.
    """
    text = (vocab, s.system_words, s.question_words, s.answer_words, s.data_rows)

    def build(tmp: Path) -> None:
        words = bench_model.vocab_words(vocab)
        rng = random.Random(0)
        rows = [
            {
                "prompt": "".join(rng.choices(words, k=s.question_words)).strip(),
                "answer": "".join(rng.choices(words, k=s.answer_words)).strip(),
                "system": system_prompt(vocab, s),
            }
            for _ in range(s.data_rows)
        ]
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (tmp / "train.jsonl").write_text(lines, encoding="utf-8")

    return cached_dir(cache_root() / "data" / f"prompts-{cache_key(text)}", build)


def parameter_count(shape: ModelShape) -> int:
    """Parameters in the shape's checkpoint (tied embeddings once), from mlx-lm's lazy model."""
    return sum(math.prod(dims) for dims in bench_model.parameter_shapes(shape.config()).values())


def overrides(model: Path, data: Path, vocab: int, s: Settings) -> list[str]:
    return [
        f"model.path={model}",
        f"data.dataset={data / 'train.jsonl'}",
        "data.prompt_field=prompt",
        "data.answer_field=answer",
        f"data.system_prompt={system_prompt(vocab, s)}",
        f"rewards.functions={REWARD_FILE}:{REWARD_FUNCTION}",
        "finetune.type=lora",
        "finetune.lora_layers=-1",
        f"finetune.lora_rank={s.lora_rank}",
        f"finetune.lora_scale={s.lora_scale}",
        f"rollout.num_generations={s.generations}",
        f"rollout.max_new_tokens={s.max_new_tokens}",
        f"rollout.temperature={s.temperature}",
        f"optim.batch_size={s.prompts_per_update}",
        f"optim.gradient_accumulation_steps={s.micro_batches}",
        f"algorithm.kl_coeff={s.kl_coeff}",
    ]


def prompt_tokens(model: Path, data: Path) -> int:
    from transformers import AutoTokenizer

    row = json.loads((data / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    messages = [
        {"role": "system", "content": row["system"]},
        {"role": "user", "content": row["prompt"]},
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))
