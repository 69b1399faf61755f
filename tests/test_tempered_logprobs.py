"""The trainer scores completions under the distribution the rollout sampled them from."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from random_models import random_lm
from tolerance import assert_close

from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.generation.rollout import SamplingConfig, generate_groups

PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
TERMS = 128  # the longest sum in the model below: its MLP's 2 x hidden 64 (vocabulary 64)


@pytest.fixture(scope="module")
def model():
    model = random_lm("qwen2", seed=2, hidden=64, vocab=64)
    mx.eval(model.parameters())
    return model


def _rollout(model, temperature: float, **options):
    return generate_groups(
        model,
        PROMPTS,
        num_generations=3,
        max_new_tokens=10,
        sampling=SamplingConfig(temperature=temperature, **options),
        eos_token_ids={63},
        seed=5,
        record_logprobs=True,
        record_entropies=True,
    )


def _trainer_view(model, rollout, temperature: float):
    batch = rollout.training_batch()
    logp, entropy = sequence_logprobs(
        model,
        batch.tokens,
        batch.start,
        with_entropy=True,
        mask=batch.completion_mask,
        temperature=temperature,
    )
    return batch, logp, entropy


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_recorded_logprobs_equal_the_trainers(model, temperature: float) -> None:
    rollout = _rollout(model, temperature)
    assert [len(x) for x in rollout.completion_logprobs] == [len(c) for c in rollout.completion_ids]
    batch, logp, entropy = _trainer_view(model, rollout, temperature)
    mask = batch.completion_mask[:, batch.start :]
    assert_close(logp * mask, batch.sampler_logp * mask, terms=TERMS, what="log-probs")
    assert_close(entropy * mask, batch.sampler_entropy * mask, terms=TERMS, what="entropies")
    if temperature != 1.0:  # scoring at T = 1 would be a different distribution
        _, untempered, _ = _trainer_view(model, rollout, 1.0)
        assert float(mx.abs((untempered - batch.sampler_logp) * mask).max()) > 1e-2


def test_recorded_logprobs_are_before_truncation(model) -> None:
    """top-k changes what can be drawn, not the recorded (untruncated) log-probs."""
    rollout = _rollout(model, 0.7, top_k=5)
    batch, logp, _ = _trainer_view(model, rollout, 0.7)
    mask = batch.completion_mask[:, batch.start :]
    assert_close(logp * mask, batch.sampler_logp * mask, terms=TERMS)


def test_stop_sequences_cut_the_recorded_values_with_the_tokens(model) -> None:
    def sample(stops):
        return generate_groups(
            model,
            PROMPTS,
            num_generations=4,
            max_new_tokens=12,
            sampling=SamplingConfig(temperature=1.0),
            eos_token_ids=set(),
            stop_sequences=stops,
            seed=1,
            record_logprobs=True,
        )

    free = sample([])
    stop = free.completion_ids[0][3]  # the same keys draw the same tokens up to the stop
    cut = sample([[stop]])
    assert cut.finish_reason[0] == "stop" and len(cut.completion_ids[0]) <= 4
    for ids, logps in zip(cut.completion_ids, cut.completion_logprobs, strict=True):
        assert len(ids) == len(logps)
    # Until the first sync (8 steps) no row is dropped, so both runs draw the same tokens.
    for row, ids in enumerate(cut.completion_ids):
        head = min(len(ids), 8)
        assert cut.completion_logprobs[row][:head] == free.completion_logprobs[row][:head]
    assert cut.completion_entropies is None


def test_a_training_run_at_t07_reports_float32_level_mismatch(tmp_path) -> None:
    from mlxgrpo.config import resolve_config
    from mlxgrpo.engine.loop.trainer import train

    sets = [
        "model.path=builtin:tiny-qwen2",
        "finetune.lora_layers=-1",
        "data.dataset=synthetic:repeat?letters=x",
        "rollout.num_generations=4",
        "rollout.max_new_tokens=8",
        "rollout.temperature=0.7",
        "optim.batch_size=2",
        "optim.gradient_accumulation_steps=2",
        "run.max_steps=2",
        "checkpoint.save_steps=0",
        "run.resume=never",
        f"run.output_dir={tmp_path}",
        "run.run_name=t07",
    ]
    train(resolve_config((), sets, environ={}), [])
    records = [
        json.loads(line)
        for line in (tmp_path / "t07" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert len(records) == 2
    for record in records:
        assert 0 <= record["logprob_mismatch_max"] <= 1e-5
        assert record["logprob_mismatch_mean"] <= record["logprob_mismatch_max"]
        # On-policy pass: the old policy is the trainer's own first pass, ratio exactly 1.
        assert record["ratio"] == pytest.approx(1.0, abs=1e-6)
