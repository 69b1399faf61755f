"""The rollout's activations stand in for the training pass's forward (docs/architecture.md §5).

Until the first optimizer step of an update the policy is the one that sampled the rollout, so
each transformer block's output at a completion position is the value the rollout already
computed there, one decode step at a time. The rollout records those outputs
(:mod:`mlxgrpo.generation.recording`: :class:`~mlxgrpo.generation.recording.ActivationRecorder`,
:class:`~mlxgrpo.generation.recording.RecordedActivations`); in the training pass's suffix pass
(:mod:`~mlxgrpo.engine.memory.shared_prefix`) each checkpointed block then returns its recorded
output instead of computing it, and recomputes itself from its recorded input only when the
backward pass reaches it (:func:`mlxgrpo.engine.memory.recompute.recompute_in_backward`). The
forward pass of the blocks over the completions is skipped; the gradient is the same, as it is
evaluated at the same activations (up to float rounding between the decode and the training
layouts).

It applies when (:func:`replay_applies`) blocks are checkpointed, no dropout is active in them
(the rollout runs without dropout), the rollout forces in no tool results (those run as
multi-token steps), and the model has the shared-prefix layout. The cost is memory: rows x
decode steps x blocks x hidden floats, held from the rollout to the end of the training pass.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from mlxgrpo.models.blocks import checkpoint_blocker, has_dropout, transformer_blocks


def replay_applies(model: nn.Module, finetune: Any, tools: Any = None) -> bool:
    """Whether this run's training pass can replay the rollout's block outputs (``finetune``:
    the config's [finetune] section)."""
    return replay_blocker(model, finetune, tools) is None


def replay_blocker(model: nn.Module, finetune: Any, tools: Any = None) -> str | None:
    """Why this run's training pass cannot replay the rollout's block outputs, or None when
    it can (see :func:`replay_applies`)."""
    from mlxgrpo.engine.memory import shared_prefix
    from mlxgrpo.engine.memory.lm_head import split_lm_head

    if not finetune.reuse_rollout_activations:
        return "finetune.reuse_rollout_activations = false"
    if not finetune.grad_checkpoint:
        return "it needs finetune.grad_checkpoint"
    if checkpoint_blocker(model) is not None:
        return "it needs checkpointed blocks"
    if tools is not None:
        return "tool results enter the rollout"
    split = split_lm_head(model)
    if split is None or not shared_prefix.supports(split[0], model):
        return "it needs the shared-prompt pass"
    # The training pass runs in training mode, the rollout without dropout: any dropout in the
    # blocks (whatever the model's mode right now) makes the two forward passes differ.
    if any(has_dropout(block) for block in transformer_blocks(model)):
        return "dropout in the blocks"
    return None
