"""Shared fixtures and test configuration."""

import os

import numpy as np
import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def make_sparse_dataset(
    n_samples=8192, n_features=32, n_true=64, p_active=4 / 64, noise=0.01, offset=0.3, seed=0
):
    """Sparse combinations of random unit directions plus Gaussian noise and an offset.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    directions : ndarray of shape (n_true, n_features)
        The ground-truth unit directions.
    """
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_true, n_features))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    active = rng.random((n_samples, n_true)) < p_active
    magnitudes = rng.uniform(0.5, 1.5, size=(n_samples, n_true)) * active
    X = magnitudes @ directions + noise * rng.normal(size=(n_samples, n_features)) + offset
    return X.astype(np.float32), directions


def mean_max_cosine(directions, learned):
    """For each true direction, the best cosine similarity among learned rows; averaged."""
    learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((directions @ learned.T).max(axis=1).mean())


@pytest.fixture(scope="session")
def sparse_dataset():
    return make_sparse_dataset()


@pytest.fixture
def small_X():
    return np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
