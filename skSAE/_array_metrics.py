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
    per-column ratios, which weight low-variance directions too much. Sums are taken in
    float64 (scikit-learn keeps float32 inputs in float32, where rounding alone gives a
    constant column a variance: compare with float64 copies).

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
        Constant columns follow sklearn too: they carry no weight, and when every
        column is constant the score is the fraction of columns reconstructed exactly.

    Examples
    --------
    >>> explained_variance([[0.0, 1.0], [2.0, 3.0]], [[0.0, 1.0], [2.0, 3.0]])
    1.0
    """
    X, X_hat = _paired(X, X_hat, "explained_variance")
    accumulator = ExplainedVarianceAccumulator()
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

    Keeps, per column and in float64, the mean of the inputs, the sum of their squared
    deviations from it and the sum of squared errors. Each chunk's deviations are taken
    around its own mean and merged exactly (Chan, Golub and LeVeque 1979), so offset
    inputs lose no precision and constant columns have a variance of exactly zero:
    ``sum(x**2) - n * mean**2`` left float64 rounding there, and a score of -6e15 for an
    imperfect reconstruction of constant rows. (Until then it took a ``shift``, the
    decoder bias, subtracted to limit that cancellation; the merge needs none.)
    """

    def __init__(self):
        self.n_rows = 0
        self.mean_D = None
        self.squared_deviations_D = None
        self.squared_error_D = None
        # Columns whose inputs so far all equal the first row's: their variance is 0.
        self.first_row_D = None
        self.constant_D = None

    def update(self, X, X_hat):
        """Add a chunk of inputs and their reconstructions (arrays of equal shape)."""
        X = np.asarray(X, dtype=np.float64)
        n_rows = X.shape[0]
        if n_rows == 0:
            return
        squared_error_D = np.square(X - np.asarray(X_hat, dtype=np.float64)).sum(axis=0)
        mean_D = X.mean(axis=0)
        squared_deviations_D = np.square(X - mean_D).sum(axis=0)
        if self.n_rows == 0:
            self.first_row_D = X[0].copy()
            self.constant_D = (X == self.first_row_D).all(axis=0)
            self.mean_D = mean_D
            self.squared_deviations_D = squared_deviations_D
            self.squared_error_D = squared_error_D
        else:
            self.constant_D &= (X == self.first_row_D).all(axis=0)
            n_total = self.n_rows + n_rows
            delta_D = mean_D - self.mean_D
            self.squared_deviations_D += squared_deviations_D + np.square(delta_D) * (
                self.n_rows * n_rows / n_total
            )
            self.mean_D += delta_D * (n_rows / n_total)
            self.squared_error_D += squared_error_D
        self.n_rows += n_rows

    def result(self):
        """The explained variance of everything fed so far (float).

        As ``r2_score(X, X_hat, multioutput="variance_weighted")`` (its default
        ``force_finite=True``): each column scores ``1 - error / variance``, 1.0 when
        reconstructed exactly, and 0.0 when constant but not reconstructed exactly;
        the scores are averaged with the columns' variances as weights, or uniformly
        when every column is constant. NaN, with an `UndefinedMetricWarning`, for
        fewer than two rows.
        """
        if self.n_rows < 2:
            warnings.warn(
                "explained variance is not well-defined with fewer than two samples.",
                UndefinedMetricWarning,
                stacklevel=3,
            )
            return float("nan")
        numerator_D = self.squared_error_D
        denominator_D = np.where(self.constant_D, 0.0, self.squared_deviations_D)
        nonzero_denominator_D = denominator_D != 0
        nonzero_numerator_D = numerator_D != 0
        valid_D = nonzero_denominator_D & nonzero_numerator_D
        scores_D = np.ones_like(numerator_D)
        scores_D[valid_D] = 1 - numerator_D[valid_D] / denominator_D[valid_D]
        scores_D[nonzero_numerator_D & ~nonzero_denominator_D] = 0.0
        if not nonzero_denominator_D.any():
            return float(np.mean(scores_D))
        return float(np.average(scores_D, weights=denominator_D))
