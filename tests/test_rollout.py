"""Batched GRPO rollout against naive, cache-free reference decoding on a tiny random model."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import record_decode_widths
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models.qwen2 import Model
from random_models import random_lm
from tolerance import assert_close

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.generation.rollout import (
    SamplingConfig,
    build_micro_batch,
    generate_groups,
)

GREEDY = SamplingConfig(temperature=0.0)
# Different lengths on purpose: the merged batch cache must left-pad and mask them correctly.
PROMPTS = [
    [1, 2, 3],
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [40],
]


def _strengthen(model: nn.Module) -> nn.Module:
    # At default init the tied-embedding model mostly echoes its last input token, which would
    # hide masking bugs; stronger projections make the greedy output depend on the context.
    stronger = tree_map_with_path(
        lambda path, w: w * 3.0 if "proj" in path and path.endswith("weight") else w,
        model.parameters(),
    )
    model.update(stronger)
    mx.eval(model.parameters())
    return model


def _build_model() -> Model:
    return _strengthen(random_lm("qwen2", seed=0, hidden=64, vocab=64))


@pytest.fixture(scope="module")
def model() -> Model:
    return _build_model()


def _reference_greedy(
    model: nn.Module, prompt: list[int], steps: int, repetition_penalty: float = 1.0
) -> list[int]:
    """Full forward pass over prompt + generated tokens at every step; no cache, no batching."""
    sequence, generated = list(prompt), []
    for _ in range(steps):
        logits = model(mx.array(sequence)[None])[0, -1]
        if repetition_penalty != 1.0:
            values = logits.tolist()
            for token in set(sequence):
                v = values[token]
                values[token] = v * repetition_penalty if v < 0 else v / repetition_penalty
            logits = mx.array(values)
        token = int(mx.argmax(logits).item())
        generated.append(token)
        sequence.append(token)
    return generated


@pytest.fixture(scope="module")
def reference(model: Model) -> list[list[int]]:
    return [_reference_greedy(model, p, 12) for p in PROMPTS]


def _decode_chars(ids: list[int]) -> str:
    return "".join(f"{i}," for i in ids)


def test_greedy_matches_reference_for_every_sample(model, reference):
    rollout = generate_groups(
        model,
        PROMPTS,
        num_generations=3,
        max_new_tokens=12,
        sampling=GREEDY,
        eos_token_ids=[],
        sync_every=5,
    )
    assert len(set(map(tuple, reference))) == len(PROMPTS), "references should differ"
    assert rollout.prompt_index == [i // 3 for i in range(12)]
    for i, completion in enumerate(rollout.completion_ids):
        assert completion == reference[i // 3]
    assert rollout.truncated == [True] * 12
    assert rollout.finish_reason == ["length"] * 12
    assert rollout.generated_tokens == 12 * 12
    assert rollout.prefill_tokens == sum(len(p) for p in PROMPTS)


def _cut_at_first(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """Reference stop rule: keep up to and including the first stop id; flag truncation."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1], False
    return tokens, True


def test_eos_is_kept_and_stops_each_row(model, reference):
    eos_ids = {reference[1][4], reference[3][5]}  # several EOS ids, from greedy output
    expected = [_cut_at_first(ref, eos_ids) for ref in reference]
    assert {tokens[-1] for tokens, truncated in expected if not truncated} == eos_ids
    assert any(truncated for _, truncated in expected)
    rollout = generate_groups(
        model,
        PROMPTS,
        num_generations=2,
        max_new_tokens=12,
        sampling=GREEDY,
        eos_token_ids=eos_ids,
        sync_every=2,
    )
    for i, completion in enumerate(rollout.completion_ids):
        tokens, truncated = expected[i // 2]
        assert completion == tokens
        assert rollout.truncated[i] is truncated
        assert rollout.finish_reason[i] == ("length" if truncated else "stop")
    assert rollout.generated_tokens == sum(len(c) for c in rollout.completion_ids)


def test_truncation_at_max_new_tokens(model, reference):
    rollout = generate_groups(
        model, PROMPTS[:2], num_generations=2, max_new_tokens=5, sampling=GREEDY, eos_token_ids=[]
    )
    assert rollout.completion_ids == [reference[0][:5]] * 2 + [reference[1][:5]] * 2
    assert rollout.truncated == [True] * 4


def test_stop_sequence_cuts_after_the_sequence(model, reference):
    stop = reference[2][3:5]
    ref = reference[2]
    end = next(e for e in range(2, 13) if ref[e - 2 : e] == stop)
    rollout = generate_groups(
        model,
        [PROMPTS[2]],
        num_generations=2,
        max_new_tokens=12,
        sampling=GREEDY,
        eos_token_ids=[],
        stop_sequences=[stop],
    )
    assert rollout.completion_ids == [ref[:end]] * 2
    assert rollout.finish_reason == ["stop"] * 2
    assert rollout.truncated == [False] * 2


def test_stop_string_cuts_after_its_last_token(model, reference):
    ref = reference[1]
    # Ends inside the text of token ref[6], so that token must be the last one kept.
    stop = _decode_chars(ref[5:6]) + str(ref[6])[0]
    end = next(e for e in range(1, 13) if stop in _decode_chars(ref[:e]))
    rollout = generate_groups(
        model,
        [PROMPTS[1]],
        num_generations=2,
        max_new_tokens=12,
        sampling=GREEDY,
        eos_token_ids=[],
        stop_strings=[stop, "no such text"],
        decode=_decode_chars,
        sync_every=3,
    )
    assert rollout.completion_ids == [ref[:end]] * 2
    assert rollout.finish_reason == ["stop"] * 2
    assert rollout.truncated == [False] * 2


def test_samples_differ_and_are_reproducible(model):
    def sample(seed: int):
        return generate_groups(
            model,
            PROMPTS,
            num_generations=4,
            max_new_tokens=10,
            sampling=SamplingConfig(temperature=1.0),
            eos_token_ids=[],
            seed=seed,
        ).completion_ids

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    for group in range(len(PROMPTS)):
        samples = {tuple(c) for c in first[group * 4 : group * 4 + 4]}
        assert len(samples) == 4


def test_a_completion_is_the_same_in_any_batch(model):
    """Sampling is keyed by (seed, the prompt's global index, sample index): prompts 1..3
    sampled alone (prompt_offset 1), or one at a time, give the completions they get in the
    whole batch, also when rows finish early (EOS 9 and 30) and leave the batch."""

    def sample(prompts, offset):
        return generate_groups(
            model,
            prompts,
            num_generations=3,
            max_new_tokens=10,
            sampling=SamplingConfig(temperature=1.0),
            eos_token_ids=[9, 30],
            seed=11,
            prompt_offset=offset,
        ).completion_ids

    whole = sample(PROMPTS, 0)
    assert sample(PROMPTS[1:], 1) == whole[3:]
    for i, prompt in enumerate(PROMPTS):
        assert sample([prompt], i) == whole[3 * i : 3 * i + 3]
    assert sample(PROMPTS[1:], 0) != whole[3:]  # the index is what keys a completion
    assert any(len(c) < 10 for c in whole)  # some rows did finish early


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(temperature=1.0, top_k=1),
        SamplingConfig(temperature=0.8, top_p=1e-6),
        SamplingConfig(temperature=1.5, min_p=1.0),
    ],
)
def test_filters_that_keep_one_token_equal_greedy(model, reference, sampling):
    rollout = generate_groups(
        model,
        PROMPTS,
        num_generations=2,
        max_new_tokens=12,
        sampling=sampling,
        eos_token_ids=[],
        seed=3,
    )
    assert rollout.completion_ids == [ref for ref in reference for _ in range(2)]


def test_repetition_penalty_matches_reference(model):
    penalty = 1.8
    expected = [_reference_greedy(model, p, 10, repetition_penalty=penalty) for p in PROMPTS]
    assert expected != [_reference_greedy(model, p, 10) for p in PROMPTS]
    rollout = generate_groups(
        model,
        PROMPTS,
        num_generations=2,
        max_new_tokens=10,
        sampling=SamplingConfig(temperature=0.0, repetition_penalty=penalty),
        eos_token_ids=[],
        sync_every=4,
    )
    assert rollout.completion_ids == [ref for ref in expected for _ in range(2)]


def test_quantized_model_matches_its_reference():
    model = _build_model()
    nn.quantize(model, group_size=32, bits=8)
    mx.eval(model.parameters())
    expected = [_reference_greedy(model, p, 8) for p in PROMPTS[:3]]
    rollout = generate_groups(
        model, PROMPTS[:3], num_generations=2, max_new_tokens=8, sampling=GREEDY, eos_token_ids=[]
    )
    assert rollout.completion_ids == [ref for ref in expected for _ in range(2)]


# A sliding-window attention model (rotating cache, window shorter than the prompts) and a
# recurrent one (state cache without a padding mask).
OTHER_ARCHITECTURES = {
    "gemma3_text": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 64,
        "sliding_window": 4,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 16,
    },
    "mamba": {
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 8,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
    },
}


@pytest.mark.parametrize("model_type", sorted(OTHER_ARCHITECTURES))
def test_other_cache_types_match_reference(model_type):
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    config = {"model_type": model_type, **OTHER_ARCHITECTURES[model_type]}
    model = _strengthen(module.Model(module.ModelArgs.from_dict(config)))
    expected = [_reference_greedy(model, p, 8) for p in PROMPTS]
    rollout = generate_groups(
        model, PROMPTS, num_generations=2, max_new_tokens=8, sampling=GREEDY, eos_token_ids=[]
    )
    assert rollout.completion_ids == [ref for ref in expected for _ in range(2)]


def test_model_is_left_unchanged(model):
    before = [(k, mx.array(v)) for k, v in tree_flatten(model.parameters())]
    model.train()
    generate_groups(
        model,
        PROMPTS[:2],
        num_generations=2,
        max_new_tokens=4,
        sampling=SamplingConfig(),
        eos_token_ids=[],
        seed=0,
    )
    assert model.training and all(m.training for _, m in model.named_modules())
    model.eval()
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(v, after[k]).item() for k, v in before)


def test_micro_batch_layout_by_hand():
    batch = build_micro_batch([[1, 2, 3], [4, 5]], [[6], [8, 9, 10]], pad_id=0)
    assert batch.tokens.dtype == mx.int32
    assert batch.tokens.tolist() == [[1, 2, 3, 6, 0], [4, 5, 8, 9, 10]]
    assert batch.completion_mask.dtype == mx.float32
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.prompt_lengths.tolist() == [3, 2]
    assert batch.start == 2


def test_rollout_training_batch_uses_each_completions_prompt(model):
    rollout = generate_groups(
        model, PROMPTS[:2], num_generations=2, max_new_tokens=3, sampling=GREEDY, eos_token_ids=[]
    )
    batch = rollout.training_batch([1, 2])
    first, second = rollout.completion_ids[1], rollout.completion_ids[2]
    assert batch.tokens.tolist() == [
        PROMPTS[0] + first + [0] * 4,
        PROMPTS[1] + second,
    ]
    assert batch.completion_mask.tolist() == [[0] * 3 + [1] * 3 + [0] * 4, [0] * 7 + [1] * 3]
    assert batch.start == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_generations": 0},
        {"max_new_tokens": 0},
        {"stop_strings": ["x"]},
    ],
)
def test_bad_arguments_raise_config_error(model, kwargs):
    options = {"num_generations": 2, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError):
        generate_groups(model, PROMPTS, sampling=GREEDY, eos_token_ids=[], **options)


def test_bad_sampling_config_raises():
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=1.5)


def test_sampling_settings_come_from_any_section_that_names_them():
    """One place knows the sampling fields: a [rollout] and a [generate] section both map."""
    from mlxgrpo.config import resolve_config
    from mlxgrpo.generation.sampling import SamplingConfig
    from mlxgrpo.inference import GenerationOptions

    sets = ["rollout.top_k=7", "rollout.min_p=0.05", "generate.repetition_penalty=1.3"]
    cfg = resolve_config(overrides=sets).config
    assert SamplingConfig.from_section(cfg.rollout) == SamplingConfig(
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=7, min_p=0.05
    )
    options = GenerationOptions.from_config(cfg.generate)
    assert options.sampling().repetition_penalty == 1.3
    assert options.stop == tuple(cfg.generate.stop) and options.seed == cfg.generate.seed


def test_a_model_that_cannot_decode_a_batch_gets_one_clear_error():
    """gpt_bigcode computes learned positions from one cache offset; a batched cache gives each
    row its own. The rollout says which model and why, not an internal error."""
    module = importlib.import_module("mlx_lm.models.gpt_bigcode")
    args = module.ModelArgs(
        model_type="gpt_bigcode", n_embd=32, n_layer=2, n_inner=64, n_head=4,
        n_positions=64, layer_norm_epsilon=1e-5, vocab_size=48,
    )  # fmt: skip
    model = module.Model(args)
    with pytest.raises(MlxgrpoError, match="gpt_bigcode cannot decode a batch: .*per-row"):
        generate_groups(
            model, [[1, 2, 3]], num_generations=2, max_new_tokens=3,
            sampling=SamplingConfig(temperature=1.0), eos_token_ids=[],
        )  # fmt: skip


def test_the_decode_cache_grows_once_to_the_size_it_needs(monkeypatch):
    """mlx-lm's caches grow by 256 positions; the rollout's grows by its decode budget, so a
    finished rollout's cache holds the longest prompt and the new tokens, no more."""
    from mlxgrpo.generation import prefill as prefill_module

    caches = []
    grow = prefill_module.grow_by
    monkeypatch.setattr(prefill_module, "grow_by", lambda c, n: caches.append(c) or grow(c, n))
    model = random_lm("qwen2", seed=1, vocab=48)
    generate_groups(
        model, [[1, 2, 3, 4, 5], [6, 7]], num_generations=3, max_new_tokens=7,
        sampling=SamplingConfig(temperature=1.0), eos_token_ids=[], seed=3,
    )  # fmt: skip
    (cache,) = caches
    assert {layer.keys.shape[2] for layer in cache} == {5 + 7}


@pytest.mark.parametrize("max_rows", [7, 3, 2, 1])
def test_max_rows_bounds_the_decode_batch_and_keeps_every_completion(model, monkeypatch, max_rows):
    """rollout.max_rows: whole groups decode together as far as they fit (7 rows hold two
    groups of 3), a group larger than the bound decodes in slices (2 -> samples [0] and
    [1, 2]). No decode step runs more rows than the bound, and every completion, its
    recorded log-probs and its recorded block outputs are those of the single batch."""

    def sample(bound):
        return generate_groups(
            model, PROMPTS, num_generations=3, max_new_tokens=9,
            sampling=SamplingConfig(temperature=1.0), eos_token_ids=[9, 30], seed=5,
            record_logprobs=True, record_entropies=True, record_activations=True,
            max_rows=bound,
        )  # fmt: skip

    whole = sample(0)
    widths = record_decode_widths(monkeypatch)
    bounded = sample(max_rows)
    assert widths and max(widths) <= max_rows
    assert bounded.completion_ids == whole.completion_ids
    assert bounded.finish_reason == whole.finish_reason
    assert bounded.prompt_ids == whole.prompt_ids and bounded.num_generations == 3
    assert bounded.prompt_index == whole.prompt_index
    for ours, theirs in zip(bounded.completion_logprobs, whole.completion_logprobs, strict=True):
        assert_close(mx.array(ours), mx.array(theirs), terms=64)
    for ours, theirs in zip(bounded.completion_entropies, whole.completion_entropies, strict=True):
        assert_close(mx.array(ours), mx.array(theirs), terms=64)
    width = max(len(c) for c in whole.completion_ids)
    for ours, theirs in zip(
        bounded.activations.block_outputs(width),
        whole.activations.block_outputs(width),
        strict=True,
    ):
        assert_close(ours, theirs, terms=64)


def test_max_rows_splits_by_whole_groups_then_by_slices():
    from mlxgrpo.generation.rollout import row_groups, sample_slices

    assert row_groups(4, 3, 0) == [range(0, 4)]
    assert row_groups(4, 3, 7) == [range(0, 2), range(2, 4)]
    assert row_groups(5, 3, 6) == [range(0, 2), range(2, 4), range(4, 5)]
    assert row_groups(2, 8, 4) == [range(0, 1), range(1, 2)]
    assert sample_slices(8, 4) == [range(0, 4), range(4, 8)]
    assert sample_slices(8, 3) == [range(0, 2), range(2, 5), range(5, 8)]
    assert sample_slices(8, 8) == sample_slices(8, 0) == [range(8)]
    assert sample_slices(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
