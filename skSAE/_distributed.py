"""Data-parallel training under `torch.distributed` (``torchrun``): shares and all-reduces.

When a process group is running (started by the user, or by `data_parallel` from the
environment ``torchrun`` sets), every rank calls ``fit(X)`` with the same ``X``, draws
the same batches from the same seeded generator, and trains on its share of each
global batch. Gradients are weighted by the share's rows and summed across ranks, so
every rank takes the step a single process takes on the whole batch; firing counts and
the running statistics are summed too, so dead latents, the ``target_l0`` calibration
and the divergence checks see the global batch. Ranks given different data (another
row count, width or first rows) are refused on every rank before any step
(`check_same_data`). A collective that fails (a rank died, or the group timed out)
stops every rank with an error that says so. A leaf: torch only.
"""

import atexit
import datetime
import os

import torch
import torch.distributed as dist

# Seconds a collective waits for the other ranks before the group gives up.
TIMEOUT_SECONDS = float(os.environ.get("SKSAE_DISTRIBUTED_TIMEOUT", "600"))
# Rows at the start of X whose norms every rank compares (`check_same_data`).
FIRST_ROWS_COMPARED = 64


class RankFailedError(RuntimeError):
    """Another rank of a data-parallel fit stopped (died, or timed out)."""


def data_parallel():
    """The data-parallel context of this process, or None when it trains alone.

    Uses the default process group when one is initialised; otherwise starts one from
    ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) with the ``nccl`` backend on CUDA and ``gloo`` on CPUs.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
        # The group skSAE started is skSAE's to close: left open, gloo's threads abort
        # the interpreter at exit.
        atexit.register(_close_group)
    if dist.get_world_size() == 1:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size())


# Set when a collective failed: the other ranks are gone, so the exit waits for none.
_FAILED = []


def _close_group():
    """At exit: wait for the other ranks, then close (a rank closing alone aborts gloo)."""
    if not dist.is_initialized():
        return
    if not _FAILED:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:  # a rank that left early: close anyway
            _FAILED.append(True)
    dist.destroy_process_group()


class DataParallel:
    """This rank's place in a data-parallel fit.

    Parameters
    ----------
    rank, world_size : int
    """

    def __init__(self, rank, world_size):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank))
        # Where this rank's own collective tensors live: nccl reduces CUDA tensors only.
        self.device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", self.local_rank)

    def share(self, x_BD):
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        n_rows = x_BD.shape[0]
        start = n_rows * self.rank // self.world_size
        stop = n_rows * (self.rank + 1) // self.world_size
        return x_BD[start:stop]

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        """Sum (or ``op``) ``tensor`` over the ranks in place; `RankFailedError` if one is gone."""
        try:
            dist.all_reduce(tensor, op=op)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self._failed(exc) from exc
        return tensor

    def _failed(self, exc):
        """The `RankFailedError` of a collective that raised ``exc`` (nothing to wait for)."""
        _FAILED.append(True)
        return RankFailedError(
            f"rank {self.rank} of {self.world_size}: another rank of this data-parallel "
            f"fit stopped or timed out ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); this rank stops too."
        )

    def _all_gather(self, tensor):
        """``tensor`` of every rank, in rank order; `RankFailedError` if one is gone."""
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, tensor)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self._failed(exc) from exc
        return gathered

    def check_same_data(self, n_rows, first_HD):
        """Refuse, on every rank alike, ranks that were given different data.

        Every rank must call ``fit`` (or ``partial_fit``) with the same rows: each
        draws the same global batches and trains on its share. With other row counts
        the ranks would draw other batches (and, at another number of steps, leave the
        others waiting in a collective); with other rows (a shard each) they would
        start from other normalisations. One all-gather of the row count, the width and
        the norms of the first rows, before any step, so every rank raises the same
        `ValueError`. The norms are compared to a relative 1e-3, so rows extracted on
        each rank by kernels that differ in the last bits still pass.

        Parameters
        ----------
        n_rows : int
            This rank's row count.
        first_HD : torch.Tensor of shape (H, D)
            Its first rows (the same number on every rank that has as many rows).
        """
        n_first = FIRST_ROWS_COMPARED
        mine = torch.full((2 + n_first,), -1.0, dtype=torch.float64, device=self.device)
        mine[0], mine[1] = n_rows, first_HD.shape[1]
        norms_H = first_HD[:n_first].to(self.device, torch.float64).norm(dim=1)
        mine[2 : 2 + norms_H.numel()] = norms_H
        ranks = [tensor.cpu() for tensor in self._all_gather(mine)]
        problems = []
        for column, what in ((0, "rows"), (1, "features")):
            counts = [int(values[column]) for values in ranks]
            if len(set(counts)) > 1:
                each = ", ".join(
                    f"rank {rank} has {count:,} {what}" for rank, count in enumerate(counts)
                )
                problems.append(f"{each}: every rank must get the same number of {what}")
        differing = [
            rank
            for rank, values in enumerate(ranks)
            if not torch.allclose(values[2:], ranks[0][2:], rtol=1e-3, atol=1e-6)
        ]
        if not problems and differing:
            problems.append(
                f"the first rows of rank(s) {', '.join(map(str, differing))} differ from rank "
                "0's: every rank must get the same rows (not a shard of its own)"
            )
        if problems:
            raise ValueError(
                f"The {self.world_size} ranks of this data-parallel fit were given different "
                f"data: {'; '.join(problems)}. Each rank takes its share of every global "
                "batch of the same X, so pass the whole X on every rank."
            )

    def average_gradients(self, parameters, rows, global_rows):
        """Make every rank's gradients those of the mean loss over the global batch.

        Each rank's gradient is of the mean over its ``rows``; weighted by
        ``rows / global_rows`` and summed, they are the gradient of the global mean.
        One all-reduce over the flattened gradients.
        """
        parameters = [p for p in parameters if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(rows / global_rows)
        self.all_reduce(flat)
        offset = 0
        for parameter, grad in zip(parameters, grads, strict=True):
            size = grad.numel()
            parameter.grad = flat[offset : offset + size].view_as(grad)
            offset += size

    def global_top_cut(self, values_N, n_kept):
        """BatchTopK's cut over all ranks' ``values_N``, and the smallest code it keeps.

        Each rank contributes its own ``n_kept`` largest (no more can be among the
        global ones, and when fewer than ``n_kept`` codes are positive they hold every
        positive one), padded to the longest with -1 below every ReLU code.

        Returns
        -------
        cut : torch.Tensor of shape ()
            The ``n_kept``-th largest value over the ranks (-1 when every code is kept):
            keeping the values ``>= cut`` keeps the global batch's ``n_kept`` largest.
        smallest : torch.Tensor of shape ()
            The smallest positive value kept on any rank (inf when none), what one
            process on the whole batch feeds BatchTopK's running threshold.
        """
        values_N = values_N.detach()  # a selection: no gradient flows through the cut
        local = values_N.topk(min(n_kept, values_N.numel()), sorted=False).values
        sizes = torch.tensor([local.numel(), values_N.numel()], device=values_N.device)
        longest = self.all_reduce(sizes[:1].clone(), op=dist.ReduceOp.MAX)
        total = self.all_reduce(sizes[1:].clone())
        padded = values_N.new_full((int(longest),), -1.0)
        padded[: local.numel()] = local
        candidates = torch.cat(self._all_gather(padded))
        if n_kept >= int(total):
            cut = values_N.new_tensor(-1.0)  # keep every code
        else:
            cut = candidates.topk(n_kept, sorted=True).values[-1]
        kept = candidates >= cut
        smallest = torch.where(kept & (candidates > 0), candidates, torch.inf).min()
        return cut, smallest

    def shared_seed(self, seed):
        """Rank 0's ``seed``, on every rank."""
        value = torch.tensor([seed], dtype=torch.int64, device=self.device)
        try:
            dist.broadcast(value, src=0)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self._failed(exc) from exc
        return int(value)
