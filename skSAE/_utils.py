"""Small helpers shared by the estimator and the data readers.

Shape suffixes: N rows of X, B minibatch rows, D n_features, F n_components.
"""

import warnings

import numpy as np
import torch


def resolve_device(device):
    """Turn the ``device`` parameter into a `torch.device`, checking that it exists.

    Parameters
    ----------
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Returns
    -------
    device : torch.device

    Raises
    ------
    ValueError
        If the string is not a device name, or names a device this machine lacks.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device name; expected 'auto', 'cpu', "
            "'cuda', 'cuda:<index>' or 'mps'."
        ) from exc
    if resolved.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if resolved.index is not None and resolved.index >= available or available == 0:
            raise ValueError(
                f"device={device!r} was requested but this machine has {available} CUDA "
                "device(s); use set_params(device='cpu') or device='auto'."
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device={device!r} was requested but MPS is not available; "
            "use set_params(device='cpu') or device='auto'."
        )
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"device={device!r} is not supported; expected 'auto', 'cpu', 'cuda' or 'mps'."
        )
    return resolved


def torch_generator(random_state):
    """A CPU `torch.Generator` seeded from a `numpy.random.RandomState`.

    Parameters
    ----------
    random_state : numpy.random.RandomState
        The estimator's ``_random_state``; one draw is consumed.

    Returns
    -------
    generator : torch.Generator
    """
    return torch.Generator("cpu").manual_seed(int(random_state.randint(2**31 - 1)))


def read_only_tensor(array):
    """A tensor sharing the memory of a NumPy array that will only ever be read.

    Read-only arrays (pandas values, memmaps opened with ``mode="r"``) are shared
    without a copy; torch's warning about them does not apply, since nothing writes.
    Arrays with a negative stride (``X[::-1]``), which torch cannot share, are copied.
    """
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(array)


def to_numpy(tensor):
    """Copy a tensor to a float32 NumPy array on the host."""
    return tensor.detach().to("cpu", torch.float32).numpy()


def is_torch_tensor(X):
    """Whether ``X`` is a `torch.Tensor` (torch is always importable here)."""
    return isinstance(X, torch.Tensor)


def is_streamed(X):
    """Whether ``X`` lives on disk and must be read in chunks, never whole.

    True for an `h5py.Dataset` and a `numpy.memmap`.
    """
    if isinstance(X, np.memmap):
        return True
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a declared dependency
        return False
    return isinstance(X, h5py.Dataset)
