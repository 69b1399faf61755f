"""Flat keys of the original MLX-GRPO script (and Trinity-RFT's ``algorithm_type``), mapped
onto the sectioned schema.

Old configs are flat TOML files (or a `[mlx_grpo]` table). Each old key maps to one dotted key,
sometimes with a value conversion. Some old keys were near-duplicates of each other (eval_steps and
eval_every_updates, max_completion_length and max_new_tokens): the alias is applied first, so
when a file sets both, the more specific key wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _bits_from_flag(value: Any) -> Any:
    # quantize_for_rollouts = true meant a 4-bit rollout copy in the original.
    if isinstance(value, bool):
        return 4 if value else 0
    return value


@dataclass(frozen=True)
class LegacyKey:
    target: str
    convert: Callable[[Any], Any] | None = None
    alias: bool = False  # a weaker synonym: applied before the key it duplicates


LEGACY_KEYS: dict[str, LegacyKey] = {
    "model_name": LegacyKey("model.path"),
    "output_dir": LegacyKey("run.output_dir"),
    "run_name": LegacyKey("run.run_name"),
    "learning_rate": LegacyKey("optim.learning_rate"),
    "batch_size": LegacyKey("optim.batch_size"),  # see prompts_per_update
    "gradient_accumulation_steps": LegacyKey("optim.gradient_accumulation_steps"),
    "num_epochs": LegacyKey("run.num_epochs"),
    "max_train_samples": LegacyKey("run.max_train_samples"),
    "warmup_ratio": LegacyKey("optim.warmup_ratio"),
    "max_grad_norm": LegacyKey("optim.max_grad_norm"),
    "logging_steps": LegacyKey("logging.logging_steps"),
    "num_generations": LegacyKey("rollout.num_generations"),
    "max_prompt_length": LegacyKey("rollout.max_prompt_length"),
    "max_completion_length": LegacyKey("rollout.max_new_tokens", alias=True),
    "max_new_tokens": LegacyKey("rollout.max_new_tokens"),
    "temperature": LegacyKey("rollout.temperature"),
    "clip_eps": LegacyKey("algorithm.clip_eps"),
    "kl_coeff": LegacyKey("algorithm.kl_coeff"),
    "adam_beta1": LegacyKey("optim.adam_beta1"),
    "adam_beta2": LegacyKey("optim.adam_beta2"),
    "weight_decay": LegacyKey("optim.weight_decay"),
    "lr_scheduler_type": LegacyKey("optim.lr_scheduler_type"),
    "save_steps": LegacyKey("checkpoint.save_steps"),
    "eval_steps": LegacyKey("eval.every_updates", alias=True),
    "eval_samples": LegacyKey("eval.samples"),
    "seed": LegacyKey("run.seed"),
    "use_compile": LegacyKey("run.compile"),
    "quantize_for_rollouts": LegacyKey("rollout.quantize_bits", convert=_bits_from_flag),
    "eval_every_updates": LegacyKey("eval.every_updates"),
    "eval_subset_size": LegacyKey("eval.samples", alias=True),
    # Trinity-RFT's name, as its stages write it.
    "algorithm_type": LegacyKey("algorithm.type"),
    "eval_max_new_tokens": LegacyKey("eval.max_new_tokens"),
    "log_jsonl": LegacyKey("logging.jsonl"),
}

LEGACY_TABLE = "mlx_grpo"


def ordered_legacy_items(flat: dict[str, Any]) -> list[tuple[str, Any]]:
    """Legacy items with aliases first, so the specific key overrides its alias."""
    return sorted(flat.items(), key=lambda kv: 0 if LEGACY_KEYS[kv[0]].alias else 1)


# The original counted batch_size prompts per micro-batch and gradient_accumulation_steps
# micro-batches per update; here optim.batch_size counts prompts per update. One layer's pair of
# old keys therefore becomes batch_size x accumulation, with the old defaults (1 and 4) filling
# in whichever of the two that layer leaves out.
OLD_BATCH_SIZE, OLD_ACCUMULATION = 1, 4
BATCH_KEYS = ("batch_size", "gradient_accumulation_steps")


def prompts_per_update(flat: dict[str, Any]) -> Any:
    """New optim.batch_size for a layer that sets either old batch key, else None."""
    if "batch_size" not in flat and "gradient_accumulation_steps" not in flat:
        return None
    size = flat.get("batch_size", OLD_BATCH_SIZE)
    accumulation = flat.get("gradient_accumulation_steps", OLD_ACCUMULATION)
    try:
        return int(size) * int(accumulation)
    except (TypeError, ValueError):
        return size  # let type checking report the bad value


def translate(name: str, value: Any) -> tuple[str, Any]:
    """The dotted key and value a legacy flat key stands for."""
    spec = LEGACY_KEYS[name]
    return spec.target, spec.convert(value) if spec.convert else value
