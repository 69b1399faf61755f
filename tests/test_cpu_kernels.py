"""CPU kernels (mlxgrpo.models.cpu_kernels): the same numbers as MLX's own, faster on CPU."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from tolerance import assert_close

from mlxgrpo.models import cpu_kernels
from mlxgrpo.models.finetune import prepare_trainable
from mlxgrpo.models.loading import load_model


def _silu64(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def test_exp_matches_float64():
    x = mx.array(np.linspace(-87.0, 87.0, 20001, dtype=np.float32))
    want = np.exp(np.asarray(x).astype(np.float64))
    got = np.asarray(cpu_kernels.exp(x)).astype(np.float64)
    # |x| log2(e) rounds to float32 before the power: a relative error up to ~|x| * 2^-24.
    assert np.max(np.abs(got - want) / want) < 1e-5
    assert np.max(np.abs(got - want) / want)[()] > 0  # a different route from np.exp's
    assert cpu_kernels.exp(mx.array([-mx.inf]))[0].item() == 0.0


def test_swiglu_values_and_gradients_match_float64():
    rng = np.random.default_rng(0)
    gate = np.concatenate([rng.normal(0, 4, 2000), [-100.0, -89.0, -88.0, 0.0, 88.0, 89.0, 100.0]])
    up = rng.normal(0, 1, gate.size)
    cot = rng.normal(0, 1, gate.size)
    g, u, c = (mx.array(a.astype(np.float32)) for a in (gate, up, cot))
    out, (d_gate, d_up) = mx.vjp(cpu_kernels.swiglu, [g, u], [c])
    g64, u64, c64 = (np.asarray(a).astype(np.float64) for a in (g, u, c))
    s = 1.0 / (1.0 + np.exp(-g64))
    want = _silu64(g64) * u64
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=2e-6, atol=1e-30)
    want_d_gate = c64 * u64 * (s + g64 * s * (1 - s))
    # The derivative crosses zero near gate = -1.28, where float32 cancels: an absolute bound.
    np.testing.assert_allclose(
        np.asarray(d_gate), want_d_gate, rtol=2e-6, atol=1e-7 * np.max(np.abs(want_d_gate))
    )
    np.testing.assert_allclose(np.asarray(d_up), c64 * _silu64(g64), rtol=2e-6, atol=1e-30)
    # and as close to MLX's own as MLX's own is to float64
    mlx_own = nn.silu(g) * u
    assert mx.max(mx.abs(out[0] - mlx_own)).item() <= 1e-5 * mx.max(mx.abs(mlx_own)).item()


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("value_dim", [8, 12])  # 12: MLA's value heads differ from the queries'
def test_decode_attention_matches_fused_attention(mask_kind, length, value_dim):
    batch, heads, kv_heads, keys_len, dim = 3, 6, 2, 11, 8
    k = mx.random.key(1)
    kv_shape = (batch, kv_heads, keys_len, dim)
    shapes = [(batch, heads, length, dim), kv_shape, (batch, kv_heads, keys_len, value_dim)]
    q, kk, v = (
        mx.random.normal(shape, key=key)
        for shape, key in zip(shapes, mx.random.split(k, 3), strict=True)
    )
    left_padding = mx.array([0, 2, 5])
    columns = mx.arange(keys_len)
    visible = (left_padding[:, None, None, None] <= columns) & (
        mx.arange(keys_len - length, keys_len)[:, None] >= columns
    )  # [B, 1, L, S]: left padding and causal
    mask = {
        "none": None,
        "bool": visible,
        "additive": mx.where(visible, 0.0, -1e9),
        "per_head": mx.broadcast_to(visible, (batch, heads, length, keys_len)),
    }[mask_kind]
    want = mx.fast.scaled_dot_product_attention(q, kk, v, scale=dim**-0.5, mask=mask)
    got = cpu_kernels.decode_attention(q, kk, v, dim**-0.5, mask)
    assert got.shape == want.shape
    assert_close(got, want, terms=keys_len)  # the softmax and the weighted sum run over keys


@pytest.mark.parametrize(
    "mask_kind", ["none", "causal", "causal_offset", "bool", "additive", "per_head", "square"]
)
@pytest.mark.parametrize("value_dim", [8, 12])  # 12: MLA's value heads differ from the queries'
def test_sequence_attention_matches_fused_attention_and_its_gradient(mask_kind, value_dim):
    """Values and gradients (queries, keys, values) of the many-query kernel against MLX's
    fused attention, for every mask form the router sends it."""
    batch, heads, kv_heads, length, dim = 3, 6, 2, 5, 8
    keys_len = length if mask_kind in ("causal", "square") else 9
    kv_shape = (batch, kv_heads, keys_len, dim)
    v_shape = (batch, kv_heads, keys_len, value_dim)
    shapes = [(batch, heads, length, dim), kv_shape, v_shape, (batch, heads, length, value_dim)]
    q, kk, v, cot = (
        mx.random.normal(shape, key=key)
        for shape, key in zip(shapes, mx.random.split(mx.random.key(3), 4), strict=True)
    )
    columns = mx.arange(keys_len)
    prompt = mx.array([2, 4, 1])[:, None, None, None]  # each row's own prefix, then causal
    visible = (columns < prompt) | (
        (columns >= 4) & (mx.arange(length)[:, None] + keys_len - length >= columns)
    )
    mask = {
        "none": None,
        "causal": "causal",
        "causal_offset": "causal",
        "bool": visible,
        "additive": mx.where(visible, 0.0, -1e9),
        "per_head": mx.broadcast_to(visible, (batch, heads, length, keys_len)),
        "square": mx.tril(mx.ones((length, keys_len), dtype=mx.bool_)),
    }[mask_kind]
    scale = dim**-0.5

    def loss(attention):
        return lambda q, k, v: mx.sum(attention(q, k, v) * cot)

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def ours(q, k, v):
        return cpu_kernels.sequence_attention(q, k, v, scale, mask)

    want = fused(q, kk, v)
    got = ours(q, kk, v)
    assert got.shape == want.shape
    assert_close(got, want, terms=keys_len)  # the softmax and the weighted sum run over keys
    want_grads = mx.grad(loss(fused), argnums=(0, 1, 2))(q, kk, v)
    got_grads = mx.grad(loss(ours), argnums=(0, 1, 2))(q, kk, v)
    # d(queries) sums over keys; d(keys) and d(values) over the queries of each kv head's group.
    terms = max(keys_len, length * heads // kv_heads)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        assert g.shape == w.shape, name
        assert_close(g, w, terms=terms, what=name)


def test_attention_router_sends_cpu_attention_to_the_kernels(monkeypatch):
    calls = []

    def original(queries, keys, values, cache, scale, mask, sinks=None):
        calls.append(queries.shape[2])
        return queries

    route = cpu_kernels._attention_router(original)
    monkeypatch.setattr(cpu_kernels, "decode_attention", lambda *a: "decode")
    monkeypatch.setattr(cpu_kernels, "sequence_attention", lambda *a: "sequence")
    q1, q4 = mx.zeros((1, 4, 1, 8)), mx.zeros((1, 4, 4, 8))
    kv = mx.zeros((1, 2, 6, 8))
    assert route(q1, kv, kv, cache=None, scale=1.0, mask=None) == "decode"
    assert route(q4, kv, kv, cache=None, scale=1.0, mask="causal") == "sequence"
    assert route(q4, kv, kv, cache=None, scale=1.0, mask=mx.ones((1, 1, 4, 6))) == "sequence"
    # Sinks, a 3-d mask and a quantized cache take MLX's own path.
    assert route(q1, kv, kv, cache=None, scale=1.0, mask=None, sinks=mx.zeros((4,))) is q1
    assert route(q4, kv, kv, cache=None, scale=1.0, mask=mx.ones((4, 4, 6))) is q4
    quantized = type("Quantized", (), {"bits": 4})()
    assert route(q4, kv, kv, cache=quantized, scale=1.0, mask="causal") is q4
    assert calls == [1, 4, 4]


def _tiny(with_kernels: bool):
    """builtin:tiny-qwen2 with LoRA on every block (B non-zero, so the adapters count)."""
    from mlx.utils import tree_map_with_path

    from mlxgrpo.config import resolve_config

    model, _ = load_model("builtin:tiny-qwen2")
    if not with_kernels:  # back to the plain mlx-lm classes
        for _, module in model.named_modules():
            if type(module).__name__.startswith("Cpu"):
                module.__class__ = type(module).__bases__[0]
    cfg = resolve_config((), ["finetune.lora_layers=-1"], environ={}).config
    prepare_trainable(model, cfg.finetune)
    model.update(
        tree_map_with_path(
            lambda path, v: (
                mx.random.normal(v.shape, key=mx.random.key(len(path))) * 0.05
                if path.endswith("lora_b")
                else v
            ),
            model.trainable_parameters(),
        )
    )
    return model


def test_loaded_models_use_the_kernels_and_switching_twice_changes_nothing():
    model, _ = load_model("builtin:tiny-qwen2")
    names = {type(m).__name__ for _, m in model.named_modules()}
    assert {"CpuMLP", "CpuAttention"} <= names
    assert cpu_kernels.use_cpu_kernels(model) == 0


def test_model_with_kernels_gives_the_plain_models_numbers():
    fast, plain = _tiny(True), _tiny(False)
    plain.update(fast.parameters())  # the same weights and adapters in both
    plain_classes = {type(m).__name__ for _, m in plain.named_modules()}
    assert plain_classes.isdisjoint({"CpuMLP", "CpuAttention"})
    tokens = mx.array([[5, 9, 17, 3, 22, 8, 1, 30], [2, 4, 6, 8, 10, 12, 14, 16]])
    terms = 128  # the longest sum in the tiny model: its intermediate size
    assert_close(fast(tokens), plain(tokens), terms=terms, what="logits")

    def loss(model):
        return nn.value_and_grad(model, lambda *_: (model(tokens) ** 2).mean())()

    (lf, gf), (lp, gp) = loss(fast), loss(plain)
    logits = fast(tokens).size  # the loss is a mean over every logit
    assert_close(lf.item(), lp.item(), terms=logits, what="loss")
    flat_f, flat_p = dict(tree_flatten(gf)), dict(tree_flatten(gp))
    assert flat_f.keys() == flat_p.keys() and flat_f
    for key in flat_f:
        assert_close(flat_f[key], flat_p[key], terms=terms, what=key)

    # cached decoding: the prompt, then one token at a time through decode_attention
    caches = [make_prompt_cache(m) for m in (fast, plain)]
    for m, c in zip((fast, plain), caches, strict=True):
        m(tokens[:, :5], cache=c)
    for step in range(5, 8):
        a = fast(tokens[:, step : step + 1], cache=caches[0])
        b = plain(tokens[:, step : step + 1], cache=caches[1])
        assert_close(a, b, terms=terms, what=f"step {step}")


@pytest.mark.parametrize("bias_heads", [1, 6])
def test_an_additive_mask_is_an_input_with_its_gradient(bias_heads):
    """MLA (DeepSeek-V2/V3) passes its positional scores as the additive mask: they depend on
    the weights, so the kernel must differentiate them like the rest."""
    batch, heads, kv_heads, length, keys_len, dim, value_dim = 2, 6, 2, 5, 7, 8, 4
    shapes = [
        (batch, heads, length, dim),
        (batch, kv_heads, keys_len, dim),
        (batch, kv_heads, keys_len, value_dim),
        (batch, bias_heads, length, keys_len),
        (batch, heads, length, value_dim),
    ]
    q, kk, v, bias, cot = (
        mx.random.normal(shape, key=key)
        for shape, key in zip(shapes, mx.random.split(mx.random.key(8), 5), strict=True)
    )
    scale = dim**-0.5

    def plain(q, k, v, b):
        k = mx.repeat(k, heads // kv_heads, axis=1)
        v = mx.repeat(v, heads // kv_heads, axis=1)
        return mx.softmax((q * scale) @ k.swapaxes(-1, -2) + b, axis=-1) @ v

    def ours(q, k, v, b):
        return cpu_kernels.sequence_attention(q, k, v, scale, b)

    def loss(attention):
        return lambda *args: mx.sum(attention(*args) * cot)

    assert_close(ours(q, kk, v, bias), plain(q, kk, v, bias), terms=keys_len)
    want = mx.grad(loss(plain), argnums=(0, 1, 2, 3))(q, kk, v, bias)
    got = mx.grad(loss(ours), argnums=(0, 1, 2, 3))(q, kk, v, bias)
    terms = max(keys_len, length * heads)
    for name, g, w in zip(["q", "k", "v", "bias"], got, want, strict=True):
        assert g.shape == w.shape, name
        assert_close(g, w, terms=terms, what=name)
