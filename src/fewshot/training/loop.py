"""One training loop for every method: ``train(TrainConfig) -> RunResult`` (see :mod:`fewshot.training`)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..version import __version__
from ..backbones import check_tta
from ..embed import check_runtime
from ..errors import CheckpointError, FewshotError
from ..io import atomic_write_json, replace_dir, writer_lock
from ..methods.base import Method, TrainConfig, get_method
from ..methods.runs import CHECKPOINT, CONFIG, save_run
from ..model import EmbeddingModel
from .checkpoint import (CHECKPOINT_FORMAT, HISTORY_FIELDS, _check_resumable, _load_checkpoint, _method_state,
                         _prepare_stage, _restore_method_state, _resume_source, _save_checkpoint, _write_curves,
                         _write_history, staging_dir)
from .data import _Data, _load_data, with_rotated_classes
from .finetune import _FineTune
from .validate import _validate

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



# --------------------------------------------------------------------------- the loop
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.fine_tune != "none" and torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FewshotError("--device cuda asked for, but no CUDA device is available", hint="use --device cpu")
    return torch.device(cfg.device)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def _validate_fine_tune(cfg: TrainConfig) -> None:
    """The fine-tuning settings (``--fine-tune`` itself is parsed by :class:`TrainConfig`)."""
    if cfg.bn not in ("auto", "eval", "train"):
        raise FewshotError(f"unknown --bn '{cfg.bn}'", hint="use --bn auto, --bn eval or --bn train")
    if cfg.augment not in ("standard", "none"):
        raise FewshotError(f"unknown --augment '{cfg.augment}'", hint="use --augment standard or --augment none")
    if cfg.class_rotations not in (1, 2, 3, 4):
        raise FewshotError(f"--class-rotations {cfg.class_rotations} must be 1, 2, 3 or 4",
                           hint="e.g. --class-rotations 4 (0, 90, 180 and 270 degrees), or 1 for none")
    if cfg.backbone_lr is not None and not (math.isfinite(cfg.backbone_lr) and cfg.backbone_lr > 0):
        raise FewshotError(f"--backbone-lr {cfg.backbone_lr} must be a positive number", hint="e.g. --backbone-lr 2.5e-5")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise FewshotError(f"--warmup-steps {cfg.warmup_steps} must not be negative", hint="e.g. --warmup-steps 50")
    given = [flag for flag, on in (("--backbone-lr", cfg.backbone_lr is not None), ("--bn", cfg.bn != "auto"),
                                   ("--augment", cfg.augment != "standard"),
                                   ("--class-rotations", cfg.class_rotations != 1),
                                   ("--warmup-steps", cfg.warmup_steps is not None)) if on]
    if given and not cfg.fine_tuning:
        raise FewshotError(f"{', '.join(given)} set(s) how the backbone trains, but --fine-tune none keeps it frozen",
                           hint="drop " + ", ".join(given) + ", or pass --fine-tune last:N or all")
    if not cfg.pretrained and cfg.fine_tune != "all":
        raise FewshotError(f"--from-scratch trains {cfg.backbone} from random weights, so every backbone "
                           f"parameter must train, but --fine-tune is '{cfg.fine_tune}'",
                           hint="add --fine-tune all")


def _validate_config(cfg: TrainConfig) -> type[Method]:
    _validate_fine_tune(cfg)
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise FewshotError(f"unknown --lr-schedule '{cfg.lr_schedule}'",
                           hint="use --lr-schedule constant or --lr-schedule cosine")
    if not cfg.out:
        raise FewshotError("no output folder given", hint="pass --out RUN_DIR")
    if cfg.epochs < 0 or cfg.patience < 0:
        raise FewshotError("epochs and patience must not be negative", hint="e.g. --epochs 30 --patience 5")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise FewshotError(f"unknown --device '{cfg.device}'", hint="use --device auto, cpu or cuda")
    if cfg.final_eval not in ("none", "test", "val", "train"):
        raise FewshotError(f"unknown final evaluation part '{cfg.final_eval}'", hint="use --split test, val, train or none")
    check_runtime(cfg.runtime)
    check_tta(cfg.final_tta)
    _check_head(cfg.head)
    return get_method(cfg.method)


def _check_head(head: dict | None) -> None:
    """Build the head once at a nominal size, so that a bad ``--head`` spec fails before any work."""
    from ..methods.heads import ProjectionHead
    from ..methods.base import resolve_head_spec

    try:
        ProjectionHead(**resolve_head_spec(head, 8))
    except (TypeError, ValueError) as exc:
        raise FewshotError(f"--head {json.dumps(head)} is not a valid head ({exc})",
                           hint='use --head linear, --head mlp, or e.g. --head \'{"kind": "mlp", "hidden_dim": 512, '
                                '"out_dim": 256}\'') from None


class _Parallel(Protocol):
    """What the loop asks of a distributed run (:class:`fewshot.training.distributed.Parallel`):
    only the lead rank (0) validates, writes files and evaluates; the others train in step."""

    lead: bool
    device: torch.device

    def check(self, method_cls: type[Method], cfg: TrainConfig) -> None: ...

    def share(self, obj: Any) -> Any: ...

    def sync_stop(self, stop: bool) -> bool: ...

    def make_step(self, setup: "_Setup") -> Callable[[Any], float]: ...

    def info(self) -> dict: ...

    def replica_spread(self, setup: "_Setup") -> float: ...


@dataclass
class _Setup:
    """Everything the epoch loop needs, built and checked before any file is written."""

    data: _Data
    method: Method
    ft: _FineTune | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    n_epochs: int
    protocol: dict
    setup_seconds: float
    #: the feature source bound to the method (cached embeddings, or the fine-tuned backbone)
    features: Callable[[np.ndarray], torch.Tensor] | None = None
    #: one optimisation step of a batch (``None``: ``method.step(batch, optimizer)``)
    step: Callable[[Any], float] | None = None
    parallel: _Parallel | None = None


LR_SCHEDULES = ("constant", "cosine")


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup: int, schedule: str = "constant",
                 total_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor of each parameter group at optimizer step ``t``:

    - the ``"backbone"`` group warms up linearly: ``min(1, (t + 1) / warmup)``;
    - ``schedule="cosine"``: after the warm-up, every group decays by
      ``(1 + cos(pi * min(1, (t - warmup) / (total_steps - warmup)))) / 2``, down to 0 at
      ``total_steps`` (SGDR, Loshchilov and Hutter 2017, eq. 5, one cycle); ``"constant"``: 1.
    """
    span = max(1, int(total_steps) - warmup)

    def decay(t: int) -> float:
        if schedule != "cosine" or t < warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / span)))

    def ramp(t: int) -> float:
        return (1.0 if warmup <= 0 else min(1.0, (t + 1) / warmup)) * decay(t)

    lambdas = [ramp if g.get("name") == "backbone" else decay for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _setup(cfg: TrainConfig, method_cls: type[Method], par: _Parallel | None = None) -> _Setup:
    device = par.device if par is not None else _device(cfg)
    t_start = time.perf_counter()
    _seed_all(cfg.seed)  # a backbone trained from scratch starts from seeded random weights
    data = _load_data(cfg)
    if cfg.class_rotations > 1:
        data.train = with_rotated_classes(data.train, cfg.class_rotations)
    _seed_all(cfg.seed)
    method = method_cls(cfg, data.backbone.dim)
    method.check_data(data.train)
    if getattr(method.head, "use_centre", False) and hasattr(method.head, "set_centre"):
        method.head.set_centre(data.train.x)
    method.to(device)
    ft: _FineTune | None = None
    if cfg.fine_tuning:
        ft = _FineTune(cfg, data, device)
        method.backbone = ft.backbone.model
        method.backbone_params = ft.params
        features = ft.features
        method.bind(ft.features, ft.inputs)
    else:
        x_train = data.train.x.to(device)
        features = lambda idx: x_train[torch.from_numpy(idx).to(device)]  # noqa: E731
        method.bind(features)
    protocol = {"split_file": str(cfg.split_file), "split_name": data.split.name, "dataset": data.split.dataset,
                "train_classes": list(data.split.train), "val_classes": list(data.split.val),
                "test_classes": list(data.split.test), "query_split": data.split.query_split,
                "gallery_split": data.split.gallery_split, "seed": data.split.seed}
    optimizer = method.optimizer()
    total = method.max_epochs() * method.steps_per_epoch(data.train) if cfg.lr_schedule == "cosine" else 0
    scheduler = lr_scheduler(optimizer, cfg.warmup() if ft is not None else 0, cfg.lr_schedule, total)
    return _Setup(data, method, ft, optimizer, scheduler, method.max_epochs(),
                  protocol, time.perf_counter() - t_start, features=features, parallel=par)


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
    return _train(cfg, on_epoch_end)


def _train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
           par: _Parallel | None = None) -> RunResult | None:
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
                  par: _Parallel | None) -> RunResult | None:
    method_cls = _validate_config(cfg)
    if par is not None:
        par.check(method_cls, cfg)
    run_dir = Path(cfg.out)
    stage = staging_dir(run_dir)
    lead = par is None or par.lead
    source = setup = loop = None
    if lead:
        source = _resume_source(cfg, run_dir, stage)
        saved = _load_resumable(cfg, source)
        setup = _setup(cfg, method_cls, par)
        loop = _restore(setup, saved, source)  # a checkpoint that does not fit is refused before any write
        _prepare_stage(stage, source, run_dir)
    if par is not None:
        source = par.share(source)  # the others wait here for rank 0's checks and set-up
        if not lead:
            setup = _setup(cfg, method_cls, par)
            loop = _restore(setup, _load_resumable(cfg, source), source)
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


def _load_resumable(cfg: TrainConfig, source: Path | None) -> dict | None:
    """The checkpoint of ``source`` (checked against ``cfg``), or ``None`` for a new run."""
    if source is None:
        return None
    saved = _load_checkpoint(source / CHECKPOINT)
    _check_resumable(saved["config"], cfg, source / CHECKPOINT)
    return saved


@dataclass
class _Loop:
    """The epoch loop's state (what a checkpoint holds besides the weights)."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": -1, "map_at_r": -math.inf})
    bad_epochs: int = 0
    elapsed: float = 0.0
    start_epoch: int = 0
    stopped_early: bool = False


def _restore(setup: _Setup, saved: dict | None, where: Path | None) -> _Loop:
    """Load ``saved`` (the checkpoint of ``where``) into ``setup``; the loop state to continue.

    Raises:
        CheckpointError: its weights or optimizer state do not fit ``setup``'s model.
    """
    if saved is None or where is None:
        return _Loop()
    try:
        _restore_method_state(setup.method, setup.ft, saved["state"])
        setup.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scheduler") is not None:
            setup.scheduler.load_state_dict(saved["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # shapes or names of another model
        raise CheckpointError(f"{where / CHECKPOINT} does not fit this run's model ({str(exc)[:300]})",
                              hint="train again without --resume (add --overwrite to discard the interrupted run)"
                              ) from None
    loop = _Loop(history=saved["history"], best=saved["best"], bad_epochs=saved["bad_epochs"],
                 elapsed=saved["seconds"], start_epoch=saved["epoch"] + 1,
                 stopped_early=saved.get("stopped_early", False))
    log.info("resuming %s after epoch %d (best epoch %d)", where, saved["epoch"], loop.best["epoch"])
    return loop


def _train_epoch(cfg: TrainConfig, setup: _Setup, epoch: int) -> list[float]:
    seed = _epoch_seed(cfg.seed, epoch)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    method = setup.method
    method.train_mode(True)
    if setup.ft is not None:
        setup.ft.seed_epoch(seed)
        setup.ft.train_mode(True)
    batches = list(method.epoch_batches(setup.data.train, rng))
    losses = []
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="step", leave=False, disable=not cfg.progress)
    for batch in bar:
        value = setup.step(batch) if setup.step is not None else method.step(batch, setup.optimizer)
        setup.scheduler.step()
        if not math.isfinite(value):
            raise FewshotError(f"training diverged at epoch {epoch} (loss {value})",
                               hint="lower --lr" + (" or --backbone-lr" if setup.ft is not None else ""))
        losses.append(value)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    return losses


def _run_config(cfg: TrainConfig, setup: _Setup, row: dict, elapsed: float) -> dict:
    data = setup.data
    return {"method": setup.method.name or cfg.method, "train_config": cfg.to_dict(), "protocol": setup.protocol,
            "seed": cfg.seed, "fine_tune": cfg.fine_tune, "package_version": __version__,
            "in_dim": data.backbone.dim, "train_images": len(data.train),
            "val_queries": len(data.val_q.vectors), "val_gallery": len(data.val_g.vectors),
            "best_epoch": row["epoch"],
            "best_val": {k[4:]: row[k] for k in HISTORY_FIELDS if k.startswith("val_")},
            "training_seconds_to_best": round(elapsed, 3),
            **({"validation_runtime": setup.ft.val_runtime} if setup.ft is not None else {}),
            **({"distributed": setup.parallel.info()} if setup.parallel is not None else {})}


def _run_epochs(cfg: TrainConfig, setup: _Setup, loop: _Loop, on_epoch_end: Callable[[int, dict], None] | None,
                work: Path) -> _Loop:
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
            losses = _train_epoch(cfg, setup, epoch) if epoch > 0 else []
            if lead:
                _end_epoch(cfg, setup, work, loop, epoch, losses, t0, bar)
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


def _end_epoch(cfg: TrainConfig, setup: _Setup, work: Path, loop: _Loop, epoch: int, losses: list[float],
               t0: float, bar) -> None:
    """Validate the epoch, keep the best run, count patience and write the epoch's files."""
    method, data = setup.method, setup.data
    metrics = _validate(method, data, cfg, setup.ft, epoch)
    seconds = time.perf_counter() - t0
    loop.elapsed += seconds
    row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, **metrics,
           "seconds": round(seconds, 3)}
    loop.history.append(row)
    score = row["val_map_at_r"] if row["val_map_at_r"] is not None else -math.inf
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
                    val_map_r=f"{score:.4f}", best=loop.best["epoch"])


def _write_epoch_files(cfg: TrainConfig, setup: _Setup, work: Path, loop: _Loop, epoch: int) -> None:
    _write_history(work, loop.history)
    _write_curves(work, loop.history)
    _save_checkpoint(work, {
        "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch,
        "state": _method_state(setup.method, setup.ft), "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "history": loop.history, "best": loop.best, "bad_epochs": loop.bad_epochs,
        "seconds": loop.elapsed, "stopped_early": loop.stopped_early, "fewshot_version": __version__})


def _finish_config(work: Path, loop: _Loop, setup: _Setup, spread: float | None = None) -> dict:
    """Record the whole run in ``config.json`` (the weights on disk are the best epoch's) and
    mark it complete; a distributed run also records how far the ranks' final weights are
    apart (``distributed.replica_max_abs_diff``, 0.0 when they are identical)."""
    cfg_path = work / CONFIG
    full = json.loads(cfg_path.read_text(encoding="utf-8"))
    full.update({"epochs_run": loop.history[-1]["epoch"], "stopped_early": loop.stopped_early,
                 "training_seconds": round(loop.elapsed, 3), "setup_seconds": round(setup.setup_seconds, 3),
                 "complete": True})
    if setup.parallel is not None:
        full["distributed"] = {**setup.parallel.info(), "replica_max_abs_diff": spread}
    atomic_write_json(cfg_path, full)
    return full


def _final_evaluation(cfg: TrainConfig, run_dir: Path) -> dict:
    from ..evaluation import EmbedOptions, EvalConfig, evaluate

    opts = EmbedOptions(backbone=None, model_dir=str(run_dir), image_size=cfg.image_size,
                        batch_size=cfg.embed_batch_size, num_workers=cfg.workers, cache_dir=cfg.cache_dir,
                        progress=cfg.progress, runtime=cfg.runtime, threads=torch.get_num_threads(),
                        tta=cfg.final_tta)
    ecfg = EvalConfig(data=cfg.data, split=None, split_file=cfg.split_file, part=cfg.final_eval,
                      group_from=cfg.group_from, layout=cfg.layout, seed=cfg.seed, episodes=cfg.eval_episodes,
                      embed=opts)
    return evaluate(ecfg, run_dir / f"eval_{cfg.final_eval}", overwrite=True)
