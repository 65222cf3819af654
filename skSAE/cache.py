"""Reading activation arrays that live on disk (`h5py.Dataset`, `numpy.memmap`) in chunks.

Only contiguous row blocks are read, so memory stays bounded by one chunk whatever
the size of the file; h5py rejects unsorted fancy indexing, so shuffling happens at
two levels: the order of the chunks, then the rows within a chunk.
"""

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
