"""Activation arrays on disk: the row schema, the HDF5 store of an extraction, chunked reading.

`Extraction` is the schema of an extraction's rows, in memory and on disk (one dataset
per field). The store takes the rows from an extractor's public
`skSAE.extraction.ActivationExtractor.iter_batches` and its settings from its
`extraction_key`; this module imports nothing from `skSAE.extraction`.

Only contiguous row blocks are read, so memory stays bounded by one chunk whatever
the size of the file; h5py rejects unsorted fancy indexing, so shuffling happens at
two levels: the order of the chunks, then the rows within a chunk.
"""

import errno
import hashlib
import json
import math
import os
import re
import shutil
from contextlib import closing, suppress
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

__all__ = ["ActivationCache", "Extraction", "StoredRows", "iter_chunks"]

# Disk set aside while a store is open for writing, and given back to HDF5 when a write
# fails so that it can still close the file (see `_StoreWriter`): more than its caches
# can hold unwritten, h5py's default 1 MiB of chunks for each of the 4 datasets, and
# their metadata.
_RESERVE_BYTES = 8 * 2**20
# Room a batch needs beyond its new chunks: the chunk index, attributes and headers.
_METADATA_BYTES = 2**20


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
        first rows; each later batch is appended and flushed before the attributes
        that count its rows and finished texts are, and ``complete`` is set once every
        row is written. A run stopped by an error or an interrupt, or killed between
        two flushes, thus leaves no file or a readable one (HDF5 has no journal: a
        kill in the middle of a flush may still damage the file), and calling again
        with the same extractor settings and texts continues after the last finished
        text. A file of another extraction (any difference in
        `extraction_key` or in the texts) is refused.

        A disk that fills is refused before HDF5 writes: each batch first checks the
        free space against the chunks it starts. A write the file system refuses
        anyway (another process took the room, a quota) is caught too. Either way the
        call raises one `OSError` that names the file, the reason and the texts it
        holds, after closing the file with only its counted rows: it stays resumable,
        and never complete. HDF5 writes at close what it still holds, so 8 MiB are set
        aside next to the store while it is written (``<path>.reserve``) and given
        back to it when a write fails.

        Raises
        ------
        OSError
            If the file system refuses a write (``errno`` 28 for a full disk).
        ValueError
            If ``path`` holds another extraction, or no token is kept.
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
            if not resume:
                first = next((batch for batch in batches if batch.activations.shape[0]), None)
                if first is None:
                    raise ValueError(
                        "No token was kept: the texts are too short once special tokens and "
                        f"the first position of each context are dropped; {cache.path} was "
                        "not written."
                    )
                metadata = {"hook_metadata": json.dumps(extractor.hook_metadata())}
                try:
                    _create_store(cache.path, {**expected, **metadata}, first)
                except _StoreWriteError as failure:
                    raise failure.error(
                        cache.path,
                        "Nothing was written; free some space, or choose another path, and "
                        "run the extraction again",
                    ) from failure
                documents_done = first.documents_done
            writer = None
            try:
                writer = _StoreWriter(cache.path, "a")
                with writer:
                    if resume:  # drop the rows of a text that was cut off, and redo it
                        writer.keep_texts_before(documents_done)
                    for batch in batches:
                        writer.append(batch)
                    writer.finish(len(texts))
            except _StoreWriteError as failure:
                done = documents_done if writer is None else writer.documents_done
                raise failure.error(
                    cache.path,
                    f"The store holds {done} of {len(texts)} texts and is not complete; "
                    "free some space and run the same extraction again to continue it",
                ) from failure
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
            check_complete(file[dataset])
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


def check_complete(data):
    """Refuse the rows of a store whose extraction has not finished.

    Parameters
    ----------
    data : h5py.Dataset or array-like
        Rows to train on or to encode. A dataset of a file marked ``complete=False``
        (an `ActivationCache` whose `ActivationCache.write` stopped: interrupted, or
        its disk full) is refused; anything else passes.

    Raises
    ------
    ValueError
        Naming the file, how many of its texts it holds, and how to finish it.
    """
    if not isinstance(data, h5py.Dataset) or not data.id.valid:
        return  # (a dataset of a closed file is refused where it is read)
    attrs = data.file.attrs
    if "complete" in attrs and not attrs["complete"]:
        raise ValueError(
            f"{data.file.filename} is an unfinished store ({attrs.get('documents_done', 0)} "
            f"of {attrs.get('n_texts', '?')} texts): run the extraction that writes it "
            "again to finish it (`skSAE extract`, or ActivationExtractor.extract with "
            "store=), or read the rows it holds with ActivationCache.read."
        )


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
        with _StoreWriter(partial, "w") as writer:
            writer.create(attrs, first.activations.shape[1])
            writer.append(first)
    except BaseException:  # an error or Ctrl-C: leave no half-written file behind
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


class _StoreWriteError(Exception):
    """A store could not be written: what the file system said, and its ``errno``."""

    def __init__(self, reason, code=None):
        super().__init__(reason)
        self.reason = reason
        self.errno = code

    def error(self, path, advice):
        """The `OSError` a user sees: the store, the file system's refusal, ``advice``."""
        error = OSError(f"{path}: the file system refused a write ({self.reason}). {advice}.")
        error.errno = self.errno
        return error


def _writing(action, *args):
    """``action(*args)``, a call that writes; its failure raised as `_StoreWriteError`."""
    try:
        return action(*args)
    except (OSError, RuntimeError) as exc:  # h5py raises either, by where HDF5 failed
        raise _write_error(exc) from exc


def _write_error(exc):
    """The `_StoreWriteError` of an exception raised by a write."""
    # HDF5 quotes the C errno in its message; Python's own OSError carries it.
    found = re.search(r"errno = (\d+)", str(exc))
    code = int(found.group(1)) if found else getattr(exc, "errno", None)
    reason = os.strerror(code) if code else " ".join(str(exc).split())
    return _StoreWriteError(f"{reason}, errno {code}" if code else reason, code)


class _StoreWriter:
    """An open store that counts rows only once they are on disk.

    A batch is written and flushed before the attributes that count it (``rows_done``,
    ``documents_done``) are, and ``complete`` is set after the last one. A write that
    fails (a full disk, a quota, an I/O error) is raised once, as `_StoreWriteError`, after
    the file is closed and the rows it had not counted are dropped.

    HDF5 cannot be trusted after a failed write: its close may fail too, and a file it
    could not close is cleaned up at interpreter exit, where each failure is printed as
    an ignored exception and the process may crash. Hence three precautions:

    - each batch first checks that the file system has room for it (the chunks it
      starts and `_METADATA_BYTES`), so a disk that fills is refused before HDF5 writes;
    - `_RESERVE_BYTES` are set aside on the same file system (``<path>.reserve``) while
      the file is open, and given back to HDF5 for its close when a write fails anyway
      (another process filled the disk, a quota the free space does not show);
    - the datasets stay open until the close, so each of their writes fails where it can
      be raised (a dataset that h5py drops is closed where an error is only printed).
    """

    def __init__(self, path, mode):
        self.path = Path(path)
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        _writing(_set_aside, self._reserve, _RESERVE_BYTES)
        try:
            self.file = h5py.File(self.path, mode)
        except BaseException as exc:
            self._reserve.unlink(missing_ok=True)
            # Creating a file writes its header; other failures to open (a lock held by
            # another process) are h5py's to explain.
            error = _write_error(exc) if isinstance(exc, OSError) else None
            if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise error from exc
            raise
        self._datasets = {name: self.file[name] for name in _COLUMNS if name in self.file}
        stored = self._datasets["activations"].shape[0] if self._datasets else 0
        self.rows = int(self.file.attrs.get("rows_done", stored))
        self.documents_done = int(self.file.attrs.get("documents_done", 0))

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if isinstance(error, _StoreWriteError):
                self._close_after_failure()
            else:
                try:
                    _writing(self.file.close)
                except _StoreWriteError:
                    self._close_after_failure()
                    raise
        finally:
            self._reserve.unlink(missing_ok=True)

    def create(self, attrs, d_model):
        """Write the attributes and the empty datasets of a new store."""
        _writing(self._create, attrs, d_model)

    def keep_texts_before(self, document):
        """Keep the counted rows of the texts before ``document`` only."""
        rows = _rows_before(self._datasets["doc_index"], document, self.rows)
        _writing(self._resize_and_count, rows, self.documents_done)

    def append(self, batch):
        """Write ``batch``'s rows after the counted ones, flush them, then count them."""
        n_rows = batch.activations.shape[0]
        if n_rows:
            self._check_room(n_rows)
            _writing(self._write_rows, batch)
        _writing(self._count, self.rows + n_rows, batch.documents_done)

    def finish(self, n_texts):
        """Mark the store complete, once every row is counted."""
        _writing(self._finish, n_texts)

    def _check_room(self, n_rows):
        """Raise `_StoreWriteError` when the file system has no room for ``n_rows`` more rows."""
        need = _METADATA_BYTES
        for dataset in self._datasets.values():
            # HDF5 writes whole chunks: the rows take the chunks they start, full size.
            chunk_rows = dataset.chunks[0]
            new_chunks = math.ceil((self.rows + n_rows) / chunk_rows) - math.ceil(
                self.rows / chunk_rows
            )
            need += new_chunks * math.prod(dataset.chunks) * dataset.dtype.itemsize
        usage = shutil.disk_usage(self.path.parent)
        free = usage.free
        if usage.total and free < need:  # (a total of 0: the file system does not say)
            raise _StoreWriteError(
                f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB free, the next "
                f"{n_rows} rows need {need / 2**20:.1f} MiB",
                errno.ENOSPC,
            )

    def _create(self, attrs, d_model):
        self.file.attrs.update(attrs)
        _create_datasets(self.file, d_model)
        self._datasets = {name: self.file[name] for name in _COLUMNS}
        self.file.attrs["complete"] = False
        self._count(0, 0)

    def _write_rows(self, batch):
        stop = self.rows + batch.activations.shape[0]
        for name, dataset in self._datasets.items():
            dataset.resize(stop, axis=0)
            dataset[self.rows :] = getattr(batch, name)
        self.file.flush()  # the rows are on disk before the attributes count them

    def _resize_and_count(self, rows, documents_done):
        for dataset in self._datasets.values():
            dataset.resize(rows, axis=0)
        self._count(rows, documents_done)

    def _finish(self, n_texts):
        self.file.attrs["complete"] = True
        self._count(self.rows, n_texts)

    def _count(self, rows, documents_done):
        self.file.attrs["rows_done"] = rows
        self.file.attrs["documents_done"] = documents_done
        self.file.flush()
        self.rows, self.documents_done = rows, documents_done

    def _close_after_failure(self):
        """Close with the reserve given back to HDF5, then drop the rows not counted.

        Best effort, errors ignored: the write that failed is the error to raise.
        """
        self._reserve.unlink(missing_ok=True)
        with suppress(OSError, RuntimeError):
            self.file.close()
        if self.file.id.valid:
            return  # HDF5 still holds the file: do not open it a second time
        with suppress(OSError, RuntimeError), h5py.File(self.path, "a") as file:
            if "activations" in file and file["activations"].shape[0] > self.rows:
                for name in _COLUMNS:
                    file[name].resize(self.rows, axis=0)


def _set_aside(path, n_bytes):
    """Write ``n_bytes`` of random bytes to ``path`` (room that `_StoreWriter` gives back).

    Random, not zeros: a compressing file system (ZFS, btrfs) stores zeros in no space.
    """
    try:
        with open(path, "wb") as file:
            for start in range(0, n_bytes, 2**20):
                file.write(os.urandom(min(2**20, n_bytes - start)))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _rows_before(doc_index, document, stop):
    """Number of rows of texts before ``document`` among the first ``stop`` rows.

    ``doc_index`` is non-decreasing; it is read backwards from ``stop`` in blocks, so a
    resume costs one block, not the file.
    """
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
