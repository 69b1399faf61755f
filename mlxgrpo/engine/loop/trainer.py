"""The GRPO training loop: set up once, then update, log, evaluate and checkpoint.

`train()` is the library entry point behind `mlxgrpo train`. It reports only through callbacks
(plain dicts) and returns a summary dict; the CLI renders both.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlxgrpo import parsing, safe_io
from mlxgrpo.config import ResolvedConfig
from mlxgrpo.config.values import path_component_problem
from mlxgrpo.engine.io.callbacks import (
    Callback,
    CallbackList,
    CompletionsLogger,
    JsonlLogger,
)
from mlxgrpo.engine.io.run_lock import hold_run
from mlxgrpo.engine.loop.resume import check_resume_target, resume_session
from mlxgrpo.errors import ConfigError, MlxgrpoError, TrainingDivergedError
from mlxgrpo.safe_io import io_errors, make_temp_dir, remove_stale_temporaries


@dataclass
class Session:
    """What the loop works with, built once by `_setup`."""

    resolved: ResolvedConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    stream: Any
    task: Any  # mlxgrpo.task.Task: prompts, rewards, tool runner and codec
    optimizer: Any
    ctx: Any
    total_updates: int
    trainable: int
    start_update: int = 0
    dist: Any = None  # mlxgrpo.distributed.Dist
    entropy_control: Any = None  # engine.loop.entropy_control.EntropyControl, with a target
    demonstrations: Any = None  # algorithm.type = mix: the PromptStream of its SFT term's data


def run_directory(output_dir: str, run_name: str, resume: str) -> Path:
    """Where this run writes; a fresh run never writes into another run's files."""
    # Config validation rejects these too; this guards callers that build a Config directly.
    problem = path_component_problem(run_name)
    if problem:
        raise ConfigError(f"run.run_name = {run_name!r}: {problem}")
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir).expanduser() / name
    with io_errors(base, "read"):
        if resume != "never" or not base.exists() or not any(base.iterdir()):
            return base
    for n in range(2, 10_000):
        candidate = base.with_name(f"{name}-{n}")
        if not candidate.exists():
            return candidate
    raise MlxgrpoError(f"too many runs named {name} in {output_dir}", hint="pick another run_name")


def update_seed(seed: int, update: int) -> int:
    """Randomness of update k depends only on (run seed, k): resumed runs replay exactly."""
    return (seed * 1_000_003 + update * 7_919 + 17) % (2**31 - 1)


def train(
    resolved: ResolvedConfig,
    callbacks: Sequence[Callback] = (),
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run GRPO as configured; returns a summary (run_dir, updates, first/last reward, ...)."""
    from mlxgrpo import distributed

    cfg = resolved.config
    dist = distributed.init()  # size 1 unless started by mlx.launch
    if resolved.stages:
        return _train_stages(resolved, dist, callbacks, should_stop)
    distributed.reject_unsupported(cfg, dist)
    check_resume_target(cfg.run.resume)
    # Rank 0 names the run directory (a timestamp, a free -N suffix) and alone writes in it.
    run_dir = Path(dist.broadcast_text(str(_run_dir_of(cfg)) if dist.is_main else ""))
    with ExitStack() as held:
        if dist.is_main:  # the lock comes first: a second process must not touch the run
            with io_errors(run_dir, "create the run directory", "pick a writable run.output_dir"):
                run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(hold_run(run_dir))
        return _train_in(resolved, run_dir, dist, callbacks, should_stop)


def _train_stages(
    resolved: ResolvedConfig,
    dist: Any,
    callbacks: Sequence[Callback],
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Run a staged config's stages in order (:mod:`~mlxgrpo.engine.loop.stages`): each in
    its own directory of the run's, from the weights the one before it ended with. Resumed,
    stages that finished are skipped and the first that did not continues."""
    from mlxgrpo.engine.loop.stages import finished_stage, stage_config

    if dist.active:
        raise ConfigError(
            "staged configs are not supported with several ranks yet", hint="train in one process"
        )
    cfg = resolved.config
    run_dir, previous = _run_dir_of(cfg), None
    cb, count, summaries = CallbackList(list(callbacks)), len(resolved.stages), []
    for number, (name, stage) in enumerate(resolved.stages, start=1):
        done = finished_stage(run_dir, name) if cfg.run.resume == "auto" else None
        if done is not None:
            cb.on_message(f"stage {number}/{count} {name}: finished earlier ({done})")
            previous = done
            continue
        cb.on_message(f"stage {number}/{count}: {name}")
        summary = train(
            stage_config(stage, run_dir, previous, cfg.run.resume), callbacks, should_stop
        )
        summaries.append({"stage": name, **summary})
        if summary["interrupted"]:
            break
        previous = Path(summary["final_dir"])
    last = summaries[-1] if summaries else {"updates": 0, "interrupted": False}
    return {**last, "run_dir": str(run_dir), "stages": summaries}


def _train_in(
    resolved: ResolvedConfig,
    run_dir: Path,
    dist: Any,
    callbacks: Sequence[Callback],
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """:func:`train` in its run directory, which this process holds."""
    loggers: list[Callback] = []
    if dist.is_main:
        _prepare_run_dir(resolved, run_dir, loggers)
    cb = CallbackList([*loggers, *callbacks])
    if dist.is_main:
        # A kill while a checkpoint (or final/, or a log) was being written leaves its temporary.
        for stale in [
            *remove_stale_temporaries(run_dir / "checkpoints"),
            *remove_stale_temporaries(run_dir),
        ]:
            cb.on_message(f"removed {stale}, left half-written by a run that was killed")
    session = _setup(resolved, run_dir, cb, dist)
    cb.on_start(_start_info(session))
    if resolved.config.rollout.quantize_bits:
        cb.on_message(
            "rollout.quantize_bits is ignored: rollouts sample from the training weights, "
            "so the ratio to the rollout policy stays exact"
        )
    return _loop(session, cb, should_stop)


def _run_dir_of(cfg: Any) -> Path:
    return run_directory(cfg.run.output_dir, cfg.run.run_name, cfg.run.resume)


def _prepare_run_dir(resolved: ResolvedConfig, run_dir: Path, loggers: list[Callback]) -> None:
    cfg = resolved.config
    with io_errors(run_dir, "create the run directory", "pick a writable run.output_dir (-o)"):
        run_dir.mkdir(parents=True, exist_ok=True)
    _write_resolved_config(resolved, run_dir)
    if cfg.logging.jsonl:
        loggers.append(JsonlLogger(run_dir / "metrics.jsonl"))
    if cfg.logging.log_completions:
        loggers.append(CompletionsLogger(run_dir / "completions.jsonl"))


def _write_resolved_config(resolved: ResolvedConfig, run_dir: Path) -> None:
    import tomli_w

    text = tomli_w.dumps(resolved.config.to_dict(drop_none=True))
    safe_io.write_text(run_dir / "config.resolved.toml", text)


def _setup(resolved: ResolvedConfig, run_dir: Path, cb: Callback, dist: Any = None) -> Session:
    """Build what the loop works with: the task (its prompts and rewards checked before the
    model loads, so bad data fails fast), the model with its trainable weights, the reference
    model of full fine-tuning with KL, the prompt stream, the optimizer and the update context;
    then resume from a checkpoint where run.resume says so."""
    from mlxgrpo.backend import seed_everything, set_memory_limits
    from mlxgrpo.distributed import Dist
    from mlxgrpo.engine.loop.context import UpdateContext
    from mlxgrpo.engine.loop.entropy_control import EntropyControl
    from mlxgrpo.engine.loop.streams import demonstration_stream, prompt_stream
    from mlxgrpo.models.finetune import load_policy, model_source
    from mlxgrpo.models.loading import load_model
    from mlxgrpo.task import Task

    cfg = resolved.config
    seed_everything(cfg.run.seed)
    set_memory_limits()
    wants_eval = cfg.eval.every_updates > 0 or cfg.eval.before_training
    task = Task.load(resolved, evaluate=wants_eval)
    model, tokenizer, trainable = load_policy(cfg.model, cfg.finetune, seed=cfg.run.seed)
    task = task.with_tokenizer(tokenizer)
    grpo = cfg.algorithm.type == "grpo"
    if grpo:
        _check_rollout_budget(cfg, model)
    ref_model = None
    if grpo and cfg.algorithm.kl_coeff > 0 and cfg.finetune.type == "full":
        # The frozen reference copy of full fine-tuning stays in the compute dtype.
        ref_model, _ = load_model(cfg.model.path, dtype=cfg.model.dtype, **model_source(cfg.model))
        ref_model.freeze()
    stream, total = prompt_stream(cfg, task.train_examples)
    optimizer = _optimizer(cfg.optim, model)
    ctx = UpdateContext.from_config(
        model,
        cfg,
        reward_set=task.reward_set,
        optimizer=optimizer,
        codec=task.codec,
        ref_model=ref_model,
        dist=dist or Dist(),
        tools=task.tools,
    )
    session = Session(
        resolved,
        run_dir,
        model,
        tokenizer,
        stream,
        task,
        optimizer,
        ctx,
        total,
        trainable,
        dist=ctx.dist,
    )
    session.entropy_control = EntropyControl.from_config(cfg.algorithm)
    if cfg.algorithm.type == "mix":
        session.demonstrations = demonstration_stream(cfg, task.demonstrations, total)
    resume_session(session, cb)
    return session


def _check_rollout_budget(cfg: Any, model: Any) -> None:
    """The rollout's per-token allocations fit the machine (before any is made)."""
    from mlxgrpo.backend import memory_budget_bytes
    from mlxgrpo.generation.budget import check_decode_budget

    r = cfg.rollout
    rows = cfg.optim.batch_size * cfg.optim.steps_per_generation * r.num_generations
    check_decode_budget(
        model,
        rows=min(rows, r.max_rows) if r.max_rows else rows,
        prompt_tokens=r.max_prompt_length,
        new_tokens=r.max_new_tokens,
        available=memory_budget_bytes(),
        keys=f"rollout.max_new_tokens = {r.max_new_tokens}",
    )


def _optimizer(optim_cfg: Any, model: Any) -> Any:
    """Adam or AdamW as [optim] says, its state allocated for the model's trainable weights."""
    import mlx.optimizers as optim

    opt_cls = optim.AdamW if optim_cfg.optimizer == "adamw" else optim.Adam
    kwargs: dict[str, Any] = {
        "learning_rate": optim_cfg.learning_rate,
        "betas": [optim_cfg.adam_beta1, optim_cfg.adam_beta2],
    }
    if optim_cfg.optimizer == "adamw":
        kwargs["weight_decay"] = optim_cfg.weight_decay
    optimizer = opt_cls(**kwargs)
    # State allocated now rather than at the first step, so the header can report its dtype.
    optimizer.init(model.trainable_parameters())
    return optimizer


def _adapted_blocks(s: Session) -> str | None:
    """'all 24 blocks' / 'last 8 of 24 blocks' for new LoRA/DoRA adapters, else None."""
    from mlxgrpo.models.finetune import num_blocks

    finetune = s.resolved.config.finetune
    if finetune.type == "full" or s.resolved.config.model.adapter_path:
        return None
    blocks = num_blocks(s.model)
    if finetune.lora_layers < 0 or finetune.lora_layers == blocks:
        return f"all {blocks} blocks"
    return f"last {finetune.lora_layers} of {blocks} blocks"


def _start_info(s: Session) -> dict[str, Any]:
    from mlxgrpo.backend import blas_info, device_summary
    from mlxgrpo.engine.loop.precision import describe, precision_report
    from mlxgrpo.engine.memory.report import memory_paths

    cfg = s.resolved.config
    return {
        "run_dir": str(s.run_dir),
        "model": cfg.model.path,
        "finetune": cfg.finetune.type,
        "adapted_blocks": _adapted_blocks(s),
        "trainable_parameters": s.trainable,
        "dataset": cfg.data.dataset,
        "rewards": list(s.task.reward_set.names) if s.task.reward_set is not None else [],
        "algorithm_type": cfg.algorithm.type,
        "mix_sft_weight": cfg.mix.sft_weight,
        "loss_type": cfg.algorithm.loss_type,
        "num_generations": cfg.rollout.num_generations,
        "batch_size": cfg.optim.batch_size,
        "total_updates": s.total_updates,
        "steps_per_generation": cfg.optim.steps_per_generation,
        "start_update": s.start_update,
        "logging_steps": cfg.logging.logging_steps,
        "device": device_summary(),
        "blas": blas_info().name,
        "precision": describe(
            precision_report(s.model, s.optimizer, cfg.finetune.type, s.ctx.ref_model)
        ),
        "memory_paths": {
            path.name: path.describe()
            for path in memory_paths(s.model, cfg.finetune, cfg.algorithm, s.ctx.tools, cfg.sft)
        },
    }


def _loop(s: Session, cb: Callback, should_stop: Callable[[], bool]) -> dict[str, Any]:
    from mlxgrpo.distributed import record_weights
    from mlxgrpo.engine.loop.guards import RunGuards
    from mlxgrpo.engine.loop.health import HealthWatch
    from mlxgrpo.engine.loop.schedule import learning_rate_at

    cfg = s.resolved.config
    started, first, last, interrupted = time.perf_counter(), None, None, False
    guards = RunGuards(cfg.optim.max_nonfinite_updates, cfg.rewards.max_consecutive_failures)
    health = HealthWatch()
    control = s.entropy_control
    if cfg.eval.before_training and s.start_update == 0 and s.task.eval_examples:
        cb.on_eval(0, _evaluate(s))
    update, steps, told = s.start_update, cfg.optim.steps_per_generation, False
    source, headline = _UpdateSource(s), "loss" if cfg.algorithm.type == "sft" else "reward_mean"
    while update < s.total_updates:
        lr = learning_rate_at(
            update,
            peak=cfg.optim.learning_rate,
            total_updates=s.total_updates,
            warmup_ratio=cfg.optim.warmup_ratio,
            kind=cfg.optim.lr_scheduler_type,
        )
        result = source.next(update, update_seed(cfg.run.seed, update), lr)
        if result is None:
            break
        update += 1
        record_weights(s.dist, s.model, update)
        if control is not None:  # this update's weight is logged, the next one's set
            result.metrics["entropy_coeff"] = control.coeff
            weight = control.after(float(result.metrics.get("entropy", control.target)))
            s.ctx.algorithm = replace(s.ctx.algorithm, entropy_coeff=weight)
        guards.report(update, result, cb)
        _report_health(health, update, result.metrics, s.model, cb)
        cb.on_update(update, result.metrics)
        cb.on_completions(update, result.completions)
        guards.enforce(update, result)
        first = first if first is not None else result.metrics[headline]
        last = result.metrics[headline]
        if cfg.eval.every_updates and update % cfg.eval.every_updates == 0 and s.task.eval_examples:
            cb.on_eval(update, _evaluate(s))
        # One rank's Ctrl-C stops all at this update (at a generation's end: told till then).
        stopping = told or s.dist.any(should_stop())
        if update % steps:  # inside a generation: a checkpoint or a stop waits for its end
            if stopping and not told:
                cb.on_message(
                    f"stopping after this rollout's last {steps - update % steps} updates"
                )
                told = True
            continue
        if stopping or (cfg.checkpoint.save_steps and update % cfg.checkpoint.save_steps == 0):
            if s.dist.is_main:
                cb.on_checkpoint(update, _checkpoint(s, update))
        if stopping:
            interrupted = True
            break
    final = _save_final(s) if not interrupted and s.dist.is_main else None
    summary = {
        "run_dir": str(s.run_dir),
        "updates": update,
        "total_updates": s.total_updates,
        # The run's headline figure: the mean reward (GRPO) or the loss (SFT).
        "headline": headline,
        f"first_{headline}": first,
        f"last_{headline}": last,
        "seconds": time.perf_counter() - started,
        "interrupted": interrupted,
        "final_dir": str(final) if final else None,
    }
    cb.on_end(summary)
    return summary


class _UpdateSource:
    """The loop's updates: optimizer steps of rollouts, ``optim.steps_per_generation`` per
    rollout (GRPO), or batches of demonstrations (SFT)."""

    def __init__(self, s: Session) -> None:
        from mlxgrpo.engine.loop.sft_update import packing_capacity

        cfg = s.resolved.config
        self.s, self.generation, self.steps = s, None, cfg.optim.steps_per_generation
        sft = cfg.algorithm.type != "grpo"  # sft, or mix with its SFT term
        self.capacity = packing_capacity(s.model, cfg.sft) if sft else None

    def next(self, update: int, seed: int, lr: float) -> Any:
        """Update ``update``'s result (engine.loop.update.UpdateResult), or None when the
        data ran out."""
        from mlxgrpo.engine.loop.sft_update import sft_update
        from mlxgrpo.engine.loop.update import sample_generation, train_step

        s, cfg = self.s, self.s.resolved.config
        if cfg.algorithm.type == "sft":
            batch = s.stream.next_batch()
            return None if batch is None else sft_update(s.ctx, batch, seed, lr, self.capacity)
        if update % self.steps == 0:  # a new rollout, for this and the next steps - 1 updates
            prompts = _generation_prompts(s.stream, self.steps)
            if prompts is None:
                return None
            more = s.stream.next_batch if cfg.algorithm.dynamic_sampling else None
            self.generation = sample_generation(s.ctx, prompts, seed, more)
        extra = None
        if s.demonstrations is not None:  # mix: this update's batch of demonstrations
            from mlxgrpo.engine.loop.sft_update import mix_term

            demos = s.demonstrations.next_batch()
            extra = mix_term(s.ctx, demos, cfg.mix.sft_weight, self.capacity)
        return train_step(s.ctx, self.generation, update % self.steps, seed, lr, extra)


def _generation_prompts(stream: Any, steps: int) -> list | None:
    """The prompts of one rollout: ``steps`` batches of the stream, or None when it ran out."""
    prompts = []
    for _ in range(steps):
        batch = stream.next_batch()
        if batch is None:
            return None
        prompts.extend(batch)
    return prompts


def _report_health(watch: Any, update: int, metrics: dict, model: Any, cb: Callback) -> None:
    """Learning-health warnings new at this update: shown once, and named in its record."""
    found = watch.check(update, metrics, model)
    if found:
        metrics["health"] = sorted(found)
        for message in found.values():
            cb.on_message(f"learning health: {message}")


def _evaluate(s: Session) -> dict[str, Any]:
    from mlxgrpo.evaluation import evaluate_task

    cfg, task = s.resolved.config, s.task
    if cfg.algorithm.type == "sft":  # held-out demonstrations: loss and perplexity
        from mlxgrpo.engine.loop.sft_update import validation_loss

        chunk = cfg.finetune.lm_head_chunk or None
        return validation_loss(
            s.model, task.eval_examples, task.codec.pad_id, cfg.optim.batch_size, chunk
        )
    # Several ranks share the eval prompts; every rank gets the global figures.
    result = evaluate_task(
        s.model, task.eval_examples, task.reward_set, task.codec, cfg, dist=s.dist, tools=task.tools
    )
    return result.metrics


def _adapter_cfg(s: Session) -> dict[str, Any]:
    """The adapters' config: the loaded adapters' own when training continues from them."""
    from mlxgrpo.engine.io.checkpoint import ADAPTER_CONFIG, adapter_config
    from mlxgrpo.models.finetune import num_blocks

    cfg = s.resolved.config
    if cfg.model.adapter_path:
        path = Path(cfg.model.adapter_path).expanduser() / ADAPTER_CONFIG
        return parsing.json_file(path)
    return adapter_config(cfg.finetune, num_blocks(s.model), s.model)


def _checkpoint(s: Session, update: int) -> Path:
    from mlxgrpo.engine.io.checkpoint import save_checkpoint
    from mlxgrpo.engine.io.run_identity import run_identity

    cfg = s.resolved.config
    state = {
        "data": s.stream.state(),
        "seed": cfg.run.seed,
        "total_updates": s.total_updates,
        "rng": "derived per update from (seed, update)",
        "identity": run_identity(cfg),
    }
    if s.entropy_control is not None:
        state["entropy_coeff"] = s.entropy_control.coeff
    if s.demonstrations is not None:
        state["demonstrations"] = s.demonstrations.state()
    return save_checkpoint(
        s.run_dir,
        update,
        s.model,
        s.optimizer,
        state,
        finetune_type=cfg.finetune.type,
        adapter_cfg=_adapter_cfg(s),
        keep_last=cfg.checkpoint.keep_last,
    )


def _save_final(s: Session) -> Path:
    """final/: adapters in mlx-lm's format, or a complete model directory for full training."""
    from mlxgrpo.engine.io.checkpoint import write_weights
    from mlxgrpo.engine.loop.training_pass import all_finite

    cfg = s.resolved.config
    final = s.run_dir / "final"
    # Last line of defence: a final/ of NaN weights would look like a finished run.
    if not all_finite(s.model.trainable_parameters()).item():
        raise TrainingDivergedError(
            "refusing to write final/: the trained weights contain NaN or inf",
            hint="lower optim.learning_rate; resume from an earlier checkpoint if there is one",
        )
    tmp = make_temp_dir(final)  # pid in its name: removed at the next start if we are killed
    try:
        with io_errors(final):
            if cfg.finetune.type == "full":
                from mlxgrpo.models.loading import save_full_model

                save_full_model(tmp, s.model, s.tokenizer, cfg.model.path)
            else:
                write_weights(tmp, s.model, cfg.finetune.type, _adapter_cfg(s))
            text = json.dumps({"base_model": cfg.model.path}, indent=2) + "\n"
            safe_io.write_text(tmp / "training.json", text)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
