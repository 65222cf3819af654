"""Metric functions against float64 references."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import r2_score

from skSAE.metrics import ExplainedVarianceAccumulator, explained_variance, mean_l0


def test_explained_variance_equals_variance_weighted_r2():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)) * rng.uniform(0.1, 10, size=12) + 50
    X_hat = X + rng.normal(size=X.shape)
    expected = r2_score(X, X_hat, multioutput="variance_weighted")
    assert explained_variance(X, X_hat) == pytest.approx(expected, rel=1e-12)


def test_explained_variance_is_not_the_mean_of_per_column_r2():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2)) * [1.0, 100.0]
    X_hat = X + rng.normal(size=X.shape)
    assert explained_variance(X, X_hat) != pytest.approx(r2_score(X, X_hat), abs=1e-3)


def test_explained_variance_of_constant_input_follows_sklearn():
    X = np.ones((5, 3))
    assert explained_variance(X, X) == 1.0
    assert explained_variance(X, X + 1) == 0.0


def r2_float64(X, X_hat):
    """scikit-learn's variance-weighted R² on float64 copies (it keeps float32 inputs in
    float32, whose rounding alone gives a constant column a variance)."""
    X, X_hat = np.asarray(X, np.float64), np.asarray(X_hat, np.float64)
    return r2_score(X, X_hat, multioutput="variance_weighted")


# Values a decoder bias is not equal to: no power of two, so float64 sums of their
# squares round (before, sum(x**2) - n * mean**2 left 1e-13 as the "variance").
CONSTANTS = [0.1, -2.3, 1e4 + 0.7, 3.3e-5]


@pytest.mark.parametrize("value", CONSTANTS)
@pytest.mark.parametrize("chunk_rows", [1000, 7])
def test_explained_variance_of_constant_rows_equals_r2_score(value, chunk_rows):
    # Before: ExplainedVarianceAccumulator (and so SparseAutoencoder.score) gave about
    # -1e14 where r2_score gives 0.0, and 0.0 for columns of which some are exact.
    rng = np.random.default_rng(0)
    X = np.full((300, 3), value, dtype=np.float32)
    cases = {
        "inexact": X + rng.normal(size=X.shape).astype(np.float32),
        "one column exact": np.column_stack([X[:, 0], X[:, 1:] + 1]),
        "exact": X,
    }
    for name, X_hat in cases.items():
        accumulator = ExplainedVarianceAccumulator()
        for start in range(0, 300, chunk_rows):
            accumulator.update(X[start : start + chunk_rows], X_hat[start : start + chunk_rows])
        expected = r2_float64(X, X_hat)
        assert expected == {"inexact": 0.0, "one column exact": 1 / 3, "exact": 1.0}[name]
        assert accumulator.result() == pytest.approx(expected, abs=1e-12), name
        assert explained_variance(X, X_hat) == pytest.approx(expected, abs=1e-12), name


def test_constant_columns_carry_no_weight_as_in_r2_score():
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=200), np.full(200, 0.1)]).astype(np.float32)
    X_hat = X + 0.3 * rng.normal(size=X.shape).astype(np.float32)
    expected = r2_float64(X, X_hat)
    assert expected == pytest.approx(r2_float64(X[:, :1], X_hat[:, :1]), rel=1e-12)
    assert explained_variance(X, X_hat) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("spread", [1e-3, 1e-5])
@pytest.mark.parametrize("chunk_rows", [500, 13])
def test_explained_variance_of_nearly_constant_rows_equals_r2_score(spread, chunk_rows):
    # A tiny but real variance, far below the offset: the score is what r2_score says
    # (large and negative when the error exceeds the variance), not rounding noise.
    rng = np.random.default_rng(0)
    X = (1e3 + 0.1 + spread * rng.normal(size=(500, 4))).astype(np.float32)
    assert np.ptp(X, axis=0).min() > 0  # still varies in float32
    for error in (0.1 * spread, 10 * spread):
        X_hat = X + (error * rng.normal(size=X.shape)).astype(np.float32)
        accumulator = ExplainedVarianceAccumulator()
        for start in range(0, 500, chunk_rows):
            accumulator.update(X[start : start + chunk_rows], X_hat[start : start + chunk_rows])
        expected = r2_float64(X, X_hat)
        assert accumulator.result() == pytest.approx(expected, rel=1e-6)
        assert explained_variance(X, X_hat) == pytest.approx(expected, rel=1e-9)


def test_explained_variance_of_one_row_is_nan_with_warning():
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(explained_variance([[1.0, 2.0]], [[1.0, 2.0]]))


@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_chunked_explained_variance_equals_one_shot(chunk_rows, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(97, 5)) + 3
    X_hat = X + 0.3 * rng.normal(size=X.shape)
    # A constant column, whose error carries no weight. A float32 value, as skSAE's
    # inputs are: r2_score's float64 mean of 0.1 itself rounds, leaving it a variance.
    X[:, 4] = np.float32(0.1)
    accumulator = ExplainedVarianceAccumulator()
    for start in range(0, 97, chunk_rows):
        accumulator.update(X[start : start + chunk_rows], X_hat[start : start + chunk_rows])
    assert accumulator.result() == pytest.approx(explained_variance(X, X_hat), rel=1e-10)
    assert accumulator.result() == pytest.approx(r2_float64(X, X_hat), rel=1e-10)


def test_mean_l0_dense_and_sparse_agree():
    codes = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert mean_l0(codes) == 1.0
    assert mean_l0(sp.csr_matrix(codes)) == 1.0
    assert isinstance(mean_l0(codes), float)
