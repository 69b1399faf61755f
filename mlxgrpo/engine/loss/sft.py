"""The supervised fine-tuning loss: the negative log-likelihood of a demonstration's target
tokens (docs/architecture.md §3).

Like GRPO's, the loss of one micro-batch is its share of the update's: summed over its target
tokens and divided by the target tokens of the whole update (every micro-batch, every rank),
so the accumulated gradient is that of the update's mean, whatever the split.
"""

from __future__ import annotations

import mlx.core as mx


def sft_loss(
    logp: mx.array, targets: mx.array, update_tokens: int
) -> tuple[mx.array, dict[str, mx.array]]:
    """``(loss, metrics)`` of one micro-batch.

    ``logp`` [N, L]: the log-probs of the tokens that follow each position; ``targets`` [N, L]:
    1 where that token trains (0 for context and padding); ``update_tokens``: the target tokens
    of the whole update. ``metrics["nll_sum"]``: the micro-batch's summed negative
    log-likelihood, without gradient.
    """
    if logp.shape != targets.shape:
        raise ValueError(f"logp {logp.shape} and targets {targets.shape} must share one shape")
    if update_tokens < 1:
        raise ValueError(f"update_tokens must be >= 1, got {update_tokens}")
    nll = -mx.sum(logp * targets)
    return nll / update_tokens, {"nll_sum": mx.stop_gradient(nll)}
