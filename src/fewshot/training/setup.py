"""What a run builds before its first epoch (:func:`build_setup`): data, method, fine-tuning
state, optimizer and schedule, on the run's device; and what the epoch loop asks of a
distributed run (:class:`ParallelRun`)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..errors import FewshotError
from ..methods import Method
from .average import WeightAverage, make_average
from .config import TrainConfig
from .data import RunData, load_run_data, with_rotated_classes
from .finetune import FineTune
from .optim import lr_scheduler, make_optimizer

__all__ = ["ParallelRun", "Setup", "ImageCount", "build_setup", "resolve_device", "seed_all", "epoch_seed"]


class ParallelRun(Protocol):
    """What the loop asks of a distributed run (:class:`fewshot.training.parallel.Parallel`):
    only the lead rank (0) validates, writes files and evaluates; the others train in step."""

    lead: bool
    device: torch.device

    def check(self, cfg: TrainConfig) -> None: ...

    def share(self, obj: Any) -> Any: ...

    def sync_stop(self, stop: bool) -> bool: ...

    def make_step(self, setup: "Setup") -> Callable[[Any], float]: ...

    def info(self) -> dict: ...

    def replica_spread(self, setup: "Setup") -> float: ...


class ImageCount:
    """Training images embedded so far (the trainer's throughput count): :meth:`wrap` counts
    the items of every call of a method's feature or input source."""

    def __init__(self) -> None:
        self.images = 0

    def wrap(self, source: Callable[[np.ndarray], torch.Tensor]) -> Callable[[np.ndarray], torch.Tensor]:
        def counted(idx: np.ndarray) -> torch.Tensor:
            self.images += len(idx)
            return source(idx)
        return counted


@dataclass
class Setup:
    """Everything the epoch loop needs, built and checked before any file is written."""

    data: RunData
    method: Method
    ft: FineTune | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    n_epochs: int
    protocol: dict
    setup_seconds: float
    #: the feature source bound to the method (cached embeddings, or the fine-tuned backbone)
    features: Callable[[np.ndarray], torch.Tensor] | None = None
    #: one optimisation step of a batch (``None``: :func:`fewshot.training.optim.train_step`)
    step: Callable[[Any], float] | None = None
    parallel: ParallelRun | None = None
    #: the running average of the weights that each epoch validates (``weight_average``; the
    #: lead rank's only), or ``None``
    average: WeightAverage | None = None
    #: training images embedded so far (images per second of each epoch)
    seen: ImageCount = field(default_factory=ImageCount)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device`` as a torch device (``"auto"``: CUDA when available and fine-tuning, else CPU).

    Raises:
        FewshotError: CUDA asked for but not available (``options``: ``device``).
    """
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.fine_tune != "none" and torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FewshotError("device=cuda asked for, but no CUDA device is available", hint="use device=cpu",
                           options=("device",))
    return torch.device(cfg.device)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness (its batches, augmentation): from ``(seed, epoch)``."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_setup(cfg: TrainConfig, par: ParallelRun | None = None) -> Setup:
    """Load and embed the data, build and check the method (:meth:`~fewshot.methods.base.Method.check_data`),
    the fine-tuning state, the optimizer and the schedule, seeded from ``cfg.seed``, and the
    weight average (:mod:`.average`) on the rank that validates.

    Raises:
        DataError: see :func:`~fewshot.training.data.load_run_data`.
        FewshotError: data the method cannot learn from; a bad fine-tuning setting.
    """
    device = par.device if par is not None else resolve_device(cfg)
    t_start = time.perf_counter()
    seed_all(cfg.seed)  # a backbone trained from scratch starts from seeded random weights
    data = load_run_data(cfg)
    if cfg.class_rotations > 1:
        data.train = with_rotated_classes(data.train, cfg.class_rotations)
    seed_all(cfg.seed)
    method = cfg.build_method(data.backbone.dim)
    method.check_data(data.train)
    if getattr(method.head, "use_centre", False) and hasattr(method.head, "set_centre"):
        method.head.set_centre(data.train.x)
    method.to(device)
    ft: FineTune | None = None
    seen = ImageCount()
    if cfg.fine_tuning:
        ft = FineTune(cfg, data, device)
        method.backbone = ft.backbone.model
        method.backbone_params = ft.params
        features = ft.features
        method.bind(seen.wrap(ft.features), seen.wrap(ft.inputs))
    else:
        x_train = data.train.x.to(device)
        features = lambda idx: x_train[torch.from_numpy(idx).to(device)]  # noqa: E731
        method.bind(seen.wrap(features))
    optimizer = make_optimizer(method, cfg)
    n_epochs = method.max_epochs(cfg.epochs)
    total = n_epochs * method.steps_per_epoch(data.train) if cfg.lr_schedule == "cosine" else 0
    scheduler = lr_scheduler(optimizer, cfg.warmup() if ft is not None else 0, cfg.lr_schedule, total)
    average = make_average(cfg, method, ft.backbone.model if ft is not None else None) \
        if par is None or par.lead else None
    return Setup(data, method, ft, optimizer, scheduler, n_epochs, _protocol(cfg, data),
                 time.perf_counter() - t_start, features=features, parallel=par, average=average, seen=seen)


def _protocol(cfg: TrainConfig, data: RunData) -> dict:
    """What ``config.json`` records of the class split."""
    split = data.split
    return {"split_file": str(cfg.split_file), "split_name": split.name, "dataset": split.dataset,
            "train_classes": list(split.train), "val_classes": list(split.val), "test_classes": list(split.test),
            "query_split": split.query_split, "gallery_split": split.gallery_split, "seed": split.seed,
            "val_trained": cfg.train_on_val}
