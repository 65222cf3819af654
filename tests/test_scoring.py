"""Metrics against float64 references; scorers and model selection, bare and in pipelines."""

import matplotlib
import numpy as np
import pytest
from conftest import TEXTS
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skSAE import ActivationExtractor, SparseAutoencoder
from skSAE import metrics as M  # noqa: N812 - short, used on every line

matplotlib.use("Agg")

FAST = dict(n_components=16, k=4, max_iter=2, batch_size=64, random_state=0)
# Six distinct texts (two variants of three), for 2-fold searches.
CORPUS = [
    f"{text} {variant} {text}" for variant in ("one", "two") for text in TEXTS if len(text) > 1
]


def reference_pair():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6)) + 2
    return X, X + 0.5 * rng.normal(size=X.shape)


def test_normalized_mse_matches_reference():
    X, X_hat = reference_pair()
    expected = sum(((x - y) ** 2).sum() for x, y in zip(X, X_hat, strict=True)) / (X**2).sum()
    assert M.normalized_mse(X, X_hat) == pytest.approx(expected, rel=1e-12)


def test_cosine_similarity_matches_reference():
    X, X_hat = reference_pair()
    expected = np.mean(
        [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(X, X_hat, strict=True)]
    )
    assert M.cosine_similarity(X, X_hat) == pytest.approx(expected, rel=1e-12)


def test_fvu_is_one_minus_explained_variance():
    X, X_hat = reference_pair()
    assert M.fraction_variance_unexplained(X, X_hat) == pytest.approx(
        1 - M.explained_variance(X, X_hat), rel=1e-12
    )


def test_latent_density_and_dead_fraction_dense_and_sparse():
    import scipy.sparse as sp

    codes = np.array([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(M.latent_density(codes), [0, 1, 0, 1 / 3])
    np.testing.assert_allclose(M.latent_density(sp.csr_matrix(codes)), [0, 1, 0, 1 / 3])
    assert M.dead_fraction(codes) == 0.5


@pytest.fixture
def fitted(small_X):
    return SparseAutoencoder(**FAST).fit(small_X)


def test_scorers_are_signed_metrics(fitted, small_X):
    codes = fitted.transform(small_X)
    X_hat = fitted.inverse_transform(codes)
    assert M.get_scorer("neg_l0")(fitted, small_X) == -M.mean_l0(codes)
    assert M.get_scorer("explained_variance")(fitted, small_X) == pytest.approx(
        M.explained_variance(small_X, X_hat), abs=1e-6
    )
    assert M.get_scorer("neg_fvu")(fitted, small_X) == pytest.approx(
        -M.fraction_variance_unexplained(small_X, X_hat), abs=1e-6
    )


def test_scorers_measure_pipeline_in_sae_input_space(small_X):
    pipe = Pipeline([("scale", StandardScaler()), ("sae", SparseAutoencoder(**FAST))])
    pipe.fit(small_X * 100)
    scaled = pipe[0].transform(small_X * 100)
    assert M.explained_variance_scorer(pipe, small_X * 100) == pipe[-1].score(scaled)


def test_unknown_scorer_lists_names():
    with pytest.raises(ValueError, match="neg_l0"):
        M.get_scorer("l0")


def test_unknown_scorer_error_names_parameter_value_and_choices():
    with pytest.raises(
        ValueError,
        match=r"The 'name' parameter of get_scorer must be a str among "
        r"\{.*'neg_l0'.*\}\. Got 'l0' instead\.",
    ):
        M.get_scorer("l0")


@pytest.mark.parametrize(
    ("function", "kwargs", "name"),
    [
        (M.sae_scoring, {"loss_recovered": 0.5}, "loss_recovered"),
        (M.pareto_refit, {"max_l0": -1}, "max_l0"),
        (M.pareto_refit, {"max_l0": "20"}, "max_l0"),
        (M.pareto_refit, {"max_l0": 20, "metric": None}, "metric"),
        (M.pareto_front, {"l0": 3, "score": [0.5]}, "l0"),
    ],
)
def test_model_selection_helpers_reject_arguments_of_the_wrong_type(function, kwargs, name):
    with pytest.raises(ValueError, match=rf"The '{name}' parameter of {function.__name__} must"):
        function(**kwargs)


@pytest.mark.parametrize(
    "metric",
    [
        M.explained_variance,
        M.fraction_variance_unexplained,
        M.normalized_mse,
        M.cosine_similarity,
    ],
)
def test_paired_metrics_name_the_mismatched_shape(metric):
    with pytest.raises(
        ValueError,
        match=rf"The 'X_hat' parameter of {metric.__name__} must be of the shape of X, "
        r"\(4, 3\)\. Got shape \(4, 2\) instead\.",
    ):
        metric(np.zeros((4, 3)), np.zeros((4, 2)))


def test_loss_recovered_scorer_needs_text_pipeline(fitted, small_X):
    with pytest.raises(ValueError, match="ActivationExtractor"):
        M.get_scorer("loss_recovered")(fitted, small_X)


def test_pareto_refit_picks_best_within_budget():
    results = {
        "mean_test_neg_l0": [-4.0, -12.0, -20.0, -40.0],
        "mean_test_loss_recovered": [0.70, 0.85, 0.80, 0.99],
    }
    assert M.pareto_refit(max_l0=25, metric="loss_recovered")(results) == 1
    assert M.pareto_refit(max_l0=100, metric="loss_recovered")(results) == 3
    with pytest.raises(ValueError, match="sparsest has 4.0"):
        M.pareto_refit(max_l0=2, metric="loss_recovered")(results)
    with pytest.raises(ValueError, match="add 'neg_fvu' to scoring"):
        M.pareto_refit(max_l0=25, metric="neg_fvu")(results)


def test_grid_search_multi_metric_with_pareto_refit(sparse_dataset):
    X, _ = sparse_dataset
    search = GridSearchCV(
        SparseAutoencoder(
            n_components=64, max_iter=3, batch_size=512, learning_rate=3e-3, random_state=0
        ),
        {"k": [2, 4, 16]},
        scoring=M.sae_scoring(),
        refit=M.pareto_refit(max_l0=5),
        cv=2,
    ).fit(X[:2048])
    l0 = -search.cv_results_["mean_test_neg_l0"]
    # TopK keeps k latents, then ReLU may zero a few whose pre-activation is negative.
    assert (l0 <= [2, 4, 16]).all() and (l0 > [1.9, 3.9, 15.5]).all()
    assert search.best_index_ == 1  # k=4: the best variance explained within L0 <= 5
    assert search.best_estimator_.k == 4
    np.testing.assert_allclose(
        search.cv_results_["mean_test_neg_fvu"],
        search.cv_results_["mean_test_explained_variance"] - 1,
    )


def text_pipeline(folder, memory=None):
    return Pipeline(
        [
            (
                "acts",
                ActivationExtractor(
                    str(folder), layer=1, context_size=16, device="cpu", memory=memory
                ),
            ),
            ("sae", SparseAutoencoder(n_components=32, k=4, max_iter=2, random_state=0)),
        ]
    )


def test_grid_search_over_text_pipeline_with_loss_recovered(tiny_model_dir, tmp_path):
    search = GridSearchCV(
        text_pipeline(tiny_model_dir, memory=tmp_path),
        {"sae__k": [2, 8]},
        scoring=M.sae_scoring(loss_recovered=True),
        refit=M.pareto_refit(max_l0=10, metric="loss_recovered"),
        cv=2,
    ).fit(CORPUS)
    results = search.cv_results_
    assert np.isfinite(results["mean_test_loss_recovered"]).all()
    # The refit is the best loss recovered among candidates with mean L0 <= 10.
    within = np.flatnonzero(-results["mean_test_neg_l0"] <= 10)
    assert search.best_index_ == within[np.argmax(results["mean_test_loss_recovered"][within])]
    assert search.transform(CORPUS[:1]).shape[1] == 32  # the refitted pipeline


def test_memory_extracts_each_fold_once(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    original = ActivationExtractor._extract_now

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(ActivationExtractor, "_extract_now", counting)
    grid = {"sae__k": [2, 4, 8]}
    refit = "explained_variance"
    GridSearchCV(
        text_pipeline(tiny_model_dir), grid, scoring=M.sae_scoring(), refit=refit, cv=2
    ).fit(CORPUS)
    without_memory = len(calls)
    calls.clear()
    GridSearchCV(
        text_pipeline(tiny_model_dir, memory=tmp_path),
        grid,
        scoring=M.sae_scoring(),
        refit=refit,
        cv=2,
    ).fit(CORPUS)
    # Without memory: per candidate and fold, one extraction to fit and one per scorer
    # (three) on the test texts, plus the refit: 3 * 2 * (1 + 3) + 1.
    assert without_memory == 25
    # With memory: each distinct list of texts once. With 2 folds each half is the
    # training set of one fold and the test set of the other, plus all texts for refit.
    assert len(calls) == 3


def test_cross_validate_grouped_by_document_with_bound_loss_recovered(tiny_model_dir, tmp_path):
    extractor = ActivationExtractor(
        str(tiny_model_dir), layer=1, context_size=16, device="cpu", memory=tmp_path
    )
    result = extractor.extract(CORPUS[:4])
    scoring = M.sae_scoring(loss_recovered=M.LossRecoveredScorer(extractor, CORPUS[4:]))
    scores = cross_validate(
        SparseAutoencoder(n_components=32, k=4, max_iter=2, random_state=0),
        result.activations,
        groups=result.doc_index,
        cv=GroupKFold(n_splits=2),
        scoring=scoring,
    )
    assert set(scoring) <= {key.removeprefix("test_") for key in scores}
    np.testing.assert_allclose(scores["test_neg_l0"], -4, atol=1e-6)
    assert np.isfinite(scores["test_loss_recovered"]).all()


def test_plot_frontier_marks_pareto_points(tmp_path):
    results = {
        "mean_test_neg_l0": [-4.0, -12.0, -20.0],
        "mean_test_explained_variance": [0.5, 0.8, 0.7],
        "params": [{"k": 4}, {"k": 12}, {"k": 20}],
    }
    ax = M.plot_frontier(results, path=tmp_path / "frontier.png")
    front_line = [line for line in ax.get_lines() if line.get_label() == "Pareto front"][0]
    np.testing.assert_array_equal(front_line.get_xdata(), [4.0, 12.0])
    assert (tmp_path / "frontier.png").stat().st_size > 1000
