"""Accuracy, pass@k and reward on held-out prompts; shared by `mlxgrpo eval` and training.

A completion counts as correct when the task's accuracy reward (`correctness` for GSM8K-style
tasks, `exact_match` where a task defines it) is positive. pass@1 is greedy; pass@k draws k
samples at the eval temperature and counts a prompt as solved when any sample is correct.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlxgrpo.data import Example
from mlxgrpo.rewards import RewardSet

ACCURACY_REWARDS = ("correctness", "exact_match", "final_number")
FORMAT_REWARDS = ("strict_format", "soft_format")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def accuracy(scored: Any) -> float | None:
    """Share of completions the task's accuracy reward marks correct; None without one."""
    name = _first_present(scored.names, ACCURACY_REWARDS)
    return None if name is None else _share_positive(scored.values[name])


def _first_present(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((n for n in wanted if n in names), None)


def _share_positive(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(v > 0 for v in present) / len(present) if present else 0.0


def evaluate(
    model: Any,
    examples: Sequence[Example],
    reward_set: RewardSet,
    *,
    encode_prompt: Callable[[Example], list[int]],
    decode: Callable[[list[int]], str],
    eos_ids: set[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    pass_k: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    dist: Any = None,
    tools: Any = None,
) -> EvalResult:
    """Greedy accuracy (and pass@k when k > 1) with per-sample records.

    `on_batch(n)` is told after each generation batch how many prompts it finished (progress).
    With `dist` (an :class:`~mlxgrpo.distributed.Dist` of several ranks) each rank
    generates a contiguous share of the prompts, and every rank returns the figures and
    records of all of them. A completion's samples depend on its prompt's index in
    `examples`, not on the share or batch it was generated in. `tools` (a ToolRunner) runs
    the completions' tool calls, as training does.
    """
    from mlxgrpo.distributed import Dist

    dist = dist or Dist()
    started = time.perf_counter()
    local, offset = dist.split(examples)
    generate = functools.partial(
        _generate,
        model,
        local,
        encode_prompt,
        decode,
        eos_ids,
        max_new_tokens,
        batch_size=batch_size,
        offset=offset,
        on_batch=on_batch,
        tools=tools,
    )
    greedy = generate(temperature=0.0, k=1, seed=seed)
    scored = _score(reward_set, local, greedy, 1)
    acc_name = _first_present(scored.names, ACCURACY_REWARDS)
    fmt_name = _first_present(scored.names, FORMAT_REWARDS)
    tokens = sum(len(ids) for ids, _, _ in greedy)
    solved: list[bool] = []
    if pass_k > 1 and acc_name:
        sampled = generate(temperature=temperature, k=pass_k, seed=seed + 1)
        s = _score(reward_set, local, sampled, pass_k)
        hits = [v is not None and v > 0 for v in s.values[acc_name]]
        solved = [any(hits[i * pass_k : (i + 1) * pass_k]) for i in range(len(local))]
        tokens += sum(len(ids) for ids, _, _ in sampled)
    mine = {
        "totals": list(scored.totals),
        "lengths": [len(ids) for ids, _, _ in greedy],
        "truncated": [bool(t) for _, _, t in greedy],
        "accuracy": scored.values[acc_name] if acc_name else [],
        "format": scored.values[fmt_name] if fmt_name else [],
        "solved": solved,
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "records": [
            _record(ex, text, scored, i, acc_name)
            for i, (ex, (_, text, _)) in enumerate(zip(local, greedy, strict=True))
        ],
    }
    # One rank alone: its own figures. Several: every rank's, joined in prompt order.
    return _joined(mine, dist.gather_json(mine), acc_name, fmt_name, pass_k)


def _joined(
    mine: dict[str, Any],
    parts: list[dict[str, Any]],
    acc_name: str | None,
    fmt_name: str | None,
    pass_k: int,
) -> EvalResult:
    """The evaluation's figures and records from every rank's ``parts`` (``mine`` among them)."""
    every = {key: [v for p in parts for v in p[key]] for key in mine if isinstance(mine[key], list)}
    seconds = max(p["seconds"] for p in parts)
    total_tokens = sum(p["tokens"] for p in parts)
    count = len(every["totals"])
    metrics: dict[str, Any] = {
        "samples": count,
        "reward_mean": sum(every["totals"]) / max(1, count),
        "completion_length_mean": sum(every["lengths"]) / max(1, count),
        "truncated_share": sum(every["truncated"]) / max(1, count),
    }
    if acc_name:
        metrics["accuracy"] = _share_positive(every["accuracy"])
    if fmt_name:
        metrics["format_rate"] = _share_positive(every["format"])
    if pass_k > 1 and acc_name:
        metrics[f"pass@{pass_k}"] = sum(every["solved"]) / max(1, count)
    metrics["seconds"] = seconds
    metrics["tokens_per_sec"] = total_tokens / seconds if seconds > 0 else 0.0
    return EvalResult(metrics, every["records"])


def completion_record(
    example: Example, completion: str, scored: Any, i: int, reward: float, **fields: Any
) -> dict[str, Any]:
    """The record of completion ``i`` of a scored batch, as training's completions.jsonl and
    `mlxgrpo eval --output` write it: its prompt and answer, the completion, each reward
    function's value, the total ``reward``, then ``fields`` in the order given."""
    return {
        "prompt": example.prompt,
        "answer": example.answer,
        "completion": completion,
        "rewards": {n: scored.values[n][i] for n in scored.names},
        "reward": reward,
        **fields,
    }


def _record(ex: Example, text: str, scored: Any, i: int, acc_name: str | None) -> dict[str, Any]:
    correct = None if acc_name is None else bool((scored.values[acc_name][i] or 0) > 0)
    return completion_record(ex, text, scored, i, scored.totals[i], correct=correct)


def _generate(
    model,
    examples,
    encode_prompt,
    decode,
    eos_ids,
    max_new_tokens,
    temperature,
    k,
    batch_size,
    seed,
    offset=0,
    on_batch=None,
    tools=None,
) -> list[tuple[list[int], str, bool]]:
    """(ids, text without EOS, truncated) for k samples of every example, in order; the
    first example is the `offset`-th of the whole evaluation (its sampling keys say so)."""
    from mlxgrpo.backend import memory_budget_bytes
    from mlxgrpo.generation.budget import check_decode_budget
    from mlxgrpo.generation.rollout import SamplingConfig, generate_groups
    from mlxgrpo.models.tokenizer import strip_eos

    sampling = SamplingConfig(temperature=temperature)
    out: list[tuple[list[int], str, bool]] = []
    per_call = max(1, batch_size // k)
    for begin in range(0, len(examples), per_call):
        chunk = examples[begin : begin + per_call]
        prompts = [encode_prompt(ex) for ex in chunk]
        if begin == 0:  # before the first allocation: does a batch of this size fit?
            check_decode_budget(
                model,
                rows=len(chunk) * k,
                prompt_tokens=max(len(ids) for ids in prompts),
                new_tokens=max_new_tokens,
                available=memory_budget_bytes(),
                keys=f"eval.max_new_tokens = {max_new_tokens}",
            )
        rollout = generate_groups(
            model,
            prompts,
            num_generations=k,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_ids=eos_ids,
            seed=seed,
            prompt_offset=offset + begin,
            tools=tools,
        )
        for ids, truncated in zip(rollout.completion_ids, rollout.truncated, strict=True):
            out.append((ids, decode(strip_eos(ids, eos_ids)), truncated))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def _score(reward_set: RewardSet, examples, generated, k: int):
    per = [ex for ex in examples for _ in range(k)]
    return score_completions(reward_set, per, [text for _, text, _ in generated])


def score_completions(reward_set: RewardSet, per_completion: Sequence[Example], texts: list[str]):
    """Score completions; `per_completion[i]` is the example completion i answers."""
    prompts = [
        ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1]["content"]
        for ex in per_completion
    ]
    columns: dict[str, list[Any]] = {}
    for key in {key for ex in per_completion for key in ex.extra}:
        columns[key] = [ex.extra.get(key) for ex in per_completion]
    return reward_set.score(prompts, texts, [ex.answer for ex in per_completion], **columns)


def evaluate_config(
    resolved: Any,
    *,
    adapter_dir: str | None = None,
    compare_base: bool = False,
    limit: int | None = None,
    batch_size: int = 16,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[str, EvalResult]]:
    """Evaluate the config's model (with `adapter_dir`) on its eval split, as training does
    (a supervised fine-tuning config's too: its task's prompts, scored by its rewards).

    With `compare_base`, the base model is evaluated too, by switching the adapters off in the
    same loaded model, and comes first. Returns (label, result) pairs. `on_start(total)` gets
    the number of prompt generations ahead, `on_batch(n)` each batch's share of them.
    Started by `mlx.launch`, the ranks share the prompts and all return the global figures.
    """
    from mlxgrpo import distributed
    from mlxgrpo.errors import ConfigError
    from mlxgrpo.models.finetune import adapters_disabled
    from mlxgrpo.models.loading import check_adapter_dir, load_model, resolve_load_target
    from mlxgrpo.task import Task

    cfg = resolved.config
    if compare_base and adapter_dir is None:
        raise ConfigError(
            "--compare-base needs adapters to compare against", hint="add --adapter DIR"
        )
    # Cheap checks first, so a wrong path fails before a dataset download.
    if adapter_dir is not None:
        check_adapter_dir(adapter_dir)
    resolve_load_target(cfg.model.path)
    if cfg.algorithm.type != "grpo":  # an SFT run's model, scored on its task's prompts
        from dataclasses import replace

        resolved = replace(
            resolved, config=replace(cfg, algorithm=replace(cfg.algorithm, type="grpo"))
        )
    task = Task.load(resolved, train=False, eval_limit=limit)
    model, tokenizer = load_model(
        cfg.model.path,
        adapter_path=adapter_dir,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    task = task.with_tokenizer(tokenizer)
    dist = distributed.init()
    if on_start is not None:  # this rank's share of the generations
        share = len(dist.split(task.eval_examples)[0])
        on_start(share * (1 + (cfg.eval.pass_k > 1)) * (1 + compare_base))

    def run() -> EvalResult:
        return evaluate_task(
            model,
            task.eval_examples,
            task.reward_set,
            task.codec,
            cfg,
            batch_size,
            on_batch,
            dist,
            task.tools,
        )

    results = []
    if compare_base:
        with adapters_disabled(model):
            results.append(("base", run()))
    results.append(("adapters" if adapter_dir else "model", run()))
    return results


def evaluate_task(
    model: Any,
    examples: Sequence[Example],
    reward_set: RewardSet,
    codec: Any,
    cfg: Any,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    dist: Any = None,
    tools: Any = None,
) -> EvalResult:
    """`evaluate` with the settings of a config's [eval] section and a task's text codec."""
    return evaluate(
        model,
        examples,
        reward_set,
        encode_prompt=codec.encode,
        decode=codec.decode,
        eos_ids=codec.eos_ids,
        max_new_tokens=cfg.eval.max_new_tokens,
        temperature=cfg.eval.temperature,
        pass_k=cfg.eval.pass_k,
        batch_size=batch_size,
        seed=cfg.run.seed,
        on_batch=on_batch,
        dist=dist,
        tools=tools,
    )
