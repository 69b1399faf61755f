"""GRPO math checked against numpy references and naive per-token Python loops."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen2
from random_models import random_lm
from tolerance import assert_close

from mlxgrpo.engine.loss.grpo import (
    LossNorm,
    group_advantages,
    kl_per_token,
    mask_truncated_advantages,
    policy_loss,
    zero_std_group_mask,
)
from mlxgrpo.engine.memory.lm_head import sequence_logprobs
from mlxgrpo.errors import ConfigError
from mlxgrpo.generation.logprobs import (
    completion_slice,
    first_completion_position,
    token_logprobs,
    token_logprobs_and_entropy,
)

# --------------------------------------------------------------------------- references


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_entropy(z: np.ndarray) -> np.ndarray:
    logp = np_log_softmax(z)
    return -(np.exp(logp) * logp).sum(axis=-1)


def to_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


# --------------------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_token_logprobs_matches_numpy(scale: float) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 5, 50)) * scale).astype(np.float32)
    targets = rng.integers(0, 50, size=(3, 5))
    got = token_logprobs(mx.array(logits), mx.array(targets))
    want = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert got.dtype == mx.float32
    assert got.shape == (3, 5)
    # float32 logsumexp error grows with the logits' magnitude and the vocabulary's size.
    assert_close(got, want, terms=50)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_token_logprobs_half_precision_inputs_give_float32(dtype: mx.Dtype) -> None:
    rng = np.random.default_rng(1)
    logits = mx.array((rng.standard_normal((4, 50)) * 8).astype(np.float32)).astype(dtype)
    targets = rng.integers(0, 50, size=(4,))
    got = token_logprobs(logits, mx.array(targets))
    # Reference on the exact half-precision values, in float64.
    exact = to_np(logits)
    want = np.take_along_axis(np_log_softmax(exact), targets[:, None], -1)[:, 0]
    assert got.dtype == mx.float32
    assert_close(got, want, terms=50)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_entropy_matches_numpy(scale: float) -> None:
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((2, 6, 50)) * scale).astype(np.float32)
    targets = rng.integers(0, 50, size=(2, 6))
    logp, entropy = token_logprobs_and_entropy(mx.array(logits), mx.array(targets))
    assert logp.dtype == mx.float32 and entropy.dtype == mx.float32
    assert_close(entropy, np_entropy(logits), terms=50, what="entropies")
    want_logp = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert_close(logp, want_logp, terms=50, what="log-probs")


def test_entropy_of_uniform_and_of_bfloat16() -> None:
    logits = mx.zeros((1, 50), dtype=mx.bfloat16)
    _, entropy = token_logprobs_and_entropy(logits, mx.array([3]))
    assert entropy.dtype == mx.float32
    assert_close(entropy.item(), math.log(50), terms=50)


# --------------------------------------------------------------------------- sequence log-probs


@pytest.fixture(scope="module")
def tiny_model() -> qwen2.Model:
    model = random_lm("qwen2", seed=0, vocab=50)
    mx.eval(model.parameters())
    return model


# (prompt, completion) per row; rows have different prompt and completion lengths.
ROWS = [
    ([5, 6, 7], [8, 9, 10, 2]),
    ([11, 12, 13, 14, 15], [16, 2]),
    ([20, 21, 22, 23], [24, 25, 26]),
]
PAD = 0
TERMS = 64  # the longest sum in tiny_model: its MLP's 2 x hidden 32 (vocabulary 50)


def build_batch() -> tuple[mx.array, mx.array, int]:
    total = max(len(p) + len(c) for p, c in ROWS)
    tokens = np.full((len(ROWS), total), PAD, dtype=np.int32)
    mask = np.zeros((len(ROWS), total), dtype=np.float32)
    for i, (prompt, completion) in enumerate(ROWS):
        row = prompt + completion
        tokens[i, : len(row)] = row
        mask[i, len(prompt) : len(row)] = 1.0
    start = first_completion_position([len(p) for p, _ in ROWS])
    return mx.array(tokens), mx.array(mask), start


def naive_row_logprobs(model: qwen2.Model, prompt: list[int], completion: list[int]):
    """Unpadded single-row forward pass; log-probs and entropies of the completion tokens."""
    row = prompt + completion
    logits = to_np(model(mx.array([row[:-1]]))[0])
    positions = range(len(prompt) - 1, len(row) - 1)
    log_probs = np_log_softmax(logits)
    logp = [log_probs[p, row[p + 1]] for p in positions]
    entropy = [np_entropy(logits[p]) for p in positions]
    return np.array(logp), np.array(entropy)


def test_sequence_logprobs_match_naive_rows(tiny_model: qwen2.Model) -> None:
    tokens, mask, start = build_batch()
    assert start == 3
    logp, entropy = sequence_logprobs(tiny_model, tokens, start, with_entropy=True)
    comp_mask = completion_slice(mask, start)
    assert logp.shape == comp_mask.shape == (3, tokens.shape[1] - start)
    assert logp.dtype == mx.float32
    for i, (prompt, completion) in enumerate(ROWS):
        selected = np.array(comp_mask[i]) > 0
        assert selected.sum() == len(completion)
        want_logp, want_entropy = naive_row_logprobs(tiny_model, prompt, completion)
        assert_close(np.array(logp[i])[selected], want_logp, terms=TERMS, what="log-probs")
        assert_close(np.array(entropy[i])[selected], want_entropy, terms=TERMS, what="entropies")


def test_prompt_is_in_context(tiny_model: qwen2.Model) -> None:
    tokens, mask, start = build_batch()
    base = sequence_logprobs(tiny_model, tokens, start)
    changed = np.array(tokens)
    changed[0, 0] = 40  # first prompt token of row 0, which is never a scored position
    other = sequence_logprobs(tiny_model, mx.array(changed), start)
    row0 = np.array(completion_slice(mask, start)[0]) > 0
    diff = np.abs(np.array(base[0]) - np.array(other[0]))[row0]
    assert diff.min() > 1e-6
    # Other rows are untouched.
    np.testing.assert_allclose(np.array(base[1:]), np.array(other[1:]), atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_equals_unchunked(tiny_model: qwen2.Model, chunk_size: int) -> None:
    tokens, _, start = build_batch()
    logp, entropy = sequence_logprobs(tiny_model, tokens, start, with_entropy=True)
    c_logp, c_entropy = sequence_logprobs(
        tiny_model, tokens, start, with_entropy=True, chunk_size=chunk_size
    )
    assert c_logp.shape == logp.shape
    assert_close(c_logp, logp, terms=TERMS, what="log-probs")
    assert_close(c_entropy, entropy, terms=TERMS, what="entropies")
    plain = sequence_logprobs(tiny_model, tokens, start, chunk_size=chunk_size)
    assert_close(plain, logp, terms=TERMS, what="log-probs without entropies")


def test_sequence_logprobs_rejects_bad_start(tiny_model: qwen2.Model) -> None:
    tokens, _, _ = build_batch()
    with pytest.raises(ValueError):
        sequence_logprobs(tiny_model, tokens, 0)
    with pytest.raises(ValueError):
        sequence_logprobs(tiny_model, tokens, tokens.shape[1])
    with pytest.raises(ValueError):
        first_completion_position([3, 0])


# --------------------------------------------------------------------------- advantages

REWARDS = mx.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_group_advantages_group_scale() -> None:
    got = np.array(group_advantages(REWARDS, 4, "group"))
    a = 0.5 / (0.5 + 1e-4)  # mean 0.5, population std 0.5
    assert_close(got, [a, -a, -a, a, 0, 0, 0, 0], terms=4)  # sums over a group of 4


def test_group_advantages_population_std() -> None:
    # mean 1, population std sqrt(2) (ddof=1 would give sqrt(3)).
    got = np.array(group_advantages(mx.array([3.0, 0.0, 0.0]), 3, "group", eps=0.0))
    s = math.sqrt(2.0)
    assert_close(got, [2 / s, -1 / s, -1 / s], terms=3)


def test_group_advantages_batch_scale() -> None:
    got = np.array(group_advantages(REWARDS, 4, "batch"))
    # batch mean 1.25; squared deviations sum to 5.5 over 8 rewards.
    std = math.sqrt(5.5 / 8)
    a = 0.5 / (std + 1e-4)
    assert_close(got, [a, -a, -a, a, 0, 0, 0, 0], terms=8)  # the std sums over the batch


def test_group_advantages_no_scale() -> None:
    got = np.array(group_advantages(REWARDS, 4, "none"))
    assert_close(got, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], terms=4)


def test_group_advantages_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        group_advantages(REWARDS, 4, "groups")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3)


def test_zero_std_group_mask() -> None:
    assert np.array(zero_std_group_mask(REWARDS, 4)).tolist() == [False, True]
    assert np.array(zero_std_group_mask(REWARDS, 2)).tolist() == [False, False, True, True]


def test_mask_truncated_advantages() -> None:
    adv = mx.array([1.0, -2.0, 3.0])
    got = mask_truncated_advantages(adv, mx.array([False, True, False]))
    assert np.array(got).tolist() == [1.0, 0.0, 3.0]


# --------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values() -> None:
    logp = mx.array([-1.0, -2.0, -0.5])
    ref = mx.array([-2.0, -1.0, -0.5])
    assert_close(kl_per_token(logp, ref, "k1"), [1, -1, 0], terms=1, what="k1")
    assert_close(kl_per_token(logp, ref, "k2"), [0.5, 0.5, 0], terms=1, what="k2")
    k3_want = [math.exp(-1.0), math.e - 2.0, 0.0]
    assert_close(kl_per_token(logp, ref, "k3"), k3_want, terms=1, what="k3")


def test_k3_is_non_negative() -> None:
    rng = np.random.default_rng(3)
    logp = mx.array(rng.standard_normal(1000).astype(np.float32))
    # Differences from 1e-8 to ~1, where cancellation could round k3 below zero.
    offsets = rng.standard_normal(1000) * 10.0 ** rng.integers(-8, 1, 1000)
    ref = logp + mx.array(offsets.astype(np.float32))
    k3 = np.array(kl_per_token(logp, ref, "k3"))
    assert (k3 >= 0).all()
    with pytest.raises(ConfigError):
        kl_per_token(logp, logp, "k4")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- loss: naive reference

CLIP_LOW, CLIP_HIGH, BETA, ENT_COEFF, MAX_NEW = 0.2, 0.28, 0.05, 0.01, 6


def make_example() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    n, length = 4, 5
    mask = np.array(
        [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=np.float32
    )
    logp = -rng.uniform(0.1, 3.0, (n, length)).astype(np.float32)
    old = (logp + rng.uniform(-0.5, 0.5, (n, length))).astype(np.float32)
    return {
        "logp": logp,
        "old": old,
        "ref": (logp + rng.uniform(-0.3, 0.3, (n, length))).astype(np.float32),
        "entropy": rng.uniform(0.0, 2.0, (n, length)).astype(np.float32),
        "adv": np.array([1.3, -0.7, 0.4, -1.1], dtype=np.float32),
        "mask": mask,
    }


def naive_loss(ex: dict[str, np.ndarray], loss_type: str) -> float:
    """Plain-Python definition of each loss type over the whole batch at once."""
    n, length = ex["mask"].shape
    per_seq, total, tokens = [], 0.0, 0.0
    for i in range(n):
        idx = [t for t in range(length) if ex["mask"][i, t] > 0]
        seq_ratio = math.exp(sum(float(ex["logp"][i, t] - ex["old"][i, t]) for t in idx) / len(idx))
        seq_sum = 0.0
        for t in idx:
            ratio = (
                seq_ratio if loss_type == "gspo" else math.exp(ex["logp"][i, t] - ex["old"][i, t])
            )
            a = float(ex["adv"][i])
            surrogate = min(ratio * a, min(max(ratio, 1 - CLIP_LOW), 1 + CLIP_HIGH) * a)
            d = float(ex["ref"][i, t] - ex["logp"][i, t])
            kl = math.exp(d) - d - 1
            seq_sum += -(surrogate - BETA * kl) - ENT_COEFF * float(ex["entropy"][i, t])
        per_seq.append(seq_sum / len(idx))
        total += seq_sum
        tokens += len(idx)
    if loss_type in ("grpo", "gspo"):
        return sum(per_seq) / n
    if loss_type in ("bnpo", "dapo"):
        return total / tokens
    return total / (n * MAX_NEW)


def run_loss(ex: dict[str, np.ndarray], rows: slice, norm: LossNorm, loss_type: str):
    return policy_loss(
        mx.array(ex["logp"][rows]),
        mx.array(ex["old"][rows]),
        mx.array(ex["adv"][rows]),
        mx.array(ex["mask"][rows]),
        norm=norm,
        loss_type=loss_type,  # type: ignore[arg-type]
        clip_eps=CLIP_LOW,
        clip_eps_high=CLIP_HIGH,
        kl_coeff=BETA,
        ref_logp=mx.array(ex["ref"][rows]),
        kl_estimator="k3",
        entropy=mx.array(ex["entropy"][rows]),
        entropy_coeff=ENT_COEFF,
    )


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_loss_types_match_naive_definition(loss_type: str) -> None:
    ex = make_example()
    norm = LossNorm.for_update([mx.array(ex["mask"])], MAX_NEW)
    loss, _ = run_loss(ex, slice(None), norm, loss_type)
    assert_close(loss.item(), naive_loss(ex, loss_type), terms=ex["mask"].size)  # over tokens


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_micro_batch_contributions_sum_to_update_loss(loss_type: str) -> None:
    ex = make_example()
    halves = [slice(0, 2), slice(2, 4)]
    norm = LossNorm.for_update([mx.array(ex["mask"][h]) for h in halves], MAX_NEW)
    assert norm == LossNorm(
        num_sequences=4, num_tokens=12, num_microbatches=2, max_new_tokens=MAX_NEW
    )
    summed = sum(run_loss(ex, h, norm, loss_type)[0].item() for h in halves)
    if loss_type == "bnpo":
        # bnpo is defined per micro-batch: the update loss is the mean of micro-batch bnpo.
        want = sum(naive_loss({k: v[h] for k, v in ex.items()}, "bnpo") for h in halves) / 2
    else:
        want = naive_loss(ex, loss_type)
    assert_close(summed, want, terms=ex["mask"].size)  # the loss sums over the tokens


def test_micro_batch_gradients_sum_to_update_gradient() -> None:
    ex = make_example()
    full_norm = LossNorm.for_update([mx.array(ex["mask"])], MAX_NEW)
    halves = [slice(0, 2), slice(2, 4)]
    split_norm = LossNorm.for_update([mx.array(ex["mask"][h]) for h in halves], MAX_NEW)
    for loss_type in ("grpo", "dapo", "dr_grpo", "gspo"):

        def loss_of(logp, rows, norm, loss_type=loss_type):
            return policy_loss(
                logp,
                mx.array(ex["old"][rows]),
                mx.array(ex["adv"][rows]),
                mx.array(ex["mask"][rows]),
                norm=norm,
                loss_type=loss_type,
            )[0]

        full = mx.grad(loss_of)(mx.array(ex["logp"]), slice(None), full_norm)
        parts = [mx.grad(loss_of)(mx.array(ex["logp"][h]), h, split_norm) for h in halves]
        grads = np.concatenate([np.array(p) for p in parts])
        assert_close(grads, full, terms=ex["mask"].size, what=loss_type)


# --------------------------------------------------------------------------- loss: properties


def test_on_policy_grpo_loss_and_gradient() -> None:
    mask = mx.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=mx.float32)
    adv = mx.array([0.5, -1.0, 2.0])
    logp = mx.array(-np.random.default_rng(5).uniform(0.1, 2.0, (3, 4)).astype(np.float32))
    norm = LossNorm.for_update([mask], MAX_NEW)

    def loss_fn(lp: mx.array) -> mx.array:
        return policy_loss(lp, None, adv, mask, norm=norm)[0]

    loss, grad = mx.value_and_grad(loss_fn)(logp)
    tokens = mask.size  # the loss sums over the tokens
    assert_close(loss.item(), -(0.5 - 1.0 + 2.0) / 3, terms=tokens, what="loss")
    lengths = [3, 1, 4]
    want = np.array([[-[0.5, -1.0, 2.0][i] / lengths[i] / 3] * 4 for i in range(3)])
    assert_close(grad, want * np.array(mask), terms=tokens, what="gradient")
    # Passing old_logp == logp explicitly is the same thing.
    explicit = policy_loss(logp, logp, adv, mask, norm=norm)[0]
    assert_close(explicit.item(), loss.item(), terms=tokens, what="explicit old_logp")


def clip_case(ratio: float, adv: float):
    old = mx.array([[0.0]])
    norm = LossNorm(num_sequences=1, num_tokens=1, num_microbatches=1, max_new_tokens=1)

    def loss_fn(lp: mx.array):
        return policy_loss(lp, old, mx.array([adv]), mx.ones((1, 1)), norm=norm, clip_eps=0.2)

    (loss, metrics), grad = mx.value_and_grad(loss_fn)(mx.array([[math.log(ratio)]]))
    return loss.item(), grad.item(), {k: v.item() for k, v in metrics.items()}


def test_clipping_high_side_has_no_gradient() -> None:
    loss, grad, metrics = clip_case(1.5, 2.0)
    assert_close(loss, -1.2 * 2.0, terms=1)  # the token contributes clip(1.5) * A = 1.2 * A
    assert grad == 0.0
    assert metrics["clip_high"] == 1.0 and metrics["clip_low"] == 0.0
    assert_close(metrics["ratio"], 1.5, terms=1)


def test_clipping_low_side_and_unclipped_negative_advantage() -> None:
    loss, grad, metrics = clip_case(0.5, -1.0)
    assert_close(loss, 0.8, terms=1)
    assert grad == 0.0
    assert metrics["clip_low"] == 1.0 and metrics["clip_high"] == 0.0
    # ratio 1.5 with A < 0: min picks the unclipped term, which keeps its gradient -r*A.
    loss, grad, metrics = clip_case(1.5, -1.0)
    assert_close([loss, grad], [1.5, 1.5], terms=1)
    assert metrics["clip_high"] == 0.0 and metrics["clip_low"] == 0.0


def test_metrics_are_masked_and_sum_over_micro_batches() -> None:
    # Row 0: ratio 1.5 (clipped high, A > 0) on a masked-out token and ratio 1 on a real one.
    logp = mx.array([[math.log(1.5), 0.0], [math.log(1.5), math.log(0.5)]])
    old = mx.zeros((2, 2))
    mask = mx.array([[0.0, 1.0], [1.0, 1.0]])
    adv = mx.array([1.0, 1.0])
    norm = LossNorm.for_update([mask[:1], mask[1:]], 1)
    parts = [
        policy_loss(logp[r], old[r], adv[r], mask[r], norm=norm, clip_eps=0.2)[1]
        for r in (slice(0, 1), slice(1, 2))
    ]
    assert abs(parts[0]["clip_high"].item()) < 1e-7
    total = {k: parts[0][k].item() + parts[1][k].item() for k in parts[0]}
    assert abs(total["clip_high"] - 1 / 3) < 1e-6  # one clipped token of three real ones
    assert abs(total["clip_low"]) < 1e-7  # ratio 0.5 with A > 0 is not a low-side clip
    assert_close(total["ratio"], (1.0 + 1.5 + 0.5) / 3, terms=3)  # a mean over 3 tokens


def test_gspo_sequence_ratio_value_and_gradient() -> None:
    old = mx.array([[0.0, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 0.0]])
    norm = LossNorm.for_update([mask], 4)

    def loss_fn(lp: mx.array, adv: float, eps: float):
        return policy_loss(
            lp, old, mx.array([adv]), mask, norm=norm, loss_type="gspo", clip_eps=eps
        )

    logp = mx.array([[0.1, 0.3, 5.0]])  # the masked third token must not enter the ratio
    s = math.exp(0.2)
    (loss, metrics), grad = mx.value_and_grad(loss_fn)(logp, 1.0, 10.0)
    # The sequence's ratio is the exponential of a mean over its 2 real tokens.
    assert_close(loss.item(), -s, terms=2, what="loss")
    assert_close(metrics["ratio"].item(), s, terms=2, what="ratio")
    # d(-exp(mean(logp - old)))/d logp_t = -s / |o| for real tokens.
    assert_close(grad, [[-s / 2, -s / 2, 0.0]], terms=2, what="gradient")
    # s = 1.22 > 1 + 0.1 with A > 0: clipped for the whole sequence, no gradient.
    (loss, metrics), grad = mx.value_and_grad(loss_fn)(logp, 1.0, 0.1)
    assert_close(loss.item(), -1.1, terms=2, what="clipped loss")
    assert np.abs(np.array(grad)).max() == 0.0
    assert abs(metrics["clip_high"].item() - 1.0) < 1e-6


def test_entropy_bonus_lowers_loss() -> None:
    logp = mx.array([[-1.0, -2.0]])
    mask = mx.ones((1, 2))
    norm = LossNorm.for_update([mask], 2)

    def loss_with(entropy: float) -> float:
        loss, metrics = policy_loss(
            logp,
            None,
            mx.array([1.0]),
            mask,
            norm=norm,
            entropy=mx.full((1, 2), entropy),
            entropy_coeff=0.1,
        )
        assert_close(metrics["entropy"].item(), entropy, terms=2)  # a mean over 2 tokens
        return loss.item()

    low, high = loss_with(1.0), loss_with(2.0)
    assert high < low
    # Two losses of ~1 differ by 0.1: their magnitude, not the difference's, sets the scale.
    assert_close(high - low, -0.1, terms=2, scale=max(abs(high), abs(low)))


def test_kl_term_adds_beta_times_kl() -> None:
    logp = mx.array([[-1.0]])
    ref = mx.array([[-2.0]])
    norm = LossNorm.for_update([mx.ones((1, 1))], 1)
    loss, metrics = policy_loss(
        logp,
        None,
        mx.array([0.0]),
        mx.ones((1, 1)),
        norm=norm,
        kl_coeff=0.5,
        ref_logp=ref,
        kl_estimator="k1",
    )
    assert_close(loss.item(), 0.5, terms=1)  # A = 0: only beta * (logp - ref) = 0.5 * 1
    assert_close(metrics["kl"].item(), 1.0, terms=1)


def test_policy_loss_rejects_bad_input() -> None:
    mask = mx.ones((1, 2))
    norm = LossNorm.for_update([mask], 2)
    logp = mx.zeros((1, 2))
    with pytest.raises(ConfigError):
        policy_loss(logp, None, mx.array([1.0]), mask, norm=norm, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        policy_loss(logp, None, mx.array([1.0]), mask, norm=norm, kl_coeff=0.1)
    with pytest.raises(ValueError):
        policy_loss(logp, None, mx.array([1.0, 2.0]), mask, norm=norm)
