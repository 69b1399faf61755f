"""Rollout throughput of three designs on the same model, prompts, G and token budget.

(a) `single`: one mlx-lm `stream_generate` call per sample (the original's design: every
    sample re-prefills its prompt and decodes at batch size 1);
(b) `batch_generate`: mlx-lm `batch_generate` with each prompt repeated G times (the usual
    peer design), one completion batch of B*G rows;
(c) `mlxgrpo`: `mlxgrpo.generation.rollout.generate_groups` (each prompt prefilled once, B*G rows
    decoded together);
(d) `mlxgrpo_tools`: (c) with the tool loop on (`rollout.tools`) but no call made (its
    markers are ids no row can sample): the cost of reading every step back and of the
    per-row bookkeeping.

All three sample at temperature 1 and stop at the tokenizer's EOS. Tokens are completion
tokens, the EOS included (batch_generate drops it from its ids; it is added back), over the
wall time of the whole call, prefill included. The designs run interleaved, one of each per
round, so they see the same machine load.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.generate import batch_generate, stream_generate
from mlx_lm.sample_utils import make_sampler

from mlxgrpo.generation.rollout import SamplingConfig, generate_groups

DESIGNS = ("single", "batch_generate", "mlxgrpo", "mlxgrpo_tools")


def _single_calls(model, tokenizer, prompts, calls: int, max_new_tokens: int) -> tuple[int, float]:
    """`calls` independent generations, cycling through the prompts as G samples would."""
    sampler = make_sampler(temp=1.0)
    tokens, started = 0, time.perf_counter()
    for k in range(calls):
        responses = stream_generate(
            model, tokenizer, prompts[k % len(prompts)], max_tokens=max_new_tokens, sampler=sampler
        )
        last = deque(responses, maxlen=1)
        tokens += last[0].generation_tokens if last else 0
    return tokens, time.perf_counter() - started


def _batch_generate(model, tokenizer, prompts, group: int, max_new_tokens: int):
    repeated = [p for p in prompts for _ in range(group)]
    started = time.perf_counter()
    out = batch_generate(
        model,
        tokenizer,
        repeated,
        max_tokens=max_new_tokens,
        sampler=make_sampler(temp=1.0),
        completion_batch_size=len(repeated),
        prefill_batch_size=len(repeated),
        return_token_ids=True,
    )
    seconds = time.perf_counter() - started
    # Rows shorter than the budget stopped on an EOS that batch_generate left out of the ids.
    tokens = sum(len(ids) + (len(ids) < max_new_tokens) for ids in out.token_ids)
    return tokens, seconds


def _unused_tools() -> Any:
    """A tool runner whose call markers are ids no row can sample: the loop runs, no call."""
    from mlxgrpo.generation.tool_loop import ToolRunner
    from mlxgrpo.tools import Tool
    from mlxgrpo.tools.formats import ToolFormat

    fmt = ToolFormat("nanochat", -1, -2, {}, lambda text: [], ([], []))
    return ToolRunner(fmt, [Tool("none", str)], lambda ids: "")


def _mlxgrpo(model, tokenizer, prompts, group: int, max_new_tokens: int, seed: int, tools=None):
    started = time.perf_counter()
    rollout = generate_groups(
        model,
        prompts,
        num_generations=group,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=1.0),
        eos_token_ids=tokenizer.eos_token_ids,
        seed=seed,
        tools=tools,
    )
    return rollout.generated_tokens, time.perf_counter() - started


def measure_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    group: int,
    max_new_tokens: int,
    repeats: int,
    single_calls: int,
) -> dict[str, Any]:
    """Per design: tokens/s of every round and their median; plus the ratios of medians."""
    prompts = [list(p) for p in prompts]
    # Warm-up: first calls pay for allocation and thread start-up.
    _single_calls(model, tokenizer, prompts, 1, 4)
    _batch_generate(model, tokenizer, prompts, group, 4)
    _mlxgrpo(model, tokenizer, prompts, group, 4, seed=0)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in DESIGNS}
    for r in range(repeats):
        mx.random.seed(r)
        runs = {
            "single": _single_calls(model, tokenizer, prompts, single_calls, max_new_tokens),
            "batch_generate": _batch_generate(model, tokenizer, prompts, group, max_new_tokens),
            "mlxgrpo": _mlxgrpo(model, tokenizer, prompts, group, max_new_tokens, seed=r),
            "mlxgrpo_tools": _mlxgrpo(
                model, tokenizer, prompts, group, max_new_tokens, seed=r, tools=_unused_tools()
            ),
        }
        for name, (tokens, seconds) in runs.items():
            rounds[name].append(
                {"tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / seconds}
            )
    result: dict[str, Any] = {
        "settings": {
            "prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "num_generations": group,
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0,
            "single_calls_per_round": single_calls,
            "repeats": repeats,
        }
    }
    for name, runs in rounds.items():
        result[name] = {
            "tokens_per_sec": statistics.median(run["tokens_per_sec"] for run in runs),
            "rounds": runs,
        }
    ours = result["mlxgrpo"]["tokens_per_sec"]
    result["ratio_vs_single"] = ours / result["single"]["tokens_per_sec"]
    result["ratio_vs_batch_generate"] = ours / result["batch_generate"]["tokens_per_sec"]
    result["tool_loop_ratio"] = result["mlxgrpo_tools"]["tokens_per_sec"] / ours
    return result
