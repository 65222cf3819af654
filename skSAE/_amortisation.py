"""The amortisation gap: an SAE's encoder against sparse solvers on its own dictionary.

An SAE's encoder is one matrix product and an activation, trained to approximate the
codes that best reconstruct each row with few dictionary rows; a sparse solver
searches for those codes row by row. The difference in reconstruction at a matched
L0 is what the amortised encoder leaves on the table. Public through
`skSAE.evaluation`.

Shape suffixes: H rows of a chunk, D n_features, F n_components.
"""

import copy
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._array_metrics import ExplainedVarianceAccumulator, cosine_similarity
from ._data import CHUNK_BYTES, validated_data
from ._estimator import SparseAutoencoder
from ._sklearn_compat import Interval, validate_params
from ._sparse_coding import DICTIONARY_ALGORITHMS, calibrate_alpha, prepare_dictionary
from ._validation import invalid_parameter

ALGORITHMS = ("encoder", *DICTIONARY_ALGORITHMS)
# Rows of X, spread evenly over it, on which a None alpha is calibrated.
_CALIBRATION_ROWS = 256


@validate_params(
    {
        "sae": [SparseAutoencoder],
        "X": "no_validation",
        "algorithms": ["array-like"],
        "n_nonzero_coefs": [Interval(Integral, 1, None, closed="left"), None],
        "alpha": [Interval(Real, 0, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def amortisation_gap(
    sae,
    X,
    algorithms=ALGORITHMS,
    n_nonzero_coefs=None,
    alpha=None,
):
    """Reconstruction of the SAE's encoder and of sparse solvers on its dictionary.

    Codes ``X`` with each algorithm in turn (the SAE's encoder, or
    `sklearn.decomposition.sparse_encode` against `components_` as the SAE's
    `transform_algorithm` does) and measures the codes' mean L0 and the
    reconstructions' explained variance and cosine similarity. The solvers run at an
    L0 matched to the encoder's mean L0 on ``X`` (see `n_nonzero_coefs` and `alpha`),
    so their explained variance against the encoder's is the amortisation gap. ``X`` is
    read in chunks (an `h5py.Dataset` or `numpy.memmap` is never loaded whole) and
    ``sae`` is left untouched: each algorithm runs on a shallow copy with its
    ``transform_*`` parameters set.

    Parameters
    ----------
    sae : SparseAutoencoder
        A fitted SAE.
    X : array-like, torch.Tensor, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
        Held-out activations.
    algorithms : sequence of {"encoder", "omp", "lasso_lars", "threshold"}, \
            default=("encoder", "omp", "lasso_lars", "threshold")
        The algorithms to measure, in the order of the result.
    n_nonzero_coefs : int, default=None
        Atoms per row for ``"omp"``. ``None`` means the encoder's mean L0 on ``X``,
        rounded (at least 1, at most ``n_features_in_``).
    alpha : float, default=None
        The L1 penalty of ``"lasso_lars"`` and the threshold of ``"threshold"``, in the
        units of `SparseAutoencoder.transform_alpha`. ``None`` picks, for each of the
        two, the value at which its mean L0 on 256 rows spread evenly over ``X``
        matches the encoder's mean L0 on the whole of ``X`` (the quantile of the
        correlations for ``"threshold"``, exact on those rows; a 10-step bisection of
        solves for ``"lasso_lars"``, to within about 1% in alpha). Their L0 on all of
        ``X`` is then close to the encoder's, not equal: compare the ``"mean_l0"`` of
        the rows.

    Returns
    -------
    results : list of dict
        One per algorithm, in the order of `algorithms`, with keys ``"algorithm"``,
        ``"mean_l0"`` (non-zero codes per row), ``"explained_variance"`` (as
        `SparseAutoencoder.score`), ``"cosine_similarity"`` (mean over rows of the
        cosine of each row of ``X`` and its reconstruction), ``"n_nonzero_coefs"``
        (used by ``"omp"``, else None) and ``"alpha"`` (used by ``"lasso_lars"`` and
        ``"threshold"``, else None). Values are Python floats and ints.

    Raises
    ------
    ValueError
        When `algorithms` is empty or names an unknown algorithm, or `n_nonzero_coefs`
        exceeds the SAE's ``n_components``.

    Notes
    -----
    The solvers are far slower than the encoder (`benchmarks/bench_amortisation.py`,
    one CPU thread, 1024 latents of 128 features: OMP at 32 atoms about 2 ms a row,
    lasso_lars about 3.5 ms, the encoder 10 microseconds), so measure them on a
    held-out sample of thousands of rows, not on a whole training store. Calibrating
    a None `alpha` for lasso_lars adds 10 solves of the 256 sample rows. The codes of
    the solvers are unconstrained in sign, as scikit-learn's are by default, while
    the encoder's are non-negative: the solvers may use a dictionary row in both
    directions (40% of OMP's non-zero codes were negative in that benchmark), so part
    of their advantage is not the encoder's amortisation. ``"lasso_lars"`` shrinks
    the codes it selects (the L1 penalty), so at a matched L0 it may reconstruct
    worse than the encoder. ``"threshold"`` soft-thresholds the correlations without
    solving anything: it is the encoder's untrained counterpart, not a stronger
    solver, and usually reconstructs worse than the encoder.

    Examples
    --------
    >>> import numpy as np
    >>> from skSAE import SparseAutoencoder
    >>> X = np.random.default_rng(0).normal(size=(256, 16))
    >>> sae = SparseAutoencoder(n_components=64, k=4, max_iter=2, random_state=0).fit(X)
    >>> results = amortisation_gap(sae, X[:64], algorithms=["encoder", "omp"])
    >>> [row["algorithm"] for row in results], results[1]["n_nonzero_coefs"]
    (['encoder', 'omp'], 4)
    """
    check_is_fitted(sae)
    algorithms = _checked_algorithms(algorithms)
    n_components = sae.components_.shape[0]
    if n_nonzero_coefs is not None and n_nonzero_coefs > n_components:
        raise invalid_parameter(
            "n_nonzero_coefs",
            "amortisation_gap",
            f"an int in [1, {n_components}] (n_components of the SAE) or None",
            repr(n_nonzero_coefs),
        )
    data = validated_data(sae, X, reset=False, device=torch.device("cpu"))
    # A chunk's float64 codes and the solvers' correlations take about CHUNK_BYTES / 4.
    chunk_rows = max(1, CHUNK_BYTES // (4 * 8 * n_components))
    own = copy.copy(sae).set_params(transform_algorithm="encoder", sparse_output=False)
    encoder, sample_SD = _measure(own, "encoder", data, chunk_rows, sample_rows=True)
    encoder_l0 = encoder["mean_l0"]
    results = []
    for algorithm in algorithms:
        if algorithm == "encoder":
            results.append(encoder)
            continue
        settings = {"transform_n_nonzero_coefs": None, "transform_alpha": None}
        if algorithm == "omp":
            settings["transform_n_nonzero_coefs"] = (
                n_nonzero_coefs
                if n_nonzero_coefs is not None
                else max(1, min(round(encoder_l0), sae.n_features_in_))
            )
        elif alpha is not None:
            settings["transform_alpha"] = float(alpha)
        else:
            settings["transform_alpha"] = calibrate_alpha(
                sample_SD - sae.b_dec_,
                prepare_dictionary(sae.components_),
                algorithm,
                encoder_l0,
            )
        solver = copy.copy(sae).set_params(
            transform_algorithm=algorithm, sparse_output=False, **settings
        )
        result, _ = _measure(solver, algorithm, data, chunk_rows)
        results.append(result)
    return results


def _checked_algorithms(algorithms):
    """The list of algorithm names, or the ValueError naming the bad one."""
    expected = f"a non-empty sequence of names among {list(ALGORITHMS)}"
    if isinstance(algorithms, str):
        raise invalid_parameter("algorithms", "amortisation_gap", expected, repr(algorithms))
    algorithms = list(algorithms)
    if not algorithms:
        raise invalid_parameter("algorithms", "amortisation_gap", expected, "[]")
    for name in algorithms:
        if name not in ALGORITHMS:
            raise invalid_parameter(
                "algorithms", "amortisation_gap", expected, f"{name!r} in {algorithms!r}"
            )
    return algorithms


def _measure(sae, algorithm, data, chunk_rows, sample_rows=False):
    """One streamed pass of ``sae.transform`` over ``data``: the result row.

    With ``sample_rows``, also returns up to `_CALIBRATION_ROWS` rows of ``data``
    spread evenly over it (float64), collected during the pass; else None.
    """
    n_rows = data.n_rows
    wanted = np.unique(np.linspace(0, n_rows - 1, min(n_rows, _CALIBRATION_ROWS)).astype(int))
    sample, nonzero, cosine_sum, start = [], 0, 0.0, 0
    accumulator = ExplainedVarianceAccumulator()
    for x_HD in data.blocks(chunk_rows, torch.device("cpu")):
        block = x_HD.numpy()
        codes_HF = sae.transform(block)
        x_hat_HD = sae.inverse_transform(codes_HF)
        nonzero += int(np.count_nonzero(codes_HF))
        accumulator.update(block, x_hat_HD)
        cosine_sum += cosine_similarity(block, x_hat_HD) * block.shape[0]
        if sample_rows:
            inside = wanted[(wanted >= start) & (wanted < start + block.shape[0])]
            sample.append(block[inside - start].astype(np.float64))
        start += block.shape[0]
    row = {
        "algorithm": algorithm,
        "mean_l0": nonzero / n_rows,
        "explained_variance": accumulator.result(),
        "cosine_similarity": cosine_sum / n_rows,
        "n_nonzero_coefs": sae.transform_n_nonzero_coefs if algorithm == "omp" else None,
        "alpha": sae.transform_alpha if algorithm in ("lasso_lars", "threshold") else None,
    }
    return row, (np.concatenate(sample) if sample_rows else None)
