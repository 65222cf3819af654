"""Chunked reading of on-disk arrays."""

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from skSAE.cache import iter_chunks


@given(st.integers(1, 60), st.integers(1, 30), st.booleans())
def test_iter_chunks_visits_every_row_once(n_rows, chunk_rows, shuffle):
    data = np.arange(n_rows * 2).reshape(n_rows, 2)
    blocks = list(
        iter_chunks(data, chunk_rows, shuffle=shuffle, random_state=np.random.RandomState(0))
    )
    assert all(block.shape[0] <= chunk_rows for _, block in blocks)
    rows = np.concatenate([block for _, block in sorted(blocks, key=lambda pair: pair[0])])
    np.testing.assert_array_equal(rows, data)


def test_iter_chunks_reads_h5py_dataset(tmp_path):
    data = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as file:
        file["x"] = data
    with h5py.File(tmp_path / "a.h5", "r") as file:
        blocks = list(iter_chunks(file["x"], 4))
    assert [start for start, _ in blocks] == [0, 4, 8]
    assert all(isinstance(block, np.ndarray) for _, block in blocks)
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), data)


def test_iter_chunks_rejects_zero_chunk_rows():
    with pytest.raises(ValueError, match="chunk_rows"):
        list(iter_chunks(np.zeros((3, 2)), 0))


def test_iter_chunks_of_a_closed_file_says_so(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as file:
        file["x"] = np.zeros((4, 2))
        dataset = file["x"]
    with pytest.raises(ValueError, match="file that is closed"):
        list(iter_chunks(dataset, 2))


def test_failed_store_creation_leaves_no_partial_file(tmp_path, monkeypatch):
    from skSAE import cache as cache_module
    from skSAE.extraction import ExtractedBatch

    def failing(file, d_model):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_create_datasets", failing)
    first = ExtractedBatch(
        np.zeros((2, 3), np.float32),
        np.zeros(2, np.int64),
        np.zeros(2, np.int64),
        np.arange(2),
        1,
    )
    path = tmp_path / "acts.h5"
    with pytest.raises(KeyboardInterrupt):
        cache_module._create_store(path, {"model": "m"}, first)
    assert list(tmp_path.iterdir()) == []
