"""Distributed data-parallel training: N processes train one model with DistributedDataParallel.

Two ways in, with the options of ``fewshot train``:

* ``fewshot train --nproc N ...`` (:func:`train_distributed`): N local processes
  (``torch.multiprocessing`` spawn, rendezvous through a file), gloo on CPU, nccl on CUDA (one
  GPU per process).
* ``torchrun --nproc_per_node=N -m fewshot train ...`` (:func:`train_launched`): every process
  torchrun starts reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` (``env://``); several machines work as torchrun sets them up.

What each rank computes. Every rank draws the same global batches (an epoch's batches are
seeded from ``(seed, epoch)``, as in one process) and takes a distinct contiguous slice of each:

* ``contrastive`` / ``triplet``: rank ``r`` of ``N`` embeds items ``[r B/N, (r+1) B/N)`` of
  each ``--batch-size B`` batch (``B`` must be a multiple of ``N``);
  pytorch-metric-learning's ``DistributedMinerWrapper`` and ``DistributedLossWrapper`` gather
  every rank's embeddings ``float32 [B, E]``, so the miner and the loss see the whole batch;
  the loss wrapper multiplies the loss by ``N`` and DDP averages the gradients, which makes the
  update the gradient of the one-process loss on the global batch.
* ``protonet`` (and any method that embeds its batch with one ``embed(features(idx))`` and
  steps with :meth:`~fewshot.methods.base.Method.step`): the episode's ``N*K + N*Q`` items are
  split across the ranks (:func:`shard_sizes`); each rank embeds its slice and
  :func:`gather_rows` joins the slices in order (its backward sums every rank's gradient of the
  slice, so parameters used after the gather, e.g. the learned logit scale, get the plain
  average); every rank then computes the episode loss on all embeddings.
* fine-tuning: the augmentation of the whole batch is drawn on every rank (one
  ``torch.Generator``, exactly as one process draws it) and each rank runs the backbone's
  forward and backward on its slice; the backbone's trainable parameters are in the DDP module.

So N processes train the same model as one process on the same batches, within float rounding
(``tests/test_distributed.py``), and the step time falls where the backbone's forward and
backward dominate. A run can be resumed with another number of processes. Not exact: ``--bn
train`` (each rank normalises its slice with its own batch statistics; the running statistics
are rank 0's) and a head with dropout (each rank draws its own masks).

Only rank 0 validates, writes ``RUN_DIR`` and prints; early stopping is broadcast from it.
``config.json`` records ``distributed`` (world size, backend and ``replica_max_abs_diff``: how
far the ranks' final trainable weights are apart, 0.0 when identical).

MAML and FOMAML are refused with more than one process (their loss adapts per task in inner
loops; splitting the meta-batch across ranks is not implemented).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import FewshotError
from ..methods.base import IndexBatch, Method, TrainConfig

log = logging.getLogger("fewshot")

__all__ = ["MAX_NPROC", "Parallel", "DataParallelStep", "check_nproc", "check_distributable", "gather_rows",
           "init_parallel", "launched_env", "shard_sizes", "train_distributed", "train_launched"]

#: more local processes than this is a typo, not a setting
MAX_NPROC = 64
#: how long a rank waits for the others at a collective (rank 0 embeds the data first: minutes)
TIMEOUT = timedelta(minutes=60)


# --------------------------------------------------------------------------- checks
def check_nproc(nproc: Any) -> int:
    """``--nproc`` as an int in ``1..MAX_NPROC``.

    Raises:
        FewshotError: anything else, naming ``--nproc``.
    """
    try:
        n = int(nproc)
        ok = n == float(nproc)
    except (TypeError, ValueError):
        n, ok = 0, False
    if not ok or not 1 <= n <= MAX_NPROC:
        raise FewshotError(f"--nproc {nproc!r}: the number of training processes must be an integer from 1 to "
                           f"{MAX_NPROC}", hint="e.g. --nproc 2 (one process per GPU, or per few CPU cores)")
    return n


def _is_siamese(method_cls: type[Method]) -> bool:
    from ..methods.siamese import SiameseMethod

    return issubclass(method_cls, SiameseMethod)


def check_distributable(method_cls: type[Method], cfg: TrainConfig, nproc: int) -> None:
    """Refuse a method or batch settings that ``nproc`` processes cannot train.

    Raises:
        FewshotError: MAML / FOMAML or a method with its own ``step``; a contrastive / triplet
            ``--batch-size`` that is not a multiple of ``nproc``; an episode with fewer items
            than processes.
    """
    if nproc <= 1:
        return
    from ..methods.maml import MAML

    if issubclass(method_cls, MAML) or method_cls.step is not Method.step:
        raise FewshotError(f"--method {cfg.method} cannot train in several processes: it adapts to every task in "
                           "inner loops, which distributed training does not split",
                           hint="train it in one process (drop --nproc, or run it without torchrun); "
                                "contrastive, triplet and protonet train in several")
    if _is_siamese(method_cls):
        bs, m = int(cfg.options.batch_size), int(cfg.options.m_per_class)
        if bs % nproc:
            good = next(b for b in range(bs, bs * nproc + 1) if b % nproc == 0 and b % m == 0)
            raise FewshotError(f"--batch-size {bs} does not split over --nproc {nproc}: every process embeds an "
                               "equal slice of each batch",
                               hint=f"use a --batch-size that is a multiple of {nproc} (and of --m-per-class {m}), "
                                    f"e.g. --batch-size {good}, or another --nproc")
    elif method_cls.episodic and cfg.ways * (cfg.shots + cfg.queries) < nproc:
        raise FewshotError(f"an episode of {cfg.ways} x ({cfg.shots} + {cfg.queries}) items is too small to split "
                           f"over --nproc {nproc}", hint="use fewer processes or larger episodes")


def _check_devices(cfg: TrainConfig, nproc: int) -> None:
    from .loop import _device

    device = _device(cfg)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise FewshotError(f"--nproc {nproc} trains on one GPU per process, but {torch.cuda.device_count()} "
                           "GPU(s) are visible", hint=f"use --nproc {torch.cuda.device_count()} or --device cpu")
    if device.type == "cpu" and nproc > (os.cpu_count() or 1):
        log.warning("--nproc %d processes on %d CPU cores: they will compete for the cores", nproc,
                    os.cpu_count() or 1)


# --------------------------------------------------------------------------- the process group
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

    def check(self, method_cls: type[Method], cfg: TrainConfig) -> None:
        """:func:`check_distributable` for this world size (raises :class:`FewshotError`)."""
        check_distributable(method_cls, cfg, self.world_size)

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
        return DataParallelStep(setup.method, setup.optimizer, self, setup.ft, setup.features)

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


def init_parallel(cfg: TrainConfig, rank: int, world_size: int, local_rank: int,
                  init_method: str = "env://") -> Parallel:
    """Join the process group: gloo on CPU, nccl when ``cfg`` trains on CUDA (device
    ``cuda:<local_rank>``).

    Raises:
        FewshotError: CUDA asked for but unavailable, or fewer GPUs than local ranks.
    """
    from .loop import _device

    device = _device(cfg)
    backend = "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FewshotError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                               hint="start at most one process per GPU")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=TIMEOUT)
    return Parallel(rank, world_size, local_rank, device, backend, group=dist.new_group(backend=backend))


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


class _Trainable(nn.Module):
    """What DDP wraps: the head, the method's own parameters and the fine-tuned backbone; its
    forward is the method's loss of one batch."""

    def __init__(self, method: Method, ft: Any) -> None:
        super().__init__()
        self.head = method.head
        self.extra = nn.ParameterList(method.extra_parameters())
        if ft is not None:
            self.backbone = ft.backbone.model
        self._loss = method.loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss(batch)


class DataParallelStep:
    """One optimisation step of ``method`` on this rank's slice of a global batch (the trainer's
    ``step``), gradients averaged by DistributedDataParallel.

    Args:
        method: the method (its head and extra parameters on ``par.device``); a siamese
            method's loss and miner are wrapped in pytorch-metric-learning's distributed wrappers.
        optimizer: the trainer's optimizer over ``method.trainable()``.
        par: the process group.
        ft: the fine-tuning state (:class:`~fewshot.training.finetune._FineTune`) or ``None``.
        features: the feature source the trainer bound (cached embeddings), used without ``ft``.

    Raises:
        FewshotError: see :func:`check_distributable`; at a step, a method whose loss does not
            embed its batch's features once (it cannot be split).
    """

    def __init__(self, method: Method, optimizer: torch.optim.Optimizer, par: Parallel, ft: Any,
                 features: Callable[[np.ndarray], torch.Tensor] | None) -> None:
        from torch.nn.parallel import DistributedDataParallel

        check_distributable(type(method), method.cfg, par.world_size)
        self.method, self.optimizer, self.par, self.ft, self.source = method, optimizer, par, ft, features
        self.siamese = _is_siamese(type(method))
        self._full: np.ndarray | None = None
        self._pending: tuple[torch.Tensor, list[int]] | None = None
        self._saved = (method.loss_fn, method.miner) if self.siamese else None
        bn_train = ft is not None and method.cfg.batchnorm_mode() == "train"
        # a channels-last backbone's depthwise weights [C, 1, k, k] carry an arbitrary stride on
        # their size-1 dimension: DDP copies their gradients into its buckets all the same
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # fine-tuning may mark parameters that never reach the features as trainable (e.g. the
        # classifier of EfficientNet-Lite under --fine-tune all): DDP must not wait for them
        self.ddp = DistributedDataParallel(_Trainable(method, ft), forward_sync_buffers=bn_train,
                                           find_unused_parameters=ft is not None,
                                           device_ids=[par.device.index] if par.device.type == "cuda" else None)
        if self.siamese:
            from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

            method.loss_fn = DistributedLossWrapper(method.loss_fn)
            if method.miner is not None:
                method.miner = DistributedMinerWrapper(method.miner)
        method.bind(self._features, ft.inputs if ft is not None else None)
        method.embed = self._embed  # the instance's embed: gathers inside a step, plain outside

    def close(self) -> None:
        """Give the method back its own loss, miner, feature source and embed."""
        if self._saved is not None:
            self.method.loss_fn, self.method.miner = self._saved
        self.method.bind(self.ft.features if self.ft is not None else self.source,
                         self.ft.inputs if self.ft is not None else None)
        self.method.__dict__.pop("embed", None)

    def _rows(self, n: int) -> tuple[int, int, list[int]]:
        sizes = shard_sizes(n, self.par.world_size)
        lo = sum(sizes[: self.par.rank])
        return lo, lo + sizes[self.par.rank], sizes

    def _features(self, idx: np.ndarray) -> torch.Tensor:
        """This rank's features of the batch: ``float32 [rows, D]``."""
        full = self._full if self.siamese else np.asarray(idx, dtype=np.int64)
        if full is None:
            raise RuntimeError("DataParallelStep features used outside a step")
        lo, hi, sizes = self._rows(len(full))
        if self.siamese and not np.array_equal(idx, full[lo:hi]):
            raise RuntimeError("the siamese loss asked for features other than this rank's slice")
        if not self.siamese and self._pending is not None:
            raise self._unsplittable("it computes features twice in one step")
        if self.ft is not None:
            x = self.ft.inputs(full)[lo:hi]  # the whole batch's augmentation, as one process draws it
            with self.ft.autocast():
                f = self.ft.backbone.model(x).float()
        else:
            f = self.source(full[lo:hi])
        if not self.siamese:
            self._pending = (f, sizes)
        return f

    def _embed(self, features: torch.Tensor) -> torch.Tensor:
        z = type(self.method).embed(self.method, features)
        if self._pending is None:  # validation, or a siamese slice (its loss wrapper gathers)
            return z
        mine, sizes = self._pending
        if features is not mine:
            raise self._unsplittable("it changes the features before embedding them")
        self._pending = None
        return gather_rows(z, sizes, self.par)

    def _unsplittable(self, why: str) -> FewshotError:
        return FewshotError(f"--method {self.method.name} cannot train in several processes: {why}",
                            hint="train it in one process (drop --nproc, or run it without torchrun)")

    def __call__(self, batch: Any) -> float:
        """Zero the gradients, forward and backward this rank's slice of ``batch``, step; returns
        the loss of the global batch."""
        self.optimizer.zero_grad(set_to_none=True)
        local = batch
        if self.siamese:
            lo, hi, _ = self._rows(len(batch.idx))
            self._full = np.asarray(batch.idx, dtype=np.int64)
            local = IndexBatch(idx=self._full[lo:hi], y=batch.y[lo:hi])
        try:
            loss = self.ddp(local)
            if self._pending is not None:
                raise self._unsplittable("its loss does not embed the features it computed")
        finally:
            self._full, self._pending = None, None
        loss.backward()
        self.optimizer.step()
        value = float(loss.detach())
        return value / self.par.world_size if self.siamese else value  # the wrapper scaled it by N


# --------------------------------------------------------------------------- entry points
def launched_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when torchrun (or a similar launcher) started this
    process as one of several, else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def _run_rank(cfg: TrainConfig, rank: int, world_size: int, local_rank: int, init_method: str) -> Any:
    from .loop import _train

    if rank != 0:
        cfg = dataclasses.replace(cfg, progress=False)
        log.setLevel(logging.ERROR)  # rank 0 says it once
    par = init_parallel(cfg, rank, world_size, local_rank, init_method)
    try:
        return _train(cfg, None, par)
    finally:
        dist.destroy_process_group()


def train_launched(cfg: TrainConfig) -> Any:
    """:func:`fewshot.training.train` as one process of a torchrun launch (see :func:`launched_env`).

    Returns:
        the :class:`~fewshot.training.RunResult` on rank 0, ``None`` on the other ranks.

    Raises:
        FewshotError: not launched as one of several processes; see :func:`train_distributed`.
    """
    env = launched_env()
    if env is None:
        raise FewshotError("not started by torchrun: RANK and WORLD_SIZE (> 1) are not set",
                           hint="run `torchrun --nproc_per_node=N -m fewshot train ...`, or `fewshot train --nproc N`")
    return _run_rank(cfg, *env, "env://")


def train_distributed(cfg: TrainConfig, nproc: int, *, threads: int | None = None) -> Any:
    """Train ``cfg`` with ``nproc`` local processes (DistributedDataParallel; gloo on CPU, nccl
    with one GPU per process on CUDA); ``nproc=1`` is :func:`fewshot.training.train`.

    Everything is checked in this process before any process starts or any file is written.

    Args:
        cfg: the run's settings (as for :func:`fewshot.training.train`).
        nproc: processes, 1 to :data:`MAX_NPROC`.
        threads: torch threads per process (default: CPU cores // ``nproc``, at least 1).

    Returns:
        rank 0's :class:`~fewshot.training.RunResult`.

    Raises:
        FewshotError: a bad ``nproc`` (:func:`check_nproc`), a method or batch size that cannot be
            split (:func:`check_distributable`), fewer GPUs than processes, and everything
            :func:`fewshot.training.train` raises (re-raised here from the process that raised it).
        RuntimeError: a process failed otherwise (its traceback in the message).
    """
    from .checkpoint import _resume_source, staging_dir
    from .loop import _validate_config, train

    nproc = check_nproc(nproc)
    if nproc == 1:
        return train(cfg)
    check_distributable(_validate_config(cfg), cfg, nproc)
    _check_devices(cfg, nproc)
    _resume_source(cfg, Path(cfg.out), staging_dir(cfg.out))  # refuses an --out it may not replace
    import torch.multiprocessing as mp

    per_rank = threads or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="fewshot-ddp-") as tmp:
        try:
            mp.start_processes(_spawned, args=(nproc, cfg.to_dict(), tmp, per_rank), nprocs=nproc, join=True,
                               start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise _child_error(Path(tmp), nproc, exc) from None
        result = Path(tmp) / "result.pkl"
        if not result.is_file():  # a process was interrupted (SIGINT) and left quietly
            raise KeyboardInterrupt
        with open(result, "rb") as fh:
            return pickle.load(fh)


def _spawned(rank: int, nproc: int, cfg_dict: dict, tmp: str, threads: int) -> None:
    """One process of :func:`train_distributed`: train, and hand rank 0's result (or a
    :class:`FewshotError`) back through ``tmp``."""
    torch.set_num_threads(threads)
    if rank == 0 and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    folder = Path(tmp)
    try:
        result = _run_rank(TrainConfig.from_dict(cfg_dict), rank, nproc, rank, (folder / "rendezvous").as_uri())
    except FewshotError as exc:
        with open(folder / f"error-{rank}.pkl", "wb") as fh:
            pickle.dump((type(exc), exc.message, exc.hint), fh)
        raise
    if rank == 0:
        with open(folder / "result.pkl", "wb") as fh:
            pickle.dump(result, fh)


def _child_error(folder: Path, nproc: int, exc: Exception) -> Exception:
    """The first rank's :class:`FewshotError` as it was raised there, else a RuntimeError."""
    for rank in range(nproc):
        path = folder / f"error-{rank}.pkl"
        if path.is_file():
            with open(path, "rb") as fh:
                cls, message, hint = pickle.load(fh)
            err = cls.__new__(cls)
            FewshotError.__init__(err, message, hint)
            return err
    return RuntimeError(f"a training process failed: {exc}")
