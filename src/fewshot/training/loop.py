"""One training loop for every method: ``train(TrainConfig) -> RunResult`` (see :mod:`fewshot.training`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FewshotError
from ..io import atomic_write_json, replace_dir, writer_lock
from ..methods.runs import CHECKPOINT, CONFIG, save_run
from ..model import EmbeddingModel
from ..version import __version__
from .checkpoint import (HISTORY_FIELDS, prepare_stage, resume_source, save_checkpoint, staging_dir, write_curves,
                         write_history)
from .config import TrainConfig, check_config
from .optim import train_step
from .prior import write_whitening_prior
from .setup import ParallelRun, Setup, build_setup, epoch_seed
from .state import TrainState, checkpoint_of, load_resumable, restore_state
from .validate import validate_epoch

__all__ = ["RunResult", "train", "run_training"]

log = logging.getLogger("fewshot")


@dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the RUN_DIR.
        best_epoch: epoch with the best val MAP@R (0 = the untrained head was best).
        best_metrics: that epoch's history row.
        history: one row per epoch (see :data:`HISTORY_FIELDS`), epoch 0 first.
        seconds: training wall time in all (epochs and validation; the final evaluation excluded).
        stopped_early: whether patience ran out before ``epochs``.
        final_metrics: the final evaluation's metrics (``None`` with ``final_eval="none"``).
        config: the run's ``config.json``.
    """

    run_dir: Path
    best_epoch: int
    best_metrics: dict
    history: list[dict]
    seconds: float
    stopped_early: bool
    final_metrics: dict | None = None
    config: dict = field(default_factory=dict)



def train(cfg: TrainConfig, *, on_epoch_end: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train ``cfg.method`` on the train classes of ``cfg.split_file``; see the module docstring.

    Every argument, the data, and whether the method can learn from it are checked before
    anything is written. The run is trained in :func:`staging_dir` and replaces ``cfg.out``
    (marked ``"complete": true`` in ``config.json``) only when training completes.

    Args:
        cfg: the run's settings.
        on_epoch_end: optional ``callback(epoch, history_row)`` after each epoch's files are
            written (raising from it interrupts the run exactly as Ctrl-C would).

    Returns:
        :class:`RunResult`.

    Raises:
        DataError: bad data or split file; a val part too small to validate on.
        CheckpointError: ``RUN_DIR`` already holds a run (and neither ``resume`` nor
            ``overwrite``), or its checkpoint is damaged, from different settings, does not fit the
            model, or holds more than tensors and plain values (never unpickled).
        FewshotError: unknown method, miner, head or fine-tune mode; impossible batch sizes;
            data on which the method cannot learn (:meth:`Method.check_data`); an ``--out``
            that is not a run folder.
    """
    return run_training(cfg, on_epoch_end)


def run_training(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
                 par: ParallelRun | None = None) -> RunResult | None:
    """:func:`train`, on one rank of a distributed run when ``par`` is given (``None`` on the
    ranks other than 0). Rank 0 checks the output and sets up first (filling the embedding
    cache), then the others; every rank trains, rank 0 alone writes, holding the run folder's
    writer lock (:func:`fewshot.io.writer_lock`: a second ``fewshot train --out`` of the same
    folder is refused at once)."""
    if par is not None and not par.lead:
        return _train_locked(cfg, on_epoch_end, par)
    with writer_lock(cfg.out, "fewshot train"):
        return _train_locked(cfg, on_epoch_end, par)


def _train_locked(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None,
                  par: ParallelRun | None) -> RunResult | None:
    check_config(cfg)
    if par is not None:
        par.check(cfg)
    run_dir = Path(cfg.out)
    stage = staging_dir(run_dir)
    lead = par is None or par.lead
    source = setup = loop = None
    if lead:
        source = resume_source(cfg, run_dir, stage)
        saved = load_resumable(cfg, source)
        setup = build_setup(cfg, par)
        loop = restore_state(setup, saved, source)  # a checkpoint that does not fit is refused before any write
        prepare_stage(stage, source, run_dir)
    if par is not None:
        source = par.share(source)  # the others wait here for rank 0's checks and set-up
        if not lead:
            setup = build_setup(cfg, par)
            loop = restore_state(setup, load_resumable(cfg, source), source)
        setup.step = par.make_step(setup)
    try:
        loop = _run_epochs(cfg, setup, loop, on_epoch_end, stage)
    except BaseException:
        if lead and not (stage / CHECKPOINT).is_file():  # nothing to resume: leave no empty run behind
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
        raise
    spread = par.replica_spread(setup) if par is not None else None
    if not lead:
        return None
    full = _finish_config(stage, loop, setup, spread)
    replace_dir(stage, run_dir)
    full["whitening_prior"] = write_whitening_prior(cfg, run_dir)
    final = None
    if cfg.final_eval != "none":
        final = _final_evaluation(cfg, run_dir)
        full["final_eval"] = {"part": cfg.final_eval, "tta": cfg.final_tta, "map": final["map"], "map_at_r": final["map_at_r"],
                              "precision_at_1": final["precision_at_1"],
                              "episodes": {k: {"accuracy": v.get("accuracy"), "ci95": v.get("ci95")}
                                           for k, v in final["episodes"].items()}}
    atomic_write_json(run_dir / CONFIG, full)
    best_row = next(r for r in loop.history if r["epoch"] == loop.best["epoch"])
    return RunResult(run_dir=run_dir, best_epoch=loop.best["epoch"], best_metrics=best_row,
                     history=loop.history, seconds=loop.elapsed, stopped_early=loop.stopped_early,
                     final_metrics=final, config=full)


def _train_epoch(cfg: TrainConfig, setup: Setup, epoch: int) -> tuple[list[float], float | None]:
    """One epoch's optimisation steps: their losses, and the training images per second they
    reached (images embedded, :attr:`Setup.seen`, over the wall time of the steps, augmentation
    included, validation not; ``None`` when nothing was counted)."""
    seed = epoch_seed(cfg.seed, epoch)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    method = setup.method
    method.train_mode(True)
    if setup.ft is not None:
        setup.ft.seed_epoch(seed)
        setup.ft.train_mode(True)
    batches = list(method.epoch_batches(setup.data.train, rng))
    losses = []
    start, t0 = setup.seen.images, time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="step", leave=False, disable=not cfg.progress)
    for batch in bar:
        value = setup.step(batch) if setup.step is not None else train_step(method, batch, setup.optimizer)
        setup.scheduler.step()
        if setup.average is not None:
            setup.average.after_step()
        if not math.isfinite(value):
            raise FewshotError(f"training diverged at epoch {epoch} (loss {value})",
                               hint="lower lr" + (" or backbone_lr" if setup.ft is not None else ""),
                               options=("lr", "backbone_lr"))
        losses.append(value)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    images = setup.seen.images - start
    rate = images / max(time.perf_counter() - t0, 1e-9) if images else None
    if setup.average is not None:
        setup.average.after_epoch(epoch)
    return losses, rate


def _run_config(cfg: TrainConfig, setup: Setup, row: dict, elapsed: float) -> dict:
    data = setup.data
    return {"method": setup.method.name or cfg.method, "train_config": cfg.to_dict(), "protocol": setup.protocol,
            "seed": cfg.seed, "fine_tune": cfg.fine_tune, "package_version": __version__,
            "in_dim": data.backbone.dim, "train_images": len(data.train),
            "val_queries": len(data.val_q.vectors), "val_gallery": len(data.val_g.vectors),
            "best_epoch": row["epoch"],
            "best_val": {k[4:]: row[k] for k in HISTORY_FIELDS if k.startswith("val_")},
            "val_held_out": not cfg.train_on_val,
            "training_seconds_to_best": round(elapsed, 3),
            **({"validation_runtime": setup.ft.val_runtime, "micro_batch": setup.ft.micro_batch}
               if setup.ft is not None else {}),
            **({"weight_average": setup.average.info()} if setup.average is not None else {}),
            **({"distributed": setup.parallel.info()} if setup.parallel is not None else {})}


def _run_epochs(cfg: TrainConfig, setup: Setup, loop: TrainState, on_epoch_end: Callable[[int, dict], None] | None,
                work: Path) -> TrainState:
    """Epoch 0 (validation only) and the training epochs, writing into ``work`` (in a
    distributed run, every rank trains; rank 0 alone validates and writes, and tells the others
    when patience runs out)."""
    par = setup.parallel
    lead = par is None or par.lead
    bar = tqdm(total=setup.n_epochs + 1, initial=loop.start_epoch, desc=f"train {cfg.method}", unit="epoch",
               disable=not cfg.progress, leave=True)
    try:
        epoch = loop.start_epoch
        while epoch <= setup.n_epochs and not loop.stopped_early:
            t0 = time.perf_counter()
            losses, rate = _train_epoch(cfg, setup, epoch) if epoch > 0 else ([], None)
            if lead:
                _end_epoch(cfg, setup, work, loop, epoch, (losses, rate), t0, bar)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, loop.history[-1])
            if par is not None:
                loop.stopped_early = par.sync_stop(loop.stopped_early)
            epoch += 1
    except KeyboardInterrupt:
        done = loop.history[-1]["epoch"] if loop.history else None
        log.warning("training interrupted%s; continue it with the same command plus --resume",
                    f" after epoch {done}" if done is not None else "")
        raise
    finally:
        bar.close()
    return loop


def _end_epoch(cfg: TrainConfig, setup: Setup, work: Path, loop: TrainState, epoch: int,
               trained: tuple[list[float], float | None], t0: float, bar) -> None:
    """Validate the epoch, keep the best run, count patience and write the epoch's files.

    With ``weight_average`` the averaged weights are in place while the epoch is validated and
    saved as the best run (:meth:`~fewshot.training.average.WeightAverage.applied`); the
    checkpoint holds the raw ones (and the average beside them)."""
    method, data = setup.method, setup.data
    losses, rate = trained
    with setup.average.applied() if setup.average is not None else contextlib.nullcontext():
        metrics = validate_epoch(method, data, cfg, setup.ft, epoch)
        seconds = time.perf_counter() - t0
        loop.elapsed += seconds
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, **metrics,
               "seconds": round(seconds, 3), "images_per_second": None if rate is None else round(rate, 2)}
        loop.history.append(row)
        score = _selection_score(cfg, row)
        if score > loop.best["map_at_r"]:
            loop.best, loop.bad_epochs = {"epoch": epoch, "map_at_r": score}, 0
            save_run(work, EmbeddingModel(backbone=data.backbone, head=method.head),
                     _run_config(cfg, setup, row, loop.elapsed), extra_tensors=method.extra_tensors())
        elif epoch > 0:
            loop.bad_epochs += 1
    if epoch > 0 and cfg.patience and loop.bad_epochs >= cfg.patience and epoch < setup.n_epochs:
        loop.stopped_early = True
    _write_epoch_files(cfg, setup, work, loop, epoch)
    bar.update(1)
    bar.set_postfix(loss="-" if row["train_loss"] is None else f"{row['train_loss']:.4f}",
                    val_map_r="-" if row["val_map_at_r"] is None else f"{row['val_map_at_r']:.4f}", best=loop.best["epoch"])


def _selection_score(cfg: TrainConfig, row: dict) -> float:
    """What picks the best epoch: val MAP@R, or with ``train_on_val`` (no held-out class left) the
    epoch itself, so that the last one is kept and patience never runs out."""
    if cfg.train_on_val:
        return float(row["epoch"])
    return row["val_map_at_r"] if row["val_map_at_r"] is not None else -math.inf


def _write_epoch_files(cfg: TrainConfig, setup: Setup, work: Path, loop: TrainState, epoch: int) -> None:
    write_history(work, loop.history)
    write_curves(work, loop.history, val_trained=cfg.train_on_val)
    save_checkpoint(work, checkpoint_of(cfg, setup, loop, epoch))


def _finish_config(work: Path, loop: TrainState, setup: Setup, spread: float | None = None) -> dict:
    """Record the whole run in ``config.json`` (the weights on disk are the best epoch's) and
    mark it complete; a distributed run also records how far the ranks' final weights are
    apart (``distributed.replica_max_abs_diff``, 0.0 when they are identical)."""
    cfg_path = work / CONFIG
    full = json.loads(cfg_path.read_text(encoding="utf-8"))
    full.update({"epochs_run": loop.history[-1]["epoch"], "stopped_early": loop.stopped_early,
                 "training_seconds": round(loop.elapsed, 3), "setup_seconds": round(setup.setup_seconds, 3),
                 "images_per_second": images_per_second(loop.history),
                 "complete": True})
    if setup.parallel is not None:
        full["distributed"] = {**setup.parallel.info(), "replica_max_abs_diff": spread}
    atomic_write_json(cfg_path, full)
    return full


def images_per_second(history: list[dict]) -> float | None:
    """The median over a run's trained epochs of their training images per second (``history``
    rows' ``images_per_second``, epochs restored by ``resume`` included; ``None`` when no row has one)."""
    rates = [r["images_per_second"] for r in history if r.get("images_per_second") is not None]
    return round(float(np.median(rates)), 2) if rates else None


def _final_evaluation(cfg: TrainConfig, run_dir: Path) -> dict:
    from ..evaluation import EvalConfig, evaluate
    from .data import run_embed_options

    opts = run_embed_options(cfg, run_dir, cfg.final_tta)  # the run's own (test) size
    ecfg = EvalConfig(data=cfg.data, split=None, split_file=cfg.split_file, part=cfg.final_eval,
                      group_from=cfg.group_from, layout=cfg.layout, seed=cfg.seed, episodes=cfg.eval_episodes,
                      embed=opts)
    return evaluate(ecfg, run_dir / f"eval_{cfg.final_eval}", overwrite=True)
