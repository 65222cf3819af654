"""Training checkpoints: written atomically, checksummed, locked, tied to their run.

A checkpoint file is one header line that holds the SHA-256 of the rest, then a
`torch.save` payload of plain containers and tensors (no pickled objects), read back
with ``torch.load(weights_only=True)`` only once the checksum matches: a file damaged
after it was written is refused as corrupt, never resumed from. It is written to a
temporary file in the same folder and renamed over the previous one, so a crash, a
kill or a full disk during the write leaves the previous checkpoint whole. Its
*fingerprint* (the data's shape and a hash of all its rows, the parameters, the call)
must match the run that reads it: a checkpoint from other data or other parameters is
refused. One process at a time trains with a checkpoint path (`checkpoint_lock`). A
leaf: torch, NumPy and the standard library only.
"""

import errno
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock instead (see `checkpoint_lock`)
    fcntl = None
    import msvcrt

CHECKPOINT_FORMAT = 2
"""Version of the checkpoint layout; a file of another version is refused."""

# The first line of a checkpoint file: this prefix, the SHA-256 (hex) of the payload
# after the line, and a newline.
_HEADER_PREFIX = b"skSAE checkpoint, sha256 of the rest: "
_HEADER_BYTES = len(_HEADER_PREFIX) + 64 + 1

# Bytes read at a time when a checkpoint's checksum is verified.
_READ_BYTES = 16 * 2**20


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another run (other data, parameters or call)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint whose content does not match the checksum stored with it."""


class CheckpointInUseError(RuntimeError):
    """Another process (or estimator) trains with the same ``checkpoint_path``."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost folder, no permission).

    The previous checkpoint is left whole and no partial file stays. ``errno`` is the
    cause's; ``kept_weights`` is True when the estimator kept the model trained so far.
    """

    def __init__(self, message, errno=None, kept_weights=False):
        super().__init__(message)
        self.errno = errno  # str() stays the message: no strerror is set
        self.kept_weights = kept_weights


def fingerprint_params(params, ignore):
    """A JSON-able digest of estimator parameters, leaving out those in ``ignore``."""
    kept = {key: value for key, value in sorted(params.items()) if key not in ignore}
    text = json.dumps(kept, sort_keys=True, default=repr)
    return {"params_sha256": hashlib.sha256(text.encode()).hexdigest(), "params": text}


def write_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename).

    Raises
    ------
    CheckpointWriteError
        When the file cannot be written (a full disk, say); the previous checkpoint at
        ``path`` is then whole, and the temporary file removed.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            file.write(_header("0" * 64))  # the checksum is known once the payload is
            payload = _HashingWriter(file)
            try:
                torch.save(state, payload)
            except RuntimeError:
                # torch reports a failed write as "unexpected pos": raise its cause.
                if payload.error is None:
                    raise
                raise payload.error from None
            file.seek(0)
            file.write(_header(payload.sha256.hexdigest()))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        reason = "the disk is full" if full else "the system refused it"
        raise CheckpointWriteError(
            f"could not write the checkpoint to checkpoint_path={os.fspath(path)!r}: "
            f"{reason} ({type(exc).__name__}: {exc}). The previous checkpoint there is "
            "whole and no partial file is left; free space (or pass another "
            "checkpoint_path) and run the same call again to continue from it.",
            errno=exc.errno,
        ) from exc
    finally:
        partial.unlink(missing_ok=True)


class _HashingWriter:
    """A binary file for `torch.save` that hashes what it writes and keeps its error."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.error = None

    def write(self, data):
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        return written

    def flush(self):
        self.file.flush()


def _header(sha256_hex):
    return _HEADER_PREFIX + sha256_hex.encode("ascii") + b"\n"


def read_checkpoint(path, fingerprint):
    """The state in ``path``, or None when there is none; refuses another run's.

    Raises
    ------
    CheckpointCorruptError
        When the file's content does not match its checksum (damaged after writing).
    CheckpointMismatchError
        When the file's fingerprint differs from ``fingerprint``; names the fields.
    ValueError
        When the file is not a readable checkpoint of this format.
    """
    path = Path(path)
    if not path.exists():
        return None
    with open(path, "rb") as file:
        header = file.read(_HEADER_BYTES)
        if not (header.startswith(_HEADER_PREFIX) and header.endswith(b"\n")):
            raise ValueError(
                f"checkpoint_path={os.fspath(path)!r} is not a readable skSAE checkpoint of "
                f"format {CHECKPOINT_FORMAT}: it lacks the checksum line that starts one (an "
                "older skSAE, another program or damage wrote it); delete it to train from "
                "the start."
            )
        stored = header[len(_HEADER_PREFIX) : -1].decode("ascii", errors="replace")
        sha256 = hashlib.sha256()
        while chunk := file.read(_READ_BYTES):
            sha256.update(chunk)
        if sha256.hexdigest() != stored:
            raise CheckpointCorruptError(
                f"checkpoint_path={os.fspath(path)!r} is corrupt: the SHA-256 of its content "
                f"({sha256.hexdigest()[:16]}...) is not the one written with it "
                f"({stored[:16]}...), so it was damaged or cut short after it was written. It "
                "is never resumed from; delete it (or restore an intact copy) to continue."
            )
        file.seek(_HEADER_BYTES)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
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


@contextmanager
def checkpoint_lock(path):
    """Hold the lock of checkpoint ``path`` for one training call.

    The lock is the file ``.<name>.lock`` beside ``path``, locked with ``fcntl.flock``
    (``msvcrt.locking`` on Windows) and holding the holder's process id. The system
    releases it when the holder exits, even by SIGKILL, so a crash never leaves a
    stale lock. Under the lock, the temporary files of interrupted writes
    (``.<name>.partial-<pid>``) are removed: no other process writes them then. On a
    file system without locks, training goes on unlocked with a warning, and leaves
    the temporary files alone.

    Raises
    ------
    CheckpointInUseError
        When another process (or another estimator of this one) holds the lock.
    CheckpointWriteError
        When the lock file cannot be created (in a folder it may not write to, say).
    """
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    fd = _locked_file(path, lock_path)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for stale in path.parent.glob(f".{path.name}.partial-*"):
            stale.unlink(missing_ok=True)  # a write that a crash interrupted
    try:
        yield
    finally:
        if fd is not None:
            if fcntl is not None:
                lock_path.unlink(missing_ok=True)  # before the unlock: see `_replaced`
            os.close(fd)


def _locked_file(path, lock_path):
    """An open descriptor of ``lock_path``, locked; None on a file system without locks."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not create the lock file {os.fspath(lock_path)!r} of "
                f"checkpoint_path={os.fspath(path)!r} ({type(exc).__name__}: {exc}); pass a "
                "checkpoint_path in a folder this process can write to.",
                errno=exc.errno,
            ) from exc
        try:
            locked = _try_lock(fd, path, lock_path)
        except BaseException:
            os.close(fd)
            raise
        if locked and not _replaced(fd, lock_path):
            return fd
        os.close(fd)
        if not locked:
            return None


def _try_lock(fd, path, lock_path):
    """Lock ``fd``; False on a file system without locks. Raises when another holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as exc:
        held = fcntl is None or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
        if not held:
            warnings.warn(
                f"the file system of checkpoint_path={os.fspath(path)!r} does not support "
                f"locks ({exc}): a second process training with the same path is not "
                "refused, so make sure none does.",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
    try:
        holder = os.read(fd, 32).decode("ascii", errors="replace").strip()
    except OSError:  # Windows: the locked byte cannot be read
        holder = ""
    holder = f"process {holder}" if holder.isdigit() else "another process"
    raise CheckpointInUseError(
        f"checkpoint_path={os.fspath(path)!r} is in use: {holder} trains with it (it holds "
        f"the lock {os.fspath(lock_path)!r}). Two runs on one checkpoint file would "
        "overwrite each other's state; wait for that run to end, or pass another "
        "checkpoint_path."
    )


def _replaced(fd, lock_path):
    """Whether ``lock_path`` no longer names the file ``fd`` locked.

    A holder removes the lock file before it unlocks, so a process that opened the
    file just before and locks it just after holds a removed file: it must open the
    path again, or two processes would each hold a lock.
    """
    if fcntl is None:
        return False  # Windows keeps the lock file (an open file cannot be removed)
    try:
        return not os.path.samestat(os.fstat(fd), os.stat(lock_path))
    except FileNotFoundError:
        return True


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
