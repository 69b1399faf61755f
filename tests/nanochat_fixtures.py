"""Test-side helpers: write nanochat checkpoints in PyTorch's `.pt` format without torch.

`torch.save` pickles a state dict whose tensors reduce to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and whose
storages are persistent ids `("storage", torch.<Dtype>Storage, key, location, numel)`; the
storages' bytes go into `<archive>/data/<key>` of a zip. Stand-in `torch` / `torch._utils`
modules are put into `sys.modules` only while pickling, so the pickler emits exactly the
GLOBAL opcodes torch would.
"""

from __future__ import annotations

import collections
import json
import pickle
import sys
import types
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxgrpo.models.builtin import write_nanochat_tokenizer

STORAGE_CLASS = {
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
# A tiny GQA model: head_dim 8, 2 query heads per kv head; vocab = the tiny tokenizer's 281.
TINY_CONFIG = {
    "sequence_len": 64,
    "vocab_size": 281,
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "n_embd": 32,
}


@dataclass
class FakeStorage:
    """A torch storage: raw little-endian bytes of `numel` elements of `dtype`."""

    key: str
    dtype: str
    data: bytes
    numel: int


@dataclass
class FakeTensor:
    """A view into a storage, pickled the way torch pickles a tensor."""

    storage: FakeStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce_ex__(self, protocol: int):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        hooks = collections.OrderedDict()
        return rebuild, (self.storage, self.offset, self.shape, self.stride, False, hooks)


@contextmanager
def fake_torch_modules() -> Iterator[types.ModuleType]:
    """`torch` and `torch._utils` stand-ins (storage classes, `_rebuild_tensor_v2`)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # only its name matters: it is pickled by reference
        raise AssertionError("the stand-in rebuild function is never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in STORAGE_CLASS.values():
        setattr(torch, name, type(name, (), {"__module__": "torch", "__qualname__": name}))
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _TorchPickler(pickle.Pickler):
    def __init__(self, file, torch: types.ModuleType) -> None:
        super().__init__(file, protocol=2)  # torch.save's default protocol
        self.torch = torch

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            storage_type = getattr(self.torch, STORAGE_CLASS[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def write_pt(path: Path, state: dict, byteorder: str = "little") -> Path:
    """A zip-format `.pt` file holding `state` (values: FakeTensors), laid out as torch does."""
    storages: dict[str, FakeStorage] = {}
    for tensor in state.values():
        storages[tensor.storage.key] = tensor.storage
    with fake_torch_modules() as torch:
        buffer = _pickle_bytes(collections.OrderedDict(state), torch)
    archive = path.stem
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", buffer)
        zf.writestr(f"{archive}/byteorder", byteorder)
        for key, storage in storages.items():
            zf.writestr(f"{archive}/data/{key}", storage.data)
        zf.writestr(f"{archive}/version", "3\n")
        zf.writestr(f"{archive}/.data/serialization_id", "0123456789")
    return path


def _pickle_bytes(obj, torch: types.ModuleType) -> bytes:
    import io

    out = io.BytesIO()
    _TorchPickler(out, torch).dump(obj)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Tensors


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class StorageCounter:
    """Hands out storage keys "0", "1", ... as torch does."""

    def __init__(self) -> None:
        self.next = 0

    def key(self) -> str:
        self.next += 1
        return str(self.next - 1)


def contiguous(values: np.ndarray, keys: StorageCounter, dtype: str = "float32") -> FakeTensor:
    raw = to_bfloat16_bits(values) if dtype == "bfloat16" else values.astype(dtype)
    raw = np.array(raw, dtype=raw.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    storage = FakeStorage(keys.key(), dtype, raw.tobytes(), raw.size)
    strides = tuple(s // raw.itemsize for s in raw.strides)
    return FakeTensor(storage, 0, tuple(raw.shape), strides)


def transposed_view(values: np.ndarray, keys: StorageCounter) -> FakeTensor:
    """`values` (2-D) stored as its transpose, read through strides (1, rows)."""
    stored = contiguous(np.ascontiguousarray(values.T), keys)
    rows = values.shape[0]
    return FakeTensor(stored.storage, 0, tuple(values.shape), (1, rows))


def shared_views(parts: list[np.ndarray], keys: StorageCounter) -> list[FakeTensor]:
    """Several tensors packed one after another into a single storage (offset views)."""
    flat = np.concatenate([p.astype(np.float32).ravel() for p in parts])
    storage = contiguous(flat, keys).storage
    views, offset = [], 0
    for part in parts:
        stride = tuple(s // 4 for s in np.ascontiguousarray(part, dtype=np.float32).strides)
        views.append(FakeTensor(storage, offset, tuple(part.shape), stride))
        offset += part.size
    return views


# ---------------------------------------------------------------------------------------------
# nanochat checkpoints


def nanochat_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights of nanochat's GPT (float32; wte already rounded to bfloat16 values)."""
    rng = np.random.default_rng(seed)
    embd, vocab = config["n_embd"], config["vocab_size"]
    head_dim = embd // config["n_head"]
    kv = config["n_kv_head"] * head_dim

    def linear(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * gain / np.sqrt(in_dim)).astype(np.float32)

    wte = rng.standard_normal((vocab, embd)).astype(np.float32)
    weights = {"transformer.wte.weight": from_bfloat16_bits(to_bfloat16_bits(wte))}
    for i in range(config["n_layer"]):
        block = f"transformer.h.{i}"
        weights[f"{block}.attn.c_q.weight"] = linear(embd, embd)
        weights[f"{block}.attn.c_k.weight"] = linear(kv, embd)
        weights[f"{block}.attn.c_v.weight"] = linear(kv, embd)
        weights[f"{block}.attn.c_proj.weight"] = linear(embd, embd)
        weights[f"{block}.mlp.c_fc.weight"] = linear(4 * embd, embd)
        weights[f"{block}.mlp.c_proj.weight"] = linear(embd, 4 * embd)
    weights["lm_head.weight"] = linear(vocab, embd, gain=4.0)
    return weights


def nanochat_state(weights: dict[str, np.ndarray], prefix: str = "_orig_mod.") -> dict:
    """FakeTensors for `weights` as a compiled nanochat saves them: `_orig_mod.` keys, wte in
    bfloat16, one transposed (strided) matrix, layer 0's c_k / c_v sharing one storage."""
    keys = StorageCounter()
    state = {}
    shared = shared_views(
        [weights["transformer.h.0.attn.c_k.weight"], weights["transformer.h.0.attn.c_v.weight"]],
        keys,
    )
    for name, values in weights.items():
        if name == "transformer.wte.weight":
            tensor = contiguous(values, keys, dtype="bfloat16")
        elif name == "transformer.h.0.attn.c_k.weight":
            tensor = shared[0]
        elif name == "transformer.h.0.attn.c_v.weight":
            tensor = shared[1]
        elif name == "transformer.h.1.mlp.c_fc.weight":
            tensor = transposed_view(values, keys)
        else:
            tensor = contiguous(values, keys)
        state[prefix + name] = tensor
    return state


def step_seed(step: int) -> int:
    return zlib.crc32(f"nanochat-step-{step}".encode())


def write_nanochat_checkpoint(
    base: Path,
    steps: tuple[int, ...] = (3, 5),
    config: dict | None = None,
    phase: str = "chatsft_checkpoints",
    tag: str = "d2",
    with_tokenizer: bool = True,
) -> Path:
    """nanochat's layout: `base/<phase>/<tag>/model_<step:06d>.pt` + meta json per step, and
    `base/tokenizer/tokenizer.pkl`. Returns the checkpoint directory."""
    config = dict(config or TINY_CONFIG)
    checkpoint_dir = base / phase / tag
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        weights = nanochat_weights(config, step_seed(step))
        write_pt(checkpoint_dir / f"model_{step:06d}.pt", nanochat_state(weights))
        meta = {"step": step, "val_bpb": 1.0, "model_config": config, "user_config": {}}
        (checkpoint_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    if with_tokenizer:
        write_nanochat_tokenizer(base / "tokenizer")
    return checkpoint_dir
