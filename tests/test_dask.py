"""Model search on a Dask cluster through joblib's dask backend, data left on disk."""

import pickle

import h5py
import numpy as np
import pytest
from joblib import parallel_backend
from sklearn.model_selection import GridSearchCV

from skSAE import ActivationCache, SparseAutoencoder

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask") / "acts.h5"
    X = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32)
    with h5py.File(path, "w") as file:
        file.create_dataset("activations", data=X, chunks=(256, 16))
    return path, X


def search():
    return GridSearchCV(
        SparseAutoencoder(n_components=32, max_iter=2, batch_size=128, random_state=0),
        {"k": [2, 4, 8], "learning_rate": [1e-3, 3e-3]},
        cv=2,
        n_jobs=2,
    )


def test_stored_rows_index_like_an_array_and_pickle_as_a_path(store):
    path, X = store
    rows = ActivationCache(path).rows()
    assert rows.shape == X.shape and len(rows) == 2000
    index = np.array([1500, 3, 3, 700])
    np.testing.assert_array_equal(rows[index], X[index])
    np.testing.assert_array_equal(rows[index, ...], X[index])
    np.testing.assert_array_equal(rows[10:20], X[10:20])
    np.testing.assert_array_equal(np.asarray(rows), X)
    assert len(pickle.dumps(rows)) < 1000 < X.nbytes


def test_grid_search_on_a_local_cluster_equals_the_default_backend(store):
    path, X = store
    rows = ActivationCache(path).rows()
    local = search().fit(rows)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
        parallel_backend("dask"),
    ):
        remote = search().fit(rows)
    for key in ("mean_test_score", "std_test_score", "rank_test_score"):
        np.testing.assert_allclose(remote.cv_results_[key], local.cv_results_[key], rtol=1e-6)
    assert remote.best_params_ == local.best_params_
    np.testing.assert_array_equal(remote.best_estimator_.components_.shape, (32, 16))
