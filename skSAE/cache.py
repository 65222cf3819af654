"""Activation arrays on disk: the row schema, the HDF5 store of an extraction, chunked reading.

`Extraction` is the schema of an extraction's rows, in memory and on disk (one dataset
per field). The store takes the rows from an extractor's public
`skSAE.extraction.ActivationExtractor.iter_batches` and its settings from its
`extraction_key`; this module imports nothing from `skSAE.extraction`.

Only contiguous row blocks are read, so memory stays bounded by one chunk whatever
the size of the file; h5py rejects unsorted fancy indexing, so shuffling happens at
two levels: the order of the chunks, then the rows within a chunk.
"""

import hashlib
import json
import os
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

__all__ = ["ActivationCache", "Extraction", "StoredRows", "iter_chunks"]


class Extraction(NamedTuple):
    """Activations of every kept token, with where each row came from.

    The row schema of an extraction: `skSAE.extraction.ActivationExtractor.extract`
    returns it in memory, and an `ActivationCache` holds one dataset per field.
    """

    activations: np.ndarray
    """Float32 array of shape (n_tokens, d_model)."""
    token_ids: np.ndarray
    """Int64 array of shape (n_tokens,): the token at each row."""
    doc_index: np.ndarray
    """Int64 array of shape (n_tokens,): index of the text each row came from."""
    position: np.ndarray
    """Int64 array of shape (n_tokens,): index of the token within its text's tokens."""


_COLUMNS = Extraction._fields


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
    if isinstance(data, h5py.Dataset) and not data.id.valid:
        raise ValueError(
            "data is an h5py.Dataset of a file that is closed; read it while the file is "
            "open: `with cache.open() as file: ...file['activations']...`."
        )
    n_rows = len(data)
    starts = np.arange(0, n_rows, chunk_rows)
    if shuffle:
        starts = random_state.permutation(starts)
    for start in starts:
        start = int(start)
        yield start, np.asarray(data[start : start + chunk_rows])


class ActivationCache:
    """An HDF5 file of activations, with the token id and origin of every row.

    Datasets: one per field of `Extraction`: ``activations`` (n_rows, d_model) float32,
    chunked and resizable; ``token_ids``, ``doc_index`` and ``position`` (n_rows,) int64.
    Attributes record the extractor's `extraction_key` (model, tokenizer, hook, layer,
    context and batch settings, dtype, the position and norm rules and skSAE version),
    the number and digest of the texts, ``d_model``, how far an unfinished extraction
    got, and the hook's metadata (`hook_metadata`). The object stores only the path, so it pickles.

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
    def hook_metadata(self):
        """What the extractor recorded about its hook (`ActivationExtractor.hook_metadata`).

        Pass it to `skSAE.io.save` with an SAE trained on the rows, so that
        `ActivationExtractor.from_metadata` finds the same activations again. An empty
        dict for a store that does not record it (one written by an older skSAE).
        """
        return json.loads(self.attrs.get("hook_metadata", "{}"))

    @property
    def n_rows(self):
        """Number of stored rows."""
        with self.open() as file:
            return int(file["activations"].shape[0]) if "activations" in file else 0

    def rows(self):
        """The activations as a `StoredRows`: an array-like that reads rows on demand.

        Pass it where scikit-learn wants ``X`` (``GridSearchCV.fit``,
        ``cross_validate``): each fold reads its rows from the file, and it pickles as
        the path, so parallel workers (joblib, Dask) open the file themselves instead
        of receiving a copy of the data.
        """
        return StoredRows(self.path)

    def read(self, start=0, stop=None):
        """Rows ``start:stop`` as an `Extraction` of NumPy arrays."""
        with self.open() as file:
            return Extraction(*(np.asarray(file[name][start:stop]) for name in _COLUMNS))

    @classmethod
    def write(cls, extractor, texts, path):
        """Stream ``extractor``'s rows for ``texts`` into ``path``, resuming if unfinished.

        Parameters
        ----------
        extractor : skSAE.ActivationExtractor
            Gives the rows (`iter_batches`) and the settings (`extraction_key`).
        texts : list of str
            Texts.
        path : str or path
            The HDF5 file.

        Returns
        -------
        cache : ActivationCache

        Notes
        -----
        Nothing is written until the model is loaded, the hook resolved, the texts
        checked and the first rows computed, so a call that fails on its settings
        leaves ``path`` as it was. The file is built under a temporary name
        (``<path>.partial``) and renamed once it holds its datasets, attributes and
        first rows; each later batch is appended and flushed with the count of
        finished texts. A run stopped by an error or an interrupt, or killed between
        two flushes, thus leaves no file or a readable one (HDF5 has no journal: a
        kill in the middle of a flush may still damage the file), and calling again
        with the same extractor settings and texts continues after the last finished
        text. A file of another extraction (any difference in
        `extraction_key` or in the texts) is refused.
        """
        cache = cls(path)
        expected = {**extractor.extraction_key(), **_texts_attrs(texts)}
        resume = False
        documents_done = 0
        if cache.path.exists():
            with cache.open() as file:
                _check_same_extraction(cache.path, file.attrs, expected)
                if file.attrs.get("complete", False):
                    return cache
                resume = "activations" in file
                if resume:
                    documents_done = int(file.attrs.get("documents_done", 0))
        batches = extractor.iter_batches(texts, first_document=documents_done)
        with closing(batches):
            if resume:
                with h5py.File(cache.path, "a") as file:
                    # Drop the rows of a text that was cut off, and redo that text.
                    rows = _rows_before(file["doc_index"], documents_done)
                    for name in _COLUMNS:
                        file[name].resize(rows, axis=0)
                    _append_batches(file, batches, rows, len(texts))
                return cache
            first = next((batch for batch in batches if batch.activations.shape[0]), None)
            if first is None:
                raise ValueError(
                    "No token was kept: the texts are too short once special tokens and "
                    f"the first position of each context are dropped; {cache.path} was "
                    "not written."
                )
            metadata = {"hook_metadata": json.dumps(extractor.hook_metadata())}
            _create_store(cache.path, {**expected, **metadata}, first)
            with h5py.File(cache.path, "a") as file:
                _append_batches(file, batches, first.activations.shape[0], len(texts))
        return cache


class StoredRows:
    """A 2-D dataset of an HDF5 file as a read-on-demand array-like (float32 rows).

    It holds the path and the dataset's name only: indexing opens the file and reads
    the rows asked for (any order, repeats allowed), and a pickle is a few hundred
    bytes, so the data stays where it is when the object goes to other processes.
    ``np.asarray`` reads it whole; `SparseAutoencoder` streams it instead (as an
    `h5py.Dataset`).

    Parameters
    ----------
    path : str or path
    dataset : str, default="activations"

    Examples
    --------
    >>> import numpy as np, h5py, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.h5")
    >>> with h5py.File(path, "w") as file:
    ...     _ = file.create_dataset("activations", data=np.arange(12.0).reshape(6, 2))
    >>> rows = StoredRows(path)
    >>> rows.shape, rows[[4, 1]].tolist()
    ((6, 2), [[8.0, 9.0], [2.0, 3.0]])
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, path, dataset="activations"):
        self.path = Path(path)
        self.dataset = dataset
        with h5py.File(self.path, "r") as file:
            if dataset not in file or file[dataset].ndim != 2:
                raise ValueError(f"{self.path} has no 2-D dataset {dataset!r}.")
            self.shape = tuple(file[dataset].shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and key[1] is Ellipsis:
            key = key[0]  # scikit-learn's _safe_indexing asks for X[indices, ...]
        with h5py.File(self.path, "r") as file:
            data = file[self.dataset]
            if isinstance(key, (slice, int, np.integer)):
                return np.asarray(data[key], dtype=np.float32)
            index = np.asarray(key)
            if index.dtype == bool:
                index = np.flatnonzero(index)
            # h5py reads increasing, distinct indices only, and slowly one by one: a
            # dense selection (a cross-validation fold) reads its span as one slice.
            unique, inverse = np.unique(index, return_inverse=True)
            if unique.size == 0:
                return np.empty((0, self.shape[1]), dtype=np.float32)
            low, high = int(unique[0]), int(unique[-1]) + 1
            if unique.size * 4 >= high - low:
                rows = np.asarray(data[low:high], dtype=np.float32)[unique - low]
            else:
                rows = np.asarray(data[unique], dtype=np.float32)
            return rows[inverse.reshape(index.shape)]

    def __array__(self, dtype=None, copy=None):
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def open_dataset(self):
        """The open file and its `h5py.Dataset` (for streaming); close the file after."""
        file = h5py.File(self.path, "r")
        return file, file[self.dataset]


def _texts_attrs(texts):
    """The number of texts and a digest of them, for the store's attributes."""
    digest = hashlib.sha256()
    for text in texts:
        # surrogatepass: a text the extractor refuses (with a clear error) must not
        # fail here first.
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return {"n_texts": len(texts), "texts_sha256": digest.hexdigest()}


def _check_same_extraction(path, stored_attrs, expected):
    """Refuse a store whose recorded extraction differs from ``expected``."""
    stored = {key: _plain(stored_attrs[key]) for key in expected if key in stored_attrs}
    differing = [key for key in expected if key not in stored or stored[key] != expected[key]]
    if differing:
        details = "; ".join(
            f"{key}: stored {stored.get(key)!r}, this call {expected[key]!r}" for key in differing
        )
        raise ValueError(
            f"{path} holds a different extraction (differs in {differing}: {details}); "
            "remove it or choose another path."
        )


def _plain(value):
    """An HDF5 attribute as a plain Python value (NumPy scalars come back from h5py)."""
    return value.item() if isinstance(value, np.generic) else value


def _create_store(path, attrs, first):
    """Write a new store with its first rows under a temporary name, then rename it."""
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as file:
            file.attrs.update(attrs)
            _create_datasets(file, first.activations.shape[1])
            file.attrs["complete"] = False
            _append_batches(file, [first], 0, None)
    except BaseException:  # an error or Ctrl-C: leave no half-written file behind
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def _append_batches(file, batches, rows, n_texts):
    """Append each batch's columns from row ``rows``; mark complete once ``n_texts`` are done.

    ``n_texts=None`` leaves the file unfinished (more batches follow).
    """
    for batch in batches:
        n_new = batch.activations.shape[0]
        for name in _COLUMNS:
            file[name].resize(rows + n_new, axis=0)
            file[name][rows:] = getattr(batch, name)
        rows += n_new
        file.attrs["documents_done"] = batch.documents_done
        file.flush()
    if n_texts is not None:
        file.attrs["documents_done"] = n_texts
        file.attrs["complete"] = True


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
