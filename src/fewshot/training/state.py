"""The epoch loop's state and its checkpoint: :class:`TrainState` (history, best epoch, patience,
time), what ``RUN_DIR/checkpoint.pt`` holds (:func:`checkpoint_of`: the raw weights, and the
weight average of ``weight_average`` beside them) and how a run continues from it
(:func:`load_resumable`, :func:`restore_state`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..methods.runs import CHECKPOINT
from ..version import __version__
from .checkpoint import (CHECKPOINT_FORMAT, RESUME_OPTIONS, check_resumable, load_checkpoint, method_state,
                         restore_method_state)
from .config import TrainConfig
from .setup import Setup

log = logging.getLogger("fewshot")

__all__ = ["TrainState", "load_resumable", "restore_state", "checkpoint_of"]


@dataclass
class TrainState:
    """The epoch loop's state (what a checkpoint holds besides the weights)."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": -1, "map_at_r": -math.inf})
    bad_epochs: int = 0
    elapsed: float = 0.0
    start_epoch: int = 0
    stopped_early: bool = False


def load_resumable(cfg: TrainConfig, source: Path | None) -> dict | None:
    """The checkpoint of ``source`` (checked against ``cfg``), or ``None`` for a new run.

    Raises:
        CheckpointError: see :func:`~fewshot.training.checkpoint.load_checkpoint` and
            :func:`~fewshot.training.checkpoint.check_resumable`.
    """
    if source is None:
        return None
    saved = load_checkpoint(source / CHECKPOINT)
    check_resumable(saved["config"], cfg, source / CHECKPOINT)
    return saved


def restore_state(setup: Setup, saved: dict | None, where: Path | None) -> TrainState:
    """Load ``saved`` (the checkpoint of ``where``) into ``setup``; the loop state to continue.

    Raises:
        CheckpointError: its weights or optimizer state do not fit ``setup``'s model.
    """
    if saved is None or where is None:
        return TrainState()
    try:
        restore_method_state(setup.method, setup.ft, saved["state"])
        setup.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scheduler") is not None:
            setup.scheduler.load_state_dict(saved["scheduler"])
        if setup.average is not None:
            setup.average.load_state_dict(saved["average"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # shapes or names of another model
        raise CheckpointError(f"{where / CHECKPOINT} does not fit this run's model ({str(exc)[:300]})",
                              hint="train again without resume=True (add overwrite=True to discard the interrupted "
                                   "run)", options=RESUME_OPTIONS) from None
    state = TrainState(history=saved["history"], best=saved["best"], bad_epochs=saved["bad_epochs"],
                       elapsed=saved["seconds"], start_epoch=saved["epoch"] + 1,
                       stopped_early=saved.get("stopped_early", False))
    log.info("resuming %s after epoch %d (best epoch %d)", where, saved["epoch"], state.best["epoch"])
    return state


def checkpoint_of(cfg: TrainConfig, setup: Setup, state: TrainState, epoch: int) -> dict:
    """What ``RUN_DIR/checkpoint.pt`` holds after ``epoch`` (tensors and plain values only)."""
    return {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch,
            "state": method_state(setup.method, setup.ft), "optimizer": setup.optimizer.state_dict(),
            "scheduler": setup.scheduler.state_dict(),
            "history": state.history, "best": state.best, "bad_epochs": state.bad_epochs,
            "seconds": state.elapsed, "stopped_early": state.stopped_early, "fewshot_version": __version__,
            "average": setup.average.state_dict() if setup.average is not None else None}
