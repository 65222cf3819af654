"""Training metrics to TensorBoard or Weights & Biases: `SparseAutoencoder(logger=...)`.

A logger is any object with ``log(metrics, step)``; the estimator calls it at its
progress checks (every 32 steps and at the end of each pass), where it already reads
the statistics from the device, so logging adds no synchronisation. ``metrics`` holds
Python floats: ``loss``, ``l0``, ``explained_variance`` (of the steps since the last
check, in training units), ``dead_fraction``, ``learning_rate`` and, for ReLU, gated
and JumpReLU, ``sparsity_coefficient``; ``step`` counts optimiser steps. A logger with
``close()`` has it called at the end of each training call.

The two here hold only their settings: the writer or run is created at the first
``log`` and left out of copies and pickles, so `sklearn.base.clone`, `GridSearchCV`
and `joblib.dump` work with a logger set.
"""

import copy

__all__ = ["TensorBoardLogger", "WandbLogger"]


class _LazyLogger:
    """Shared: settings kept, the live writer built on first use and never copied."""

    def __init__(self):
        self._writer = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_writer"] = None
        return state

    def __deepcopy__(self, memo):
        clone = copy.copy(self)
        clone.__dict__ = copy.deepcopy(self.__getstate__(), memo)
        return clone

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.__getstate__().items() if k != "_writer")
        return f"{type(self).__name__}({settings})"


class TensorBoardLogger(_LazyLogger):
    """Write training metrics as TensorBoard scalars (``pip install tensorboard``).

    Parameters
    ----------
    log_dir : str or path, default=None
        The event folder; None means TensorBoard's ``runs/<date>_<host>``.
    prefix : str, default="sae/"
        Put before every scalar's name.

    Examples
    --------
    >>> from skSAE import SparseAutoencoder
    >>> from skSAE.logging import TensorBoardLogger
    >>> sae = SparseAutoencoder(logger=TensorBoardLogger("runs/sae"))
    """

    def __init__(self, log_dir=None, prefix="sae/"):
        super().__init__()
        self.log_dir = log_dir
        self.prefix = prefix

    def log(self, metrics, step):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._writer = SummaryWriter(log_dir=self.log_dir)
        for name, value in metrics.items():
            self._writer.add_scalar(self.prefix + name, value, step)

    def close(self):
        if self._writer is not None:
            self._writer.flush()


class WandbLogger(_LazyLogger):
    """Log training metrics to Weights & Biases (``pip install wandb``).

    Logs to the active run (``wandb.run``), or starts one with ``init_kwargs``
    (``project=``, ``name=``, ``mode="offline"``, ...) at the first ``log``.

    Parameters
    ----------
    prefix : str, default="sae/"
    **init_kwargs
        Passed to ``wandb.init`` when no run is active.
    """

    def __init__(self, prefix="sae/", **init_kwargs):
        super().__init__()
        self.prefix = prefix
        self.init_kwargs = init_kwargs

    def log(self, metrics, step):
        if self._writer is None:
            import wandb

            self._writer = wandb.run if wandb.run is not None else wandb.init(**self.init_kwargs)
        self._writer.log({self.prefix + name: value for name, value in metrics.items()}, step=step)
