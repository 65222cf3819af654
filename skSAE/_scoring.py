"""Scorers for scikit-learn model selection, and the Pareto refit of a multi-metric search.

Public through `skSAE.metrics`. A scorer is a plain module-level callable
``scorer(estimator, X, y=None) -> float``, greater is better, so it pickles for
``n_jobs > 1``. It accepts a bare `SparseAutoencoder` on activations, or a `Pipeline`
ending in one; the SAE is then scored in its own input space
(``pipeline[:-1].transform(X)``).
"""

from numbers import Real

import numpy as np
from sklearn.pipeline import Pipeline

from ._array_metrics import cosine_similarity, dead_fraction, mean_l0
from ._loss_recovered import loss_recovered
from ._probing import pooled_activations, pooled_probe_scores
from ._sklearn_compat import Interval, StrOptions, validate_params
from .extraction import ActivationExtractor


def _split(estimator):
    """(steps before the SAE or None, the SAE)."""
    if isinstance(estimator, Pipeline):
        return (estimator[:-1] if len(estimator) > 1 else None), estimator[-1]
    return None, estimator


def _sae_inputs(estimator, X):
    prefix, sae = _split(estimator)
    return sae, (X if prefix is None else prefix.transform(X))


def neg_l0_scorer(estimator, X, y=None):
    """Minus the mean number of active latents per row (greater is sparser)."""
    sae, inputs = _sae_inputs(estimator, X)
    return -mean_l0(sae.transform(inputs))


def explained_variance_scorer(estimator, X, y=None):
    """The SAE's `score`: fraction of the variance of its inputs explained."""
    sae, inputs = _sae_inputs(estimator, X)
    return sae.score(inputs)


def neg_fvu_scorer(estimator, X, y=None):
    """Minus the fraction of variance unexplained (``explained_variance - 1``)."""
    return explained_variance_scorer(estimator, X) - 1.0


def cosine_similarity_scorer(estimator, X, y=None):
    """Mean cosine similarity of each input row and its reconstruction."""
    sae, inputs = _sae_inputs(estimator, X)
    return cosine_similarity(inputs, sae.inverse_transform(sae.transform(inputs)))


def neg_dead_fraction_scorer(estimator, X, y=None):
    """Minus the fraction of latents never active on the scored rows."""
    sae, inputs = _sae_inputs(estimator, X)
    return -dead_fraction(sae.transform(inputs))


def loss_recovered_scorer(estimator, X, y=None):
    """Loss recovered of a text pipeline ``[..., ActivationExtractor, SparseAutoencoder]``.

    ``X`` are the held-out texts; the extractor is the step just before the SAE, so
    the SAE's reconstruction can be spliced back at its hook.
    """
    if not (
        isinstance(estimator, Pipeline)
        and len(estimator) >= 2
        and isinstance(estimator[-2], ActivationExtractor)
    ):
        raise ValueError(
            "the 'loss_recovered' scorer needs a Pipeline whose last two steps are an "
            "ActivationExtractor and a SparseAutoencoder, scored on texts; for an SAE on "
            "activations use skSAE.metrics.LossRecoveredScorer(extractor, texts)."
        )
    return loss_recovered(estimator[-1], estimator[-2], X)


class LossRecoveredScorer:
    """Loss recovered of an SAE on fixed held-out texts, for an SAE fitted on activations.

    The ``X`` of each call (activations) is ignored: the SAE is spliced into
    ``extractor``'s model on ``texts``. Set ``extractor.memory`` so that the clean and
    ablated cross-entropies are computed once for the whole search.

    Parameters
    ----------
    extractor : ActivationExtractor
        The model and hook the SAE was trained on.
    texts : list of str
        Held-out texts.
    ablation : {"zero", "mean"}, default="zero"
        The baseline of `skSAE.metrics.loss_recovered`.

    Examples
    --------
    >>> from skSAE import ActivationExtractor
    >>> scorer = LossRecoveredScorer(ActivationExtractor("path/to/model"), ["held-out text"])
    >>> scorer.ablation
    'zero'
    """

    def __init__(self, extractor, texts, ablation="zero"):
        self.extractor = extractor
        self.texts = list(texts)
        self.ablation = ablation

    def __call__(self, estimator, X=None, y=None):
        _, sae = _split(estimator)
        return loss_recovered(sae, self.extractor, self.texts, ablation=self.ablation)


class SparseProbingScorer:
    """Sparse-probing accuracy of an SAE on fixed labelled texts (`skSAE.evaluation`).

    The ``X`` of each call is ignored: the texts are encoded through ``extractor``,
    mean-pooled, split, and probed with the ``k`` latents that best separate each
    class (`skSAE.evaluation.sparse_probing`); the score is the balanced test
    accuracy. It costs a forward pass over the texts per candidate and fold.

    Parameters
    ----------
    extractor : ActivationExtractor
        The model and hook the SAE was trained on.
    texts : list of str
        Labelled texts (e.g. `skSAE.corpora.labelled_texts`).
    labels : array-like of shape (n_texts,)
        One label per text.
    k : int, default=1
        Latents per probe.

    Examples
    --------
    >>> from skSAE import ActivationExtractor
    >>> scorer = SparseProbingScorer(ActivationExtractor("path/to/model"), ["a", "b"], [0, 1])
    >>> scorer.k
    1
    """

    def __init__(self, extractor, texts, labels, k=1):
        self.extractor = extractor
        self.texts = list(texts)
        self.labels = np.asarray(labels)
        self.k = k

    def __call__(self, estimator, X=None, y=None):
        _, sae = _split(estimator)
        n_components = sae.components_.shape[0]
        if not 1 <= self.k <= n_components:
            raise ValueError(
                f"SparseProbingScorer: k must be in [1, {n_components}], got {self.k}."
            )
        if len(self.labels) != len(self.texts):
            raise ValueError(
                f"SparseProbingScorer: expected one label per text ({len(self.texts)}), got "
                f"{len(self.labels)}."
            )
        pooled = pooled_activations(sae, self.extractor, self.texts)
        scores = pooled_probe_scores(*pooled, self.labels, k_values=(self.k,))
        return scores[f"probe_accuracy_top_{self.k}"]


_SCORERS = {
    "neg_l0": neg_l0_scorer,
    "explained_variance": explained_variance_scorer,
    "neg_fvu": neg_fvu_scorer,
    "cosine_similarity": cosine_similarity_scorer,
    "neg_dead_fraction": neg_dead_fraction_scorer,
    "loss_recovered": loss_recovered_scorer,
}


def get_scorer_names():
    """Names accepted by `get_scorer`.

    Examples
    --------
    >>> get_scorer_names()
    ['cosine_similarity', 'explained_variance', 'loss_recovered', 'neg_dead_fraction',
     'neg_fvu', 'neg_l0']
    """
    return sorted(_SCORERS)


@validate_params({"name": [StrOptions(set(_SCORERS))]}, prefer_skip_nested_validation=True)
def get_scorer(name):
    """The scorer called ``name`` (see `get_scorer_names`).

    Parameters
    ----------
    name : str
        ``"neg_l0"``, ``"explained_variance"``, ``"neg_fvu"``, ``"cosine_similarity"``,
        ``"neg_dead_fraction"`` or ``"loss_recovered"``.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None) -> float``, greater is better.

    Examples
    --------
    >>> get_scorer("neg_l0").__name__
    'neg_l0_scorer'
    """
    return _SCORERS[name]


@validate_params(
    {
        "loss_recovered": ["boolean", callable],
        "sparse_probing": [callable, None],
        "diagnostics": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def sae_scoring(loss_recovered=False, sparse_probing=None, diagnostics=False):
    """The multi-metric ``scoring`` dict for `GridSearchCV` and `cross_validate`.

    Parameters
    ----------
    loss_recovered : bool or LossRecoveredScorer, default=False
        Add ``"loss_recovered"``: ``True`` for a text pipeline (see
        `loss_recovered_scorer`), or a `LossRecoveredScorer` for an SAE on activations.
        It costs a forward pass of the model per candidate and fold.
    sparse_probing : SparseProbingScorer, default=None
        Add ``"sparse_probing"``, the balanced accuracy of its k-sparse probes.
    diagnostics : bool, default=False
        Add ``"cosine_similarity"`` and ``"neg_dead_fraction"`` (on the scored rows).

    Returns
    -------
    scoring : dict of str to callable
        ``"neg_l0"``, ``"explained_variance"``, ``"neg_fvu"`` and those asked for.

    Raises
    ------
    ValueError
        When `loss_recovered` is neither a bool nor a callable.

    Examples
    --------
    >>> sorted(sae_scoring())
    ['explained_variance', 'neg_fvu', 'neg_l0']
    """
    scoring = {name: _SCORERS[name] for name in ("neg_l0", "explained_variance", "neg_fvu")}
    if loss_recovered is True:
        scoring["loss_recovered"] = loss_recovered_scorer
    elif loss_recovered is not False:
        scoring["loss_recovered"] = loss_recovered
    if sparse_probing is not None:
        scoring["sparse_probing"] = sparse_probing
    if diagnostics:
        scoring["cosine_similarity"] = cosine_similarity_scorer
        scoring["neg_dead_fraction"] = neg_dead_fraction_scorer
    return scoring


class ParetoRefit:
    """Pick the best candidate on ``metric`` among those with mean L0 <= ``max_l0``.

    Returned by `pareto_refit`; a module-level class so that searches pickle.
    """

    def __init__(self, max_l0, metric):
        self.max_l0 = max_l0
        self.metric = metric

    def __call__(self, cv_results):
        l0 = -np.asarray(cv_results["mean_test_neg_l0"], dtype=float)
        key = f"mean_test_{self.metric}"
        if key not in cv_results:
            raise ValueError(f"cv_results_ has no {key!r}: add {self.metric!r} to scoring.")
        score = np.asarray(cv_results[key], dtype=float)
        allowed = np.flatnonzero((l0 <= self.max_l0) & np.isfinite(score))
        if allowed.size == 0:
            raise ValueError(
                f"no candidate has mean L0 <= {self.max_l0} (the sparsest has "
                f"{np.nanmin(l0):.1f}); raise max_l0 or add sparser candidates."
            )
        return int(allowed[np.argmax(score[allowed])])


@validate_params(
    {"max_l0": [Interval(Real, 0, None, closed="left")], "metric": [str]},
    prefer_skip_nested_validation=True,
)
def pareto_refit(max_l0, metric="explained_variance"):
    """A ``refit`` callable: best ``metric`` subject to mean L0 <= ``max_l0``.

    Parameters
    ----------
    max_l0 : float
        The L0 budget (active latents per token).
    metric : str, default="explained_variance"
        A scoring name present in the search, e.g. ``"loss_recovered"``.

    Returns
    -------
    refit : callable
        Maps ``cv_results_`` to ``best_index_``; the search needs ``"neg_l0"`` in its
        scoring. ``best_score_`` stays unset, as sklearn does for callable refits.

    Examples
    --------
    >>> refit = pareto_refit(max_l0=20)
    >>> refit({"mean_test_neg_l0": [-8, -16, -32], "mean_test_explained_variance": [0.6, 0.8, 0.9]})
    1
    """
    return ParetoRefit(max_l0, metric)


@validate_params(
    {"l0": ["array-like"], "score": ["array-like"]}, prefer_skip_nested_validation=True
)
def pareto_front(l0, score):
    """Indices of the points no other point beats on both L0 (lower) and score (higher).

    Parameters
    ----------
    l0 : array-like of shape (n_points,)
        Mean active latents per token of each point.
    score : array-like of shape (n_points,)
        A greater-is-better score of each point.

    Returns
    -------
    indices : list of int
        Sorted by increasing L0.

    Examples
    --------
    >>> pareto_front([8, 16, 32, 16], [0.6, 0.5, 0.9, 0.8])
    [0, 3, 2]
    """
    l0 = np.asarray(l0, dtype=float)
    score = np.asarray(score, dtype=float)
    order = np.lexsort((-score, l0))
    front, best = [], -np.inf
    for index in order:
        if score[index] > best:
            front.append(int(index))
            best = score[index]
    return front
