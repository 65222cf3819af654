"""Training checkpoints: written atomically, read without running code, tied to their run.

A checkpoint is a `torch.save` file of plain containers and tensors (no pickled
objects), read back with ``torch.load(weights_only=True)``. It is written to a
temporary file in the same folder and renamed over the previous one, so a crash or a
kill during the write leaves the previous checkpoint whole. Its *fingerprint* (the
data's shape and a hash of sampled rows, the parameters, the call) must match the run
that reads it: a checkpoint from other data or other parameters is refused. A leaf:
torch, NumPy and the standard library only.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout; a file of another version is refused."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another run (other data, parameters or call)."""


def fingerprint_params(params, ignore):
    """A JSON-able digest of estimator parameters, leaving out those in ``ignore``."""
    kept = {key: value for key, value in sorted(params.items()) if key not in ignore}
    text = json.dumps(kept, sort_keys=True, default=repr)
    return {"params_sha256": hashlib.sha256(text.encode()).hexdigest(), "params": text}


def write_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def read_checkpoint(path, fingerprint):
    """The state in ``path``, or None when there is none; refuses another run's.

    Raises
    ------
    CheckpointMismatchError
        When the file's fingerprint differs from ``fingerprint``; names the fields.
    ValueError
        When the file is not a readable checkpoint of this format.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        stale.unlink(missing_ok=True)  # a write that a crash interrupted
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise ValueError(
            f"checkpoint_path={os.fspath(path)!r} is not a readable skSAE checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "delete it to train from the start."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint_path={os.fspath(path)!r} is not an skSAE checkpoint of format "
            f"{CHECKPOINT_FORMAT}; delete it to train from the start."
        )
    check_fingerprint(state.get("fingerprint", {}), fingerprint, path)
    return state


def check_fingerprint(saved, expected, path, what="checkpoint_path"):
    """Raise `CheckpointMismatchError` naming the fields where ``saved`` differs."""
    differ = sorted(
        key
        for key in set(saved) | set(expected)
        if key != "params" and saved.get(key) != expected.get(key)
    )
    if "call" in differ:
        raise CheckpointMismatchError(
            f"{what}={os.fspath(path)!r} holds the checkpoint of a {saved.get('call')} run, "
            f"not of a {expected.get('call')} one. Delete the file or pass another "
            "checkpoint_path to train from the start."
        )
    if differ:
        raise CheckpointMismatchError(
            f"{what}={os.fspath(path)!r} was written by another run: its "
            f"{', '.join(differ)} differ from this call's. Delete the file or pass another "
            "checkpoint_path to train from the start; it is never used for other data or "
            "parameters."
        )


def to_plain(value):
    """``value`` with NumPy arrays and scalars as tensors and lists: what
    ``torch.load(weights_only=True)`` reads back. Nested dicts, lists and tuples."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return {"__array__": torch.from_numpy(np.array(value, order="C"))}
        return {"__strings__": [str(item) for item in value.ravel()]}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    raise TypeError(f"cannot checkpoint a value of type {type(value).__name__}")


def from_plain(value):
    """The inverse of `to_plain` (string arrays come back as object arrays)."""
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return value["__array__"].numpy()
        if set(value) == {"__strings__"}:
            return np.asarray(value["__strings__"], dtype=object)
        return {key: from_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(item) for item in value)
    return value
