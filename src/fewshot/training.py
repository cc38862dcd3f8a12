"""One training loop for every method: ``train(TrainConfig) -> RunResult``.

What :func:`train` does, in order (every file is written into ``RUN_DIR.partial``, see
:func:`staging_dir`, which replaces ``RUN_DIR`` only when training completes; nothing is
written before the arguments, the data and :meth:`Method.check_data` have been checked):

1. Loads the dataset and the class split (``cfg.split_file``): training uses *every* image of
   the split's train classes (:func:`~fewshot.data.splits.dataset_for`); validation uses the val
   classes under the cross-visit rule (:func:`~fewshot.data.splits.protocol_sets`: queries from
   the test photos, gallery from the train photos).
2. Embeds those images with the frozen backbone (cached on disk: a second run embeds nothing).
3. Builds the method (:mod:`fewshot.methods.base`) and its head; a head with ``"centre": true``
   gets the mean L2-normalised training embedding as its centre. Seeds torch and numpy.
4. Validates epoch 0 (before any step), so the curves start at the frozen baseline, then runs
   epochs: each epoch iterates ``method.epoch_batches(train, rng)`` with a per-epoch seeded
   ``rng`` and calls ``method.step``; then validates (val mAP, MAP@R, Precision@1 with
   :func:`~fewshot.metrics.retrieval_metrics`, and N-way K-shot episodic accuracy with
   ``val_episodes`` episodes and :meth:`Method.episode_classifier`).
5. Keeps the best epoch by val MAP@R (``RUN_DIR/config.json`` + ``model.safetensors`` via
   :func:`~fewshot.methods.runs.save_run`, atomically) and stops after ``patience`` epochs without
   improvement.
6. Every epoch writes ``RUN_DIR/history.csv`` (epoch, train_loss, val_map, val_map_at_r,
   val_precision_at_1, val_episodic_acc, seconds), ``RUN_DIR/curves.png`` and, last,
   ``RUN_DIR/checkpoint.pt`` (atomic: head / method / fine-tuned backbone state, optimizer state,
   epoch, RNG states, history, best epoch, patience counter). ``cfg.resume`` continues from it
   and gives exactly the run an uninterrupted training would have given (every epoch's
   randomness is seeded from ``(seed, epoch)``); a finished run resumed with a larger
   ``epochs`` trains on (one that stopped early stays stopped).
7. Evaluates the best model on ``cfg.final_eval`` classes (default ``test``) with
   :func:`fewshot.pipeline.evaluate` into ``RUN_DIR/eval_<part>/``.

With ``fine_tune="last"`` the last ``fine_tune_blocks`` blocks of the backbone train too, on
augmented images (:mod:`fewshot.methods.augment`); validation then re-embeds the val images
with the current backbone every epoch. Meant for a GPU; it runs (slowly) on CPU.

This module sits at the pipeline level: it uses the metrics (and, for the final evaluation,
:mod:`fewshot.pipeline`), which nothing below it imports.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .backbones import Backbone, create_backbone
from .data.fetch import resolve_data
from .data.loaders import load_dataset
from .data.records import Dataset
from .data.splits import ClassSplit, dataset_for, protocol_sets
from .embed import Embeddings, embed_dataset
from .errors import CheckpointError, DataError, FewshotError
from .io import atomic_path, atomic_write_json, atomic_write_text, check_output, replace_dir
from .model import EmbeddingModel
from .methods.base import Method, TrainConfig, TrainData, get_method
from .methods.runs import CHECKPOINT, CONFIG, is_run_dir, save_run

log = logging.getLogger("fewshot")

__all__ = ["train", "RunResult", "HISTORY_FIELDS", "CHECKPOINT", "read_history", "staging_dir"]

HISTORY = "history.csv"
CURVES = "curves.png"
#: a run is trained in ``RUN_DIR.partial`` beside ``RUN_DIR`` and moved onto it when training completes
PARTIAL_SUFFIX = ".partial"
HISTORY_FIELDS = ("epoch", "train_loss", "val_map", "val_map_at_r", "val_precision_at_1",
                  "val_episodic_acc", "seconds")
CHECKPOINT_FORMAT = 1

#: config fields that may change between an interrupted run and its ``--resume``
_RESUMABLE_CHANGES = {"epochs", "patience", "options.episodes", "resume", "overwrite", "progress", "device",
                      "cache_dir", "workers", "embed_batch_size", "final_eval", "eval_episodes", "out",
                      "data"}


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


# --------------------------------------------------------------------------- data
@dataclass
class _Data:
    backbone: Backbone
    split: ClassSplit
    train: TrainData
    train_set: Dataset
    val_q: Embeddings
    val_g: Embeddings


def _embed(dataset: Dataset, backbone: Backbone, cfg: TrainConfig) -> Embeddings:
    return embed_dataset(dataset, backbone, batch_size=cfg.embed_batch_size, num_workers=cfg.workers,
                         cache_dir=cfg.cache_dir, progress=cfg.progress)


def _load_data(cfg: TrainConfig) -> _Data:
    if not cfg.split_file:
        raise DataError("training needs a class split (train / val classes)",
                        hint="pass --split-file FILE (e.g. splits/grocery-unseen.json)")
    split = ClassSplit.load(cfg.split_file)
    dataset = load_dataset(resolve_data(cfg.data), split=None, group_from=cfg.group_from)
    train_set = dataset_for(dataset, split, "train")
    val_q_set, val_g_set = protocol_sets(dataset, split, "val")
    backbone = create_backbone(cfg.backbone, pretrained=True, image_size=cfg.image_size)
    tr = _embed(train_set, backbone, cfg)
    names = sorted(set(tr.labels))
    if len(names) < 2:
        raise DataError(f"the train classes of {cfg.split_file} have {len(names)} readable class(es)",
                        hint="training needs at least two classes")
    _check_validation(val_q_set, val_g_set, cfg)
    index = {n: i for i, n in enumerate(names)}
    train = TrainData(x=torch.from_numpy(np.ascontiguousarray(tr.vectors)),
                      y=torch.tensor([index[lab] for lab in tr.labels], dtype=torch.int64),
                      label_names=names, groups=list(tr.groups), paths=[str(p) for p in tr.dataset.paths])
    return _Data(backbone, split, train, tr.dataset, _embed(val_q_set, backbone, cfg),
                 _embed(val_g_set, backbone, cfg))


def _check_validation(val_q: Dataset, val_g: Dataset, cfg: TrainConfig) -> None:
    """Refuse a val part on which validation is empty or true by construction (one class:
    val MAP@R 1.0 whatever the model); warn when it has few classes."""
    from .pipeline import check_evaluable

    try:
        check_evaluable(val_q.labels, val_g.labels, f"the val classes of {cfg.split_file}")
    except DataError as exc:
        raise DataError(f"validation would be meaningless: {exc.message}",
                        hint="give the split file's val part at least 2 classes (5 or more is better) "
                             "with photos for both queries and gallery") from None
    usable = set(val_q.labels) & set(val_g.labels)
    if len(usable) < 5:
        log.warning("only %d val classes: val MAP@R (which picks the best epoch) is noisy; "
                    "5 or more val classes are better", len(usable))


# --------------------------------------------------------------------------- fine-tuning
def _backbone_tail(model: nn.Module, blocks: int) -> list[nn.Module]:
    """The modules of the last ``blocks`` blocks (and the layers after them) of a backbone.

    EfficientNet-Lite: ``_blocks[-blocks:]``, ``_conv_head``, ``_bn1``. Other backbones: the last
    ``blocks`` children of the deepest-last ``Sequential`` / ``ModuleList`` with at least four
    children, plus the modules registered after it.
    """
    net = getattr(model, "net", model)
    if hasattr(net, "_blocks") and hasattr(net, "_conv_head"):
        return list(net._blocks[-blocks:]) + [net._conv_head, net._bn1]
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= 4:
            best = mod
    if best is None:
        return [list(model.children())[-1]] if list(model.children()) else [model]
    tail = list(best)[-blocks:]
    names = [n for n, _ in model.named_modules()]
    owner = {id(m): n for n, m in model.named_modules()}
    start = names.index(owner[id(best)])
    after = [m for n, m in list(model.named_modules())[start + 1:]
             if not n.startswith(owner[id(best)] + ".") and not any(True for _ in m.children())]
    return tail + after


class _FineTune:
    """Trainable backbone tail + in-memory images + augmentation for ``fine_tune="last"``."""

    def __init__(self, cfg: TrainConfig, data: _Data, device: torch.device) -> None:
        from .methods.augment import ImageBank

        self.cfg = cfg
        self.backbone = data.backbone
        model = self.backbone.model
        for p in model.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for mod in _backbone_tail(model, max(1, int(cfg.fine_tune_blocks))):
            for p in mod.parameters():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    params.append(p)
        self.params = params
        model.to(device).eval()
        self.device = device
        load = int(round(cfg.image_size * 8 / 7))
        self.train_bank = ImageBank(data.train.paths, load, progress=cfg.progress)
        self.val_q_bank = ImageBank([str(p) for p in data.val_q.dataset.paths], cfg.image_size, cfg.progress)
        self.val_g_bank = ImageBank([str(p) for p in data.val_g.dataset.paths], cfg.image_size, cfg.progress)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def seed_epoch(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def features(self, idx: np.ndarray) -> torch.Tensor:
        from .methods.augment import augment

        images = augment(self.train_bank.images[torch.from_numpy(idx)], self.cfg.image_size,
                         self.backbone.preprocess, self.generator)
        return self.backbone.model(images.to(self.device))

    @torch.no_grad()
    def embed_bank(self, bank, batch: int = 64) -> torch.Tensor:
        from .methods.augment import normalise

        out = [self.backbone.model(normalise(bank.images[i:i + batch], self.backbone.preprocess).to(self.device))
               for i in range(0, len(bank), batch)]
        return torch.cat(out).float()


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def _head_embed(method: Method, x: torch.Tensor, batch: int = 4096) -> np.ndarray:
    method.train_mode(False)
    out = [method.embed(x[i:i + batch].to(method.device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


def _validate(method: Method, data: _Data, cfg: TrainConfig, ft: _FineTune | None, epoch: int) -> dict:
    from .metrics import episodic_accuracy, retrieval_metrics

    if ft is not None:
        xq, xg = ft.embed_bank(ft.val_q_bank), ft.embed_bank(ft.val_g_bank)
    else:
        xq, xg = torch.from_numpy(data.val_q.vectors), torch.from_numpy(data.val_g.vectors)
    q, g = _head_embed(method, xq), _head_embed(method, xg)
    rep = retrieval_metrics(q, data.val_q.labels, g, data.val_g.labels)
    episodic = None
    if cfg.val_episodes > 0:
        try:
            res = episodic_accuracy(g, data.val_g.labels, n_way=cfg.ways, k_shot=cfg.shots,
                                    n_query=cfg.queries, episodes=cfg.val_episodes, seed=cfg.seed,
                                    query_embeddings=q, query_labels=data.val_q.labels,
                                    classifier=method.episode_classifier(), warn=epoch == 0)
            episodic = res.accuracy
        except DataError as exc:
            if epoch == 0:
                log.warning("episodic validation skipped: %s", exc.message)
    return {"val_map": _f(rep.map), "val_map_at_r": _f(rep.map_at_r),
            "val_precision_at_1": _f(rep.precision_at_1), "val_episodic_acc": episodic}


def _f(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------- files
def _write_history(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]))
                    for k in HISTORY_FIELDS})
    atomic_write_text(run_dir / HISTORY, buf.getvalue())


def read_history(run_dir: str | Path) -> list[dict]:
    """``RUN_DIR/history.csv`` as a list of dicts (``epoch`` int, metrics float or ``None``)."""
    rows = []
    with open(Path(run_dir) / HISTORY, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: (int(v) if k == "epoch" else (float(v) if v != "" else None)) for k, v in r.items()})
    return rows


def _write_curves(run_dir: Path, history: list[dict]) -> None:
    try:
        from .viz import training_curves
    except ImportError:  # matplotlib missing: the CSV is enough
        return
    nan = float("nan")
    rows = [{k: (nan if v is None else v) for k, v in row.items()} for row in history]
    try:
        training_curves(rows, run_dir / CURVES, loss_keys=("train_loss",),
                        metric_keys=("val_map", "val_map_at_r", "val_precision_at_1", "val_episodic_acc"))
    except Exception as exc:  # a plotting failure must not end a long run
        log.warning("could not draw %s: %s", run_dir / CURVES, exc)


def _save_checkpoint(run_dir: Path, state: dict) -> None:
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a fewshot training checkpoint")
        return state
    except Exception as exc:
        raise CheckpointError(f"{path} is damaged or not a training checkpoint ({exc})",
                              hint="delete it and train again without --resume") from exc


def _flat(config: dict) -> dict:
    """A train_config with its options as ``options.NAME`` keys."""
    out = {k: v for k, v in config.items() if k != "options"}
    out.update({f"options.{k}": v for k, v in (config.get("options") or {}).items()})
    return out


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    saved = _flat(TrainConfig.from_dict(saved).to_dict())  # a checkpoint of 0.1.0 kept options flat
    now = _flat(cfg.to_dict())
    diff = [k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:6])
        raise CheckpointError(f"cannot resume {path}: settings differ from the interrupted run ({pairs})",
                              hint="resume with the same settings, or train into a new --out folder")


# --------------------------------------------------------------------------- the loop
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if cfg.fine_tune != "none" and torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FewshotError("--device cuda asked for, but no CUDA device is available", hint="use --device cpu")
    return torch.device(cfg.device)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def _method_state(method: Method, ft: _FineTune | None) -> dict:
    st = {"head": {k: v.detach().cpu().clone() for k, v in method.head.state_dict().items()},
          "extra": {k: v.detach().cpu().clone() for k, v in method.extra_tensors().items()}}
    if ft is not None:
        st["backbone"] = {k: v.detach().cpu().clone() for k, v in ft.backbone.model.state_dict().items()}
    return st


def _restore_method_state(method: Method, ft: _FineTune | None, st: dict) -> None:
    method.head.load_state_dict(st["head"])
    method.load_extra_tensors(st.get("extra", {}))
    if ft is not None and "backbone" in st:
        ft.backbone.model.load_state_dict(st["backbone"])


def _validate_config(cfg: TrainConfig) -> type[Method]:
    if cfg.fine_tune not in ("none", "last"):
        raise FewshotError(f"unknown --fine-tune '{cfg.fine_tune}'", hint="use --fine-tune none or --fine-tune last")
    if not cfg.out:
        raise FewshotError("no output folder given", hint="pass --out RUN_DIR")
    if cfg.epochs < 0 or cfg.patience < 0:
        raise FewshotError("epochs and patience must not be negative", hint="e.g. --epochs 30 --patience 5")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise FewshotError(f"unknown --device '{cfg.device}'", hint="use --device auto, cpu or cuda")
    if cfg.final_eval not in ("none", "test", "val", "train"):
        raise FewshotError(f"unknown final evaluation part '{cfg.final_eval}'", hint="use test, val or none")
    _check_head(cfg.head)
    return get_method(cfg.method)


def _check_head(head: dict | None) -> None:
    """Build the head once at a nominal size, so that a bad ``--head`` spec fails before any work."""
    from .methods.heads import ProjectionHead
    from .methods.base import resolve_head_spec

    try:
        ProjectionHead(**resolve_head_spec(head, 8))
    except (TypeError, ValueError) as exc:
        raise FewshotError(f"--head {json.dumps(head)} is not a valid head ({exc})",
                           hint='use --head linear, --head mlp, or e.g. --head \'{"kind": "mlp", "hidden_dim": 512, '
                                '"out_dim": 256}\'') from None


def staging_dir(run_dir: str | Path) -> Path:
    """Where a run into ``run_dir`` is trained: ``RUN_DIR.partial`` beside it. It replaces
    ``run_dir`` only when training completes, so a failed or interrupted run never touches a
    previous good run (and ``--model`` refuses the partial one: it is not marked complete)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)


def _resume_source(cfg: TrainConfig, run_dir: Path, stage: Path) -> Path | None:
    """The folder whose checkpoint this call continues (``stage`` or ``run_dir``), or ``None``
    for a new run; refuses outputs that this call may not replace."""
    from .pipeline import data_protection

    protect = data_protection(cfg.data)
    for folder in (run_dir, stage):  # anything there that is not a fewshot run is refused outright
        check_output(folder, what="fewshot training run", is_ours=is_run_dir, overwrite=True, **protect)
    if cfg.resume:
        for folder in (stage, run_dir):
            if (folder / CHECKPOINT).is_file():
                return folder
        log.info("no checkpoint in %s or %s: starting a new run", run_dir, stage)
    if is_run_dir(stage) and not cfg.overwrite:
        raise CheckpointError(f"{stage} holds an interrupted training run for {run_dir}",
                              hint="pass --resume to continue it, or --overwrite to discard it and start again")
    if is_run_dir(run_dir) and not cfg.overwrite:
        raise CheckpointError(f"{run_dir} already holds a training run",
                              hint="pass --resume to continue it, --overwrite to replace it, or another --out")
    return None


def _prepare_stage(stage: Path, source: Path | None, run_dir: Path) -> None:
    """Make ``stage`` the folder to train in (called once every argument has been checked)."""
    import shutil

    if source == stage:
        return
    if stage.exists():  # an interrupted run that --overwrite discards (checked by _resume_source)
        shutil.rmtree(stage)
    if source == run_dir:  # continue a finished run (larger --epochs) without touching it
        shutil.copytree(run_dir, stage)
    else:
        stage.mkdir(parents=True)
    log.info("training in %s (it replaces %s when training completes)", stage, run_dir)


@dataclass
class _Setup:
    """Everything the epoch loop needs, built and checked before any file is written."""

    data: _Data
    method: Method
    ft: _FineTune | None
    optimizer: torch.optim.Optimizer
    n_epochs: int
    protocol: dict
    setup_seconds: float


def _setup(cfg: TrainConfig, method_cls: type[Method]) -> _Setup:
    device = _device(cfg)
    t_start = time.perf_counter()
    data = _load_data(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    method = method_cls(cfg, data.backbone.dim)
    method.check_data(data.train)
    if getattr(method.head, "use_centre", False) and hasattr(method.head, "set_centre"):
        method.head.set_centre(data.train.x)
    method.to(device)
    ft: _FineTune | None = None
    if cfg.fine_tune == "last":
        ft = _FineTune(cfg, data, device)
        method.backbone = ft.backbone.model
        method.backbone_params = ft.params
        method.bind(ft.features)
    else:
        x_train = data.train.x.to(device)
        method.bind(lambda idx: x_train[torch.from_numpy(idx).to(device)])
    protocol = {"split_file": str(cfg.split_file), "split_name": data.split.name, "dataset": data.split.dataset,
                "train_classes": list(data.split.train), "val_classes": list(data.split.val),
                "test_classes": list(data.split.test), "query_split": data.split.query_split,
                "gallery_split": data.split.gallery_split, "seed": data.split.seed}
    return _Setup(data, method, ft, method.optimizer(), method.max_epochs(), protocol,
                  time.perf_counter() - t_start)


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
            ``overwrite``), or its checkpoint is damaged / from different settings.
        FewshotError: unknown method, miner, head or fine-tune mode; impossible batch sizes;
            data on which the method cannot learn (:meth:`Method.check_data`); an ``--out``
            that is not a run folder.
    """
    method_cls = _validate_config(cfg)
    run_dir = Path(cfg.out)
    stage = staging_dir(run_dir)
    source = _resume_source(cfg, run_dir, stage)
    saved = _load_checkpoint(source / CHECKPOINT) if source is not None else None
    if saved is not None:
        _check_resumable(saved["config"], cfg, source / CHECKPOINT)
    setup = _setup(cfg, method_cls)
    _prepare_stage(stage, source, run_dir)
    try:
        loop = _run_epochs(cfg, setup, stage, saved, on_epoch_end)
    except BaseException:
        if not (stage / CHECKPOINT).is_file():  # nothing to resume: leave no empty run behind
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
        raise
    full = _finish_config(stage, loop, setup)
    replace_dir(stage, run_dir)
    final = None
    if cfg.final_eval != "none":
        final = _final_evaluation(cfg, run_dir)
        full["final_eval"] = {"part": cfg.final_eval, "map": final["map"], "map_at_r": final["map_at_r"],
                              "precision_at_1": final["precision_at_1"],
                              "episodes": {k: {"accuracy": v.get("accuracy"), "ci95": v.get("ci95")}
                                           for k, v in final["episodes"].items()}}
        atomic_write_json(run_dir / CONFIG, full)
    best_row = next(r for r in loop.history if r["epoch"] == loop.best["epoch"])
    return RunResult(run_dir=run_dir, best_epoch=loop.best["epoch"], best_metrics=best_row,
                     history=loop.history, seconds=loop.elapsed, stopped_early=loop.stopped_early,
                     final_metrics=final, config=full)


@dataclass
class _Loop:
    """The epoch loop's state (what a checkpoint holds besides the weights)."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": -1, "map_at_r": -math.inf})
    bad_epochs: int = 0
    elapsed: float = 0.0
    start_epoch: int = 0
    stopped_early: bool = False


def _restore(setup: _Setup, saved: dict | None, where: Path) -> _Loop:
    if saved is None:
        return _Loop()
    _restore_method_state(setup.method, setup.ft, saved["state"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    loop = _Loop(history=saved["history"], best=saved["best"], bad_epochs=saved["bad_epochs"],
                 elapsed=saved["seconds"], start_epoch=saved["epoch"] + 1,
                 stopped_early=saved.get("stopped_early", False))
    log.info("resuming %s after epoch %d (best epoch %d)", where, saved["epoch"], loop.best["epoch"])
    return loop


def _train_epoch(cfg: TrainConfig, setup: _Setup, epoch: int) -> list[float]:
    seed = _epoch_seed(cfg.seed, epoch)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if setup.ft is not None:
        setup.ft.seed_epoch(seed)
    method = setup.method
    method.train_mode(True)
    losses = []
    for batch in method.epoch_batches(setup.data.train, rng):
        value = method.step(batch, setup.optimizer)
        if not math.isfinite(value):
            raise FewshotError(f"training diverged at epoch {epoch} (loss {value})", hint="lower --lr")
        losses.append(value)
    return losses


def _run_config(cfg: TrainConfig, setup: _Setup, row: dict, elapsed: float) -> dict:
    data = setup.data
    return {"method": setup.method.name or cfg.method, "train_config": cfg.to_dict(), "protocol": setup.protocol,
            "seed": cfg.seed, "fine_tune": cfg.fine_tune, "package_version": __version__,
            "in_dim": data.backbone.dim, "train_images": len(data.train),
            "val_queries": len(data.val_q.vectors), "val_gallery": len(data.val_g.vectors),
            "best_epoch": row["epoch"],
            "best_val": {k[4:]: row[k] for k in HISTORY_FIELDS if k.startswith("val_")},
            "training_seconds_to_best": round(elapsed, 3)}


def _run_epochs(cfg: TrainConfig, setup: _Setup, work: Path, saved: dict | None,
                on_epoch_end: Callable[[int, dict], None] | None) -> _Loop:
    """Epoch 0 (validation only) and the training epochs, writing into ``work``."""
    method, data = setup.method, setup.data
    loop = _restore(setup, saved, work)
    bar = tqdm(total=setup.n_epochs + 1, initial=loop.start_epoch, desc=f"train {cfg.method}", unit="epoch",
               disable=not cfg.progress, leave=True)
    try:
        epoch = loop.start_epoch
        while epoch <= setup.n_epochs and not loop.stopped_early:
            t0 = time.perf_counter()
            losses = _train_epoch(cfg, setup, epoch) if epoch > 0 else []
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
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            epoch += 1
    except KeyboardInterrupt:
        done = loop.history[-1]["epoch"] if loop.history else None
        log.warning("training interrupted%s; continue it with the same command plus --resume",
                    f" after epoch {done}" if done is not None else "")
        raise
    finally:
        bar.close()
    return loop


def _write_epoch_files(cfg: TrainConfig, setup: _Setup, work: Path, loop: _Loop, epoch: int) -> None:
    _write_history(work, loop.history)
    _write_curves(work, loop.history)
    _save_checkpoint(work, {
        "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch,
        "state": _method_state(setup.method, setup.ft), "optimizer": setup.optimizer.state_dict(),
        "history": loop.history, "best": loop.best, "bad_epochs": loop.bad_epochs,
        "seconds": loop.elapsed, "stopped_early": loop.stopped_early, "fewshot_version": __version__})


def _finish_config(work: Path, loop: _Loop, setup: _Setup) -> dict:
    """Record the whole run in ``config.json`` (the weights on disk are the best epoch's) and
    mark it complete."""
    cfg_path = work / CONFIG
    full = json.loads(cfg_path.read_text(encoding="utf-8"))
    full.update({"epochs_run": loop.history[-1]["epoch"], "stopped_early": loop.stopped_early,
                 "training_seconds": round(loop.elapsed, 3), "setup_seconds": round(setup.setup_seconds, 3),
                 "complete": True})
    atomic_write_json(cfg_path, full)
    return full


def _final_evaluation(cfg: TrainConfig, run_dir: Path) -> dict:
    from .pipeline import EmbedOptions, EvalConfig, evaluate

    opts = EmbedOptions(backbone=None, model_dir=str(run_dir), image_size=cfg.image_size,
                        batch_size=cfg.embed_batch_size, num_workers=cfg.workers, cache_dir=cfg.cache_dir,
                        progress=cfg.progress)
    ecfg = EvalConfig(data=cfg.data, split=None, split_file=cfg.split_file, part=cfg.final_eval,
                      group_from=cfg.group_from, seed=cfg.seed, episodes=cfg.eval_episodes, embed=opts)
    return evaluate(ecfg, run_dir / f"eval_{cfg.final_eval}", overwrite=True)
