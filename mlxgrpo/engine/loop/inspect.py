"""What a training run of a config would use, without training: `mlxgrpo doctor --model`.

Loads the model and prepares its trainable weights exactly as `mlxgrpo train` does, then asks
the memory-path report (:mod:`~mlxgrpo.engine.memory.report`) the question the run header
answers.
"""

from __future__ import annotations

from mlxgrpo.config import ResolvedConfig
from mlxgrpo.engine.memory.report import memory_paths
from mlxgrpo.models.finetune import load_policy
from mlxgrpo.task import build_tool_runner, check_tools


def planned_memory_paths(resolved: ResolvedConfig) -> dict[str, str]:
    """``{technique: "on" | "off: why"}`` for a run of ``resolved``'s model and settings."""
    cfg = resolved.config
    check_tools(resolved, task=False)
    model, tokenizer, _ = load_policy(cfg.model, cfg.finetune)
    tools = build_tool_runner(resolved, tokenizer)
    return {
        path.name: path.describe()
        for path in memory_paths(model, cfg.finetune, cfg.algorithm, tools)
    }
