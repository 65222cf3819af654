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


def test_explained_variance_of_one_row_is_nan_with_warning():
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(explained_variance([[1.0, 2.0]], [[1.0, 2.0]]))


@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_chunked_explained_variance_equals_one_shot(chunk_rows, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(97, 5)) + 3
    X_hat = X + 0.3 * rng.normal(size=X.shape)
    accumulator = ExplainedVarianceAccumulator(shift=np.zeros(5))
    for start in range(0, 97, chunk_rows):
        accumulator.update(X[start : start + chunk_rows], X_hat[start : start + chunk_rows])
    assert accumulator.result() == pytest.approx(explained_variance(X, X_hat), rel=1e-10)


def test_mean_l0_dense_and_sparse_agree():
    codes = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert mean_l0(codes) == 1.0
    assert mean_l0(sp.csr_matrix(codes)) == 1.0
    assert isinstance(mean_l0(codes), float)
