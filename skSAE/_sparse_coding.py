"""Sparse coding against a fitted SAE's dictionary with scikit-learn's solvers.

What `SparseAutoencoder` runs instead of its encoder when ``transform_algorithm`` is
``"omp"``, ``"lasso_lars"`` or ``"threshold"``, and what `amortisation_gap` uses to
pick a comparable ``alpha``. A leaf: NumPy and scikit-learn only, no torch, nothing
from skSAE.

`sklearn.decomposition.sparse_encode` solves ``X ~= code @ dictionary``, and "some of
the algorithms assume normalized rows" (its docstring): OMP's greedy choice and the
threshold compare correlations ``x @ d``, which favour long rows. The solvers are
therefore run on unit rows, and the codes divided by the row norms afterwards, so
that ``codes @ components_`` is the reconstruction whatever the rows' norms.
Everything is computed in float64.

Shape suffixes: H rows of a block, S rows of a calibration sample, D n_features,
F n_components.
"""

from typing import NamedTuple

import numpy as np
from sklearn.decomposition import sparse_encode

DICTIONARY_ALGORITHMS = ("omp", "lasso_lars", "threshold")
# `calibrate_alpha` for lasso_lars bisects (geometrically) a bracket of a factor
# _BRACKET either side of the threshold's alpha; 10 halvings of its log leave a ratio
# of 1.006 between the ends. A small alpha makes LARS run long paths (dense codes),
# so the bracket stays near the answer instead of spanning decades.
_BISECTION_STEPS = 10
_BRACKET = 16.0


class Dictionary(NamedTuple):
    """A dictionary prepared for `encode_block`: unit rows, their norms, the Gram."""

    unit_FD: np.ndarray
    """The rows scaled to unit norm (a zero row stays zero), float64."""
    norms_F: np.ndarray
    """The rows' norms (1 for a zero row), float64."""
    gram_FF: np.ndarray
    """``unit_FD @ unit_FD.T``, computed once for all blocks."""


def prepare_dictionary(components):
    """The `Dictionary` of ``components`` (n_components, n_features).

    Parameters
    ----------
    components : array-like of shape (n_components, n_features)
        The decoder rows (`SparseAutoencoder.components_`).

    Returns
    -------
    dictionary : Dictionary
    """
    components_FD = np.asarray(components, dtype=np.float64)
    norms_F = np.linalg.norm(components_FD, axis=1)
    norms_F[norms_F == 0] = 1.0
    unit_FD = components_FD / norms_F[:, None]
    return Dictionary(unit_FD, norms_F, unit_FD @ unit_FD.T)


def encode_block(x_HD, dictionary, algorithm, *, n_nonzero_coefs=None, alpha=None):
    """Sparse codes of rows against ``dictionary``, with ``sparse_encode``.

    Parameters
    ----------
    x_HD : ndarray of shape (n_rows, n_features)
        The rows to code, already centred on the decoder bias (``X - b_dec_``).
    dictionary : Dictionary
        From `prepare_dictionary`.
    algorithm : {"omp", "lasso_lars", "threshold"}
        The solver of `sklearn.decomposition.sparse_encode`.
    n_nonzero_coefs : int, default=None
        Atoms per row; only used by ``"omp"``.
    alpha : float, default=None
        The L1 penalty of ``"lasso_lars"`` (of ``0.5 * ||x - code @ D||^2 +
        alpha * ||code||_1``) or the soft threshold of ``"threshold"``, both in the
        units of the correlations ``x @ d`` with unit rows ``d``.

    Returns
    -------
    codes_HF : ndarray of shape (n_rows, n_components), float64
        Codes such that ``codes_HF @ components`` approximates ``x_HD``.
    """
    x_HD = np.asarray(x_HD, dtype=np.float64)
    codes_HF = sparse_encode(
        x_HD,
        dictionary.unit_FD,
        gram=dictionary.gram_FF,
        algorithm=algorithm,
        n_nonzero_coefs=n_nonzero_coefs,
        alpha=alpha,
        check_input=False,
    )
    return codes_HF / dictionary.norms_F


def calibrate_alpha(x_SD, dictionary, algorithm, target_l0):
    """The ``alpha`` at which ``algorithm`` codes ``target_l0`` atoms a row on ``x_SD``.

    For ``"threshold"`` the L0 of a row is the count of its correlations above
    ``alpha``, so ``alpha`` is the quantile of the absolute correlations of the sample
    that leaves ``target_l0 / n_components`` of them above it: exact on the sample.
    For ``"lasso_lars"`` the L0 falls as ``alpha`` grows (all codes are zero from the
    largest absolute correlation up), so a geometric bisection of 10 steps, between
    1/16 and 16 times the threshold's ``alpha`` (at most the largest correlation), runs
    the solver on the sample at each step and returns the ``alpha`` whose mean L0 came
    closest to ``target_l0`` (the nearest end of that range when it holds no match).

    Parameters
    ----------
    x_SD : ndarray of shape (n_rows, n_features)
        A sample of centred rows (``X - b_dec_``).
    dictionary : Dictionary
        From `prepare_dictionary`.
    algorithm : {"lasso_lars", "threshold"}
        The solver the ``alpha`` is for.
    target_l0 : float
        The mean number of non-zero codes a row wanted.

    Returns
    -------
    alpha : float
    """
    x_SD = np.asarray(x_SD, dtype=np.float64)
    correlations = np.abs(x_SD @ dictionary.unit_FD.T)
    n_components = dictionary.unit_FD.shape[0]
    if algorithm == "threshold":
        keep = min(max(target_l0 / n_components, 0.0), 1.0)
        return float(np.quantile(correlations, 1.0 - keep)) if keep < 1.0 else 0.0
    largest = float(correlations.max()) if correlations.size else 0.0
    guess = calibrate_alpha(x_SD, dictionary, "threshold", target_l0)
    if largest == 0.0 or guess == 0.0:
        return guess
    low, high = guess / _BRACKET, min(guess * _BRACKET, largest)
    best_alpha, best_miss = high, np.inf

    def mean_l0(alpha):
        codes = encode_block(x_SD, dictionary, algorithm, alpha=alpha)
        return np.count_nonzero(codes) / x_SD.shape[0]

    for _ in range(_BISECTION_STEPS):
        middle = float(np.sqrt(low * high))
        l0 = mean_l0(middle)
        if abs(l0 - target_l0) < best_miss:
            best_alpha, best_miss = middle, abs(l0 - target_l0)
        if l0 > target_l0:
            low = middle
        else:
            high = middle
    return best_alpha
