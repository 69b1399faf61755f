"""How an update's completions are split into micro-batches (gradient accumulation).

Two plans: a fixed count of contiguous, near-equal micro-batches
(``optim.gradient_accumulation_steps``), or packing by token count
(``optim.max_tokens_per_microbatch``): completions sorted by length, each micro-batch holding as
many as fit ``rows x longest sequence <= budget``. Sorting keeps the right-padding small, and the
budget bounds activation memory whatever the completion lengths turn out to be. Either way the
loss normalisers describe the whole update (:class:`~mlxgrpo.engine.loss.grpo.LossNorm`), so the
accumulated gradient does not depend on the split (bnpo excepted: it is defined per micro-batch).
"""

from __future__ import annotations

from collections.abc import Sequence


def split_evenly(indices: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` contiguous chunks of near-equal size (fewer when there are fewer indices)."""
    parts = max(1, min(parts, len(indices)))
    size, extra = divmod(len(indices), parts)
    chunks, begin = [], 0
    for k in range(parts):
        end = begin + size + (1 if k < extra else 0)
        chunks.append(list(indices[begin:end]))
        begin = end
    return chunks


def pack_by_tokens(
    indices: Sequence[int], lengths: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """Micro-batches of `indices`, shortest sequences first, each with rows x longest <= budget.

    ``lengths[i]`` is the full (prompt + completion) length of sequence ``i``. A sequence longer
    than the budget on its own still gets a micro-batch of one row (it cannot be split).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(indices, key=lambda i: (lengths[i], i))
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newcomer is the longest of its micro-batch.
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def plan_microbatches(
    indices: Sequence[int], lengths: Sequence[int], *, parts: int, max_tokens: int
) -> list[list[int]]:
    """The update's micro-batches: packed by tokens when ``max_tokens > 0``, else ``parts``."""
    if max_tokens > 0:
        return pack_by_tokens(indices, lengths, max_tokens)
    return split_evenly(indices, parts)
