"""The data streams a run reads: its prompts (or demonstrations) in batches of
``optim.batch_size``, and the demonstrations of a mix run's SFT term. Each is a
:class:`~mlxgrpo.data.PromptStream`, so a checkpoint's cursor resumes it exactly."""

from __future__ import annotations

import math
from typing import Any

from mlxgrpo.errors import ConfigError


def prompt_stream(cfg: Any, train_examples: list) -> tuple[Any, int]:
    """The training prompts in batches of optim.batch_size, for as many epochs as the run's
    updates (and dynamic sampling's extra draws) may read; and the number of updates."""
    from mlxgrpo.data import PromptStream, num_updates

    per_epoch = num_updates(len(train_examples), cfg.optim.batch_size, 1)
    if per_epoch == 0:
        raise ConfigError(
            f"{len(train_examples)} training prompts are fewer than optim.batch_size = "
            f"{cfg.optim.batch_size}",
            hint="lower optim.batch_size or raise run.max_train_samples",
        )
    total = cfg.run.max_steps or per_epoch * cfg.run.num_epochs
    steps = cfg.optim.steps_per_generation
    if total < steps:
        raise ConfigError(
            f"the run has {total} updates, fewer than optim.steps_per_generation = {steps}",
            hint="lower optim.steps_per_generation, or train longer (run.max_steps, "
            "run.num_epochs)",
        )
    total -= total % steps  # whole generations (a config's max_steps is a multiple already)
    epochs = max(cfg.run.num_epochs, math.ceil(total / per_epoch))
    if cfg.algorithm.dynamic_sampling:  # extra draws read on into later epochs
        epochs *= 1 + cfg.algorithm.max_resample_batches
    stream = PromptStream(
        train_examples,
        cfg.optim.batch_size,
        seed=cfg.run.seed,
        num_epochs=epochs,
        shuffle=cfg.data.shuffle,
    )
    return stream, total


def demonstration_stream(cfg: Any, demos: list, updates: int) -> Any:
    """The mix term's demonstrations, mix.batch_size (or optim.batch_size) per update, for as
    many epochs as the run's updates read."""
    from mlxgrpo.data import PromptStream

    size = cfg.mix.batch_size or cfg.optim.batch_size
    if len(demos) < size:
        raise ConfigError(
            f"{len(demos)} demonstrations for the mix term are fewer than its batch of {size}",
            hint="lower mix.batch_size, or give mix.dataset more demonstrations",
        )
    epochs = math.ceil(updates / (len(demos) // size)) + 1
    # Its own seed: the prompts' order does not depend on whether a run mixes.
    return PromptStream(demos, size, seed=cfg.run.seed + 1, num_epochs=epochs)
