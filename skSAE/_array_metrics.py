"""Metric functions on NumPy arrays: the leaf of the metrics (no torch, no model).

Every metric is a plain function on arrays that returns a Python float. Metrics over
data too large for memory accumulate sufficient statistics chunk by chunk and finish
once; they never average per-chunk ratios. Public through `skSAE.metrics`.
"""

import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.utils import check_array

from ._validation import invalid_parameter


def mean_l0(codes):
    """Average number of active latents per row.

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_components)
        Output of `SparseAutoencoder.transform` (dense or scipy sparse).

    Returns
    -------
    l0 : float
        Mean count of non-zero entries per row.

    Examples
    --------
    >>> mean_l0([[0.0, 2.0], [1.0, 3.0]])
    1.5
    """
    codes = check_array(codes, accept_sparse="csr", ensure_all_finite=False)
    if hasattr(codes, "count_nonzero"):
        return float(codes.count_nonzero() / codes.shape[0])
    return float(np.count_nonzero(codes) / codes.shape[0])


def explained_variance(X, X_hat):
    """Fraction of the variance of ``X`` that ``X_hat`` explains (1 - FVU).

    Defined as ``1 - sum((X - X_hat)**2) / sum((X - X.mean(axis=0))**2)``, the sums
    running over all rows and columns. This is exactly
    ``sklearn.metrics.r2_score(X, X_hat, multioutput="variance_weighted")``: the
    per-column R² weighted by each column's variance. It is not the mean of per-row or
    per-column ratios, which weight low-variance directions too much.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Inputs.
    X_hat : array-like of shape (n_samples, n_features)
        Reconstructions.

    Returns
    -------
    score : float
        1.0 for a perfect reconstruction, 0.0 for predicting the column means; NaN
        (with an `UndefinedMetricWarning`) for fewer than two rows, as in sklearn.

    Examples
    --------
    >>> explained_variance([[0.0, 1.0], [2.0, 3.0]], [[0.0, 1.0], [2.0, 3.0]])
    1.0
    """
    X, X_hat = _paired(X, X_hat, "explained_variance")
    accumulator = ExplainedVarianceAccumulator(shift=X[0])
    accumulator.update(X, X_hat)
    return accumulator.result()


def fraction_variance_unexplained(X, X_hat):
    """Fraction of variance unexplained, ``1 - explained_variance(X, X_hat)``.

    Parameters
    ----------
    X, X_hat : array-like of shape (n_samples, n_features)
        Inputs and reconstructions.

    Returns
    -------
    fvu : float
        0.0 for a perfect reconstruction, 1.0 for predicting the column means.

    Examples
    --------
    >>> fraction_variance_unexplained([[0.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [1.0, 2.0]])
    1.0
    """
    X, X_hat = _paired(X, X_hat, "fraction_variance_unexplained")
    return 1.0 - explained_variance(X, X_hat)


def normalized_mse(X, X_hat):
    """Squared error relative to the squared norm of the inputs.

    ``sum((X - X_hat)**2) / sum(X**2)``: the error of the reconstruction against that of
    predicting zeros. Unlike FVU it is not centred, so a constant offset in ``X`` that
    the decoder bias captures makes it small.

    Parameters
    ----------
    X, X_hat : array-like of shape (n_samples, n_features)
        Inputs and reconstructions.

    Returns
    -------
    nmse : float

    Examples
    --------
    >>> normalized_mse([[3.0, 4.0]], [[3.0, 0.0]])
    0.64
    """
    X, X_hat = _paired(X, X_hat, "normalized_mse")
    return float(np.square(X - X_hat).sum() / np.square(X).sum())


def cosine_similarity(X, X_hat):
    """Mean over rows of the cosine similarity of each input and its reconstruction.

    Parameters
    ----------
    X, X_hat : array-like of shape (n_samples, n_features)
        Inputs and reconstructions; rows of zero norm count as similarity 0.

    Returns
    -------
    similarity : float
        In [-1, 1]; 1 when every reconstruction points along its input.

    Examples
    --------
    >>> cosine_similarity([[1.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [1.0, 0.0]])
    0.5
    """
    X, X_hat = _paired(X, X_hat, "cosine_similarity")
    norms = np.linalg.norm(X, axis=1) * np.linalg.norm(X_hat, axis=1)
    dots = (X * X_hat).sum(axis=1)
    return float(np.mean(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)))


def latent_density(codes):
    """Fraction of rows on which each latent is active (non-zero).

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_components)
        Dense or scipy sparse codes.

    Returns
    -------
    density : ndarray of shape (n_components,)

    Examples
    --------
    >>> latent_density([[0.0, 2.0], [1.0, 3.0]]).tolist()
    [0.5, 1.0]
    """
    codes = check_array(codes, accept_sparse="csc", ensure_all_finite=False)
    if hasattr(codes, "getnnz"):
        return codes.getnnz(axis=0) / codes.shape[0]
    return np.count_nonzero(codes, axis=0) / codes.shape[0]


def dead_fraction(codes):
    """Fraction of latents that are never active on ``codes``.

    Parameters
    ----------
    codes : array-like of shape (n_samples, n_components)
        Dense or scipy sparse codes.

    Returns
    -------
    fraction : float

    Examples
    --------
    >>> dead_fraction([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])
    0.3333333333333333
    """
    return float(np.mean(latent_density(codes) == 0))


def _paired(X, X_hat, caller):
    X = check_array(X, dtype=np.float64)
    X_hat = check_array(X_hat, dtype=np.float64)
    if X.shape != X_hat.shape:
        raise invalid_parameter(
            "X_hat", caller, f"of the shape of X, {X.shape}", f"shape {X_hat.shape}"
        )
    return X, X_hat


class ExplainedVarianceAccumulator:
    """Streamed `explained_variance`: feed chunks with `update`, then call `result`.

    Keeps float64 sums of squared errors and of the shifted inputs and their squares
    per column. Shifting by a value near the mean (the decoder bias, the first row)
    avoids the cancellation of ``sum(x**2) - n * mean**2`` for offset data.

    Parameters
    ----------
    shift : array-like of shape (n_features,)
        Subtracted from the inputs before their sums are taken.
    """

    def __init__(self, shift):
        self.shift = np.asarray(shift, dtype=np.float64)
        self.n_rows = 0
        self.squared_error = 0.0
        self.sum_D = np.zeros_like(self.shift)
        self.sum_squares_D = np.zeros_like(self.shift)

    def update(self, X, X_hat):
        """Add a chunk of inputs and their reconstructions (arrays of equal shape)."""
        X = np.asarray(X, dtype=np.float64)
        self.squared_error += float(np.square(X - np.asarray(X_hat, dtype=np.float64)).sum())
        centred = X - self.shift
        self.sum_D += centred.sum(axis=0)
        self.sum_squares_D += np.square(centred).sum(axis=0)
        self.n_rows += X.shape[0]

    def result(self):
        """The explained variance of everything fed so far (float)."""
        if self.n_rows < 2:
            warnings.warn(
                "explained variance is not well-defined with fewer than two samples.",
                UndefinedMetricWarning,
                stacklevel=3,
            )
            return float("nan")
        total = float((self.sum_squares_D - np.square(self.sum_D) / self.n_rows).sum())
        if total <= 0.0:
            # Constant inputs: sklearn's force_finite convention.
            return 1.0 if self.squared_error == 0.0 else 0.0
        return float(1.0 - self.squared_error / total)
