"""The one rule for comparing float32 results that differ only in the order of their sums.

Two ways of computing the same quantity in float32 (a tiled and a whole-vocabulary walk, a
hand-written kernel and MLX's generic one, one process and two ranks, a float32 result and its
float64 re-derivation) add the same terms in different orders. Every addition rounds to half an
ulp of the running sum, so the gap between the two grows with the magnitude of the values and
with the number of terms summed. BLAS builds pick their own orders (blocking, SIMD width,
threads), so a fixed absolute tolerance that holds with one library fails with another: that is
why tests compare such results through :func:`assert_close`, never through a bare ``atol``.

The bound is ``SLACK * EPS32 * sqrt(terms) * scale``: rounding errors of a length-``terms`` sum
grow like ``sqrt(terms)`` ulps in practice (the worst case, ``terms`` ulps, is never met by
random data), ``scale`` is the magnitude of the values (of the summands where a sum cancels),
and ``SLACK`` covers the few roundings around each sum (scaling, exponentials, a logarithm).
A real defect (a dropped term, a wrong rescale, a stale buffer) moves results by far more.

Bit-exact comparisons stay bit-exact where the code promises it (resume, distributed runs with
matched layouts, one library on both sides): use ``mx.array_equal`` there, not this module.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
SLACK = 32.0


def summation_tolerance(scale: float, terms: int, slack: float = SLACK) -> float:
    """Largest gap expected between two float32 evaluations of values of magnitude ``scale``
    that each come out of sums of ``terms`` terms, added in different orders."""
    if terms < 1:
        raise ValueError(f"terms must be at least 1, got {terms}")
    return slack * EPS32 * math.sqrt(terms) * max(float(scale), np.finfo(np.float32).tiny)


def _as_float64(values) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # an mx.array in a dtype numpy lacks (bfloat16)
        import mlx.core as mx

        return np.asarray(values.astype(mx.float32), dtype=np.float64)


def gap(actual, expected, *, terms: int, scale: float | None = None) -> tuple[float, float]:
    """``(largest |actual - expected|, tolerance)``; ``scale`` defaults to the largest magnitude
    on either side."""
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {e.shape}")
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        raise AssertionError("non-finite values in a float comparison")
    if scale is None:
        scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(e).max(initial=0.0)))
    return float(np.abs(a - e).max(initial=0.0)), summation_tolerance(scale, terms)


def is_close(actual, expected, *, terms: int, scale: float | None = None) -> bool:
    """True when the two agree within :func:`summation_tolerance`."""
    diff, tol = gap(actual, expected, terms=terms, scale=scale)
    return diff <= tol


def assert_close(actual, expected, *, terms: int, scale: float | None = None, what: str = ""):
    """Fail, naming the gap and the bound, unless the two agree within the summation rule."""
    diff, tol = gap(actual, expected, terms=terms, scale=scale)
    label = f"{what}: " if what else ""
    assert diff <= tol, f"{label}max |diff| {diff:.3g} exceeds {tol:.3g} ({terms} terms)"
