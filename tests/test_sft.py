"""Supervised fine-tuning (algorithm.type = "sft"): which tokens a demonstration trains, the
loss against float64, the memory paths' gradients, and a run that lowers its loss."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from loss_checks import bare_context
from mlx.utils import tree_flatten
from random_models import add_random_adapters, random_lm
from tolerance import assert_close

from mlxgrpo.config import ConfigProblems, resolve_config
from mlxgrpo.data import Demonstration, EncodedDemonstration, Example, encode_demonstration
from mlxgrpo.data.demonstration import rows_to_demonstrations
from mlxgrpo.data.loading import load_demonstrations
from mlxgrpo.engine.loop.context import UpdateContext
from mlxgrpo.engine.loop.sft_update import (
    demonstration_logprobs,
    packing_capacity,
    padded_batch,
    rows_of,
    sft_update,
    validation_loss,
)
from mlxgrpo.engine.loop.trainer import train
from mlxgrpo.engine.loss.sft import sft_loss
from mlxgrpo.engine.memory.packing import pack, packing_blocker
from mlxgrpo.errors import ConfigError

VOCAB = 48
TERMS = 64  # the longest sum in random_lm's models: the MLP's 2 x hidden 32
EOS = 2

# --- which tokens train -----------------------------------------------------------------------


# A toy chat template, one token per character of "<role>:<content>|" with a generation prompt
# "assistant:"; "|" (id of "|") ends a turn. Enough to tell spans apart by hand.
def _render(messages, generation):
    text = "".join(f"{m['role'][0]}:{m['content']}|" for m in messages)
    return [ord(ch) for ch in text + ("a:" if generation else "")]


def _encode(demo, **options):
    settings = {"train_on_prompt": False, "max_length": 100, **options}
    return encode_demonstration(
        demo,
        render=_render,
        encode_text=lambda text: [ord(ch) for ch in text],
        eos_ids={ord("|"), EOS},
        eos_id=EOS,
        **settings,
    )


def _trained_text(encoded: EncodedDemonstration) -> str:
    pairs = zip(encoded.ids, encoded.targets, strict=True)
    return "".join(chr(i) if i != EOS else "<eos>" for i, t in pairs if t)


def test_only_the_assistant_turns_train():
    demo = Demonstration(
        (
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "ok"},
        )
    )
    encoded = _encode(demo)
    assert "".join(map(chr, encoded.ids)) == "s:be brief|u:hi|a:yo|u:and?|a:ok|"
    # Each assistant turn from after its generation prompt to its end-of-turn marker.
    assert _trained_text(encoded) == "yo|ok|"
    assert encoded.trained == 6 and not encoded.truncated
    every = _encode(demo, train_on_prompt=True)
    assert every.ids == encoded.ids and all(every.targets)


def test_text_trains_whole_and_learns_to_stop():
    encoded = _encode(Demonstration(text="abc"))
    assert encoded.ids == [97, 98, 99, EOS] and encoded.targets == [1, 1, 1, 1]
    assert encoded.trained == 3  # the first token is never predicted
    cut = _encode(Demonstration(text="abcdef"), max_length=4)
    assert cut.ids == [97, 98, 99, 100] and cut.truncated


def test_a_template_that_rewrites_earlier_turns_is_refused():
    def forgetful(messages, generation):  # drops earlier assistant turns, as some templates do
        last = len(messages) - 1
        kept = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == last]
        return _render(kept, generation)

    demo = Demonstration(
        (
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        )
    )
    with pytest.raises(ConfigError, match="renders the conversation before turn 1 differently"):
        encode_demonstration(
            demo,
            render=forgetful,
            encode_text=list,
            eos_ids={EOS},
            eos_id=EOS,
            train_on_prompt=False,
            max_length=100,
        )


def test_rows_become_demonstrations_in_the_form_their_columns_give():
    from datasets import Dataset

    chats = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    )
    [chat] = rows_to_demonstrations(chats, "chats", "question", "completion", None)
    assert chat.messages[-1] == {"role": "assistant", "content": "a"}
    pairs = Dataset.from_list([{"question": "2+2?", "completion": "4"}])
    [pair] = rows_to_demonstrations(pairs, "pairs", "question", "completion", "sys")
    assert [m["role"] for m in pair.messages] == ["system", "user", "assistant"]
    texts = Dataset.from_list([{"text": "hello"}])
    assert rows_to_demonstrations(texts, "texts", "question", "completion", None)[0].text
    with pytest.raises(ConfigError, match="has no demonstrations: it needs a 'messages'"):
        rows_to_demonstrations(Dataset.from_list([{"q": "x"}]), "odd", "question", "c", None)
    no_answer = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ConfigError, match="with an assistant turn"):
        rows_to_demonstrations(no_answer, "chats", "question", "completion", None)


def test_synthetic_tasks_write_their_demonstrations():
    [demo] = load_demonstrations("synthetic:repeat?n=1&letters=q", system_prompt=None)
    assert demo.messages[-1] == {"role": "assistant", "content": "q" * 8}
    [sum_demo] = load_demonstrations("synthetic:arithmetic?n=1", system_prompt="S")
    answer = sum_demo.messages[-1]["content"]
    assert answer.startswith("<reasoning>\n") and answer.endswith("</answer>")
    with pytest.raises(ConfigError, match="has no demonstrations to train on"):
        load_demonstrations("synthetic:arithmetic?n=1&tool=calculator", system_prompt=None)


def test_the_builtin_chat_template_trains_the_answer_and_its_end_of_turn():
    from mlxgrpo.models.loading import load_model
    from mlxgrpo.task import demonstration_encoder, text_codec

    _, tokenizer = load_model("builtin:tiny-qwen2")
    cfg = resolve_config((), ["algorithm.type=sft"], environ={}).config
    codec = text_codec(tokenizer, cfg)
    encode = demonstration_encoder(tokenizer, cfg, codec)
    demo = Demonstration.of_example(Example("Repeat x:"), "xxxx", system_prompt=None)
    encoded = encode(demo)
    trained = [i for i, t in zip(encoded.ids, encoded.targets, strict=True) if t]
    assert tokenizer.decode(trained) == "xxxx<|im_end|>\n"
    assert any(i in codec.eos_ids for i in trained)  # the template's own end: no extra EOS


# --- the loss ---------------------------------------------------------------------------------


def test_sft_loss_is_the_mean_nll_over_the_update_in_float64():
    rng = np.random.default_rng(0)
    logp = -rng.random((2, 5)) * 3
    targets = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=np.float64)
    update_tokens = 5 + 4  # another micro-batch of the update holds 4 more
    loss, metrics = sft_loss(mx.array(logp, dtype=mx.float32), mx.array(targets), update_tokens)
    expected = -(logp * targets).sum() / update_tokens
    assert_close(loss.item(), expected, terms=5, what="loss")
    assert_close(metrics["nll_sum"].item(), -(logp * targets).sum(), terms=5, what="nll")
    with pytest.raises(ValueError):
        sft_loss(mx.zeros((2, 5)), mx.zeros((2, 4)), 3)


def _model() -> nn.Module:
    model = random_lm("qwen2", seed=7, vocab=VOCAB)
    add_random_adapters(model, seed=9, b_std=0.1)
    mx.eval(model.parameters())
    return model


def _demos() -> list[EncodedDemonstration]:
    rng = np.random.default_rng(1)
    out = []
    for length, prompt in ((9, 4), (6, 2), (12, 7), (5, 1)):
        ids = rng.integers(3, VOCAB, length).tolist()
        out.append(EncodedDemonstration(ids, [0] * prompt + [1] * (length - prompt)))
    return out


def _float64_logprobs(model: nn.Module, demo: EncodedDemonstration) -> np.ndarray:
    """log p(token t | tokens < t) of one unpadded demonstration, softmax in float64."""
    return _float64_reference(model, demo)[0]


def _float64_reference(model: nn.Module, demo: EncodedDemonstration):
    """(log-probs, whether each target is the argmax) of one unpadded demonstration."""
    logits = np.asarray(model(mx.array([demo.ids])[:, :-1]).astype(mx.float32), dtype=np.float64)
    logits = logits[0] - logits[0].max(axis=-1, keepdims=True)
    logsm = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    positions = np.arange(len(demo.ids) - 1)
    return logsm[positions, demo.ids[1:]], logits.argmax(axis=-1) == np.asarray(demo.ids[1:])


@pytest.mark.parametrize("chunk", [3, None], ids=["head-in-chunks", "head-tiled"])
def test_padded_log_probs_equal_each_demonstration_alone(chunk):
    """Right-padding and the tiled head on target positions only: every target's log-prob is
    that of the demonstration run alone (float64 softmax), and its top-token flag that
    logit's argmax; non-targets are 0."""
    model, demos = _model(), _demos()
    tokens, targets, _ = padded_batch(rows_of(demos, None), pad_id=0)
    logp, top = map(np.asarray, demonstration_logprobs(model, tokens, targets, chunk))
    for row, demo in enumerate(demos):
        alone, argmax = _float64_reference(model, demo)
        mask = np.asarray(demo.targets[1:], dtype=bool)
        assert_close(logp[row, : len(alone)][mask], alone[mask], terms=TERMS, what=f"row {row}")
        assert not logp[row, : len(alone)][~mask].any() and not logp[row, len(alone) :].any()
        assert top[row, : len(alone)][mask].tolist() == argmax[mask].astype(float).tolist()
        assert not top[row, : len(alone)][~mask].any()


def test_token_accuracy_counts_the_targets_the_model_ranks_first():
    """Held-out accuracy is the share of targets that are the float64 argmax; a
    demonstration of the model's own greedy continuation scores exactly 1."""
    model, demos = _model(), _demos()
    figures = validation_loss(model, demos, pad_id=0, batch_size=4)
    expected = np.concatenate(
        [_float64_reference(model, d)[1][np.asarray(d.targets[1:], dtype=bool)] for d in demos]
    )
    assert figures["token_accuracy"] == pytest.approx(expected.mean(), abs=1e-9)
    ids = demos[0].ids[:4]
    for _ in range(6):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    greedy = EncodedDemonstration(ids, [0] * 4 + [1] * 6)
    assert validation_loss(model, [greedy], pad_id=0, batch_size=1)["token_accuracy"] == 1.0


def test_packing_fills_rows_longest_first():
    assert pack([5, 9, 3, 4, 2], 10) == [[1], [0, 3], [2, 4]]
    assert pack([12, 3], 10) == [[0], [1]]  # too long for a row: a row of its own


def test_packed_log_probs_equal_each_demonstration_alone():
    """Three rows of packed demonstrations: no token sees another demonstration's, so every
    target's log-prob is that of its demonstration run alone (float64 softmax), and a packed
    demonstration's first token does not train."""
    model, demos = _model(), _demos()
    rows = rows_of(demos, capacity=16)
    assert sorted(len(r.ids) for r in rows) == [5, 12, 15]  # [12], [9, 6] and [5]
    tokens, targets, segments = padded_batch(rows, pad_id=0)
    logp = np.asarray(demonstration_logprobs(model, tokens, targets, 3, segments)[0])
    got = {}
    for row, r in enumerate(rows):
        starts = [t for t in range(len(r.ids)) if t == 0 or r.segments[t] != r.segments[t - 1]]
        for begin in starts:
            length = r.segments.count(r.segments[begin])
            got[tuple(r.ids[begin : begin + length])] = (row, begin, length)
            assert r.targets[begin] == 0
    for demo in demos:
        row, begin, length = got[tuple(demo.ids)]
        alone = _float64_logprobs(model, demo)
        mask = np.asarray(demo.targets[1:], dtype=bool)
        packed = logp[row, begin : begin + length - 1]
        assert_close(packed[mask], alone[mask], terms=TERMS, what=f"demo at row {row}")


def test_models_that_cannot_pack_say_why():
    from mlx_lm.models import gpt2

    assert packing_blocker(_model(), _model().model) is None
    args = gpt2.ModelArgs("gpt2", 64, 32, 4, 2, 64, 1e-5, VOCAB)
    absolute = gpt2.Model(args)
    mx.eval(absolute.parameters())
    assert "absolute position" in packing_blocker(absolute, absolute.model)
    assert "trunk cannot run alone" in packing_blocker(absolute, None)


def _context(model: nn.Module, *sets: str) -> UpdateContext:
    return bare_context(model, ["algorithm.type=sft", *sets])


@pytest.mark.parametrize(
    "sets",
    [
        ("finetune.grad_checkpoint=false", "optim.gradient_accumulation_steps=1"),
        ("finetune.grad_checkpoint=true", "optim.gradient_accumulation_steps=2"),
        ("finetune.lm_head_chunk=2", "optim.max_tokens_per_microbatch=20"),
        ("sft.packing=true", "sft.max_length=16", "optim.gradient_accumulation_steps=2"),
    ],
    ids=["plain", "checkpointed-2-micro-batches", "chunked-head-token-packed", "packed"],
)
def test_one_update_takes_the_float64_mean_nll_step(sets):
    """With SGD at learning rate 1, the step is the gradient of the update's mean NLL: equal
    to a plain autodiff of the float64-checked loss whatever the memory paths and split."""
    demos = _demos()
    reference, model = _model(), _model()
    expected_nll = np.concatenate(
        [-_float64_logprobs(reference, d)[np.asarray(d.targets[1:], dtype=bool)] for d in demos]
    )

    def plain_loss():
        total = sum(
            -mx.sum(
                demonstration_logprobs(reference, *padded_batch(rows_of([d], None), 0)[:2])[0]
                * mx.array([d.targets[1:]], dtype=mx.float32)
            )
            for d in demos
        )
        return total / len(expected_nll)

    before = dict(tree_flatten(reference.trainable_parameters()))
    grads = dict(tree_flatten(nn.value_and_grad(reference, plain_loss)()[1]))
    ctx = _context(model, *sets, "optim.max_grad_norm=0")
    capacity = packing_capacity(
        model, resolve_config((), ["algorithm.type=sft", *sets], environ={}).config.sft
    )
    result = sft_update(ctx, demos, seed=0, lr=1.0, capacity=capacity)
    assert result.metrics["rows"] == (3 if capacity else 4)
    assert_close(result.metrics["loss"], expected_nll.mean(), terms=TERMS, what="loss")
    assert result.metrics["target_tokens"] == len(expected_nll)
    after = dict(tree_flatten(model.trainable_parameters()))
    scale = max(float(mx.max(mx.abs(g))) for g in grads.values())
    for name, grad in grads.items():
        step = before[name] - after[name]
        assert_close(step, grad, terms=TERMS, scale=scale, what=name)


def test_validation_loss_is_the_mean_nll_and_its_perplexity():
    model, demos = _model(), _demos()
    nll = np.concatenate(
        [-_float64_logprobs(model, d)[np.asarray(d.targets[1:], dtype=bool)] for d in demos]
    )
    figures = validation_loss(model, demos, pad_id=0, batch_size=3)
    assert figures["target_tokens"] == len(nll)
    assert_close(figures["loss"], nll.mean(), terms=TERMS, what="loss")
    assert_close(np.log(figures["perplexity"]), nll.mean(), terms=TERMS, what="perplexity")


# --- a run ------------------------------------------------------------------------------------

SFT_RUN = [
    "algorithm.type=sft",
    "model.path=builtin:tiny-qwen2",
    "data.dataset=synthetic:repeat?letters=xyz",
    "finetune.lora_layers=-1",
    "optim.learning_rate=1e-2",
    "optim.lr_scheduler_type=constant",
    "optim.warmup_ratio=0",
    "optim.batch_size=4",
    "optim.gradient_accumulation_steps=2",
    "eval.every_updates=10",
    "eval.samples=8",
    "checkpoint.save_steps=0",
    "run.resume=never",
]


def test_sft_run_lowers_its_loss_and_reports_held_out_loss(tmp_path):
    resolved = resolve_config(
        (),
        [*SFT_RUN, "run.max_steps=20", f"run.output_dir={tmp_path}", "run.run_name=r"],
        environ={},
    )
    summary = train(resolved)
    assert summary["headline"] == "loss" and summary["updates"] == 20
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(losses) == 20 and sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert [r["update"] for r in evals] == [10, 20] and evals[1]["loss"] < evals[0]["loss"]
    assert (tmp_path / "r" / "final" / "adapters.safetensors").is_file()


def test_settings_of_the_other_kind_of_training_are_refused():
    with pytest.raises(ConfigProblems) as exc:
        resolve_config((), ["sft.train_on_prompt=true"], environ={})
    assert any(
        p.startswith("sft.train_on_prompt is read by algorithm.type = sft or mix only")
        for p in exc.value.problems
    )
    with pytest.raises(ConfigProblems) as exc:
        resolve_config((), ["algorithm.type=sft", "rollout.num_generations=4"], environ={})
    assert any(
        p.startswith("rollout.num_generations is read by algorithm.type = grpo or mix only")
        for p in exc.value.problems
    )


def test_a_stopped_sft_run_resumes_to_the_same_weights(tmp_path):
    def run(name: str, *sets: str, should_stop=lambda: False):
        resolved = resolve_config(
            (),
            [
                *SFT_RUN,
                "run.max_steps=6",
                f"run.output_dir={tmp_path}",
                f"run.run_name={name}",
                *sets,
            ],
            environ={},
        )
        return train(resolved, should_stop=should_stop)

    run("whole")
    calls = {"n": 0}

    def after_three() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    stopped = run("split", should_stop=after_three)
    assert stopped["interrupted"] and stopped["updates"] == 3
    resumed = run("split", "run.resume=auto")
    assert resumed["updates"] == 6
    whole = mx.load(str(tmp_path / "whole" / "final" / "adapters.safetensors"))
    split = mx.load(str(tmp_path / "split" / "final" / "adapters.safetensors"))
    assert whole.keys() == split.keys()
    assert all(mx.array_equal(whole[k], split[k]).item() for k in whole)


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_sft_trains_dora_and_full_weights(tmp_path, kind):
    """The same SFT run with DoRA adapters, and with every weight trained: the trained weights
    move, and final/ holds what that kind of training leaves (adapters, or a whole model)."""
    resolved = resolve_config(
        (),
        [
            *SFT_RUN,
            f"finetune.type={kind}",
            "run.max_steps=3",
            "eval.every_updates=0",
            "optim.learning_rate=1e-3",
            f"run.output_dir={tmp_path}",
            "run.run_name=r",
        ],
        environ={},
    )
    summary = train(resolved)
    assert summary["updates"] == 3 and summary["last_loss"] < summary["first_loss"] * 2
    final = tmp_path / "r" / "final"
    if kind == "full":
        from mlxgrpo.models.loading import load_model

        trained, _ = load_model(str(final))
        base, _ = load_model("builtin:tiny-qwen2")
        moved = [
            k
            for k, v in tree_flatten(trained.parameters())
            if not mx.array_equal(v, dict(tree_flatten(base.parameters()))[k]).item()
        ]
        assert len(moved) > 10  # every block's matrices, not a few stray ones
    else:
        adapters = mx.load(str(final / "adapters.safetensors"))
        assert any(".m" in k for k in adapters)  # DoRA's magnitudes
        assert all(bool(mx.isfinite(v).all()) for v in adapters.values())
