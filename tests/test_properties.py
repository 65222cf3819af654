"""Property tests: invariants that hold for any data shape and hyperparameters."""

import numpy as np
import pytest
import torch
from conftest import assert_codes_match, assert_same_codes
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import r2_score

from skSAE import SparseAutoencoder
from skSAE._architectures import ARCHITECTURES

# An example may be one row of one latent, so a single code at a cut can be most of
# it: at most half may sit at one (measured on 150 draws like these: at most 5% of one
# example's codes, none in the others), so each check stays a check.
UNDECIDED_EXAMPLE = 0.5


@st.composite
def fitted_cases(draw):
    n_samples = draw(st.integers(2, 40))
    n_features = draw(st.integers(1, 12))
    n_components = draw(st.integers(1, 24))
    architecture = draw(st.sampled_from(sorted(ARCHITECTURES)))
    with_mean = draw(st.booleans())
    k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    X = np.random.default_rng(seed).normal(size=(n_samples, n_features)) * draw(
        st.sampled_from([1e-3, 1.0, 1e3])
    )
    params = dict(
        n_components=n_components,
        architecture=architecture,
        k=k,
        with_mean=with_mean,
        max_iter=1,
        batch_size=16,
        random_state=seed,
    )
    return params, X


def fit(case):
    params, X = case
    return SparseAutoencoder(**params).fit(X), X


@given(fitted_cases())
def test_shapes_and_dtypes(case):
    sae, X = fit(case)
    codes = sae.transform(X)
    n_components = sae.components_.shape[0]
    assert codes.shape == (X.shape[0], n_components) and codes.dtype == np.float32
    X_hat = sae.inverse_transform(codes)
    assert X_hat.shape == X.shape and X_hat.dtype == np.float32
    assert sae.W_enc_.shape == (X.shape[1], n_components)
    assert sae.components_.shape == (n_components, X.shape[1])
    assert np.isfinite(codes).all() and np.isfinite(X_hat).all()


@given(fitted_cases())
def test_sparsity_constraints(case):
    sae, X = fit(case)
    codes = sae.transform(X)
    assert (codes >= 0).all()  # every architecture's codes are non-negative
    if sae.architecture == "topk":
        assert ((codes != 0).sum(axis=1) <= sae.k).all()
    # Every architecture's codes are act(X @ W_enc_ + b_enc_), up to float32 rounding;
    # an entry within that rounding of the cut may fall either way (it once did: a
    # matryoshka pre-activation of 0.000415, small by cancellation of terms near 1e3).
    assert_codes_match(codes, sae, X, max_undecided=UNDECIDED_EXAMPLE)


@given(fitted_cases(), st.data())
def test_rows_are_encoded_independently(case, data):
    sae, X = fit(case)
    row = data.draw(st.integers(0, X.shape[0] - 1))
    # One row and all rows run other kernels: a code at a cut may flip between them.
    assert_same_codes(
        sae.transform(X[row : row + 1]),
        sae.transform(X)[row : row + 1],
        sae,
        X[row : row + 1],
        max_undecided=UNDECIDED_EXAMPLE,
    )


@given(fitted_cases())
def test_public_form_reproduces_the_trained_module(case):
    # The trained module works on (X - input_mean_) * input_scale_; the public
    # attributes fold that normalisation (and free decoder norms, gated magnitudes)
    # away. A wrong fold of a bias, threshold or scale breaks this equality.
    sae, X = fit(case)
    module = sae._module.eval()
    x = (torch.from_numpy(X).float() - torch.from_numpy(sae.input_mean_)) * sae.input_scale_
    with torch.inference_mode():
        x_hat = module.decode(module.encode(x)).double().numpy()
    expected = x_hat / sae.input_scale_ + sae.input_mean_
    reconstructed = sae.inverse_transform(sae.transform(X))
    scale = max(1.0, float(np.abs(X).max()))
    np.testing.assert_allclose(reconstructed, expected, rtol=1e-3, atol=1e-4 * scale)


@given(fitted_cases())
def test_score_equals_sklearn_variance_weighted_r2(case):
    sae, X = fit(case)
    X_hat = sae.inverse_transform(sae.transform(X))
    if np.var(X, axis=0).sum() == 0:
        return
    expected = r2_score(X, X_hat, multioutput="variance_weighted")
    assert sae.score(X) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@given(st.integers(0, 2**16), st.sampled_from(sorted(ARCHITECTURES)))
def test_same_seed_same_model(seed, architecture):
    X = np.random.default_rng(seed).normal(size=(30, 4))
    params = dict(
        n_components=8, k=2, architecture=architecture, max_iter=1, batch_size=8, random_state=seed
    )
    first = SparseAutoencoder(**params).fit(X)
    second = SparseAutoencoder(**params).fit(X)
    np.testing.assert_array_equal(first.components_, second.components_)
    np.testing.assert_array_equal(first.b_enc_, second.b_enc_)


def test_codes_check_leaves_out_only_codes_at_a_cut():
    # The check of thresholded and top-k codes (conftest) must still catch a wrong code:
    # it forgives a flip only where float32 rounding could make one.
    from types import SimpleNamespace

    X = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)
    W = np.array([[1.0, 0.5, -1.0], [0.25, 1.0, 0.5]], dtype=np.float32)
    threshold = SimpleNamespace(W_enc_=W, b_enc_=np.zeros(3, np.float32), threshold_=1.5)
    pre = X.astype(np.float64) @ W  # [[1.5, 2.5, 0], [2.75, 0.5, -3.5]]: 1.5 at the cut
    exact = np.where(pre > 1.5, pre, 0.0)
    assert_codes_match(exact, threshold, X, max_undecided=1.0)
    flipped = exact.copy()
    flipped[0, 0] = 1.5  # active or not: both are right at the cut
    assert_codes_match(flipped, threshold, X, max_undecided=1.0)
    for wrong in ((1, 0, 0.0), (0, 1, 2.5001), (1, 1, 0.5)):  # far from the cut
        codes = exact.copy()
        codes[wrong[:2]] = wrong[2]
        with pytest.raises(AssertionError):
            assert_codes_match(codes, threshold, X, max_undecided=1.0)
    # Top-1: row 0's two largest tie in float32 rounding only if they are that close.
    topk = SimpleNamespace(W_enc_=W, b_enc_=np.array([1.0, 0.0, 0.0], np.float32))
    topk._fit_options = {"k": 1}  # pre row 0: [2.5, 2.5 (tie), 0]; row 1: [3.75, 0.5, -3.5]
    for chosen in ([[2.5, 0, 0], [3.75, 0, 0]], [[0, 2.5, 0], [3.75, 0, 0]]):
        assert_codes_match(np.array(chosen), topk, X, max_undecided=1.0)
    with pytest.raises(AssertionError):
        assert_codes_match(np.array([[2.5, 0, 0], [0, 0.5, 0]]), topk, X, max_undecided=1.0)
