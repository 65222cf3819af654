"""Training and inference data behind one interface: in memory, or streamed from disk.

`validated_data` checks ``X`` for an estimator (shape, dtype, finiteness, feature
count) and wraps it as an `InMemoryData` (NumPy array or torch tensor) or a
`StreamedData` (`h5py.Dataset` or `numpy.memmap`, read one chunk at a time and never
loaded whole). Both give `sample` (rows for the initialisation), `batches` (one
shuffled training pass) and `blocks` (the rows in order, for inference).

Shape suffixes: N rows of X, B minibatch rows, H rows of a chunk, D n_features.
"""

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sklearn.utils import check_array
from sklearn.utils.validation import validate_data

from ._utils import is_streamed, is_torch_tensor, read_only_tensor
from .cache import StoredRows, check_complete, iter_chunks

# Bytes of one chunk read from disk.
CHUNK_BYTES = 64 * 2**20

# Bytes of float32 rows hashed as one piece by the data fingerprint.
FINGERPRINT_BYTES = 16 * 2**20


def validated_data(estimator, X, *, reset, device):
    """Check ``X`` for ``estimator`` and wrap it for training or inference.

    Parameters
    ----------
    estimator : BaseEstimator
        Receives ``n_features_in_`` (and ``feature_names_in_``) when ``reset``.
    X : array-like, torch.Tensor, h5py.Dataset or numpy.memmap of shape (n_samples, n_features)
    reset : bool
        Whether this call sets the feature count (`fit`, a first `partial_fit`).
    device : torch.device
        Where batches are computed.

    Returns
    -------
    data : InMemoryData or StreamedData
    """
    if isinstance(X, StoredRows):  # read in chunks like the h5py.Dataset it names
        _, X = X.open_dataset()  # the dataset keeps its file open while in use
    if is_streamed(X):
        check_complete(X)  # an interrupted store's rows are not the data asked for
        return StreamedData(estimator, X, reset=reset)
    if is_torch_tensor(X):
        X = X.detach()
        if X.device.type != "cpu":
            return InMemoryData(_validated_device_tensor(estimator, X, reset=reset), device)
        X = X.to(torch.float32).numpy() if X.dtype.is_floating_point else X.numpy()
    X = validate_data(estimator, X, reset=reset, dtype=np.float32)
    return InMemoryData(read_only_tensor(X), device)


class InMemoryData:
    """A validated float32 tensor, batched by a random permutation of all rows.

    Parameters
    ----------
    X_ND : torch.Tensor of shape (N, D)
        Validated data, on the CPU or on ``device``.
    device : torch.device
        Where batches are computed. CPU data is moved there whole when it fits in a
        quarter of the free accelerator memory, else batch by batch.
    """

    def __init__(self, X_ND, device):
        if X_ND.device != device and device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            if X_ND.element_size() * X_ND.nelement() < free_bytes // 4:
                X_ND = X_ND.to(device)
        self.X_ND = X_ND
        self.n_rows = X_ND.shape[0]

    def sample(self, n_rows, random_state):
        """Up to ``n_rows`` distinct random rows (all rows when there are fewer)."""
        if self.n_rows <= n_rows:
            return self.X_ND
        rows = np.sort(random_state.choice(self.n_rows, n_rows, replace=False))
        return self.X_ND[torch.from_numpy(rows).to(self.X_ND.device)]

    def batches(self, batch_size, generator, device, skip=0, after_skip=None):
        """One shuffled pass, as batches of ``batch_size`` rows (the last may be short).

        ``skip`` leaves out the pass's first batches (a resumed run), and ``after_skip``
        is called once they are drawn, before the next batch uses the generator.
        """
        order_N = torch.randperm(self.n_rows, generator=generator).to(self.X_ND.device)
        if after_skip is not None:
            after_skip()
        for start in range(skip * batch_size, self.n_rows, batch_size):
            x_BD = self.X_ND.index_select(0, order_N[start : start + batch_size])
            yield x_BD.to(device, non_blocking=True)

    @functools.cached_property
    def fingerprint(self):
        """Shape and a hash of all rows: what a checkpoint must have been trained on."""
        return _fingerprint(
            self.n_rows, self.X_ND.shape[1], lambda start, stop: self.X_ND[start:stop].cpu()
        )

    def blocks(self, block_rows, device):
        """The rows in order, in blocks of ``block_rows``."""
        for start in range(0, self.n_rows, block_rows):
            yield self.X_ND[start : start + block_rows].to(device, non_blocking=True)


class StreamedData:
    """An `h5py.Dataset` or `numpy.memmap`, read and validated one chunk at a time.

    A training pass visits the blocks in a random order and shuffles the rows within
    each block, both drawn from the torch generator.
    """

    def __init__(self, estimator, X, *, reset):
        if hasattr(X, "id") and not X.id.valid:
            raise ValueError(
                "X is a dataset of a closed h5py file; keep the file open while the "
                "estimator reads it: `with h5py.File(path) as file: sae.fit(file[name])`."
            )
        if len(X.shape) != 2:
            raise ValueError(
                f"Expected a 2D array, got a {len(X.shape)}D {type(X).__name__} of shape "
                f"{X.shape}; reshape it to (n_samples, n_features)."
            )
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise ValueError(f"X has dtype {X.dtype}; expected a numeric (float or integer) array.")
        # Validates the shape (empty X, feature count) on a two-row slice only.
        validate_data(estimator, np.asarray(X[:2]), reset=reset, dtype=np.float32)
        self.X = X
        self.n_rows = X.shape[0]
        self.n_features = X.shape[1]
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * self.n_features))

    def _checked(self, start, block):
        try:
            block = check_array(block, dtype=np.float32, ensure_all_finite=True)
        except ValueError as exc:
            stop = start + block.shape[0]
            raise ValueError(f"{exc} (rows {start}:{stop} of the {type(self.X).__name__})") from exc
        return read_only_tensor(block)

    def sample(self, n_rows, random_state):
        """A contiguous block of up to ``n_rows`` rows at a random offset."""
        start = int(random_state.randint(max(1, self.n_rows - n_rows + 1)))
        return self._checked(start, np.asarray(self.X[start : start + n_rows]))

    def batches(self, batch_size, generator, device, skip=0, after_skip=None):
        """One pass: chunks in random order, rows shuffled within; full batches across chunks.

        ``skip`` and ``after_skip`` as in `InMemoryData.batches`: the skipped batches are
        still read (their chunks' shuffles come from the generator), not yielded.
        """
        leftover_BD = None
        n_blocks = -(-self.n_rows // self.chunk_rows)
        produced = 0
        order = torch.randperm(n_blocks, generator=generator).tolist()
        if skip == 0 and after_skip is not None:
            after_skip()  # the block order is drawn; resume before the first shuffle
        for x_HD in _read_ahead(self._read_block, order):
            x_HD = x_HD[torch.randperm(x_HD.shape[0], generator=generator)]
            if leftover_BD is not None:
                x_HD = torch.cat([leftover_BD, x_HD])
            n_full = x_HD.shape[0] // batch_size * batch_size
            for offset in range(0, n_full, batch_size):
                produced += 1
                if produced <= skip:
                    if produced == skip and after_skip is not None:
                        after_skip()
                    continue
                yield x_HD[offset : offset + batch_size].to(device, non_blocking=True)
            leftover_BD = x_HD[n_full:] if n_full < x_HD.shape[0] else None
        if leftover_BD is not None and produced >= skip:
            yield leftover_BD.to(device, non_blocking=True)

    @functools.cached_property
    def fingerprint(self):
        """Shape and a hash of all rows: what a checkpoint must have been trained on."""
        return _fingerprint(self.n_rows, self.n_features, lambda start, stop: self.X[start:stop])

    def _read_block(self, block):
        """Chunk number ``block``, read and validated (in the read-ahead thread)."""
        start = block * self.chunk_rows
        return self._checked(start, np.asarray(self.X[start : start + self.chunk_rows]))

    def blocks(self, block_rows, device):
        """The rows in order, in blocks of at most ``block_rows``."""
        for start, block in iter_chunks(self.X, min(block_rows, self.chunk_rows)):
            yield self._checked(start, block).to(device)


def _read_ahead(read, keys):
    """``read(key)`` for each key in turn, the next one read in a thread meanwhile.

    Training on one chunk (torch releases the GIL) overlaps the read of the next, so a
    pass over a store runs near the speed of training from memory. At most two chunks
    are held: the one being trained on and the one being read.
    """
    keys = list(keys)
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="skSAE-read-ahead") as pool:
        pending = pool.submit(read, keys[0])
        for key in keys[1:]:
            ready = pending.result()
            pending = pool.submit(read, key)
            yield ready
        yield pending.result()


def _fingerprint(n_rows, n_features, read_rows):
    """``n_rows``, ``n_features`` and a SHA-256 of every row (as float32).

    ``read_rows(start, stop)`` gives rows ``start:stop`` (an array or a CPU tensor). The
    rows are hashed in pieces of `FINGERPRINT_BYTES`, on up to 8 threads (hashlib
    releases the GIL), and the pieces' digests are hashed in order: a value changed in
    any row changes the fingerprint. It is computed once per training call that has a
    ``checkpoint_path``, before the first step. Measured on the project's 2-core CPU
    under load: 1.5-2 GB/s, about 2 s per million rows of 768 features, and 0.15 s for
    the main job's 100k rows of 576 features (which train for about 25 s). A GPU trains
    a pass far faster, so there the hash weighs more (not measured).
    """
    piece_rows = max(1, FINGERPRINT_BYTES // (4 * n_features))

    def digest(start):
        stop = min(start + piece_rows, n_rows)
        piece = np.ascontiguousarray(read_rows(start, stop), dtype=np.float32)
        return hashlib.sha256(piece).digest()

    threads = max(1, min(8, torch.get_num_threads()))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="skSAE-fingerprint") as pool:
        digests = b"".join(pool.map(digest, range(0, n_rows, piece_rows)))
    return {
        "n_rows": int(n_rows),
        "n_features": int(n_features),
        "rows_sha256": hashlib.sha256(digests).hexdigest(),
    }


def _validated_device_tensor(estimator, X, *, reset):
    """Validate a tensor on an accelerator without copying it to the host."""
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2D tensor, got {X.ndim}D of shape {tuple(X.shape)}; reshape it to "
            "(n_samples, n_features)."
        )
    if X.dtype.is_complex or X.dtype == torch.bool:
        raise ValueError(f"X has dtype {X.dtype}; expected a real floating or integer tensor.")
    validate_data(estimator, X[:2].float().cpu().numpy(), reset=reset, dtype=np.float32)
    X = X.to(torch.float32)
    if not bool(torch.isfinite(X).all()):
        raise ValueError("Input X contains NaN or infinity.")
    return X
