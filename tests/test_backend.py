"""Backend: BLAS preload and detection (in fresh subprocesses), dtype policy, limits, seeding.

The BLAS checks run in subprocesses because the preload only works before mlx is first
imported, and this test process has imported it long ago. They pass with whichever fast BLAS
the machine has: a system OpenBLAS (Debian package libopenblas0-pthread) or, without one, the
scipy-openblas32 wheel (tests/test_blas_wheel.py covers that path on its own).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

from mlxgrpo import backend
from mlxgrpo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# Times a size×size fp32 matmul at the median of a few runs and reports what serves BLAS.
PROBE = """
import json
from mlxgrpo import backend
info = backend.blas_info()
rate = backend.measure_matmul_gflops(size=512, max_repeats=5, budget_s=0.25)
print(json.dumps({"info": info.to_dict(), "gflops": rate}))
"""


def run_python(code: str, *, blas: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXGRPO_BLAS")}
    environment.pop("OPENBLAS_NUM_THREADS", None)
    if blas is not None:
        environment["MLXGRPO_BLAS"] = blas
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def exports_openblas_config(path: str) -> bool:
    import ctypes

    lib = ctypes.CDLL(path)  # the wheel's OpenBLAS prefixes its names with scipy_
    return hasattr(lib, "openblas_get_config") or hasattr(lib, "scipy_openblas_get_config")


# --------------------------------------------------------------------------- BLAS


@pytest.fixture(scope="module")
def bundled_run() -> dict:
    return last_json(run_python(PROBE, blas="off"))


def test_openblas_is_found_loaded_and_much_faster_than_the_bundled_blas(bundled_run):
    # One OpenBLAS thread: the comparison stays fair and steady on a busy 2-core machine.
    result = last_json(run_python(PROBE, OPENBLAS_NUM_THREADS="1"))
    info = result["info"]
    assert info["name"].startswith("OpenBLAS 0.")
    assert info["fast"] and info["loaded_by_us"] and info["hint"] is None
    assert exports_openblas_config(info["path"])
    assert bundled_run["info"]["name"] == backend.BUNDLED_NAME
    # Reference BLAS runs a 512² matmul ~15-30x slower here; 3x leaves room for a busy machine.
    assert result["gflops"] > 3 * bundled_run["gflops"], (result, bundled_run)


def test_blas_off_reports_the_reference_blas_and_how_to_get_openblas_back(bundled_run):
    info = bundled_run["info"]
    assert not info["fast"] and not info["loaded_by_us"]
    assert "mlx_cpu.libs" in info["path"]
    assert info["hint"].startswith("unset MLXGRPO_BLAS=off to use OpenBLAS from /")


def test_missing_openblas_reports_the_reference_blas_with_the_install_hint():
    code = """
    import json, os, sys
    from mlxgrpo import backend      # MLXGRPO_BLAS=off: nothing loaded yet
    os.environ["MLXGRPO_BLAS"] = "auto"
    backend._preloaded = None
    backend._candidate_paths = lambda: iter(())   # as on a machine without OpenBLAS
    sys.modules["scipy_openblas32"] = None        # ... and without the wheel
    preloaded = backend.preload_blas()
    print(json.dumps([preloaded.to_dict(), backend.blas_info().to_dict()]))
    """
    preloaded, info = last_json(run_python(code, blas="off"))
    assert preloaded["name"] == info["name"] == backend.BUNDLED_NAME
    assert (
        info["hint"] == backend.INSTALL_HINT
        and "apt-get install libopenblas0-pthread" in (info["hint"])
    )
    assert not info["fast"]


def test_a_bad_blas_path_warns_and_falls_back_to_the_system_openblas():
    done = run_python(PROBE, blas="/nonexistent.so", OPENBLAS_NUM_THREADS="1")
    info = last_json(done)["info"]
    assert info["warning"].startswith("MLXGRPO_BLAS=/nonexistent.so: file not found")
    assert "RuntimeWarning: MLXGRPO_BLAS=/nonexistent.so" in done.stderr
    assert info["name"].startswith("OpenBLAS") and info["fast"]
    assert info["threads"] == 1  # OPENBLAS_NUM_THREADS is left to OpenBLAS and honoured


def test_an_explicit_blas_path_is_used():
    found = last_json(run_python(PROBE))["info"]["path"]
    info = last_json(run_python(PROBE, blas=found))["info"]
    assert info["path"] == found and info["loaded_by_us"] and info["warning"] is None


def test_importing_mlx_first_is_reported_as_too_late_without_the_wheel():
    code = """
    import json, sys
    sys.modules["scipy_openblas32"] = None  # hides the wheel, which would rescue this case
    import mlx.core
    from mlxgrpo import backend
    print(json.dumps(backend.blas_info().to_dict()))
    """
    info = last_json(run_python(code))
    assert info["name"] == backend.BUNDLED_NAME and not info["fast"]
    assert info["hint"] == backend.TOO_LATE_HINT
    assert "too late" in info["warning"]


def test_a_late_load_that_still_binds_lazily_is_reported_as_openblas(bundled_run):
    # With lazy binding and no BLAS call yet, a late RTLD_GLOBAL load does take effect.
    code = "import os, sys\nsys.setdlopenflags(os.RTLD_LAZY)\nimport mlx.core\n" + PROBE
    result = last_json(run_python(code, OPENBLAS_NUM_THREADS="1"))
    assert result["info"]["name"].startswith("OpenBLAS") and result["info"]["warning"] is None
    assert result["gflops"] > 3 * bundled_run["gflops"], (result, bundled_run)


def test_linalg_still_agrees_with_numpy_under_openblas():
    # OpenBLAS's LAPACK symbols join the global scope too: the results must stay right.
    code = """
    import json
    import mlxgrpo
    import mlx.core as mx
    import numpy as np
    a = np.random.default_rng(0).normal(size=(48, 48)).astype(np.float32) + 8 * np.eye(48)
    inv = mx.linalg.inv(mx.array(a), stream=mx.cpu)
    print(json.dumps({"got": np.array(inv).tolist(), "want": np.linalg.inv(a).tolist()}))
    """
    result = last_json(run_python(code))
    assert_close(result["got"], result["want"], terms=48, what="inverse")  # 48x48 elimination


def test_doctor_json_names_openblas_and_exits_zero():
    report = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mlxgrpo", "doctor", "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if k != "MLXGRPO_BLAS"},
        ).stdout
    )
    assert report["blas"]["name"].startswith("OpenBLAS") and report["blas"]["fast"]
    assert report["matmul_fp32_1024_gflops"] > 0
    assert report["device"]["backend"] == "cpu" and report["default_dtype"] == "float32"
    assert report["packages"]["mlx"] == mx.__version__
    assert set(report["packages"]) == set(backend.REPORTED_PACKAGES)


def test_doctor_table_shows_the_reference_blas_and_its_hint_when_blas_is_off():
    done = subprocess.run(
        [sys.executable, "-m", "mlxgrpo", "doctor"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MLXGRPO_BLAS": "off", "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "reference BLAS (bundled with mlx[cpu])" in done.stdout
    assert "unset MLXGRPO_BLAS=off" in done.stdout
    assert "GFLOP/s" in done.stdout


def test_doctor_report_paints_a_slow_blas_and_its_hint_red(monkeypatch):
    from rich.console import Console

    from mlxgrpo import ui

    report = json.loads(json.dumps(backend.environment_report(measure=False)))
    report["blas"].update(name="reference BLAS (x)", fast=False, hint="install it", path=None)
    sink = io.StringIO()
    monkeypatch.setattr(ui.console, "out", Console(file=sink, force_terminal=True, width=200))
    ui.doctor_report(report)
    text = sink.getvalue()
    assert "\x1b[31mreference BLAS (x)" in text and "\x1b[31minstall it" in text
    assert "not measured" in text and mx.__version__ in text


# --------------------------------------------------------------------------- device, dtype


def test_device_summary_on_linux_cpu():
    summary = backend.device_summary()
    assert summary["mlx_version"] == mx.__version__
    assert summary["default_device"] == "cpu" and summary["backend"] == "cpu"
    assert summary["cpu_count"] == len(os.sched_getaffinity(0))
    page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    assert summary["system_ram_bytes"] == page * pages > 0
    assert summary["max_recommended_working_set_bytes"] is None  # a Metal-only key


def test_dtype_policy_is_float32_on_cpu():
    assert backend.default_dtype() == "float32"
    assert backend.resolve_dtype("auto") == mx.float32
    assert backend.resolve_dtype("bfloat16") == mx.bfloat16
    assert backend.resolve_dtype(" Float16 ") == mx.float16
    with pytest.raises(ConfigError) as caught:
        backend.resolve_dtype("int8")
    assert "int8" in caught.value.message and "float32" in caught.value.hint


def test_dtype_policy_is_bfloat16_on_gpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert backend.default_dtype() == "bfloat16"
    assert backend.resolve_dtype("auto") == mx.bfloat16


def _no_allocator_tuning(monkeypatch):
    monkeypatch.setattr(backend, "retain_freed_memory", lambda: False)


def test_set_memory_limits_wires_nothing_without_metal(monkeypatch):
    _no_allocator_tuning(monkeypatch)
    assert backend.set_memory_limits() == {}
    assert backend.set_memory_limits(wired=False) == {}


def test_set_memory_limits_wires_the_recommended_working_set_on_metal(monkeypatch):
    _no_allocator_tuning(monkeypatch)
    calls: list[int] = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 12345})
    monkeypatch.setattr(mx, "set_wired_limit", calls.append)
    assert backend.set_memory_limits() == {"wired_limit_bytes": 12345}
    assert calls == [12345]
    assert backend.set_memory_limits(wired=False) == {} and calls == [12345]


def test_retain_freed_memory_sets_glibcs_mmap_and_trim_options(monkeypatch):
    calls: list[tuple[int, int]] = []

    def mallopt(option: int, value: int) -> int:
        calls.append((option, value))
        return 1

    class FakeLibc:
        pass

    FakeLibc.mallopt = staticmethod(mallopt)

    monkeypatch.setattr(backend.sys, "platform", "linux")
    monkeypatch.setattr(backend.ctypes, "CDLL", lambda name: FakeLibc())
    assert backend.retain_freed_memory() is True
    # M_MMAP_MAX = -4 → 0 (no fresh mappings), M_TRIM_THRESHOLD = -1 → -1 (never trim).
    assert sorted(calls) == [(-4, 0), (-1, -1)]
    assert backend.set_memory_limits() == {"retain_freed_memory": 1}
    monkeypatch.setattr(backend.sys, "platform", "darwin")
    assert backend.retain_freed_memory() is False


def test_seed_everything_makes_every_generator_repeat():
    def draw() -> tuple:
        return (random.random(), float(np.random.rand()), mx.random.uniform(shape=(3,)).tolist())

    backend.seed_everything(7)
    first = draw()
    backend.seed_everything(7)
    assert draw() == first
    backend.seed_everything(8)
    other = draw()
    assert all(a != b for a, b in zip(first[:2], other[:2], strict=True))
    assert first[2] != other[2]


def test_package_versions_reads_metadata_and_marks_missing_packages():
    versions = backend.package_versions(("mlx", "surely-not-installed-package"))
    assert versions == {"mlx": mx.__version__, "surely-not-installed-package": None}
