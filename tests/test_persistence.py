"""Pickling and joblib: NumPy-only state, identical outputs, training continues."""

import pickle

import joblib
import numpy as np
import pytest
import torch

import skSAE
from skSAE import SparseAutoencoder
from skSAE._architectures import ARCHITECTURES

FAST = dict(n_components=16, k=4, max_iter=2, batch_size=64, random_state=0)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_joblib_round_trip_transforms_identically(tmp_path, small_X, architecture):
    sae = SparseAutoencoder(architecture=architecture, **FAST).fit(small_X)
    joblib.dump(sae, tmp_path / "sae.joblib")
    loaded = joblib.load(tmp_path / "sae.joblib")
    np.testing.assert_array_equal(loaded.transform(small_X), sae.transform(small_X))
    assert loaded.score(small_X) == sae.score(small_X)


def test_pickled_state_holds_no_torch_objects(small_X):
    state = SparseAutoencoder(**FAST).fit(small_X).__getstate__()
    for value in state.values():
        assert not isinstance(
            value, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer, torch.Generator)
        )
    assert state["_sksae_version"] == skSAE.__version__


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_partial_fit_continues_after_unpickling(small_X, architecture):
    sae = SparseAutoencoder(architecture=architecture, with_mean=True, **FAST).fit(small_X)
    loaded = pickle.loads(pickle.dumps(sae))
    before = loaded.components_.copy()
    loaded.partial_fit(small_X)
    assert loaded.n_iter_ == 3
    assert not np.array_equal(loaded.components_, before)
    assert loaded.score(small_X) > 0


def test_loading_other_version_warns(small_X):
    state = SparseAutoencoder(**FAST).fit(small_X).__getstate__()
    state["_sksae_version"] = "0.0.0"
    fresh = SparseAutoencoder.__new__(SparseAutoencoder)
    with pytest.warns(UserWarning, match="saved with skSAE 0.0.0"):
        fresh.__setstate__(state)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_module_rebuilt_from_numpy_state_computes_the_same(small_X, architecture):
    # After unpickling, training resumes from a module rebuilt from the public form;
    # it must compute the very function that was saved (gated: as r_mag = 0).
    sae = SparseAutoencoder(architecture=architecture, with_mean=True, **FAST).fit(small_X + 3)
    loaded = pickle.loads(pickle.dumps(sae))
    module, _ = loaded._training_module(torch.device("cpu"))
    module.eval()
    x_BD = (torch.from_numpy(small_X + 3) - torch.from_numpy(sae.input_mean_)) * sae.input_scale_
    with torch.no_grad():
        x_hat = module.decode(module.encode(x_BD.float())).numpy() / sae.input_scale_
    x_hat += sae.input_mean_
    expected = sae.inverse_transform(sae.transform(small_X + 3))
    np.testing.assert_allclose(x_hat, expected, rtol=1e-4, atol=1e-4)
