"""MLX device setup: BLAS on Linux CPU, dtype policy, Metal memory limits, seeding.

mlx is imported lazily inside functions: `mlxgrpo/__init__.py` calls `preload_blas()` on every
import, and it has to run before the first `import mlx` in the process.

Why the BLAS preload: the `mlx[cpu]` wheel links a bundled reference (netlib) BLAS, which runs an
fp32 1024² matmul about 30x slower than OpenBLAS. libmlx resolves `cblas_sgemm` through the
global symbol scope first, so a system OpenBLAS loaded with RTLD_GLOBAL before libmlx is loaded
serves every BLAS call. Loading it later does not help: Python imports extension modules with
RTLD_NOW, which binds libmlx's BLAS symbols at import time (measured: 4 GFLOP/s after a late load,
185 GFLOP/s when the same late load meets lazy binding).

Without a system OpenBLAS (no root, fresh machine) the `scipy-openblas32` wheel serves instead.
Its symbols are prefixed (`scipy_cblas_sgemm`), so no preload can bind them; as soon as mlx.core
is imported, `blas_slots.rebind` points libmlx's BLAS/LAPACK import slots at them. That also
works after a late `import mlx`, so the wheel rescues the "too late" case as well.

Order: `MLXGRPO_BLAS` (`auto` default, `off`, `wheel`, or a path to a BLAS library, plain or
`scipy_`-prefixed), then a system OpenBLAS, then the wheel. `MLXGRPO_BLAS_SEARCH_SYSTEM=0` skips
the system search, as on a machine without the Debian package (used by the tests).
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mlxgrpo import blas_slots
from mlxgrpo.blas_probe import (
    UNBOUND,
    bound_blas_path,
    owner_of,
    predicted_blas_path,
    same_file,
)
from mlxgrpo.errors import ConfigError
from mlxgrpo.version import __version__

ENV_VAR = "MLXGRPO_BLAS"
SEARCH_SYSTEM_VAR = "MLXGRPO_BLAS_SEARCH_SYSTEM"
BUNDLED_NAME = "reference BLAS (bundled with mlx[cpu])"
WHEEL_LABEL = "from scipy-openblas32 (wheel, rebound)"
INSTALL_HINT = (
    "install OpenBLAS: pip install scipy-openblas32 (no root needed; `uv sync` installs it), "
    "or sudo apt-get install libopenblas0-pthread (Debian/Ubuntu) or sudo dnf install openblas "
    "(Fedora); mlxgrpo uses it automatically on the next run"
)
REBIND_FAILED_HINT = (
    "install a system OpenBLAS, which mlxgrpo preloads instead: sudo apt-get install "
    "libopenblas0-pthread (Debian/Ubuntu) or sudo dnf install openblas (Fedora)"
)
TOO_LATE_HINT = (
    "import mlxgrpo before mlx: OpenBLAS has to be loaded before the first `import mlx` "
    "in the process"
)
REPORTED_PACKAGES = ("mlx", "mlx-lm", "transformers", "datasets", "tiktoken", "typer", "rich")

_OPENBLAS_NAMES = ("libopenblasp.so.0", "libopenblas.so.0", "libopenblas.so", "libopenblaso.so.0")
_OPENBLAS_IN_CACHE = re.compile(rb"/[\x21-\x7e]*/libopenblas[po]?\.so(?:\.\d+)*(?=\x00)")
_PARALLEL_MODELS = {0: "sequential", 1: "pthread", 2: "OpenMP"}


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS serves MLX's CPU matmuls, and what to do when it is the slow one."""

    name: str
    path: str | None = None
    loaded_by_us: bool = False
    fast: bool = True
    hint: str | None = None
    warning: str | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_preloaded: BlasInfo | None = None


# --------------------------------------------------------------------------- preload


def preload_blas() -> BlasInfo:
    """Set up a fast BLAS for MLX on Linux, once per process: load a system OpenBLAS into the
    global symbol scope, or else arrange for libmlx to be rebound to the scipy-openblas32 wheel.

    Returns what the preload did; `blas_info()` reports what actually serves MLX afterwards.
    `MLXGRPO_BLAS` selects: `auto` (default), `off`, `wheel`, or a path to a BLAS library.
    """
    global _preloaded
    if _preloaded is None:
        _preloaded = _preload()
        if _preloaded.warning:
            warnings.warn(_preloaded.warning, RuntimeWarning, stacklevel=2)
    return _preloaded


def _preload() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo("Accelerate")
    if not sys.platform.startswith("linux"):
        return BlasInfo("platform default")
    setting = os.environ.get(ENV_VAR, "auto").strip()
    if setting.lower() == "off":
        found = next(_candidate_paths(), None) or blas_slots.wheel_library()
        hint = f"unset {ENV_VAR}=off to use OpenBLAS from {found}" if found else INSTALL_HINT
        return BlasInfo(BUNDLED_NAME, fast=False, hint=hint)
    if setting.lower() == "wheel":
        return _use_wheel(blas_slots.wheel_library())
    late = None
    if "mlx.core" in sys.modules:
        late = _late_preload_check()
        if late is not None and late.fast:
            return late
    warning = None
    if setting.lower() not in ("", "auto"):
        if _exports_prefixed(setting):
            return _use_wheel(setting)
        lib, reason = (None, "too late to load it") if late else _load_global(setting)
        if lib is not None:  # a bare name was found by dlopen's search: report the file
            found = owner_of(ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value) or setting
            return replace(_describe(found, lib), loaded_by_us=True)
        warning = f"{ENV_VAR}={setting}: {reason}; looking for another OpenBLAS instead"
    if late is None:
        for path in _candidate_paths():
            lib, _ = _load_global(path)
            if lib is not None:
                return replace(_describe(path, lib), loaded_by_us=True, warning=warning)
    wheel = blas_slots.wheel_library()
    if wheel is not None:
        return replace(_use_wheel(wheel), warning=warning)
    if late is not None:
        return late
    return BlasInfo(BUNDLED_NAME, fast=False, hint=INSTALL_HINT, warning=warning)


# Set when rebinding the wheel's functions into libmlx failed: why, for blas_info().
_rebind_failure: str | None = None


def _use_wheel(path: str | None) -> BlasInfo:
    """Serve MLX from a `scipy_`-prefixed OpenBLAS: rebind now if mlx is loaded, else on import."""
    if path is None:
        return BlasInfo(
            BUNDLED_NAME,
            fast=False,
            hint="pip install scipy-openblas32 (or `uv sync`) to get the OpenBLAS wheel",
            warning=f"{ENV_VAR}=wheel: the scipy-openblas32 package is not installed",
        )
    info = BlasInfo(f"OpenBLAS {WHEEL_LABEL}", path, loaded_by_us=True)
    if "mlx.core" in sys.modules:
        return _rebind_wheel(path) or info
    _RebindOnImport.install(path)
    return info


def _rebind_wheel(path: str) -> BlasInfo | None:
    """Rebind libmlx's slots to `path`; None on success, else the reference BLAS and why."""
    global _rebind_failure
    try:
        blas_slots.rebind(path)
    except blas_slots.SlotError as exc:
        _rebind_failure = f"could not point MLX at the OpenBLAS wheel: {exc}"
        return BlasInfo(BUNDLED_NAME, fast=False, hint=REBIND_FAILED_HINT, warning=_rebind_failure)
    _rebind_failure = None
    return None


class _RebindOnImport:
    """Meta-path hook: once `mlx.core` (and so libmlx) is loaded, rebind its BLAS slots.

    Importing mlx eagerly instead would cost every `import mlxgrpo` a few hundred ms.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def install(cls, path: str) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, cls)]
        sys.meta_path.insert(0, cls(path))

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "mlx.core":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, hook = spec.loader, self

        class _ThenRebind(type(loader)):  # keeps the real loader's behaviour, adds one step
            def exec_module(self, module: Any) -> None:
                super().exec_module(module)
                sys.meta_path[:] = [f for f in sys.meta_path if f is not hook]
                failed = _rebind_wheel(hook.path)
                if failed is not None:
                    warnings.warn(failed.warning, RuntimeWarning, stacklevel=2)

        loader.__class__ = _ThenRebind
        return spec


def _exports_prefixed(path: str) -> bool:
    """Whether `path` is an OpenBLAS built with `scipy_`-prefixed names (like the wheel's)."""
    if os.sep in path and not os.path.exists(path):
        return False
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    except OSError:
        return False
    prefixed = blas_slots.WHEEL_PREFIX + "cblas_sgemm"
    return hasattr(lib, prefixed) and not hasattr(lib, "cblas_sgemm")


def _late_preload_check() -> BlasInfo | None:
    """mlx is already imported: report its binding, or None when a load can still take effect."""
    bound = bound_blas_path()
    if bound is None or bound == UNBOUND:
        # Unbound: lazy binding and no BLAS call yet, so a global load is still picked up.
        # None (cannot inspect): loading is harmless, so try.
        return None
    info = _describe(bound)
    if info.fast:
        return info
    return replace(
        info,
        hint=TOO_LATE_HINT,
        warning="mlx was imported before mlxgrpo, too late to load OpenBLAS; "
        "MLX keeps the slow reference BLAS in this process",
    )


def _load_global(path: str) -> tuple[ctypes.CDLL | None, str | None]:
    """Load `path` locally, check it is a usable CBLAS, then promote it to the global scope."""
    if os.sep in path and not os.path.exists(path):
        return None, "file not found"
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    except OSError as exc:
        return None, f"cannot be loaded ({exc})"
    if not hasattr(lib, "cblas_sgemm"):
        return None, "does not export cblas_sgemm"
    if "USE64BITINT" in (_openblas_config(lib) or ""):
        return None, "is a 64-bit-integer (ILP64) build, which MLX cannot call"
    ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    return lib, None


def _candidate_paths():
    """Existing OpenBLAS files, most specific first; only stat calls and one small file read."""
    if os.environ.get(SEARCH_SYSTEM_VAR, "1").strip() == "0":
        return  # as on a machine without a system OpenBLAS
    machine = platform.machine()
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine, "")
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(os.path.join(os.environ["CONDA_PREFIX"], "lib"))
    if triple:
        system = f"/usr/lib/{triple}"
        dirs += [system, f"{system}/openblas-pthread", f"{system}/openblas-openmp"]
    dirs += ["/usr/lib64", "/usr/lib", "/usr/local/lib", "/opt/OpenBLAS/lib"]
    seen: set[str] = set()
    for directory in dirs:
        for name in _OPENBLAS_NAMES:
            path = os.path.join(directory, name)
            if path not in seen and os.path.exists(path):
                seen.add(path)
                yield path
    # What ctypes.util.find_library would find, without the ldconfig/gcc subprocesses it runs.
    for path in _ld_cache_openblas():
        if path not in seen and os.path.exists(path):
            seen.add(path)
            yield path


def _ld_cache_openblas() -> list[str]:
    try:
        data = Path("/etc/ld.so.cache").read_bytes()
    except OSError:
        return []
    return [m.decode() for m in _OPENBLAS_IN_CACHE.findall(data)]


# --------------------------------------------------------------------------- what serves MLX


def blas_info() -> BlasInfo:
    """The BLAS that really serves MLX's `cblas_sgemm` in this process (imports mlx)."""
    preloaded = preload_blas()
    if not sys.platform.startswith("linux"):
        return preloaded
    import mlx.core  # noqa: F401  (binds libmlx's BLAS symbols if nothing has yet)

    path = bound_blas_path()
    if path in (None, UNBOUND):
        path = predicted_blas_path()
    info = _describe(path) if path else BlasInfo("unknown BLAS", fast=False)
    ours = bool(preloaded.loaded_by_us and path and same_file(path, preloaded.path or ""))
    hint, warning = preloaded.hint or INSTALL_HINT, preloaded.warning
    if _rebind_failure and not info.fast:
        hint, warning = REBIND_FAILED_HINT, _rebind_failure
    return replace(info, loaded_by_us=ours, hint=None if info.fast else hint, warning=warning)


def _describe(path: str, lib: ctypes.CDLL | None = None) -> BlasInfo:
    """Name a BLAS library from what it exports (OpenBLAS reports its version and threading)."""
    if lib is None:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        except OSError:
            lib = None
    prefix = ""
    if lib is not None and hasattr(lib, blas_slots.WHEEL_PREFIX + "openblas_get_config"):
        prefix = blas_slots.WHEEL_PREFIX
    config = _openblas_config(lib, prefix) if lib is not None else None
    if config is not None:
        version = re.search(r"OpenBLAS\s+([\w.]+)", config)
        parallel = _call_int(lib, prefix + "openblas_get_parallel")
        model = _PARALLEL_MODELS.get(parallel, "unknown threading")
        name = f"OpenBLAS {version.group(1) if version else '?'} ({model})"
        if prefix:  # only reachable through libmlx's rebound slots
            name += f" {WHEEL_LABEL}" if _from_wheel(path) else " (prefixed build, rebound)"
        return BlasInfo(name, path, threads=_call_int(lib, prefix + "openblas_get_num_threads"))
    path = os.path.realpath(path)
    base = os.path.basename(path).lower()
    parent = os.path.basename(os.path.dirname(path)).lower()
    if parent.startswith("mlx") and parent.endswith(".libs"):
        return BlasInfo(BUNDLED_NAME, path, fast=False)
    if base.startswith("libblas"):
        return BlasInfo(f"reference BLAS ({base})", path, fast=False)
    for marker, name in (("mkl", "Intel MKL"), ("blis", "BLIS"), ("atlas", "ATLAS")):
        if marker in base:
            return BlasInfo(name, path)
    return BlasInfo(os.path.basename(path), path)


def _from_wheel(path: str) -> bool:
    wheel = blas_slots.wheel_library()
    return bool(wheel and same_file(path, wheel))


def _openblas_config(lib: ctypes.CDLL, prefix: str = "") -> str | None:
    if not hasattr(lib, prefix + "openblas_get_config"):
        return None
    get_config = getattr(lib, prefix + "openblas_get_config")
    get_config.restype = ctypes.c_char_p
    return (get_config() or b"").decode(errors="replace")


def _call_int(lib: ctypes.CDLL, function: str) -> int | None:
    return int(getattr(lib, function)()) if hasattr(lib, function) else None


# --------------------------------------------------------------------------- device


def device_summary() -> dict[str, Any]:
    """MLX version, default device, GPU backend and memory, as a plain dict."""
    import mlx.core as mx

    metal = bool(mx.metal.is_available())
    cuda = bool(hasattr(mx, "cuda") and mx.cuda.is_available())
    info = _device_info(mx)
    return {
        "mlx_version": mx.__version__,
        "default_device": "gpu" if mx.default_device().type == mx.gpu else "cpu",
        "backend": "metal" if metal else "cuda" if cuda else "cpu",
        "device_name": info.get("device_name"),
        "architecture": info.get("architecture"),
        "device_memory_bytes": info.get("memory_size"),
        "max_recommended_working_set_bytes": info.get("max_recommended_working_set_size"),
        "system_ram_bytes": _system_ram_bytes(),
        "cpu_count": _cpu_count(),
    }


def _device_info(mx: Any) -> dict[str, Any]:
    """`mx.device_info()` where it exists (keys vary: Linux CPU reports no memory)."""
    getter = getattr(mx, "device_info", None)
    if getter is None and mx.metal.is_available():
        getter = getattr(mx.metal, "device_info", None)
    try:
        return dict(getter()) if getter else {}
    except (RuntimeError, ValueError, TypeError):
        return {}


def memory_budget_bytes() -> int | None:
    """The memory this process may use: the device's (Metal) or the machine's RAM, lowered by
    a cgroup limit (containers) or an address-space rlimit; None when nothing is known."""
    import mlx.core as mx

    found = [_device_info(mx).get("memory_size"), _system_ram_bytes(), _cgroup_limit_bytes()]
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        found.append(None if soft == resource.RLIM_INFINITY else soft)
    except (ImportError, ValueError, OSError):
        pass
    known = [int(v) for v in found if isinstance(v, int) and v > 0]
    return min(known) if known else None


def _cgroup_limit_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path, encoding="ascii").read().strip()  # noqa: SIM115
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def _system_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_count() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # honours container / taskset limits
    return os.cpu_count()


def default_dtype() -> str:
    """bfloat16 on a GPU (Metal, CUDA); float32 on CPU, where only fp32 goes through BLAS."""
    import mlx.core as mx

    return "bfloat16" if mx.default_device().type == mx.gpu else "float32"


def resolve_dtype(name: str) -> Any:
    """Map a config dtype name ("auto", "float32", "bfloat16", "float16") to an mx.Dtype."""
    import mlx.core as mx

    choices = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
    key = name.strip().lower()
    if key == "auto":
        key = default_dtype()
    if key not in choices:
        raise ConfigError(
            f"unknown dtype {name!r}", hint="use one of auto, float32, bfloat16, float16"
        )
    return choices[key]


def set_memory_limits(wired: bool = True) -> dict[str, int]:
    """Prepare memory for training: wire the model's memory on Metal (as mlx-lm does), and on
    Linux keep freed buffers for reuse (:func:`retain_freed_memory`).

    Returns what was applied, e.g. {"wired_limit_bytes": ...}, {"retain_freed_memory": 1}.
    """
    import mlx.core as mx

    applied = {"retain_freed_memory": 1} if retain_freed_memory() else {}
    if not (wired and mx.metal.is_available() and hasattr(mx, "set_wired_limit")):
        return applied
    limit = _device_info(mx).get("max_recommended_working_set_size")
    if not limit:
        return applied
    mx.set_wired_limit(int(limit))
    return {**applied, "wired_limit_bytes": int(limit)}


_GLIBC_M_TRIM_THRESHOLD = -1
_GLIBC_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """On glibc (Linux), serve large buffers from the heap and keep freed memory for reuse.

    glibc maps every buffer over 32 MB afresh and unmaps it on free, so each training step
    page-faults its activations and logits in again: on Linux CPU that doubled the time of a
    LoRA update of a 39M-parameter model (bench/run.py). The price is that the process keeps
    its peak memory instead of returning it to the OS. Returns whether the settings applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_GLIBC_M_MMAP_MAX, 0)) and bool(mallopt(_GLIBC_M_TRIM_THRESHOLD, -1))


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy (when installed) and MLX's global PRNG."""
    import mlx.core as mx

    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    mx.random.seed(seed)


# --------------------------------------------------------------------------- diagnostics


def measure_matmul_gflops(
    size: int = 1024, *, max_repeats: int = 5, budget_s: float = 0.4, warmup: int = 1
) -> float:
    """Median fp32 size×size matmul rate on the default device, in GFLOP/s.

    Stops after `max_repeats` timed runs or once `budget_s` is spent (at least one run), so a
    slow BLAS (~0.5 s per 1024² matmul) keeps the measurement short.
    """
    import mlx.core as mx

    a = mx.random.normal((size, size), dtype=mx.float32, key=mx.random.key(0))
    b = mx.random.normal((size, size), dtype=mx.float32, key=mx.random.key(1))
    mx.eval(a, b)
    for _ in range(warmup):
        mx.eval(a[:256, :256] @ b[:256, :256])  # starts BLAS threads without a full-size run
    timings: list[float] = []
    spent = 0.0
    while len(timings) < max_repeats and (not timings or spent < budget_s):
        start = time.perf_counter()
        mx.eval(a @ b)
        timings.append(time.perf_counter() - start)
        spent += timings[-1]
    timings.sort()
    return 2 * size**3 / timings[len(timings) // 2] / 1e9


def package_versions(names: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (the packages themselves are not imported)."""
    import importlib.metadata  # ~40 ms: kept off the import path of every mlxgrpo command

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_report(measure: bool = True) -> dict[str, Any]:
    """Everything `mlxgrpo doctor` shows, as one JSON-ready dict."""
    device = device_summary()
    return {
        "mlxgrpo_version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mlx_version": device["mlx_version"],
        "device": device,
        "blas": blas_info().to_dict(),
        "matmul_fp32_1024_gflops": round(measure_matmul_gflops(), 1) if measure else None,
        "default_dtype": default_dtype(),
        "packages": package_versions(),
    }
