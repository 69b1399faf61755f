"""Training data: loading (synthetic tasks, local files, Hub), GSM8K parsing, prompts, batching.

Importing this package does not import ``datasets`` or mlx; loading files or Hub data does.
"""

from mlxgrpo.data.demonstration import (
    Demonstration,
    EncodedDemonstration,
    encode_demonstration,
)
from mlxgrpo.data.example import GSM8K_SYSTEM_PROMPT, Example, Message, build_messages
from mlxgrpo.data.loading import (
    GSM8K_CONFIG,
    GSM8K_HUB_ID,
    default_rewards,
    default_system_prompt,
    load_demonstrations,
    load_examples,
    resolve_local_path,
)
from mlxgrpo.data.stream import PromptStream, StreamCursor, batches, num_updates
from mlxgrpo.data.synthetic import (
    SYNTHETIC_TASKS,
    SyntheticTask,
    call_prefill,
    generate_synthetic,
    is_synthetic,
    parse_synthetic_spec,
)
from mlxgrpo.rewards.gsm8k import parse_gsm8k_answer

__all__ = [
    "GSM8K_CONFIG",
    "GSM8K_HUB_ID",
    "GSM8K_SYSTEM_PROMPT",
    "SYNTHETIC_TASKS",
    "Demonstration",
    "EncodedDemonstration",
    "Example",
    "Message",
    "PromptStream",
    "StreamCursor",
    "SyntheticTask",
    "batches",
    "call_prefill",
    "build_messages",
    "default_rewards",
    "default_system_prompt",
    "encode_demonstration",
    "generate_synthetic",
    "is_synthetic",
    "load_demonstrations",
    "load_examples",
    "num_updates",
    "parse_gsm8k_answer",
    "parse_synthetic_spec",
    "resolve_local_path",
]
