"""How an update's completions are split into micro-batches (gradient accumulation).

Two plans: a fixed count of contiguous, near-equal micro-batches
(``optim.gradient_accumulation_steps``), or packing by token count
(``optim.max_tokens_per_microbatch``): completions sorted by length, each micro-batch holding as
many as fit ``rows x longest sequence <= budget``. Sorting keeps the right-padding small, and the
budget bounds activation memory whatever the completion lengths turn out to be. Either way the
loss normalisers describe the whole update (:class:`~mlxgrpo.engine.loss.grpo.LossNorm`), so the
accumulated gradient does not depend on the split (bnpo excepted: it is defined per micro-batch).

One level up, a rollout that feeds several optimizer steps (``optim.steps_per_generation``)
splits its kept completions into the steps' shares first (:func:`generation_shares`).
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


def generation_shares(
    keep: Sequence[int], group: int, steps: int, first_group: int = 0
) -> list[list[int]]:
    """Per optimizer step of a generation, the kept completions it trains on.

    ``keep``: kept completion indices in local numbering, ``group`` completions per prompt;
    this process's first group is the generation's ``first_group``-th (several ranks). Group
    ``g`` goes to step ``g mod steps`` (global numbering): every step gets an equal share of
    each rank's groups, and the shares do not depend on how many ranks there are.
    """
    if steps < 1 or group < 1:
        raise ValueError(f"steps and group must be >= 1, got {steps} and {group}")
    shares: list[list[int]] = [[] for _ in range(steps)]
    for i in keep:
        shares[(first_group + i // group) % steps].append(i)
    return shares
