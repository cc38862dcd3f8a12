"""Distributed data-parallel training: N processes train one model with DistributedDataParallel.

Two ways in, with the options of ``fewshot train``:

* ``fewshot train --nproc N ...`` (:func:`train_distributed`): N local processes
  (``torch.multiprocessing`` spawn, rendezvous through a file), gloo on CPU, nccl on CUDA (one
  GPU per process).
* ``torchrun --nproc_per_node=N -m fewshot train ...`` (:func:`train_launched`): every process
  torchrun starts reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` (``env://``); several machines work as torchrun sets them up.

What each rank computes is :mod:`.parallel`'s data-parallel step (slice the batch's items, embed
the slice, gather, loss), the same for every method that declares it can be split. A run can be
resumed with another number of processes.

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
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import FewshotError
from .checkpoint import resume_source, staging_dir
from .config import TrainConfig, check_config
from .loop import run_training, train
from .parallel import DataParallelStep, Parallel, check_distributable, gather_rows, shard_sizes
from .setup import resolve_device

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
        FewshotError: anything else (``options``: ``nproc``).
    """
    try:
        n = int(nproc)
        ok = n == float(nproc)
    except (TypeError, ValueError):
        n, ok = 0, False
    if not ok or not 1 <= n <= MAX_NPROC:
        raise FewshotError(f"nproc={nproc!r}: the number of training processes must be an integer from 1 to "
                           f"{MAX_NPROC}", hint="e.g. nproc=2 (one process per GPU, or per few CPU cores)",
                           options=("nproc",))
    return n


def _check_devices(cfg: TrainConfig, nproc: int) -> None:
    device = resolve_device(cfg)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise FewshotError(f"nproc={nproc} trains on one GPU per process, but {torch.cuda.device_count()} "
                           "GPU(s) are visible", hint=f"use nproc={torch.cuda.device_count()} or device=cpu",
                           options=("nproc", "device"))
    if device.type == "cpu" and nproc > (os.cpu_count() or 1):
        log.warning("%d processes on %d CPU cores: they will compete for the cores", nproc,
                    os.cpu_count() or 1)


# --------------------------------------------------------------------------- the process group
def init_parallel(cfg: TrainConfig, rank: int, world_size: int, local_rank: int,
                  init_method: str = "env://") -> Parallel:
    """Join the process group: gloo on CPU, nccl when ``cfg`` trains on CUDA (device
    ``cuda:<local_rank>``).

    Raises:
        FewshotError: CUDA asked for but unavailable, or fewer GPUs than local ranks.
    """
    device = resolve_device(cfg)
    backend = "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FewshotError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                               hint="start at most one process per GPU")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=TIMEOUT)
    return Parallel(rank, world_size, local_rank, device, backend, group=dist.new_group(backend=backend))


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
    if rank != 0:
        cfg = dataclasses.replace(cfg, progress=False)
        log.setLevel(logging.ERROR)  # rank 0 says it once
    par = init_parallel(cfg, rank, world_size, local_rank, init_method)
    try:
        return run_training(cfg, None, par)
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
                           hint="run `torchrun --nproc_per_node=N -m fewshot train ...`, or use train_distributed(cfg, nproc=N)")
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
    nproc = check_nproc(nproc)
    if nproc == 1:
        return train(cfg)
    check_config(cfg)
    check_distributable(cfg, nproc)
    _check_devices(cfg, nproc)
    resume_source(cfg, Path(cfg.out), staging_dir(cfg.out))  # refuses an out it may not replace
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
            pickle.dump((type(exc), exc.message, exc.hint, exc.options), fh)
        raise
    if rank == 0:
        with open(folder / "result.pkl", "wb") as fh:
            pickle.dump(result, fh)
    leave_finished_rank()


def leave_finished_rank() -> None:
    """End a spawned rank whose work is done and whose process group is destroyed, skipping the
    interpreter's teardown: there, gloo's worker threads sometimes abort the process (SIGABRT,
    "terminate called without an active exception"; about 1 exit in 30 measured with torch 2.13),
    which would fail a run that had trained and been written."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _child_error(folder: Path, nproc: int, exc: Exception) -> Exception:
    """The first rank's :class:`FewshotError` as it was raised there, else a RuntimeError."""
    for rank in range(nproc):
        path = folder / f"error-{rank}.pkl"
        if path.is_file():
            with open(path, "rb") as fh:
                cls, message, hint, options = pickle.load(fh)
            err = cls.__new__(cls)
            FewshotError.__init__(err, message, hint, options=options)
            return err
    return RuntimeError(f"a training process failed: {exc}")
