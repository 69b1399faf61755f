"""Read PyTorch `.pt` state dicts without torch (and without running the pickle's code).

`torch.save` (PyTorch >= 1.6) writes a zip archive: `<archive>/data.pkl` is a pickle of the
state dict whose tensors point at raw storages `<archive>/data/<key>` through persistent ids,
`<archive>/byteorder` says how those bytes are laid out. The pickle is read with an unpickler
that admits only the handful of globals a state dict needs (`torch._utils._rebuild_tensor_v2`,
the `torch.*Storage` type names, `collections.OrderedDict`, ...) and substitutes harmless
stand-ins for them, so a file that references anything else is refused before any of its code
can run. torch itself is never imported.
"""

from __future__ import annotations

import collections
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxgrpo.errors import ConfigError, MlxgrpoError
from mlxgrpo.models.safe_pickle import AllowListUnpickler

if TYPE_CHECKING:
    import mlx.core as mx

# Legacy storage class names (what torch.save pickles) and torch dtype names → our dtype names.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}
# numpy layout of each dtype's bytes; bfloat16 is read as raw uint16 and reinterpreted in MLX.
_NUMPY_DTYPES = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}

_STATE_DICT_HINT = (
    "only plain state dicts (torch.save(model.state_dict(), path)) can be read without torch"
)


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.*Storage` class or a torch dtype named in the pickle."""

    dtype: str


@dataclass(frozen=True)
class _TensorType:
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` (only as rebuild targets)."""

    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's values live: a storage, an element offset, a shape and element strides."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) for v in value):
        raise MlxgrpoError(f"malformed tensor record: {what} is {value!r}", hint=_STATE_DICT_HINT)
    return tuple(int(v) for v in value)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    if not isinstance(storage, _StorageRef) or not isinstance(storage_offset, int):
        raise MlxgrpoError("malformed tensor record in the checkpoint", hint=_STATE_DICT_HINT)
    shape = _as_int_tuple(size, "size")
    strides = _as_int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise MlxgrpoError(
            f"malformed tensor record: shape {shape} with strides {strides}",
            hint=_STATE_DICT_HINT,
        )
    return TensorRef(storage, int(storage_offset), shape, strides)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensors with Python state or subclasses go through here; only plain types are accepted.
    if not isinstance(new_type, _TensorType) or func not in _REBUILDERS or state:
        raise MlxgrpoError("the checkpoint holds a tensor subclass", hint=_STATE_DICT_HINT)
    return func(*args)


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_parameter_with_state)

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch._tensor", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _StorageType(dtype) for name, dtype in _TORCH_DTYPES.items()},
}


class _StateDictUnpickler(AllowListUnpickler):
    """Unpickler that knows only the globals a state dict uses; anything else is refused."""

    allowed = _ALLOWED_GLOBALS
    needed_by = "a PyTorch state dict"
    hint = _STATE_DICT_HINT

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed and module == "torch" and name.endswith("Storage"):
            raise MlxgrpoError(
                f"'{self._source}' holds tensors of type torch.{name}, which cannot be read",
                hint=f"supported: {', '.join(sorted(_STORAGE_DTYPES))}",
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise MlxgrpoError(
                f"'{self._source}' has an unknown persistent record {pid!r:.80}",
                hint=_STATE_DICT_HINT,
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise MlxgrpoError(f"'{self._source}' has a malformed storage record {pid!r:.80}")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _open_archive(path: Path) -> tuple[zipfile.ZipFile, str]:
    """The zip and the prefix (`<archive>/`) of its records, or a clear error for other files."""
    if not path.is_file():
        raise ConfigError(f"checkpoint file '{path}' not found")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(1)
        if head == b"\x80" or tarfile.is_tarfile(path):
            raise MlxgrpoError(
                f"'{path}' is in PyTorch's legacy (pre-1.6) serialization format",
                hint="re-save it with a current torch: torch.save(torch.load(p), p)",
            )
        raise MlxgrpoError(f"'{path}' is not a PyTorch checkpoint (not a zip archive)")
    archive = zipfile.ZipFile(path)
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        archive.close()
        raise MlxgrpoError(
            f"'{path}' is a zip file but not a torch.save archive (no <archive>/data.pkl)"
        )
    prefix = pickles[0][: -len("data.pkl")]
    if any(n.startswith(prefix + "code/") for n in archive.namelist()):
        archive.close()
        raise MlxgrpoError(
            f"'{path}' is a TorchScript archive, not a state dict", hint=_STATE_DICT_HINT
        )
    return archive, prefix


def _check_byteorder(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    name = prefix + "byteorder"
    if name not in archive.namelist():
        return  # written before PyTorch recorded it: always little-endian
    order = archive.read(name).decode("ascii", "replace").strip()
    if order != "little":
        raise MlxgrpoError(
            f"'{path}' stores its tensors {order}-endian; only little-endian files are supported",
            hint="re-save the checkpoint on a little-endian machine",
        )


def _unpickle(archive: zipfile.ZipFile, prefix: str, path: Path) -> Any:
    try:
        with archive.open(prefix + "data.pkl") as fh:
            return _StateDictUnpickler(fh, str(path)).load()
    except MlxgrpoError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways
        raise MlxgrpoError(f"'{path}' is damaged: cannot read its data.pkl ({err})") from err


def _read_storage(archive: zipfile.ZipFile, prefix: str, key: str, path: Path) -> bytes:
    name = f"{prefix}data/{key}"
    try:
        return archive.read(name)
    except KeyError as err:
        raise MlxgrpoError(f"'{path}' lacks storage record '{name}': the file is damaged") from err


def materialize(ref: TensorRef, raw: bytes) -> mx.array:
    """The tensor `ref` describes, read from its storage's bytes, as a contiguous mx.array."""
    import mlx.core as mx
    import numpy as np

    if ref.dtype not in _NUMPY_DTYPES:
        raise MlxgrpoError(f"unsupported tensor dtype {ref.dtype}", hint=_STATE_DICT_HINT)
    np_dtype = np.dtype(_NUMPY_DTYPES[ref.dtype])
    numel = ref.storage.numel
    if len(raw) < numel * np_dtype.itemsize:
        raise MlxgrpoError(
            f"storage '{ref.storage.key}' holds {len(raw)} bytes, "
            f"{numel * np_dtype.itemsize} expected: the checkpoint is truncated"
        )
    flat = np.frombuffer(raw, dtype=np_dtype, count=numel)
    if 0 in ref.shape:
        values = np.zeros(ref.shape, dtype=np_dtype)
    else:
        last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True))
        if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= numel:
            raise MlxgrpoError(
                f"tensor view (offset {ref.offset}, shape {ref.shape}, stride {ref.stride}) "
                f"reaches outside its storage of {numel} elements: the checkpoint is damaged"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * np_dtype.itemsize for s in ref.stride),
            writeable=False,
        )
        values = np.array(view, dtype=np_dtype.newbyteorder("="), order="C", copy=True)
    array = mx.array(values)
    return array.view(mx.bfloat16) if ref.dtype == "bfloat16" else array


def _flatten(obj: Any, prefix: str, out: dict[str, TensorRef], path: Path) -> None:
    if isinstance(obj, TensorRef):
        out[prefix] = obj
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise MlxgrpoError(f"'{path}' has a non-string key {key!r}", hint=_STATE_DICT_HINT)
            _flatten(value, f"{prefix}.{key}" if prefix else key, out, path)
        return
    raise MlxgrpoError(
        f"'{path}' holds a {type(obj).__name__} at '{prefix or '<top>'}', not a tensor",
        hint=_STATE_DICT_HINT,
    )


def load_torch_state_dict(path: str | Path) -> dict[str, mx.array]:
    """Tensors of a `torch.save`d state dict by name (nested dicts flattened with `.`).

    Dtypes are kept (bfloat16 included); views (offsets, strides, storages shared by several
    tensors) are materialized as contiguous arrays. Errors: ConfigError when the file is
    missing, MlxgrpoError when it is not a zip-format state dict or references code.
    """
    path = Path(path)
    archive, prefix = _open_archive(path)
    with archive:
        _check_byteorder(archive, prefix, path)
        refs: dict[str, TensorRef] = {}
        _flatten(_unpickle(archive, prefix, path), "", refs, path)
        # Group by storage so each storage is read once even when many tensors share it.
        by_storage: dict[str, list[str]] = {}
        for name, ref in refs.items():
            by_storage.setdefault(ref.storage.key, []).append(name)
        tensors: dict[str, mx.array] = {}
        for key, names in by_storage.items():
            raw = _read_storage(archive, prefix, key, path)
            for name in names:
                tensors[name] = materialize(refs[name], raw)
    return {name: tensors[name] for name in refs}
