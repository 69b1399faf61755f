"""The float comparison rule of tests/tolerance.py: loose enough for any summation order,
tight enough to catch a wrong sum."""

from __future__ import annotations

import numpy as np
import pytest
from tolerance import assert_close, is_close, summation_tolerance


def _sums(terms: int, seed: int):
    """One set of float32 rows summed forwards, backwards and pairwise, and in float64."""
    rows = np.random.default_rng(seed).normal(size=(64, terms)).astype(np.float32) * 3.0
    forwards = np.zeros(64, dtype=np.float32)
    for column in rows.T:
        forwards += column
    backwards = np.zeros(64, dtype=np.float32)
    for column in rows.T[::-1]:
        backwards += column
    pairwise = rows.sum(axis=1, dtype=np.float32)
    exact = rows.astype(np.float64).sum(axis=1)
    return rows, forwards, backwards, pairwise, exact


@pytest.mark.parametrize("terms", [7, 100, 4096])
def test_other_summation_orders_pass(terms):
    rows, forwards, backwards, pairwise, exact = _sums(terms, seed=terms)
    scale = float(np.abs(rows).max())  # the sums cancel: the summands set the scale
    for ours in (backwards, pairwise, exact):
        assert_close(ours, forwards, terms=terms, scale=scale)


@pytest.mark.parametrize("terms", [7, 100, 4096])
def test_a_dropped_or_doubled_term_fails(terms):
    rows, forwards, *_ = _sums(terms, seed=terms + 1)
    scale = float(np.abs(rows).max())
    assert not is_close(forwards - rows[:, terms // 2], forwards, terms=terms, scale=scale)
    assert not is_close(forwards + rows[:, 0], forwards, terms=terms, scale=scale)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(forwards * 1.001, forwards, terms=terms)


def test_the_bound_grows_with_scale_and_length_only():
    base = summation_tolerance(1.0, 100)
    assert summation_tolerance(4.0, 100) == pytest.approx(4 * base, rel=1e-12)
    assert summation_tolerance(1.0, 400) == pytest.approx(2 * base, rel=1e-12)
    assert 1e-6 < base < 1e-4
    with pytest.raises(ValueError, match="terms"):
        summation_tolerance(1.0, 0)


def test_shapes_and_non_finite_values_are_refused():
    with pytest.raises(AssertionError, match="shapes"):
        assert_close(np.zeros(3), np.zeros(4), terms=1)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([np.nan]), np.array([0.0]), terms=1)
