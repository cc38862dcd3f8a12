"""The data-parallel step: N processes train one model, each embedding a slice of every batch.

Every rank draws the same global batches (an epoch's batches are seeded from ``(seed, epoch)``,
as in one process). The step is the same for every method that declares
:attr:`~fewshot.methods.base.Method.data_parallel` (its loss is
:meth:`~fewshot.methods.base.Method.loss_from` of the embeddings of
:meth:`~fewshot.methods.base.Method.items`):

1. slice: rank ``r`` takes a contiguous slice of ``items(batch)`` (:func:`shard_sizes`);
2. embed: it computes the features of its slice (the cached embeddings, or a forward pass of
   the fine-tuned backbone: the augmentation of the whole batch is drawn on every rank with one
   ``torch.Generator``, exactly as one process draws it, and each rank runs the backbone on its
   slice) and the head's embeddings;
3. gather: :func:`gather_rows` joins the slices in rank order, with gradients (its backward sums
   every rank's gradient of the slice);
4. loss: every rank computes ``loss_from`` on all embeddings, the global batch's loss.

Every rank's gradient of its slice is then ``N x dL/dslice`` and DistributedDataParallel
averages the parameters' gradients over the ``N`` ranks, so the update is the one-process
update on the global batch (a parameter used after the gather, e.g. protonet's learned logit
scale, gets the plain average of ``N`` equal gradients). So N processes train the same model as
one process on the same batches, within float rounding (``tests/training/test_distributed.py``). Not
exact: ``bn="train"`` (each rank normalises its slice with its own batch statistics; the running
statistics are rank 0's) and a head with dropout (each rank draws its own masks).

A method may refuse settings it cannot split (:meth:`~fewshot.methods.base.Method.check_parallel`:
e.g. a contrastive / triplet ``batch_size`` that is not a multiple of ``N``); a method that is not
data-parallel (MAML, FOMAML: their loss adapts per task in inner loops) trains in one process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..methods import Method, get_method
from .config import TrainConfig

__all__ = ["Parallel", "DataParallelStep", "check_distributable", "gather_rows", "shard_sizes"]


def check_distributable(cfg: TrainConfig, nproc: int) -> None:
    """Refuse a method or settings that ``nproc`` processes cannot train (the method's
    :meth:`~fewshot.methods.base.Method.check_parallel`).

    Raises:
        FewshotError: a method that is not data-parallel (MAML, FOMAML); a contrastive / triplet
            ``batch_size`` that is not a multiple of ``nproc``; an episode with fewer items
            than processes (``options`` names what to change; ``nproc`` is the number of processes).
    """
    get_method(cfg.method).check_parallel(cfg.options, cfg.episode_spec(), nproc)


@dataclass
class Parallel:
    """This process's place in a distributed run (what :func:`fewshot.training.train`'s loop asks).

    Attributes:
        rank, world_size, local_rank: as torchrun numbers them.
        device: this rank's device (``cuda:<local_rank>`` on GPUs).
        backend: ``"gloo"`` or ``"nccl"``.
        group: the process group of :func:`gather_rows` (apart from DDP's own traffic).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any = None

    @property
    def lead(self) -> bool:
        """Rank 0: validates, writes and prints."""
        return self.rank == 0

    def check(self, cfg: TrainConfig) -> None:
        """:func:`check_distributable` for this world size (raises :class:`FewshotError`)."""
        check_distributable(cfg, self.world_size)

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective: every rank waits for rank 0)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_stop(self, stop: bool) -> bool:
        """Rank 0's early-stopping decision on every rank."""
        flag = torch.tensor([int(bool(stop))], device=self._wire())
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def make_step(self, setup: Any) -> "DataParallelStep":
        """The trainer's step for this rank (a collective: DDP broadcasts rank 0's weights)."""
        return DataParallelStep(setup.method, setup.optimizer, self, setup.ft, setup.features, setup.seen)

    def info(self) -> dict:
        """What ``config.json`` records under ``distributed``."""
        return {"world_size": self.world_size, "backend": self.backend}

    def replica_spread(self, setup: Any) -> float:
        """Largest absolute difference between any rank's trainable weights and rank 0's (a collective)."""
        params = setup.method.trainable()
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params]).to(self._wire())
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        spread = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        return float(spread.item())

    def _wire(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- sharding and gathering
def shard_sizes(n: int, world_size: int) -> list[int]:
    """Rows of each rank when ``n`` rows are split in contiguous slices (the first ``n % world_size``
    ranks take one more), e.g. ``shard_sizes(10, 4) == [3, 3, 2, 2]``."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # every rank's gradient of every slice, summed
        lo = sum(ctx.sizes[: ctx.rank])
        return total[lo: lo + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(local: torch.Tensor, sizes: list[int], par: Parallel) -> torch.Tensor:
    """Every rank's slice joined in rank order, with gradients.

    Args:
        local: this rank's rows ``[sizes[rank], ...]`` (any dtype all_gather takes, e.g. float32).
        sizes: rows of each rank (:func:`shard_sizes`).
        par: the process group.

    Returns:
        ``[sum(sizes), ...]``. Backward gives ``local`` the sum over ranks of the gradient of its
        rows: when every rank computes the same loss ``L`` from the gathered tensor, that is
        ``world_size * dL/dlocal``, which DDP's averaging turns into the one-process gradient.
    """
    return _GatherRows.apply(local, list(sizes), par.rank, par.group)


# --------------------------------------------------------------------------- the step
class _Trainable(nn.Module):
    """What DDP wraps: the head, the method's own parameters and the fine-tuned backbone; its
    forward is this rank's part of one batch's loss."""

    def __init__(self, method: Method, ft: Any, loss: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.head = method.head
        self.extra = nn.ParameterList(method.extra_parameters())
        if ft is not None:
            self.backbone = ft.backbone.model
        self._loss = loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss(batch)


class DataParallelStep:
    """One optimisation step of ``method`` on this rank's slice of a global batch (the trainer's
    ``step``): slice :meth:`~fewshot.methods.base.Method.items`, embed the slice, gather, loss
    (see the module docstring); gradients averaged by DistributedDataParallel.

    Args:
        method: a :attr:`~fewshot.methods.base.Method.data_parallel` method (its head and extra
            parameters on ``par.device``); it is used as it is, never changed.
        optimizer: the trainer's optimizer over ``method.trainable()``.
        par: the process group.
        ft: the fine-tuning state (:class:`~fewshot.training.finetune.FineTune`) or ``None``.
        features: the feature source the trainer bound (cached embeddings), used without ``ft``.

    Raises:
        FewshotError: see :meth:`~fewshot.methods.base.Method.check_parallel`.
    """

    def __init__(self, method: Method, optimizer: torch.optim.Optimizer, par: Parallel, ft: Any,
                 features: Callable[[np.ndarray], torch.Tensor] | None, seen: Any = None) -> None:
        from torch.nn.parallel import DistributedDataParallel

        type(method).check_parallel(method.opts, method.episodes, par.world_size)
        self.method, self.optimizer, self.par, self.ft, self.source = method, optimizer, par, ft, features
        self.seen = seen  # counts the global batch: every rank steps with it
        bn_train = ft is not None and ft.bn_train
        # a channels-last backbone's depthwise weights [C, 1, k, k] carry an arbitrary stride on
        # their size-1 dimension: DDP copies their gradients into its buckets all the same
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # fine-tuning may mark parameters that never reach the features as trainable (e.g. the
        # classifier of EfficientNet-Lite under fine_tune="all"): DDP must not wait for them
        self.ddp = DistributedDataParallel(_Trainable(method, ft, self._loss), forward_sync_buffers=bn_train,
                                           find_unused_parameters=ft is not None,
                                           device_ids=[par.device.index] if par.device.type == "cuda" else None)

    def _features(self, items: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        """Features ``float32 [hi - lo, D]`` of this rank's slice ``items[lo:hi]``."""
        if self.ft is None:
            return self.source(items[lo:hi])
        x = self.ft.inputs(items)[lo:hi]  # the whole batch's augmentation, as one process draws it
        return self.ft.forward(x)  # in slices of micro_batch images, as one process runs it

    def _loss(self, batch: Any) -> torch.Tensor:
        """The global batch's loss, from this rank's embedded slice and the others' (gathered)."""
        items = np.asarray(self.method.items(batch), dtype=np.int64)
        if self.seen is not None:
            self.seen.images += len(items)
        sizes = shard_sizes(len(items), self.par.world_size)
        lo = sum(sizes[: self.par.rank])
        z = self.method.embed(self._features(items, lo, lo + sizes[self.par.rank]))
        return self.method.loss_from(gather_rows(z, sizes, self.par), batch)

    def __call__(self, batch: Any) -> float:
        """Zero the gradients, forward and backward this rank's slice of ``batch``, step; returns
        the loss of the global batch."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.ddp(batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
