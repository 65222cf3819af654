"""Behaviour of SparseAutoencoder: training quality, sklearn integration, inputs, errors."""

import re
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    assert_codes_match,
    assert_same_codes,
    explained_variance_slack,
    mean_max_cosine,
)
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import skSAE._data as data_module
import skSAE._estimator as estimator_module
from skSAE import SparseAutoencoder, TrainingDivergedError, TrainingInterruptedWarning
from skSAE.cache import iter_chunks

FAST = dict(n_components=16, k=4, max_iter=2, batch_size=64, random_state=0)


# ----------------------------------------------------------------- training quality


# A random dictionary of 64 unit vectors in 32 dimensions matches the true directions
# with a mean max cosine similarity of about 0.38 (measured in the test below), so
# 0.9 is far above chance: nearly every true direction has a learned twin.
@pytest.mark.parametrize(
    ("architecture", "options", "min_cosine", "min_variance"),
    [("topk", {"k": 4}, 0.9, 0.75), ("relu", {"l1_coefficient": 1.0}, 0.85, 0.75)],
)
def test_fit_recovers_ground_truth_directions(
    sparse_dataset, architecture, options, min_cosine, min_variance
):
    X, directions = sparse_dataset
    chance = mean_max_cosine(directions, np.random.default_rng(1).normal(size=(64, 32)))
    sae = SparseAutoencoder(
        n_components=64,
        architecture=architecture,
        max_iter=30,
        batch_size=512,
        learning_rate=3e-3,
        random_state=0,
        **options,
    ).fit(X)
    assert chance < 0.45
    assert mean_max_cosine(directions, sae.components_) > min_cosine
    assert sae.score(X) > min_variance


def test_fit_loss_decreases(sparse_dataset):
    X, _ = sparse_dataset
    sae = SparseAutoencoder(
        n_components=64, k=4, max_iter=5, batch_size=512, learning_rate=3e-3, random_state=0
    )
    sae.fit(X)
    assert len(sae.loss_curve_) == 5
    assert all(np.diff(sae.loss_curve_) < 0)
    assert sae.loss_curve_[-1] < 0.7 * sae.loss_curve_[0]
    assert sae.n_iter_ == 5
    assert sae.n_steps_ == 5 * 16


def test_topk_codes_have_at_most_k_nonzeros(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    assert ((sae.transform(small_X) != 0).sum(axis=1) <= 4).all()


def test_k_above_n_components_keeps_every_latent(small_X):
    sae = SparseAutoencoder(n_components=4, k=10, max_iter=1, random_state=0).fit(small_X)
    codes = sae.transform(small_X)
    assert_codes_match(codes, sae, small_X)


def test_relu_codes_follow_public_formula(small_X):
    sae = SparseAutoencoder(architecture="relu", **FAST).fit(small_X)
    expected = np.maximum(small_X @ sae.W_enc_ + sae.b_enc_, 0)
    np.testing.assert_allclose(sae.transform(small_X), expected, rtol=1e-5, atol=1e-5)


def test_components_have_unit_norm(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1.0, rtol=1e-5)


def test_latent_frequency_counts_firing_rows(small_X):
    # A negligible learning rate leaves the weights as they were when the codes were
    # counted, so the training frequency must equal the one measured by transform.
    sae = SparseAutoencoder(
        n_components=16,
        architecture="relu",
        max_iter=1,
        batch_size=64,
        learning_rate=1e-12,
        random_state=0,
    ).fit(small_X)
    expected = (sae.transform(small_X) > 0).mean(axis=0)
    np.testing.assert_allclose(sae.latent_frequency_, expected, atol=1.5 / 200)
    assert 0 < sae.latent_frequency_.sum() <= 16


def test_folded_normalisation_matches_training_reconstruction(small_X):
    sae = SparseAutoencoder(architecture="relu", **FAST).fit(small_X * 100.0)
    module = sae._module
    with torch.no_grad():
        x_BD = torch.from_numpy(small_X * 100.0) * sae.input_scale_
        x_hat_training = module.decode(module.encode(x_BD)).numpy() / sae.input_scale_
    x_hat = sae.inverse_transform(sae.transform(small_X * 100.0))
    np.testing.assert_allclose(x_hat, x_hat_training, rtol=1e-4, atol=1e-3)


def test_input_scale_normalises_mean_squared_norm(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X * 7.0)
    scaled = small_X * 7.0 * sae.input_scale_
    np.testing.assert_allclose(np.square(scaled).sum(axis=1).mean(), 8.0, rtol=1e-4)


def test_score_equals_sklearn_variance_weighted_r2(small_X):
    X = small_X + np.arange(8, dtype=np.float32) * 10  # offsets test the stable sums
    sae = SparseAutoencoder(**FAST).fit(X)
    X_hat = sae.inverse_transform(sae.transform(X))
    expected = r2_score(X, X_hat, multioutput="variance_weighted")
    assert sae.score(X) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("rows", ["constant", "nearly constant"])
def test_score_of_rows_that_barely_vary_equals_r2_score(small_X, rows):
    # Before: about -1e14 on constant rows (float64 rounding of sum(x**2) - n * mean**2
    # around the decoder bias), where r2_score gives 0.0.
    # (Measured before: seeds 0, 2 and 3 gave -1.6e15, -1.7e16 and -4.3e14.)
    sae = SparseAutoencoder(**FAST).fit(small_X)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        X = np.tile(rng.normal(size=(1, 8)).astype(np.float32), (100, 1))
        if rows == "nearly constant":
            X += (1e-4 * rng.normal(size=X.shape)).astype(np.float32)
        X_hat = sae.inverse_transform(sae.transform(X)).astype(np.float64)
        expected = r2_score(X.astype(np.float64), X_hat, multioutput="variance_weighted")
        assert sae.score(X) == pytest.approx(expected, rel=1e-5)
        if rows == "constant":
            assert expected == 0.0


def test_inverse_transform_of_zeros_is_decoder_bias(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    np.testing.assert_array_equal(
        sae.inverse_transform(np.zeros((3, 16))), np.tile(sae.b_dec_, (3, 1))
    )


def test_sparse_output_equals_dense(small_X):
    dense = SparseAutoencoder(**FAST).fit(small_X)
    sparse = clone(dense).set_params(sparse_output=True).fit(small_X)
    codes = sparse.transform(small_X)
    assert sp.issparse(codes) and codes.format == "csr" and codes.dtype == np.float32
    np.testing.assert_array_equal(codes.toarray(), dense.transform(small_X))
    np.testing.assert_allclose(
        sparse.inverse_transform(codes),
        dense.inverse_transform(dense.transform(small_X)),
        rtol=1e-5,
        atol=1e-6,
    )


# --------------------------------------------------------------- sklearn integration


def test_same_seed_gives_bitwise_equal_model(small_X):
    first = SparseAutoencoder(**FAST).fit(small_X)
    second = SparseAutoencoder(**FAST).fit(small_X)
    np.testing.assert_array_equal(first.components_, second.components_)
    np.testing.assert_array_equal(first.W_enc_, second.W_enc_)


def test_different_seed_gives_different_model(small_X):
    first = SparseAutoencoder(**FAST).fit(small_X)
    other = SparseAutoencoder(**{**FAST, "random_state": 1}).fit(small_X)
    assert not np.array_equal(first.components_, other.components_)


def test_fit_twice_equals_fit_once(small_X):
    sae = SparseAutoencoder(**FAST)
    once = sae.fit(small_X).components_.copy()
    np.testing.assert_array_equal(sae.fit(small_X).components_, once)


def test_clone_is_unfitted_with_same_params(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    copy = clone(sae)
    assert copy.get_params() == sae.get_params()
    with pytest.raises(NotFittedError):
        copy.transform(small_X)


def test_pipeline_with_standard_scaler(small_X):
    pipe = Pipeline([("scale", StandardScaler()), ("sae", SparseAutoencoder(**FAST))])
    codes = pipe.fit_transform(small_X)
    assert codes.shape == (200, 16)
    np.testing.assert_array_equal(codes, pipe.transform(small_X))
    assert list(pipe.get_feature_names_out()[:2]) == ["sparseautoencoder0", "sparseautoencoder1"]


def test_grid_search_over_l1_coefficient_with_default_score(sparse_dataset):
    X, _ = sparse_dataset
    search = GridSearchCV(
        SparseAutoencoder(
            n_components=64,
            architecture="relu",
            max_iter=3,
            batch_size=512,
            learning_rate=3e-3,
            random_state=0,
        ),
        {"l1_coefficient": [0.1, 10.0]},
        cv=2,
    ).fit(X[:2048])
    # A heavier penalty explains less variance, so the default score prefers 0.1.
    assert search.best_params_ == {"l1_coefficient": 0.1}
    scores = search.cv_results_["mean_test_score"]
    assert scores[0] > scores[1]


def test_set_output_pandas_names_latents(small_X):
    sae = SparseAutoencoder(**FAST).set_output(transform="pandas").fit(small_X)
    frame = sae.transform(small_X)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns[:2]) == ["sparseautoencoder0", "sparseautoencoder1"]


def test_feature_names_in_from_dataframe(small_X):
    frame = pd.DataFrame(small_X, columns=[f"dim{i}" for i in range(8)])
    sae = SparseAutoencoder(**FAST).fit(frame)
    assert list(sae.feature_names_in_) == list(frame.columns)


def test_partial_fit_counts_one_pass_per_call(small_X):
    sae = SparseAutoencoder(**FAST)
    for _, block in iter_chunks(small_X, 50):
        sae.partial_fit(block)
    assert sae.n_iter_ == 4
    assert sae.n_steps_ == 4  # 50 rows, batch_size 64: one step per block
    assert len(sae.loss_curve_) == 4


def test_partial_fit_keeps_input_scale_of_first_call(small_X):
    sae = SparseAutoencoder(**FAST).partial_fit(small_X)
    scale = sae.input_scale_
    sae.partial_fit(small_X * 10)
    assert sae.input_scale_ == scale


@pytest.mark.parametrize(
    "architecture", ["topk", "batchtopk", "matryoshka", "jumprelu", "gated", "relu"]
)
@pytest.mark.parametrize("block", ["one row", "identical rows"])
def test_partial_fit_trains_on_a_block_whose_rows_do_not_vary(small_X, architecture, block):
    # A stream's last block can hold one row. Its variance is zero, and the divergence
    # check measured the error against it (floored at 1e-3 of the squared norm): every
    # architecture raised TrainingDivergedError ("500 times the variance of the rows").
    sae = SparseAutoencoder(**{**FAST, "architecture": architecture})
    for _, rows in iter_chunks(small_X, 64):
        sae.partial_fit(rows)
    components, n_steps = sae.components_.copy(), sae.n_steps_
    rows = small_X[:1] if block == "one row" else np.repeat(small_X[:1], 50, axis=0)
    sae.partial_fit(rows)
    assert sae.n_steps_ == n_steps + 1 and not np.array_equal(sae.components_, components)
    assert np.isfinite(sae.components_).all() and sae.score(small_X) > 0.2


def test_partial_fit_on_one_row_still_detects_divergence(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    with pytest.raises(TrainingDivergedError, match="left as it was"):
        sae.set_params(learning_rate=1e30).partial_fit(small_X[:1] * 1e18)


def test_warm_start_continues_training(small_X):
    # Without the per-fit learning-rate decay, a continued fit is one long fit.
    sae = SparseAutoencoder(**FAST, decay_fraction=0.0, warm_start=True).fit(small_X)
    sae.fit(small_X)
    assert sae.n_iter_ == 4
    cold = SparseAutoencoder(**{**FAST, "max_iter": 4, "decay_fraction": 0.0}).fit(small_X)
    # Same seed and a continued optimizer: two fits of two passes equal one of four.
    np.testing.assert_allclose(sae.components_, cold.components_, rtol=1e-5, atol=1e-6)


def test_verbose_prints_progress_with_metrics(small_X, capsys):
    SparseAutoencoder(**{**FAST, "verbose": 1}).fit(small_X)
    out = capsys.readouterr().out
    assert "loss=" in out and "L0=" in out and "var_expl=" in out


# ------------------------------------------------------------------ input kinds


def test_torch_tensor_input_equals_numpy(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    from_tensor = SparseAutoencoder(**FAST).fit(torch.from_numpy(small_X).double())
    np.testing.assert_array_equal(from_tensor.components_, sae.components_)
    np.testing.assert_array_equal(sae.transform(torch.from_numpy(small_X)), sae.transform(small_X))


def test_h5py_dataset_is_streamed_in_chunks(tmp_path, monkeypatch, small_X):
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("activations", data=small_X, chunks=(32, 8))
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 4 * 8 * 48)  # 48-row chunks
    monkeypatch.setattr(estimator_module, "CHUNK_BYTES", 4 * 8 * 48)
    monkeypatch.setattr(estimator_module, "_INIT_SAMPLE_ROWS", 64)
    reads = []
    original = data_module.StreamedData._checked

    def recording_checked(self, start, block):
        reads.append(block.shape[0])
        return original(self, start, block)

    monkeypatch.setattr(data_module.StreamedData, "_checked", recording_checked)
    with h5py.File(path, "r") as file:
        dataset = file["activations"]
        sae = SparseAutoencoder(**FAST).fit(dataset)
        codes = sae.transform(dataset)
        score = sae.score(dataset)
    assert max(reads) <= 64
    assert sae.n_features_in_ == 8
    assert sae.n_steps_ == 2 * 4  # 200 rows in full batches of 64 carried across chunks
    # 48-row blocks against one of 200: other kernels, so a code at a cut may flip.
    undecided = assert_same_codes(codes, sae.transform(small_X), sae, small_X)
    assert score == pytest.approx(
        sae.score(small_X), abs=1e-6 + explained_variance_slack(sae, small_X, undecided)
    )


def test_memmap_is_streamed(tmp_path, small_X):
    path = tmp_path / "acts.dat"
    memmap = np.memmap(path, dtype=np.float32, mode="w+", shape=small_X.shape)
    memmap[:] = small_X
    memmap.flush()
    readonly = np.memmap(path, dtype=np.float32, mode="r", shape=small_X.shape)
    sae = SparseAutoencoder(**FAST).fit(readonly)
    np.testing.assert_array_equal(sae.transform(readonly), sae.transform(small_X))


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fit_rejects_non_finite(small_X, bad):
    X = small_X.copy()
    X[3, 2] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        SparseAutoencoder(**FAST).fit(X)


def test_transform_rejects_wrong_width(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    with pytest.raises(ValueError, match="X has 5 features, but SparseAutoencoder is expecting 8"):
        sae.transform(small_X[:, :5])


def test_inverse_transform_rejects_wrong_width(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    with pytest.raises(ValueError, match="n_components=16"):
        sae.inverse_transform(np.zeros((2, 7)))


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (np.zeros((0, 8)), "0 sample"),
        (np.zeros(8), "Expected a 2-dimensional|Expected 2D"),
        (np.array([["a", "b"], ["c", "d"]]), "could not convert|dtype"),
    ],
    ids=["empty", "1-D", "strings"],
)
def test_fit_rejects_malformed_input(X, message):
    with pytest.raises(ValueError, match=message):
        SparseAutoencoder(**FAST).fit(X)


def test_transform_before_fit_raises_not_fitted(small_X):
    with pytest.raises(NotFittedError):
        SparseAutoencoder().transform(small_X)


def test_unavailable_device_suggests_cpu(small_X):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    with pytest.raises(ValueError, match=re.escape("set_params(device='cpu')")):
        SparseAutoencoder(**{**FAST, "device": "cuda"}).fit(small_X)


def test_nan_in_h5py_chunk_names_rows_and_keeps_model(tmp_path, small_X):
    good = SparseAutoencoder(**FAST).fit(small_X)
    components = good.components_.copy()
    X = small_X.copy()
    X[150] = np.nan
    with h5py.File(tmp_path / "bad.h5", "w") as file:
        file["x"] = X
    with (
        h5py.File(tmp_path / "bad.h5", "r") as file,
        pytest.raises(ValueError, match=r"rows 0:200"),
    ):
        good.fit(file["x"])
    np.testing.assert_array_equal(good.components_, components)
    assert good.n_iter_ == 2


def test_failed_partial_fit_leaves_model_usable(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    before = sae.transform(small_X)
    with pytest.raises(ValueError, match="features"):
        sae.partial_fit(small_X[:, :3])
    np.testing.assert_array_equal(sae.transform(small_X), before)
    sae.partial_fit(small_X)  # still trainable
    assert sae.n_iter_ == 3


def test_divergence_with_no_good_step_leaves_the_estimator_unfitted(small_X):
    sae = SparseAutoencoder(architecture="relu", **{**FAST, "learning_rate": 1e30})
    with pytest.raises(TrainingDivergedError, match="learning_rate.*now 1e\\+30"):
        sae.fit(small_X * 1e18)
    # The first check already failed: the only weights are the untrained ones.
    with pytest.raises(NotFittedError):
        sae.transform(small_X)


def test_divergence_in_partial_fit_keeps_the_model_and_its_counters(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    components, n_steps, n_iter = sae.components_.copy(), sae.n_steps_, sae.n_iter_
    with pytest.raises(TrainingDivergedError, match="left as it was"):
        sae.set_params(learning_rate=1e30).partial_fit(small_X * 1e18)
    np.testing.assert_array_equal(sae.components_, components)
    assert (sae.n_steps_, sae.n_iter_) == (n_steps, n_iter)


@pytest.mark.parametrize(
    "architecture", ["topk", "batchtopk", "matryoshka", "jumprelu", "gated", "relu"]
)
@pytest.mark.parametrize("learning_rate", [10.0, 1e3, 1e6])
def test_finite_divergence_is_detected(sparse_dataset, architecture, learning_rate):
    # A huge step sends the reconstruction error far above the variance while it stays
    # finite (measured within 32 steps: 25 to 870 times at learning_rate=10, up to 9e12
    # at 1e6; gated gives NaN); before this check,
    # 16 of these 18 runs returned a useless model without a word.
    X, _ = sparse_dataset
    sae = SparseAutoencoder(
        n_components=64,
        architecture=architecture,
        k=4,
        batch_size=64,
        max_iter=1,
        learning_rate=learning_rate,
        random_state=0,
    )
    with pytest.raises(TrainingDivergedError, match="learning_rate"):
        sae.fit(X[:4096])


def test_divergence_keeps_the_counters_of_the_weights_kept(small_X, monkeypatch):
    # Make the check after step 64 fail: the weights and counters of step 32 stay.
    sae = SparseAutoencoder(**{**FAST, "batch_size": 8, "max_iter": 3})  # 25 steps a pass
    original = estimator_module.TrainingStatistics.summary

    def failing_at_64(self, module):
        summary = original(self, module)
        if sae.n_steps_ == 64:
            summary["finite"] = False
        return summary

    monkeypatch.setattr(estimator_module.TrainingStatistics, "summary", failing_at_64)
    snapshots = {}
    original_good = SparseAutoencoder._good_state

    def recording(self, run):
        state = original_good(self, run)
        snapshots[self.n_steps_] = run.module.W_dec_FD.detach().clone()
        return state

    monkeypatch.setattr(SparseAutoencoder, "_good_state", recording)
    with pytest.raises(TrainingDivergedError, match="step 64.*step 32") as caught:
        sae.fit(small_X)
    assert caught.value.kept_weights
    # Checks at steps 25 (end of pass 1), 32, 50 (end of pass 2) passed, 64 failed. The
    # weights of step 50 were never checked by a window of steps from them; those of
    # step 32 were (by the window ending at 50), so they are kept.
    assert sae.n_steps_ == 32 and sae.n_iter_ == 1 and len(sae.loss_curve_) == 1
    np.testing.assert_allclose(
        sae.components_ / np.linalg.norm(sae.components_, axis=1, keepdims=True),
        snapshots[32].numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_refit_that_diverges_keeps_the_previous_model(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    components, codes = sae.components_.copy(), sae.transform(small_X)
    with pytest.raises(TrainingDivergedError, match="left as it was") as caught:
        sae.set_params(learning_rate=1e30, architecture="jumprelu").fit(small_X * 1e18)
    assert not caught.value.kept_weights
    np.testing.assert_array_equal(sae.components_, components)
    np.testing.assert_array_equal(sae.set_params(architecture="jumprelu").transform(small_X), codes)
    assert sae.n_steps_ == 8 and sae._fit_architecture == "topk"


def test_useless_model_warns_to_lower_the_learning_rate(sparse_dataset):
    # ReLU at learning_rate=1 in 10 steps of 4096 rows neither explodes nor learns
    # (measured: explained variance -0.33 on these rows, from -0.09 in the first
    # steps); the fit says so instead of returning silently.
    X, _ = sparse_dataset
    with pytest.warns(ConvergenceWarning, match="worse than predicting their mean.*learning_rate"):
        SparseAutoencoder(
            architecture="relu", learning_rate=1.0, batch_size=4096, random_state=0
        ).fit(X[:4096])


def test_keyboard_interrupt_keeps_the_steps_trained(small_X, monkeypatch):
    sae = SparseAutoencoder(**FAST)
    original = SparseAutoencoder._check
    calls = []

    def interrupt_in_second_pass(self, run, window):
        calls.append(1)
        if len(calls) == 2:  # the check at the end of pass 2
            raise KeyboardInterrupt
        return original(self, run, window)

    monkeypatch.setattr(SparseAutoencoder, "_check", interrupt_in_second_pass)
    with pytest.warns(TrainingInterruptedWarning, match="after 8 steps"):
        returned = sae.fit(small_X)
    assert returned is sae
    assert sae.n_steps_ == 8 and sae.n_iter_ == 1 and len(sae.loss_curve_) == 1
    assert sae.transform(small_X).shape == (200, 16)  # a usable, fitted model
    np.testing.assert_allclose(np.linalg.norm(sae.components_, axis=1), 1, rtol=1e-5)


def test_keyboard_interrupt_before_the_first_step_restores_and_reraises(small_X, monkeypatch):
    sae = SparseAutoencoder(**FAST, warm_start=True).fit(small_X)
    curve, n_iter, components = list(sae.loss_curve_), sae.n_iter_, sae.components_.copy()

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sae.fit(small_X)
    assert sae.loss_curve_ == curve and sae.n_iter_ == n_iter
    np.testing.assert_array_equal(sae.components_, components)
    fresh = SparseAutoencoder(**FAST)
    with pytest.raises(KeyboardInterrupt):
        fresh.fit(small_X)
    with pytest.raises(NotFittedError):
        fresh.transform(small_X)


def test_readonly_memmap_fit_does_not_warn(tmp_path, small_X):
    np.save(tmp_path / "x.npy", small_X)
    X = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "This fit will make only", ConvergenceWarning)
        SparseAutoencoder(**FAST).fit(X)


@pytest.mark.slow  # acceptance: 30 passes over 8192 rows
def test_batchtopk_keeps_k_per_row_on_average(sparse_dataset):
    X, directions = sparse_dataset
    sae = SparseAutoencoder(
        n_components=64,
        architecture="batchtopk",
        k=4,
        max_iter=30,
        batch_size=512,
        learning_rate=3e-3,
        random_state=0,
    ).fit(X)
    codes = sae.transform(X)
    # Inference uses the learned threshold, which lags the growing codes a little;
    # measured L0 3.87, mean max cosine 0.909, variance explained 0.826 here.
    assert 3.0 < (codes > 0).sum(axis=1).mean() < 6.0
    assert_codes_match(codes, sae, X)
    assert not np.signbit(codes).any()  # no -0.0 entries
    assert mean_max_cosine(directions, sae.components_) > 0.88


def test_batchtopk_threshold_is_in_user_units(small_X):
    sae = SparseAutoencoder(architecture="batchtopk", **FAST).fit(small_X)
    scaled = SparseAutoencoder(architecture="batchtopk", **FAST).fit(small_X * 100)
    assert float(scaled.threshold_) == pytest.approx(100 * float(sae.threshold_), rel=1e-3)


def test_switching_architecture_drops_threshold(small_X):
    sae = SparseAutoencoder(architecture="batchtopk", **FAST).fit(small_X)
    sae.set_params(architecture="topk").fit(small_X)
    assert not hasattr(sae, "threshold_")


# ------------------------------------------------------ fitted behaviour, input layout


@pytest.mark.parametrize(
    ("architecture", "changed"),
    [
        ("topk", {"k": 2}),
        ("batchtopk", {"k": 1}),
        ("matryoshka", {"prefix_sizes": [3, 5]}),
        ("relu", {"decoder_constraint": "free"}),
        ("jumprelu", {"bandwidth": 5.0}),
        ("gated", {"architecture": "topk"}),
    ],
)
def test_set_params_after_fit_leaves_the_codes_unchanged(small_X, architecture, changed):
    sae = SparseAutoencoder(architecture=architecture, **FAST).fit(small_X)
    codes, score = sae.transform(small_X), sae.score(small_X)
    sae.set_params(**changed)
    np.testing.assert_array_equal(sae.transform(small_X), codes)
    assert sae.score(small_X) == score


def test_invalid_parameter_after_fit_does_not_break_transform(small_X):
    sae = SparseAutoencoder(architecture="matryoshka", **FAST).fit(small_X)
    codes = sae.transform(small_X)
    sae.set_params(prefix_sizes=[8, 2])  # invalid, but only for the next fit
    np.testing.assert_array_equal(sae.transform(small_X), codes)
    with pytest.raises(ValueError, match="prefix_sizes"):
        sae.fit(small_X)


def test_partial_fit_applies_a_changed_k(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    sae.set_params(k=2).partial_fit(small_X)
    assert ((sae.transform(small_X) != 0).sum(axis=1) <= 2).all()


def test_negative_strides_are_accepted_everywhere(tmp_path, small_X):
    reversed_X = small_X[::-1]
    sae = SparseAutoencoder(**FAST).fit(reversed_X)
    sae.partial_fit(reversed_X)
    codes = sae.transform(reversed_X)
    np.testing.assert_array_equal(codes, sae.transform(np.ascontiguousarray(reversed_X)))
    assert sae.score(reversed_X) == pytest.approx(sae.score(small_X), abs=1e-6)
    memmap = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="w+", shape=small_X.shape)
    memmap[:] = small_X
    backwards = memmap[::-1]
    np.testing.assert_array_equal(sae.transform(backwards), codes)
    SparseAutoencoder(**FAST).fit(backwards)


def test_dataset_of_a_closed_file_is_a_clear_error(tmp_path, small_X):
    with h5py.File(tmp_path / "acts.h5", "w") as file:
        dataset = file.create_dataset("activations", data=small_X)
    with pytest.raises(ValueError, match="closed h5py file"):
        SparseAutoencoder(**FAST).fit(dataset)


def test_verbose_final_bar_lines_agree(small_X, capsys, monkeypatch):
    # tqdm redraws the bar on close: that line must repeat the last one, not show
    # values the last update did not. Redraw at every update, as on a slow run.
    bar = estimator_module.tqdm
    monkeypatch.setattr(
        estimator_module, "tqdm", lambda **kwargs: bar(mininterval=0, miniters=1, **kwargs)
    )
    SparseAutoencoder(**FAST, verbose=1).fit(small_X)
    lines = [line for line in re.split(r"[\r\n]+", capsys.readouterr().out) if "100%" in line]
    assert len(lines) >= 2
    assert lines[-1].split("step/s")[-1].strip() == lines[-2].split("step/s")[-1].strip()
    assert "var_expl=" in lines[-1]


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka", "jumprelu", "gated"])
def test_thresholded_codes_have_no_negative_zeros(small_X, architecture):
    codes = SparseAutoencoder(architecture=architecture, **FAST).fit(small_X).transform(small_X)
    assert (codes == 0).any() and not np.signbit(codes).any()


def test_interrupted_first_pass_has_the_frequency_of_the_rows_seen(small_X, monkeypatch):
    sae = SparseAutoencoder(**{**FAST, "batch_size": 8})  # 25 steps a pass
    original = SparseAutoencoder._minibatch_step

    def interrupt_at_step_6(self, run, window, x_BD):
        if self.n_steps_ == 5:
            raise KeyboardInterrupt
        return original(self, run, window, x_BD)

    monkeypatch.setattr(SparseAutoencoder, "_minibatch_step", interrupt_at_step_6)
    with pytest.warns(TrainingInterruptedWarning) as record:
        sae.fit(small_X)
    assert record[0].filename == __file__  # points at the user's call
    assert sae.n_steps_ == 5 and sae.n_iter_ == 0 and sae.loss_curve_ == []
    assert sae.latent_frequency_.shape == (16,) and sae.latent_frequency_.sum() > 0


def test_partial_fit_validates_parameters_changed_since_the_first_call(small_X):
    sae = SparseAutoencoder(**FAST).fit(small_X)
    with pytest.raises(ValueError, match="'k' parameter"):
        sae.set_params(k=0).partial_fit(small_X)


def test_partial_fit_refuses_a_threshold_of_the_wrong_form(small_X):
    sae = SparseAutoencoder(architecture="jumprelu", **FAST).fit(small_X)
    components = sae.components_.copy()
    with pytest.raises(ValueError, match="threshold_ of shape \\(16,\\) does not fit"):
        sae.set_params(architecture="batchtopk").partial_fit(small_X)
    np.testing.assert_array_equal(sae.components_, components)


def test_model_pickled_before_fitted_options_loads_and_transforms(small_X):
    sae = SparseAutoencoder(architecture="matryoshka", **FAST).fit(small_X)
    state = sae.__getstate__()
    state["_architecture_fitted"] = state.pop("_fit_architecture")
    del state["_fit_options"]
    old = SparseAutoencoder.__new__(SparseAutoencoder)
    old.__setstate__(state)
    np.testing.assert_array_equal(old.transform(small_X), sae.transform(small_X))
