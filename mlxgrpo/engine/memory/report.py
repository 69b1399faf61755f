"""Which memory techniques a run's training pass uses, and why any of them is off.

`mlxgrpo train` prints this once at the start and writes it into the first update record of
`metrics.jsonl`, so a model the techniques cannot serve is never silently slower or hungrier
than the figures in docs/architecture.md §5. Each answer comes from the same predicates the
techniques themselves use when they decide, so the report cannot drift from what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlxgrpo.engine.memory import shared_prefix
from mlxgrpo.engine.memory.frozen_head import target_rows
from mlxgrpo.engine.memory.lm_head import split_lm_head
from mlxgrpo.engine.memory.packing import packing_blocker
from mlxgrpo.engine.memory.replay import replay_blocker
from mlxgrpo.models.blocks import checkpoint_blocker
from mlxgrpo.models.heads import conventional_head, head_linear


@dataclass(frozen=True)
class MemoryPath:
    """One technique: whether this run's training pass uses it, and if not, why."""

    name: str
    on: bool
    why: str = ""

    def describe(self) -> str:
        return "on" if self.on else f"off: {self.why}"


def memory_paths(
    model: nn.Module, finetune: Any, algorithm: Any, tools: Any = None, sft: Any = None
) -> list[MemoryPath]:
    """The techniques of docs/architecture.md §5 for this model and these config sections
    (``[finetune]``, ``[algorithm]``, and ``[sft]`` for packing; ``tools``: the rollout's tool
    runner, if any)."""
    split = split_lm_head(model)
    unsplit = (
        "the output is not the LM head applied to the trunk (a logit softcap or scale, or a "
        "trunk that cannot run alone)"
        if conventional_head(model) is not None
        else "no LM head where mlx-lm's conventions put it"
    )
    if getattr(algorithm, "type", "grpo") == "sft":
        paths = [
            _tiled_head(split, unsplit, algorithm),
            MemoryPath("shared prompt", False, "supervised fine-tuning: no group shares a prompt"),
            MemoryPath("replay", False, "supervised fine-tuning: no rollout to replay"),
            _checkpointing(model, finetune),
        ]
        if sft is not None and sft.packing:
            why = packing_blocker(model, split[0] if split is not None else None)
            paths.append(MemoryPath("packing", why is None, why or ""))
        return paths
    return [
        _tiled_head(split, unsplit, algorithm),
        _shared_prompt(model, split, unsplit),
        _replay(model, finetune, tools),
        _checkpointing(model, finetune),
    ]


def _tiled_head(split: Any, unsplit: str, algorithm: Any) -> MemoryPath:
    name = "tiled head"
    if split is None:
        return MemoryPath(name, False, unsplit)
    head = head_linear(split[1])
    owner = getattr(head, "__self__", head)
    if isinstance(owner, nn.Module) and owner.trainable_parameters():
        return MemoryPath(name, False, "the LM head trains (chunked head with recomputation)")
    if algorithm.entropy_coeff != 0:
        return MemoryPath(name, False, "the entropy bonus is differentiated (chunked head)")
    if target_rows(head) is None:
        return MemoryPath(name, False, f"a {type(owner).__name__} head (chunked head)")
    return MemoryPath(name, True)


def _shared_prompt(model: nn.Module, split: Any, unsplit: str) -> MemoryPath:
    name = "shared prompt"
    if split is None:
        return MemoryPath(name, False, unsplit)
    why = shared_prefix.blocker(split[0], model)
    return MemoryPath(name, why is None, why or "")


def _replay(model: nn.Module, finetune: Any, tools: Any) -> MemoryPath:
    why = replay_blocker(model, finetune, tools)
    return MemoryPath("replay", why is None, why or "")


def _checkpointing(model: nn.Module, finetune: Any) -> MemoryPath:
    name = "checkpointing"
    if not finetune.grad_checkpoint:
        return MemoryPath(name, False, "finetune.grad_checkpoint = false")
    why = checkpoint_blocker(model)
    return MemoryPath(name, why is None, why or "")
