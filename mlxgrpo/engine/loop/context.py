"""What every update of a run shares (:class:`UpdateContext`) and the loss of one micro-batch,
which the context differentiates.

Both :mod:`~mlxgrpo.engine.loop.update` (rollout and scoring) and
:mod:`~mlxgrpo.engine.loop.training_pass` (gradient passes) build on this module; it imports
neither. The context holds the config sections the update reads (``algorithm``, ``optim``,
``rollout``, ``finetune``), never the whole config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from mlxgrpo import distributed
from mlxgrpo.engine.loss import grpo
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.engine.memory.recompute import checkpointed_blocks
from mlxgrpo.engine.memory.replay import replay_applies
from mlxgrpo.generation.logprobs import completion_slice
from mlxgrpo.generation.rollout import MicroBatch
from mlxgrpo.rewards import RewardSet
from mlxgrpo.task import TextCodec

if TYPE_CHECKING:
    from mlxgrpo.config.schema import (
        AlgorithmConfig,
        FinetuneConfig,
        OptimConfig,
        RolloutConfig,
    )


def trainer_temperature(rollout: RolloutConfig) -> float:
    """The temperature of the trainer's log-probs: the rollout's (1 for greedy rollouts)."""
    return rollout.temperature if rollout.temperature > 0 else 1.0


@dataclass
class UpdateContext:
    """Everything an update needs that stays the same across updates."""

    model: nn.Module
    algorithm: AlgorithmConfig
    optim: OptimConfig
    rollout: RolloutConfig
    finetune: FinetuneConfig
    reward_set: RewardSet
    optimizer: Any
    codec: TextCodec  # prompt encoder, decoder, EOS ids, pad id
    ref_model: nn.Module | None = None  # full fine-tuning with KL only
    tools: Any = None  # generation.tool_loop.ToolRunner when rollout.tools is set
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # size 1: one process
    _value_and_grad: Callable[..., Any] = field(init=False, repr=False)
    # Whether rollouts record the blocks' outputs for the training pass (engine.memory.replay).
    replays_rollout: bool = field(init=False, default=False)

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any, **rest: Any) -> UpdateContext:
        """The context of ``model`` with the sections of ``cfg`` (a Config) that an update
        reads; ``rest``: the other fields."""
        return cls(
            model=model,
            algorithm=cfg.algorithm,
            optim=cfg.optim,
            rollout=cfg.rollout,
            finetune=cfg.finetune,
            **rest,
        )

    def __post_init__(self) -> None:
        self._value_and_grad = nn.value_and_grad(self.model, self._loss)
        self.replays_rollout = replay_applies(self.model, self.finetune, self.tools)

    def loss_and_grad(
        self, batch: MicroBatch, advantages, old_logp, ref_logp, norm, policy_mask=None, known=None
    ):
        """``((loss, (metrics, logp)), grads)`` of one micro-batch (see
        :func:`micro_batch_loss`).

        With ``finetune.grad_checkpoint`` the blocks recompute their activations in the
        backward pass, which runs inside this call: the context spans all of it. ``known``:
        the rollout's block outputs at these rows (``GatheredActivations``,
        :mod:`~mlxgrpo.engine.memory.replay`), valid only while the weights are the rollout's.
        """
        with checkpointed_blocks(self.model, self.finetune.grad_checkpoint):
            return self._value_and_grad(
                batch, advantages, old_logp, ref_logp, norm, policy_mask, known
            )

    def _loss(self, batch: MicroBatch, advantages, old_logp, ref_logp, norm, policy_mask, known):
        return micro_batch_loss(
            self.model,
            batch,
            advantages,
            old_logp,
            ref_logp,
            norm,
            policy_mask,
            known,
            algorithm=self.algorithm,
            chunk_size=self.finetune.lm_head_chunk or None,
            temperature=trainer_temperature(self.rollout),
        )


def micro_batch_loss(
    model: nn.Module,
    batch: MicroBatch,
    advantages,
    old_logp,
    ref_logp,
    norm,
    policy_mask,
    known,
    *,
    algorithm: AlgorithmConfig,
    chunk_size: int | None,
    temperature: float,
):
    """``(loss, (metrics, logp))`` of one micro-batch: the policy's log-probs (and entropies)
    at the completion tokens, then :func:`~mlxgrpo.engine.loss.grpo.policy_loss` with the
    ``[algorithm]`` settings. ``logp`` comes back without gradient (the old policy of later
    passes)."""
    algo, mask = algorithm, batch.completion_mask
    # The entropy is always reported; it is differentiated only when it is in the loss.
    logp, entropy = sequence_logprobs(
        model,
        batch.tokens,
        batch.start,
        with_entropy=True,
        entropy_grad=algo.entropy_coeff != 0,
        chunk_size=chunk_size,
        mask=mask,
        prompt_lengths=batch.prompt_lengths,
        temperature=temperature,
        known=known,
    )
    loss, metrics = grpo.policy_loss(
        logp,
        old_logp,
        advantages,
        completion_slice(mask, batch.start),
        norm=norm,
        loss_type=algo.loss_type,
        clip_eps=algo.clip_eps,
        clip_eps_high=algo.clip_eps_high,
        kl_coeff=algo.kl_coeff,
        ref_logp=ref_logp,
        kl_estimator=algo.kl_estimator,
        entropy=entropy,
        entropy_coeff=algo.entropy_coeff,
        importance_sampling_level=algo.importance_sampling_level,
        sapo_tau_pos=algo.sapo_tau_pos,
        sapo_tau_neg=algo.sapo_tau_neg,
        sampler_logp=batch.sampler_logp,
        rollout_correction=algo.rollout_correction,
        rollout_correction_cap=algo.rollout_correction_cap,
        rollout_correction_level=algo.rollout_correction_level,
        rollout_correction_min=algo.rollout_correction_min,
        delta=algo.delta,
        off_policy_mask_threshold=algo.off_policy_mask_threshold,
        policy_mask=policy_mask,
    )
    return loss, (metrics, mx.stop_gradient(logp))
