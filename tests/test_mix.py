"""algorithm.type = "mix": each update's gradient is GRPO's plus mix.sft_weight x the SFT
loss's on a batch of demonstrations, both losses are logged, and a mix run resumes exactly."""

from __future__ import annotations

import json
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import spread_reward
from loss_checks import bare_context
from mlx.utils import tree_flatten
from random_models import add_random_adapters, random_lm
from test_train import LEARN
from tolerance import assert_close

from mlxgrpo.config import ConfigProblems, resolve_config
from mlxgrpo.data import EncodedDemonstration
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.sft_update import mix_term, sft_gradients
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.engine.loop.training_pass import learn
from mlxgrpo.generation.rollout import SamplingConfig, generate_groups

VOCAB = 48
TERMS = 64


def _model() -> nn.Module:
    model = random_lm("qwen2", seed=7, vocab=VOCAB)
    add_random_adapters(model, seed=9, b_std=0.1)
    mx.eval(model.parameters())
    return model


def _context(model: nn.Module) -> UpdateContext:
    sets = ["algorithm.type=mix", "rollout.temperature=1.0", "optim.max_grad_norm=0"]
    return bare_context(model, sets)


def _demos() -> list[EncodedDemonstration]:
    rng = np.random.default_rng(1)
    return [
        EncodedDemonstration(rng.integers(3, VOCAB, n).tolist(), [0] * p + [1] * (n - p))
        for n, p in ((9, 4), (6, 2), (7, 3))
    ]


def _weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def test_the_step_is_the_policy_gradient_plus_the_weighted_sft_gradient():
    """With SGD at learning rate 1 a step is minus the gradient: the mixed step minus the
    GRPO-only step is minus weight x the SFT loss's gradient, taken separately."""
    weight = 0.3
    mixed, plain, reference = _model(), _model(), _model()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (9, 6)]
    rollout_args = dict(
        num_generations=3,
        max_new_tokens=6,
        sampling=SamplingConfig(temperature=1.0),
        eos_token_ids={0, 1},
        seed=3,
    )
    advantages = [0.9, -0.4, -0.5, 1.2, 0.1, -1.3]
    before = _weights(mixed)
    ctx = _context(mixed)
    metrics, _ = learn(
        ctx,
        generate_groups(mixed, prompts, **rollout_args),
        advantages,
        list(range(6)),
        extra=mix_term(ctx, _demos(), weight),
    )
    learn(
        _context(plain), generate_groups(plain, prompts, **rollout_args), advantages, list(range(6))
    )
    sft = sft_gradients(_context(reference), _demos())
    grads = dict(tree_flatten(sft.grads))
    scale = max(float(mx.max(mx.abs(g))) for g in grads.values())
    after_mixed, after_plain = _weights(mixed), _weights(plain)
    for name, grad in grads.items():
        difference = (before[name] - after_mixed[name]) - (before[name] - after_plain[name])
        assert_close(difference, weight * grad, terms=TERMS, scale=weight * scale, what=name)
    # Both losses are logged: the SFT one is the plain mean NLL, unweighted.
    assert_close(metrics["sft_loss"], sft.nll / sft.target_tokens, terms=TERMS, what="sft_loss")
    assert metrics["sft_target_tokens"] == sum(d.trained for d in _demos()) == 13
    assert 0 <= metrics["sft_token_accuracy"] <= 1
    assert "policy_loss" in metrics


MIX_RUN = [
    *LEARN,
    "algorithm.type=mix",
    "mix.sft_weight=0.5",
    "mix.batch_size=2",
    "run.max_steps=4",
    "checkpoint.save_steps=2",
]


def _run(tmp_path, name: str, *sets: str, should_stop=lambda: False):
    resolved = resolve_config(
        (),
        [
            *MIX_RUN,
            spread_reward(tmp_path),
            f"run.output_dir={tmp_path}",
            f"run.run_name={name}",
            *sets,
        ],
        environ={},
    )
    return train(resolved, should_stop=should_stop)


def test_a_mix_run_logs_both_losses_and_resumes_exactly(tmp_path):
    whole = _run(tmp_path, "whole")
    assert whole["updates"] == 4
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(
        r["sft_loss"] > 0 and "policy_loss" in r and "reward_mean" in r for r in train_records
    )
    assert len({r["sft_loss"] for r in train_records}) == 4  # a new batch of demonstrations each
    calls = {"n": 0}

    def after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    assert _run(tmp_path, "split", should_stop=after_two)["updates"] == 2
    assert _run(tmp_path, "split", "run.resume=auto")["updates"] == 4
    a = mx.load(str(tmp_path / "whole" / "final" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "split" / "final" / "adapters.safetensors"))
    assert all(mx.allclose(a[k], b[k], atol=1e-6).item() for k in a)
    state = json.loads(
        (tmp_path / "split" / "checkpoints" / "step-000002" / "trainer_state.json").read_text()
    )
    assert state["demonstrations"]["batch_size"] == 2


def test_mix_settings_belong_to_mix_runs():
    with pytest.raises(ConfigProblems) as exc:
        resolve_config((), ["mix.sft_weight=0.2"], environ={})
    assert any(
        p.startswith("mix.sft_weight is read by algorithm.type = mix only")
        for p in exc.value.problems
    )
    mixed = resolve_config(
        (), ["algorithm.type=mix", "rollout.num_generations=4", "sft.max_length=64"], environ={}
    )
    assert mixed.config.mix.sft_weight == 0.1
    with pytest.raises(ConfigProblems) as exc:
        resolve_config(
            (),
            ["algorithm.type=mix", "mix.dataset=synthetic:arithmetic?tool=calculator"],
            environ={},
        )
    assert any(
        "mix.dataset = synthetic:arithmetic?tool=calculator writes no demonstrations" in p
        for p in exc.value.problems
    )


@pytest.mark.parametrize("kind", ["sft", "mix"])
def test_sft_and_mix_runs_say_they_need_one_process(kind):
    from mlxgrpo.distributed import reject_unsupported
    from mlxgrpo.errors import ConfigError

    cfg = resolve_config((), [f"algorithm.type={kind}"], environ={}).config
    ranks = types.SimpleNamespace(active=True, check_batch_size=lambda size: None)
    with pytest.raises(ConfigError, match=f"algorithm.type = {kind} is not supported with several"):
        reject_unsupported(cfg, ranks)
