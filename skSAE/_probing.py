"""Are the latents useful? Sparse probing and ablation effects on labelled texts.

Public through `skSAE.evaluation`. After SAEBench (Karvonen et al. 2025, "SAEBench:
A comprehensive benchmark for sparse autoencoders in language model
interpretability"): codes and model activations are mean-pooled over each text's
kept tokens, and scikit-learn's `LogisticRegression` probes them. Multi-class labels
are probed one class against the rest, and scored by balanced accuracy (so a probe
that always answers "the rest" scores 0.5, not the share of the rest).

Shape suffixes: T texts, N token rows, D features, F latents.
"""

import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

DEFAULT_K = (1, 2, 5, 10, 20)
"""Sizes of the sparse probes: SAEBench's defaults (1, 2 and 5), then 10 and 20."""


def pooled_activations(sae, extractor, texts):
    """Mean over each text's kept tokens of the model's activations and of the codes.

    One streaming pass: `ActivationExtractor.iter_batches`, with the SAE's `transform`
    on each batch. Memory: one row per text, never one per token.

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted on ``extractor``'s activations.
    extractor : ActivationExtractor
        The model and hook.
    texts : list of str
        The texts.

    Returns
    -------
    activations_TD : ndarray of shape (n_texts, n_features)
    codes_TF : ndarray of shape (n_texts, n_components)
    n_tokens_T : ndarray of shape (n_texts,)
        Tokens pooled per text (0 where the extractor kept none: rows of zeros).
    """
    check_is_fitted(sae)
    n_texts = len(texts)
    activations_TD = np.zeros((n_texts, sae.n_features_in_))
    codes_TF = np.zeros((n_texts, sae.components_.shape[0]))
    n_tokens_T = np.zeros(n_texts, np.int64)
    for batch in extractor.iter_batches(texts):
        n_rows = batch.activations.shape[0]
        if n_rows == 0:
            continue
        pool_TN = sp.csr_matrix(
            (np.ones(n_rows), (batch.doc_index, np.arange(n_rows))), shape=(n_texts, n_rows)
        )
        activations_TD += pool_TN @ batch.activations.astype(np.float64)
        codes = sae.transform(batch.activations)
        codes = codes.toarray() if sp.issparse(codes) else codes
        codes_TF += np.asarray(pool_TN @ codes, dtype=np.float64)
        n_tokens_T += np.bincount(batch.doc_index, minlength=n_texts)
    scale_T = 1.0 / np.maximum(n_tokens_T, 1)
    return activations_TD * scale_T[:, None], codes_TF * scale_T[:, None], n_tokens_T


def top_latents(codes_TF, y_T, k):
    """The ``k`` latents whose mean code differs most between ``y_T`` true and false.

    SAEBench's selection for its k-sparse probes: the absolute difference of the class
    means on the training texts. Ties go to the lower index.

    Parameters
    ----------
    codes_TF : ndarray of shape (n_texts, n_components)
    y_T : ndarray of bool of shape (n_texts,)
    k : int

    Returns
    -------
    latents : ndarray of int of shape (k,)
        Largest difference first.

    Examples
    --------
    >>> codes = np.array([[0.0, 1.0, 5.0], [0.0, 0.0, 4.0], [2.0, 1.0, 0.0]])
    >>> top_latents(codes, [True, True, False], 2).tolist()
    [2, 0]
    """
    y_T = np.asarray(y_T, dtype=bool)
    gap_F = np.abs(codes_TF[y_T].mean(axis=0) - codes_TF[~y_T].mean(axis=0))
    return np.argsort(-gap_F, kind="stable")[:k]


def _probe():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def probe_scores(codes_train, codes_test, y_train, y_test, activations_train=None,
                 activations_test=None, k_values=DEFAULT_K):  # fmt: skip
    """Balanced test accuracy of logistic probes on top-k latents, all latents and the model.

    Parameters
    ----------
    codes_train, codes_test : ndarray of shape (n_texts, n_components)
        Pooled codes of the training and test texts.
    y_train, y_test : array-like of shape (n_texts,)
        Labels (two or more classes; more are probed one against the rest).
    activations_train, activations_test : ndarray of shape (n_texts, n_features), default=None
        Pooled model activations: the baseline probe, when given.
    k_values : sequence of int, default=(1, 2, 5, 10, 20)
        Sizes of the sparse probes (values above the number of latents are skipped).

    Returns
    -------
    scores : dict
        ``probe_accuracy_top_{k}`` for each k, ``probe_accuracy_all_latents`` and,
        with activations, ``probe_accuracy_model``: balanced accuracy, averaged over
        the one-against-the-rest tasks.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise ValueError(
            f"probing needs at least two classes in the training texts, got {classes}."
        )
    positives = classes[1:] if len(classes) == 2 else classes
    totals = {}
    for positive in positives:
        train_T, test_T = y_train == positive, y_test == positive
        features = {"all_latents": (codes_train, codes_test)}
        for k in k_values:
            if k <= codes_train.shape[1]:
                latents = top_latents(codes_train, train_T, k)
                features[f"top_{k}"] = (codes_train[:, latents], codes_test[:, latents])
        if activations_train is not None:
            features["model"] = (activations_train, activations_test)
        for name, (train, test) in features.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs on separable data: fine
                probe = _probe().fit(train, train_T)
            accuracy = balanced_accuracy_score(test_T, probe.predict(test))
            totals[name] = totals.get(name, 0.0) + accuracy
    order = ["model", "all_latents"] + [f"top_{k}" for k in k_values]
    return {
        f"probe_accuracy_{name}": totals[name] / len(positives) for name in order if name in totals
    }


def sparse_probing(sae, extractor, texts, labels, *, k_values=DEFAULT_K, test_size=0.25,
                   random_state=0):  # fmt: skip
    """SAEBench's sparse probing: can a few latents tell the texts' labels apart?

    The texts' codes and activations are mean-pooled (`pooled_activations`); a
    stratified split keeps ``test_size`` of the texts for testing; for each class
    (one against the rest), the k latents with the largest difference of class means
    on the training texts feed a `LogisticRegression` (after a `StandardScaler`). The
    same probe on all latents, and on the model's pooled activations (the baseline),
    bound it.

    Parameters
    ----------
    sae : SparseAutoencoder
    extractor : ActivationExtractor
    texts : list of str
    labels : array-like of shape (n_texts,)
        One label per text (for example from `skSAE.corpora.labelled_texts`).
    k_values : sequence of int, default=(1, 2, 5, 10, 20)
    test_size : float, default=0.25
    random_state : int, default=0
        The split.

    Returns
    -------
    scores : dict
        See `probe_scores`; plus ``probe_texts``, the number of texts probed (texts
        with no kept token are left out).
    """
    labels = np.asarray(labels)
    if len(labels) != len(texts):
        raise ValueError(f"expected one label per text ({len(texts)}), got {len(labels)}.")
    pooled = pooled_activations(sae, extractor, texts)
    return pooled_probe_scores(*pooled, labels, k_values, test_size, random_state)


def pooled_probe_scores(activations_TD, codes_TF, n_tokens_T, labels, k_values=DEFAULT_K,
                        test_size=0.25, random_state=0):  # fmt: skip
    """`sparse_probing` on pooled rows (`pooled_activations`): split, then `probe_scores`."""
    kept = n_tokens_T > 0
    split = train_test_split(
        activations_TD[kept], codes_TF[kept], labels[kept],
        test_size=test_size, random_state=random_state, stratify=labels[kept],
    )  # fmt: skip
    acts_train, acts_test, codes_train, codes_test, y_train, y_test = split
    scores = probe_scores(codes_train, codes_test, y_train, y_test, acts_train, acts_test, k_values)
    return {**scores, "probe_texts": int(kept.sum())}


def ablation_effect(sae, X, y, probe, latents, codes=None):
    """How much zero-ablating ``latents`` (the SAE's error kept) changes a probe's accuracy.

    The ablated activations are ``X - codes[:, latents] @ components_[latents]``: the
    SAE's reconstruction without those latents, plus its error ``X - X_hat``. This is
    the core of SAEBench's SCR and TPP metrics. Since the map is linear, mean-pooled
    ``X`` with the same pooling of the codes works too (`pooled_activations`).

    Parameters
    ----------
    sae : SparseAutoencoder
        Fitted.
    X : array-like of shape (n_samples, n_features)
        Activations the probe reads.
    y : array-like of shape (n_samples,)
        The probe's targets.
    probe : classifier
        Fitted on activations; its ``score(X, y)`` is the accuracy.
    latents : array-like of int
        The latents to remove.
    codes : array-like of shape (n_samples, n_components), default=None
        The codes of ``X`` (``sae.transform(X)`` when None).

    Returns
    -------
    effect : dict
        ``accuracy`` (on ``X``), ``ablated_accuracy`` and ``change`` (ablated minus
        clean; negative when the latents carried what the probe reads).
    """
    check_is_fitted(sae)
    X = np.asarray(X, dtype=np.float64)
    codes = sae.transform(X.astype(np.float32)) if codes is None else codes
    codes = codes.toarray() if sp.issparse(codes) else np.asarray(codes)
    latents = np.asarray(latents, dtype=np.int64)
    removed = codes[:, latents].astype(np.float64) @ sae.components_[latents].astype(np.float64)
    accuracy = float(probe.score(X, y))
    ablated = float(probe.score(X - removed, y))
    return {"accuracy": accuracy, "ablated_accuracy": ablated, "change": ablated - accuracy}


def targeted_probe_perturbation(sae, activations_TD, codes_TF, labels, *, n_latents=20,
                                test_size=0.25, random_state=0):  # fmt: skip
    """SAEBench's TPP: remove one class's latents; its probe should suffer, the others not.

    For each class c, a probe for "c against the rest" on the model's pooled
    activations, and the ``n_latents`` latents that separate c best (`top_latents`).
    Ablating c's latents (`ablation_effect`) lowers the accuracy of probe c by d_cc
    and of probe j by d_jc; TPP is the mean of d_cc minus the mean of d_jc over
    j != c (SAEBench; Karvonen et al. 2024, "Evaluating sparse autoencoders on
    targeted concept erasure tasks"). Two departures from SAEBench: the latents are
    those of `top_latents` (the absolute gap of class means; SAEBench ranks by the
    positive gap times the probe's weight along each decoder row), and accuracies are
    plain accuracies of the one-against-the-rest test texts (SAEBench balances each
    probe's test set), so the own-class drop is at most the class's share of them.

    Parameters
    ----------
    sae : SparseAutoencoder
    activations_TD, codes_TF : ndarray
        Pooled activations and codes (`pooled_activations`).
    labels : array-like of shape (n_texts,)
        At least two classes.
    n_latents : int, default=20
    test_size : float, default=0.25
    random_state : int, default=0

    Returns
    -------
    scores : dict
        ``tpp`` (greater is better), ``tpp_own_drop`` (mean d_cc) and
        ``tpp_other_drop`` (mean d_jc).
    """
    if not 1 <= n_latents <= codes_TF.shape[1]:
        raise ValueError(
            f"n_latents must be in [1, {codes_TF.shape[1]}] (the latents), got {n_latents}."
        )
    labels = np.asarray(labels)
    split = train_test_split(
        activations_TD, codes_TF, labels,
        test_size=test_size, random_state=random_state, stratify=labels,
    )  # fmt: skip
    acts_train, acts_test, codes_train, codes_test, y_train, y_test = split
    classes = np.unique(y_train)
    probes, latents = {}, {}
    for c in classes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probes[c] = _probe().fit(acts_train, y_train == c)
        latents[c] = top_latents(codes_train, y_train == c, n_latents)
    own, other = [], []
    for c in classes:
        for j in classes:
            effect = ablation_effect(sae, acts_test, y_test == j, probes[j], latents[c], codes_test)
            (own if j == c else other).append(-effect["change"])
    own_drop, other_drop = float(np.mean(own)), float(np.mean(other))
    return {"tpp": own_drop - other_drop, "tpp_own_drop": own_drop, "tpp_other_drop": other_drop}
