"""Cross-field rules that single-field types and bounds cannot express.

Each rule returns sentences that name the keys involved and the fix. Nothing here loads a model
or a data set, so `mlxgrpo config validate` runs anywhere in a fraction of a second.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from mlxgrpo.config.resolved import ResolvedConfig
from mlxgrpo.config.schema import Config
from mlxgrpo.errors import ConfigError


def check_config(resolved: ResolvedConfig) -> list[str]:
    cfg, problems = resolved.config, []
    algo, rollout, optim, rewards = cfg.algorithm, cfg.rollout, cfg.optim, cfg.rewards
    problems += _check_algorithm_options(resolved)
    if algo.clip_eps_high is not None and algo.clip_eps_high < algo.clip_eps:
        problems.append(
            f"algorithm.clip_eps_high ({algo.clip_eps_high}) must be >= algorithm.clip_eps "
            f"({algo.clip_eps}); raise it or leave it unset"
        )
    if rewards.weights and len(rewards.weights) != len(rewards.functions):
        problems.append(
            f"rewards.weights has {len(rewards.weights)} values but rewards.functions names "
            f"{len(rewards.functions)}; give one weight per function (or none)"
        )
    completions = optim.batch_size * rollout.num_generations
    if not optim.max_tokens_per_microbatch and completions % optim.gradient_accumulation_steps:
        problems.append(
            f"optim.batch_size x rollout.num_generations = {completions} completions per update "
            f"do not split into optim.gradient_accumulation_steps = "
            f"{optim.gradient_accumulation_steps} equal micro-batches; "
            f"pick a divisor of {completions}"
        )
    problems += _check_generation_steps(cfg)
    problems += _check_training_kind(resolved)
    if cfg.eval.pass_k > 1 and cfg.eval.temperature <= 0:
        problems.append(
            "eval.pass_k > 1 needs eval.temperature > 0 (k greedy samples are identical)"
        )
    problems += _check_model_path(cfg.model.path, "model.path")
    if cfg.model.adapter_path:
        problems += _check_existing_dir(cfg.model.adapter_path, "model.adapter_path")
    problems += _check_rewards(resolved)
    problems += _check_dataset(resolved)
    return problems


# Keys that only GRPO (and mix) runs read, besides the rest of [algorithm], [rollout], [rewards].
GRPO_ONLY_KEYS = (
    "optim.steps_per_generation",
    "eval.max_new_tokens",
    "eval.temperature",
    "eval.pass_k",
    "data.answer_field",
)


def _readers(key: str) -> tuple[str, ...] | None:
    """The kinds of training (algorithm.type) that read ``key``; None: every kind."""
    section = key.split(".")[0]
    if section == "sft":
        return ("sft", "mix")
    if section == "mix":
        return ("mix",)
    grpo_only = section in ("rollout", "rewards") or key in GRPO_ONLY_KEYS
    if grpo_only or (section == "algorithm" and key != "algorithm.type"):
        return ("grpo", "mix")
    return None


def _check_training_kind(resolved: ResolvedConfig) -> list[str]:
    """Settings that this run's kind of training does not read (accepted, then ignored): one
    problem naming the first of them. In a stage, only what the stage itself sets counts; the
    top level of a staged config holds settings for the other stages too. An SFT or mix run's
    demonstrations must exist."""
    cfg = resolved.config
    kind = cfg.algorithm.type
    changed = resolved.changed_keys()
    if resolved.stage is not None:
        changed = [key for key in changed if resolved.sources[key].layer == "stage"]
    if kind != "grpo":
        key = "mix.dataset" if kind == "mix" and cfg.mix.dataset else "data.dataset"
        problems = _check_demonstrations(key, cfg.get(key), kind)
        if problems:
            return problems
    unused = [
        (key, readers) for key in changed if (readers := _readers(key)) and kind not in readers
    ]
    if not unused:
        return []
    key, readers = unused[0]
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    kinds = " or ".join(readers)
    return [
        f"{key}{more} is read by algorithm.type = {kinds} only, and this run has "
        f"algorithm.type = {kind}; leave it out, or set algorithm.type"
    ]


def _check_demonstrations(key: str, dataset: str, kind: str) -> list[str]:
    """A synthetic task that writes no demonstrations cannot feed supervised fine-tuning (a
    data file's columns are checked when it loads)."""
    from mlxgrpo.data.synthetic import is_synthetic, parse_synthetic_spec

    if not is_synthetic(dataset):
        return []
    try:
        task, options = parse_synthetic_spec(dataset)
        probe = task.generate(random.Random(0), 1, options)[0]
    except ConfigError:
        return []  # the dataset check names the bad spec
    if task.demonstrate is None or task.demonstrate(probe, options) is None:
        return [
            f"{key} = {dataset} writes no demonstrations for algorithm.type = {kind}; use "
            "synthetic:repeat, synthetic:copy, synthetic:arithmetic without a tool, or a file "
            "of demonstrations"
        ]
    return []


def _check_generation_steps(cfg: Config) -> list[str]:
    """With several optimizer steps per rollout, checkpoints and the run's end fall between
    rollouts (a resume regenerates a rollout from the weights it was sampled with)."""
    steps, problems = cfg.optim.steps_per_generation, []
    if steps == 1:
        return problems
    for key, value in (
        ("checkpoint.save_steps", cfg.checkpoint.save_steps),
        ("run.max_steps", cfg.run.max_steps),
    ):
        if value and value % steps:
            problems.append(
                f"{key} = {value} is not a multiple of optim.steps_per_generation = {steps}; "
                f"checkpoints and the run's end fall between rollouts, so pick a multiple of "
                f"{steps}"
            )
    return problems


def _check_algorithm_options(resolved: ResolvedConfig) -> list[str]:
    """[algorithm] settings whose combination would do nothing, or contradict itself."""
    algo, problems = resolved.config.algorithm, []
    if algo.advantage_estimator != "grpo" and algo.scale_rewards != "group":
        problems.append(
            f"algorithm.scale_rewards = {algo.scale_rewards} applies to advantage_estimator = "
            f"grpo only; {algo.advantage_estimator} scales its advantages its own way"
        )
    if algo.reward_aggregation == "normalize_then_sum" and algo.advantage_estimator != "grpo":
        problems.append(
            "algorithm.reward_aggregation = normalize_then_sum gives advantages itself; use it "
            f"with advantage_estimator = grpo, not {algo.advantage_estimator}"
        )
    if algo.reward_aggregation == "normalize_then_sum" and algo.overlong_penalty > 0:
        problems.append(
            "algorithm.overlong_penalty changes the summed reward, which normalize_then_sum "
            "does not use; set one of them"
        )
    problems += _set_while_off(
        resolved,
        ("entropy_coeff_step", "entropy_coeff_min", "entropy_coeff_max"),
        off=algo.entropy_target is None,
        what="steers the adaptive entropy weight",
        switch="algorithm.entropy_target",
    )
    if algo.entropy_target is not None and not (
        algo.entropy_coeff_min <= algo.entropy_coeff <= algo.entropy_coeff_max
    ):
        problems.append(
            f"algorithm.entropy_coeff ({algo.entropy_coeff}) starts the adaptive weight and must "
            f"lie within [entropy_coeff_min, entropy_coeff_max] = [{algo.entropy_coeff_min}, "
            f"{algo.entropy_coeff_max}]"
        )
    if algo.delta is not None:
        high = algo.clip_eps if algo.clip_eps_high is None else algo.clip_eps_high
        if algo.loss_type in ("cispo", "sapo"):
            problems.append(
                f"algorithm.delta caps the clipped losses' ratio; loss_type = {algo.loss_type} "
                "has no such term (use grpo, bnpo, dr_grpo, dapo or gspo, or unset delta)"
            )
        elif algo.delta <= 1 + high:
            problems.append(
                f"algorithm.delta ({algo.delta}) must exceed 1 + clip_eps_high ({1 + high:g}), "
                "or the cap would cut inside the clip range"
            )
    problems += _set_while_off(
        resolved,
        ("rollout_correction_cap", "rollout_correction_min", "rollout_correction_level"),
        off=algo.rollout_correction == "none",
        what="shapes the rollout correction",
        switch="algorithm.rollout_correction (tis, mis or reject)",
    )
    if algo.rollout_correction_min >= algo.rollout_correction_cap:
        problems.append(
            f"algorithm.rollout_correction_min ({algo.rollout_correction_min}) must be below "
            f"algorithm.rollout_correction_cap ({algo.rollout_correction_cap}): the weights "
            "kept lie between the two"
        )
    return problems


def _set_while_off(
    resolved: ResolvedConfig, keys: tuple[str, ...], *, off: bool, what: str, switch: str
) -> list[str]:
    """One problem when any of the [algorithm] ``keys`` was set while the option they belong
    to is ``off`` (a key accepted and then ignored)."""
    changed = [k for k in keys if f"algorithm.{k}" in resolved.changed_keys()]
    if not off or not changed:
        return []
    return [f"algorithm.{changed[0]} {what}, which is off; set {switch} too, or leave it out"]


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_local(path: str) -> bool:
    """True for paths that cannot be hub ids: absolute, ./, ../, ~, or more than one slash."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or os.sep != "/"
        and os.sep in path
    )


def _check_model_path(path: str, key: str) -> list[str]:
    if path.startswith("builtin:"):
        from mlxgrpo.models.builtin import list_builtin_models

        names = list_builtin_models()
        name = path.split(":", 1)[1]
        if name not in names:
            return [f"{key} = '{path}': no such built-in model; available: {', '.join(names)}"]
        return []
    if looks_local(path) and not Path(os.path.expanduser(path)).exists():
        return [f"{key} = '{path}': directory not found; fix the path or run `mlxgrpo convert`"]
    return []


def _check_existing_dir(path: str, key: str) -> list[str]:
    if not Path(os.path.expanduser(path)).is_dir():
        return [f"{key} = '{path}': directory not found"]
    return []


def _check_rewards(resolved: ResolvedConfig) -> list[str]:
    from mlxgrpo.rewards import resolve_reward

    problems = []
    for spec in resolved.config.rewards.functions:
        try:
            resolve_reward(spec, base_dir=resolved.base_dir())
        except ConfigError as exc:
            problems.append(f"rewards.functions: {exc}")
    return problems


def _check_dataset(resolved: ResolvedConfig) -> list[str]:
    dataset = resolved.config.data.dataset
    if dataset.startswith("synthetic:"):
        from mlxgrpo.data import parse_synthetic_spec

        try:
            parse_synthetic_spec(dataset)
        except ConfigError as exc:
            return [f"data.dataset = '{dataset}': {exc}"]
    elif (looks_local(dataset) or dataset.endswith(DATA_SUFFIXES)) and not Path(
        os.path.expanduser(dataset)
    ).exists():
        return [f"data.dataset = '{dataset}': file or directory not found"]
    return []
