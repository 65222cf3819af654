"""Activation arrays on disk: the HDF5 store of an extraction, and chunked reading.

Only contiguous row blocks are read, so memory stays bounded by one chunk whatever
the size of the file; h5py rejects unsorted fancy indexing, so shuffling happens at
two levels: the order of the chunks, then the rows within a chunk.
"""

import hashlib
from pathlib import Path

import h5py
import numpy as np


def iter_chunks(data, chunk_rows, *, shuffle=False, random_state=None):
    """Yield contiguous row blocks of a 2-D array-like.

    Parameters
    ----------
    data : h5py.Dataset, numpy.memmap or array-like of shape (n_samples, n_features)
        Anything that supports ``len`` and row slicing ``data[start:stop]``.
    chunk_rows : int
        Rows per block (the last block may be shorter).
    shuffle : bool, default=False
        Visit the blocks in a random order (the rows inside a block stay in order).
    random_state : numpy.random.RandomState, default=None
        Source of the block order when ``shuffle`` is true.

    Yields
    ------
    start : int
        Index of the block's first row.
    block : numpy.ndarray of shape (n_rows, n_features)
        The rows ``start:start + n_rows``, read into memory.

    Examples
    --------
    >>> import numpy as np
    >>> [(start, block.shape) for start, block in iter_chunks(np.zeros((5, 2)), 2)]
    [(0, (2, 2)), (2, (2, 2)), (4, (1, 2))]
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    n_rows = len(data)
    starts = np.arange(0, n_rows, chunk_rows)
    if shuffle:
        starts = random_state.permutation(starts)
    for start in starts:
        start = int(start)
        yield start, np.asarray(data[start : start + chunk_rows])


class ActivationCache:
    """An HDF5 file of activations, with the token id and origin of every row.

    Datasets: ``activations`` (n_rows, d_model) float32, chunked and resizable;
    ``token_ids``, ``doc_index`` and ``position`` (n_rows,) int64. Attributes record the
    model, hook, layer, context settings, dtype and skSAE version, and how far an
    unfinished extraction got. The object stores only the path, so it pickles.

    Parameters
    ----------
    path : str or path
        The HDF5 file.

    Examples
    --------
    >>> cache = ActivationCache("acts.h5")
    >>> str(cache.path)
    'acts.h5'
    """

    def __init__(self, path):
        self.path = Path(path)

    def open(self, mode="r"):
        """The `h5py.File`; use as ``with cache.open() as file: sae.fit(file["activations"])``."""
        try:
            return h5py.File(self.path, mode)
        except OSError as exc:
            raise ValueError(f"{self.path} is not a readable HDF5 activation store: {exc}") from exc

    @property
    def attrs(self):
        """The file's attributes as a plain dict."""
        with self.open() as file:
            return dict(file.attrs)

    @property
    def n_rows(self):
        """Number of stored rows."""
        with self.open() as file:
            return int(file["activations"].shape[0]) if "activations" in file else 0

    def read(self, start=0, stop=None):
        """Rows ``start:stop`` as an `skSAE.extraction.Extraction` of NumPy arrays."""
        from .extraction import Extraction

        with self.open() as file:
            return Extraction(*(np.asarray(file[name][start:stop]) for name in _COLUMNS))

    @classmethod
    def write(cls, extractor, texts, path):
        """Stream ``extractor``'s rows for ``texts`` into ``path``, resuming if unfinished.

        Each batch is appended and flushed with the count of finished texts, so an
        interrupted run leaves a readable file; calling again with the same extractor
        settings and texts continues after the last finished text.

        Returns
        -------
        cache : ActivationCache
        """
        cache = cls(path)
        expected = _store_attrs(extractor, texts)
        with h5py.File(cache.path, "a") as file:
            stored = {key: file.attrs[key] for key in expected if key in file.attrs}
            if stored and stored != expected:
                differing = sorted(key for key in expected if stored.get(key) != expected[key])
                raise ValueError(
                    f"{cache.path} holds a different extraction (differs in {differing}); "
                    "remove it or choose another path."
                )
            if file.attrs.get("complete", False):
                return cache
            file.attrs.update(expected)
            documents_done = int(file.attrs.get("documents_done", 0))
            rows = 0
            if "activations" in file:
                # Drop the rows of a text that was cut off, and redo that text.
                rows = _rows_before(file["doc_index"], documents_done)
                for name in _COLUMNS:
                    file[name].resize(rows, axis=0)
            file.attrs["complete"] = False
            for batch in extractor.iter_batches(texts, first_document=documents_done):
                if "activations" not in file:
                    _create_datasets(file, batch.activations.shape[1])
                n_new = batch.activations.shape[0]
                for name in _COLUMNS:
                    file[name].resize(rows + n_new, axis=0)
                    file[name][rows:] = getattr(batch, name)
                rows += n_new
                file.attrs["documents_done"] = batch.documents_done
                file.flush()
            if "activations" not in file:
                raise ValueError("No token was kept: the texts are too short.")
            file.attrs["documents_done"] = len(texts)
            file.attrs["complete"] = True
        return cache


_COLUMNS = ("activations", "token_ids", "doc_index", "position")


def _rows_before(doc_index, document):
    """Number of rows of texts before ``document``; ``doc_index`` is non-decreasing.

    Reads backwards from the end in blocks, so a resume costs one block, not the file.
    """
    stop = doc_index.shape[0]
    while stop > 0:
        start = max(0, stop - 65536)
        block = doc_index[start:stop]
        if block[0] < document or start == 0:
            return start + int(np.searchsorted(block, document))
        stop = start
    return 0


def _create_datasets(file, d_model):
    rows_per_chunk = max(1, 2**20 // (4 * d_model))
    file.create_dataset(
        "activations",
        shape=(0, d_model),
        maxshape=(None, d_model),
        dtype="float32",
        chunks=(rows_per_chunk, d_model),
    )
    for name in _COLUMNS[1:]:
        file.create_dataset(name, shape=(0,), maxshape=(None,), dtype="int64", chunks=(65536,))
    file.attrs["d_model"] = d_model


def _store_attrs(extractor, texts):
    from . import __version__

    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    model = extractor.model
    model_name = getattr(getattr(model, "config", None), "name_or_path", None) or str(model)
    return {
        "model": model_name,
        "hook": extractor.hook,
        "layer": int(extractor.layer),
        "context_size": int(extractor.context_size),
        "dtype": extractor.dtype,
        "exclude_special_tokens": bool(extractor.exclude_special_tokens),
        "drop_first_position": bool(extractor.drop_first_position),
        "n_texts": len(texts),
        "texts_sha256": digest.hexdigest(),
        "sksae_version": __version__,
    }
