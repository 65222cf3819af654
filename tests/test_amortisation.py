"""Dictionary solvers as `transform_algorithm`, and the amortisation gap they measure."""

import pickle

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import TEXTS, code_statistics_slack
from sklearn.base import clone
from sklearn.linear_model import Lasso
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from skSAE import ActivationExtractor, SparseAutoencoder
from skSAE import _amortisation as amortisation_module
from skSAE._amortisation import amortisation_gap
from skSAE.metrics import (
    explained_variance,
    get_scorer,
    loss_recovered,
    loss_recovered_details,
    mean_l0,
)

FAST = dict(n_components=32, k=3, max_iter=3, batch_size=64, random_state=0)
SOLVERS = ["omp", "lasso_lars", "threshold"]
ALL = ["encoder", *SOLVERS]


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(256, 16)) + 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(X):
    return SparseAutoencoder(**FAST).fit(X)


def solver(sae, algorithm, **settings):
    """A fitted copy of ``sae`` with ``transform_algorithm`` and its settings."""
    return pickle.loads(pickle.dumps(sae)).set_params(transform_algorithm=algorithm, **settings)


def unit_rows(sae):
    components = sae.components_.astype(np.float64)
    return components / np.linalg.norm(components, axis=1, keepdims=True)


def greedy_omp(x, dictionary, n_atoms):
    """Float64 orthogonal matching pursuit of one row: its reconstruction."""
    residual, chosen = x.copy(), []
    for _ in range(n_atoms):
        chosen.append(int(np.argmax(np.abs(dictionary @ residual))))
        atoms = dictionary[chosen]
        coefficients, *_ = np.linalg.lstsq(atoms.T, x, rcond=None)
        residual = x - coefficients @ atoms
    return x - residual


# ------------------------------------------------------- each solver against a reference


def test_omp_reconstruction_equals_float64_greedy_reference(fitted, X):
    sae = solver(fitted, "omp", transform_n_nonzero_coefs=3)
    codes = sae.transform(X)
    assert ((codes != 0).sum(axis=1) == 3).all()
    centred = X.astype(np.float64) - fitted.b_dec_
    expected = np.array([greedy_omp(x, unit_rows(fitted), 3) for x in centred])
    reconstruction = sae.inverse_transform(codes) - fitted.b_dec_
    np.testing.assert_allclose(reconstruction, expected, atol=1e-4)


def test_lasso_lars_codes_solve_the_lasso_in_float64(fitted, X):
    # Independent solver: coordinate descent on the same objective, in float64.
    alpha = 0.5
    sae = solver(fitted, "lasso_lars", transform_alpha=alpha)
    codes = sae.transform(X[:40])
    dictionary = fitted.components_.astype(np.float64)
    for x, code in zip(X[:40].astype(np.float64) - fitted.b_dec_, codes, strict=True):
        # sklearn's Lasso minimises ||x - D^T c||^2 / (2 * n_features) + a * ||c||_1.
        reference = Lasso(alpha=alpha / x.size, fit_intercept=False, tol=1e-12, max_iter=100_000)
        reference.fit(dictionary.T, x)
        np.testing.assert_allclose(code @ dictionary, reference.coef_ @ dictionary, atol=1e-4)


def test_threshold_codes_are_the_soft_thresholded_correlations(fitted, X):
    sae = solver(fitted, "threshold", transform_alpha=0.8)
    correlations = (X.astype(np.float64) - fitted.b_dec_) @ unit_rows(fitted).T
    expected = np.sign(correlations) * np.maximum(np.abs(correlations) - 0.8, 0.0)
    np.testing.assert_allclose(sae.transform(X), expected, atol=1e-5)


@pytest.mark.parametrize("algorithm", SOLVERS)
def test_solver_reconstruction_ignores_the_norms_of_the_rows(fitted, X, algorithm):
    # The solvers see unit rows; the codes are scaled so that codes @ components_ holds.
    settings = {"transform_n_nonzero_coefs": 3} if algorithm == "omp" else {"transform_alpha": 0.8}
    sae = solver(fitted, algorithm, **settings)
    scaled = solver(fitted, algorithm, **settings)
    scale = np.random.default_rng(1).uniform(0.2, 5.0, size=(FAST["n_components"], 1))
    scaled.components_ = (fitted.components_ * scale).astype(np.float32)
    np.testing.assert_allclose(
        scaled.inverse_transform(scaled.transform(X)),
        sae.inverse_transform(sae.transform(X)),
        atol=1e-4,
    )


def test_omp_reconstructs_exact_sparse_combinations_the_encoder_misses():
    sae = SparseAutoencoder(n_components=48, k=3, max_iter=3, batch_size=64, random_state=0)
    sae.fit(np.random.default_rng(0).normal(size=(512, 32)))
    rng = np.random.default_rng(2)
    codes = np.zeros((200, 48))
    for row in codes:
        row[rng.choice(48, size=3, replace=False)] = rng.uniform(1.0, 2.0, size=3)
    exact = (codes @ sae.components_ + sae.b_dec_).astype(np.float32)
    omp = solver(sae, "omp", transform_n_nonzero_coefs=3)
    error = np.abs(omp.inverse_transform(omp.transform(exact)) - exact).max()
    assert error < 1e-4 * np.abs(exact).max()
    assert omp.score(exact) > 1 - 1e-8
    assert sae.score(exact) < 0.99


# ------------------------------------------------------------ the estimator's contract


@pytest.mark.parametrize("algorithm", ALL)
def test_score_is_explained_variance_of_the_round_trip(fitted, X, algorithm):
    sae = solver(fitted, algorithm)
    codes = sae.transform(X)
    assert codes.dtype == np.float32 and codes.shape == (256, 32)
    reconstruction = sae.inverse_transform(codes)
    np.testing.assert_allclose(reconstruction, codes @ sae.components_ + sae.b_dec_, rtol=1e-6)
    assert sae.score(X) == pytest.approx(explained_variance(X, reconstruction), abs=1e-6)


@pytest.mark.parametrize("algorithm", ALL)
def test_sparse_output_equals_dense_for_every_algorithm(fitted, X, algorithm):
    dense = solver(fitted, algorithm).transform(X)
    sparse = solver(fitted, algorithm, sparse_output=True).transform(X)
    assert sp.issparse(sparse) and sparse.dtype == np.float32
    np.testing.assert_array_equal(sparse.toarray(), dense)


@pytest.mark.parametrize("algorithm", ALL)
def test_scorers_follow_the_transform_algorithm(fitted, X, algorithm):
    sae = solver(fitted, algorithm)
    pipeline = Pipeline([("scale", FunctionTransformer()), ("sae", sae)])
    assert get_scorer("neg_l0")(pipeline, X) == -mean_l0(sae.transform(X))
    assert get_scorer("explained_variance")(pipeline, X) == sae.score(X)
    assert get_scorer("neg_fvu")(sae, X) == pytest.approx(sae.score(X) - 1.0, abs=1e-12)


def test_set_params_on_a_fitted_model_changes_its_codes_and_back(fitted, X):
    sae = solver(fitted, "encoder")
    encoder_codes = sae.transform(X)
    omp_codes = sae.set_params(transform_algorithm="omp").transform(X)
    assert not np.array_equal(omp_codes, encoder_codes)
    assert sae.score(X) > fitted.score(X)
    np.testing.assert_array_equal(
        sae.set_params(transform_algorithm="encoder").transform(X), encoder_codes
    )


def test_clone_keeps_the_transform_parameters(fitted):
    sae = solver(fitted, "lasso_lars", transform_alpha=0.3, transform_n_nonzero_coefs=5)
    params = clone(sae).get_params()
    assert params["transform_algorithm"] == "lasso_lars"
    assert params["transform_alpha"] == 0.3 and params["transform_n_nonzero_coefs"] == 5


def test_fit_ignores_the_transform_algorithm(X, fitted):
    other = SparseAutoencoder(transform_algorithm="omp", **FAST).fit(X)
    np.testing.assert_array_equal(other.components_, fitted.components_)
    np.testing.assert_array_equal(other.W_enc_, fitted.W_enc_)


def test_pickled_solver_transforms_identically(fitted, X):
    sae = solver(fitted, "omp", transform_n_nonzero_coefs=2)
    loaded = pickle.loads(pickle.dumps(sae))
    assert loaded.transform_algorithm == "omp"
    np.testing.assert_array_equal(loaded.transform(X), sae.transform(X))


def test_model_pickled_before_the_inference_options_loads_with_the_encoder(fitted, X):
    state = fitted.__getstate__()
    for name in ("transform_algorithm", "transform_n_nonzero_coefs", "transform_alpha"):
        del state[name]
    loaded = SparseAutoencoder.__new__(SparseAutoencoder)
    loaded.__setstate__(state)
    assert loaded.get_params()["transform_algorithm"] == "encoder"
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))


def test_checkpoint_fingerprint_ignores_the_inference_options():
    from skSAE._estimator import _checkpoint_params

    assert _checkpoint_params(SparseAutoencoder()) == _checkpoint_params(
        SparseAutoencoder(transform_algorithm="omp", transform_alpha=1.0)
    )


def test_default_atoms_are_k_capped_at_the_width(X):
    sae = SparseAutoencoder(**{**FAST, "k": 20}).fit(X)
    codes = solver(sae, "omp").transform(X)
    assert ((codes != 0).sum(axis=1) == 16).all()  # k=20 > n_features=16
    codes = solver(sae.set_params(k=2), "omp").transform(X)  # k as fitted, not as set
    assert ((codes != 0).sum(axis=1) == 16).all()


def test_default_atoms_of_relu_are_the_encoder_mean_l0(X):
    sae = SparseAutoencoder(**{**FAST, "architecture": "relu", "target_l0": 3}).fit(X)
    target = round(mean_l0(sae.transform(X)))
    codes = solver(sae, "omp").transform(X)
    assert ((codes != 0).sum(axis=1) == target).all()


@pytest.mark.parametrize("algorithm", ["lasso_lars", "threshold"])
def test_default_alpha_matches_the_model_l0(fitted, X, algorithm):
    l0 = mean_l0(solver(fitted, algorithm).transform(X[:128]))
    assert l0 == pytest.approx(FAST["k"], abs=0.5)


def test_h5py_input_gives_the_codes_of_the_array(tmp_path, fitted, X):
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("activations", data=X)
    sae = solver(fitted, "omp", transform_n_nonzero_coefs=3)
    with h5py.File(path, "r") as file:
        codes = sae.transform(file["activations"])
    np.testing.assert_array_equal(codes, sae.transform(X))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"transform_algorithm": "lars"}, "'transform_algorithm' parameter of SparseAutoencoder"),
        ({"transform_n_nonzero_coefs": 0}, "'transform_n_nonzero_coefs' parameter"),
        ({"transform_alpha": -1.0}, "'transform_alpha' parameter of SparseAutoencoder"),
        (
            {"transform_algorithm": "omp", "transform_n_nonzero_coefs": 33},
            r"must be an int in \[1, 32\] \(n_components\) or None\. Got 33",
        ),
    ],
)
def test_bad_transform_settings_after_fit_are_clear_errors(fitted, X, settings, message):
    sae = pickle.loads(pickle.dumps(fitted)).set_params(**settings)
    with pytest.raises(ValueError, match=message):
        sae.transform(X)
    with pytest.raises(ValueError, match=message):
        sae.score(X)


def test_bad_transform_algorithm_fails_fit(X):
    with pytest.raises(ValueError, match="'transform_algorithm' parameter"):
        SparseAutoencoder(transform_algorithm="lars", **FAST).fit(X)


# ---------------------------------------------------------------- amortisation_gap


def test_amortisation_gap_rows_match_each_algorithm_transform(fitted, X):
    results = amortisation_gap(fitted, X)
    assert [row["algorithm"] for row in results] == ALL
    for row in results:
        settings = {
            "transform_n_nonzero_coefs": row["n_nonzero_coefs"],
            "transform_alpha": row["alpha"],
        }
        sae = solver(fitted, row["algorithm"], **settings)
        codes = sae.transform(X)
        assert row["mean_l0"] == pytest.approx(mean_l0(codes), rel=1e-12)
        assert row["explained_variance"] == pytest.approx(sae.score(X), abs=1e-6)
        assert isinstance(row["cosine_similarity"], float)
    encoder_l0 = results[0]["mean_l0"]
    assert results[1]["n_nonzero_coefs"] == round(encoder_l0)
    for row in results[2:]:
        assert row["mean_l0"] == pytest.approx(encoder_l0, abs=0.5)


def test_amortisation_gap_leaves_the_sae_untouched(fitted, X):
    params, codes = fitted.get_params(), fitted.transform(X)
    amortisation_gap(fitted, X, algorithms=["omp", "threshold"], alpha=0.5)
    assert fitted.get_params() == params
    np.testing.assert_array_equal(fitted.transform(X), codes)


def test_amortisation_gap_in_chunks_equals_one_pass(monkeypatch, tmp_path, fitted, X):
    whole = amortisation_gap(fitted, X, n_nonzero_coefs=2, alpha=0.6)
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("activations", data=X)
    monkeypatch.setattr(amortisation_module, "CHUNK_BYTES", 4 * 8 * 32 * 40)  # 40-row chunks
    with h5py.File(path, "r") as file:
        chunked = amortisation_gap(fitted, file["activations"], n_nonzero_coefs=2, alpha=0.6)
    # The encoder's codes of 40-row blocks against one block of 256: a code at a cut may
    # fall either way. (The solvers work in float64: a cut within its rounding, 1e-16,
    # is not to be expected.)
    slack = code_statistics_slack(fitted, X)
    for one, other in zip(whole, chunked, strict=True):
        encoder = one["algorithm"] == "encoder"
        assert abs(one["mean_l0"] - other["mean_l0"]) <= (slack["l0"] if encoder else 0.0)
        assert one["explained_variance"] == pytest.approx(
            other["explained_variance"], abs=1e-6 + (slack["explained_variance"] if encoder else 0)
        )
        assert one["cosine_similarity"] == pytest.approx(other["cosine_similarity"], abs=1e-6)


def test_amortisation_gap_omp_beats_the_encoder_on_exact_combinations():
    sae = SparseAutoencoder(n_components=48, k=3, max_iter=3, batch_size=64, random_state=0)
    sae.fit(np.random.default_rng(0).normal(size=(512, 32)))
    rng = np.random.default_rng(2)
    codes = np.zeros((100, 48))
    for row in codes:
        row[rng.choice(48, size=3, replace=False)] = rng.uniform(1.0, 2.0, size=3)
    exact = codes @ sae.components_ + sae.b_dec_
    encoder, omp = amortisation_gap(sae, exact, algorithms=["encoder", "omp"])
    assert omp["explained_variance"] > 1 - 1e-8 > encoder["explained_variance"]
    assert omp["cosine_similarity"] == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"algorithms": "omp"}, r"'algorithms' parameter of amortisation_gap must be"),
        ({"algorithms": []}, r"must be a non-empty sequence of names .* Got \[\]"),
        ({"algorithms": ["omp", "lars"]}, r"Got 'lars' in \['omp', 'lars'\] instead"),
        ({"n_nonzero_coefs": 33}, r"\[1, 32\] \(n_components of the SAE\) or None\. Got 33"),
        ({"n_nonzero_coefs": 0}, "'n_nonzero_coefs' parameter of amortisation_gap"),
        ({"alpha": -0.1}, "'alpha' parameter of amortisation_gap"),
    ],
)
def test_amortisation_gap_bad_arguments_are_clear_errors(fitted, X, arguments, message):
    with pytest.raises(ValueError, match=message):
        amortisation_gap(fitted, X, **arguments)


def test_amortisation_gap_needs_a_fitted_sae(X):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        amortisation_gap(SparseAutoencoder(), X)


# ------------------------------------------------------------------- loss recovered


def test_loss_recovered_splices_the_solver_codes(tiny_model_dir):
    extractor = ActivationExtractor(
        str(tiny_model_dir), layer=1, context_size=16, batch_size=3, device="cpu"
    )
    sae = SparseAutoencoder(n_components=32, k=2, max_iter=2, random_state=0)
    sae.fit(extractor.transform(TEXTS))
    omp = solver(sae, "omp", transform_n_nonzero_coefs=2)
    encoder_score = loss_recovered(sae, extractor, TEXTS)
    details = loss_recovered_details(omp, extractor, TEXTS)
    assert abs(details.score - encoder_score) > 1e-4

    def omp_reconstruction(hidden_BSD):
        x_ND = hidden_BSD.reshape(-1, 16).numpy()
        return torch.from_numpy(omp.inverse_transform(omp.transform(x_ND))).reshape(
            hidden_BSD.shape
        )

    assert details.ce_sae == pytest.approx(
        extractor.cross_entropy(TEXTS, omp_reconstruction), rel=1e-6
    )
    assert loss_recovered(omp, extractor, TEXTS) == pytest.approx(details.score, rel=1e-6)
