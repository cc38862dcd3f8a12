"""The run folder: what a run writes while it trains, and how an interrupted one is continued.

A run is trained in ``RUN_DIR.partial`` (:func:`staging_dir`) and moved onto ``RUN_DIR`` when
training completes; every epoch writes ``history.csv``, ``curves.png`` and ``checkpoint.pt``
there (atomically), and ``--resume`` continues from the checkpoint.
"""

from __future__ import annotations

import csv
import io
import logging
import pickle
import re
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import atomic_path, atomic_write_text, check_output
from ..methods import Method
from ..methods.runs import CHECKPOINT, WHITENING_PRIOR, is_run_dir, run_file
from .config import TrainConfig
from .finetune import FineTune

log = logging.getLogger("fewshot")

HISTORY = "history.csv"
CURVES = "curves.png"
#: a run is trained in ``RUN_DIR.partial`` beside ``RUN_DIR`` and moved onto it when training completes
PARTIAL_SUFFIX = ".partial"
HISTORY_FIELDS = ("epoch", "train_loss", "val_map", "val_map_at_r", "val_precision_at_1",
                  "val_episodic_acc", "seconds", "images_per_second")
CHECKPOINT_FORMAT = 1

#: the options a run folder's errors name: continue the run, or replace it
RESUME_OPTIONS = ("resume", "overwrite")
#: config fields that may change between an interrupted run and its ``resume``
RESUMABLE_CHANGES = {"epochs", "patience", "options.episodes", "resume", "overwrite", "progress", "device",
                      "cache_dir", "workers", "micro_batch", "fold_bn", "embed_batch_size", "final_eval", "eval_episodes", "final_tta", "out",
                      "data"}


# --------------------------------------------------------------------------- files
def write_history(run_dir: Path, history: list[dict]) -> None:
    """Write ``RUN_DIR/history.csv`` (:data:`HISTORY_FIELDS`, one row per epoch), atomically."""
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


#: the title of ``curves.png``'s metrics when the val classes were trained on (``train_on_val``)
TRAINED_VAL_TITLE = "val classes, trained on (not held out)"


def write_curves(run_dir: Path, history: list[dict], val_trained: bool = False) -> None:
    """Draw ``RUN_DIR/curves.png`` from the history (nothing without matplotlib; a failure is
    logged); ``val_trained``: the val metrics are titled :data:`TRAINED_VAL_TITLE`."""
    try:
        from ..viz import training_curves
    except ImportError:  # matplotlib missing: the CSV is enough
        return
    nan = float("nan")
    rows = [{k: (nan if v is None else v) for k, v in row.items()} for row in history]
    try:
        training_curves(rows, run_dir / CURVES, loss_keys=("train_loss",),
                        metric_keys=("val_map", "val_map_at_r", "val_precision_at_1", "val_episodic_acc"),
                        metric_title=TRAINED_VAL_TITLE if val_trained else "validation")
    except Exception as exc:  # a plotting failure must not end a long run
        log.warning("could not draw %s: %s", run_dir / CURVES, exc)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``state`` (tensors and plain values) to ``RUN_DIR/checkpoint.pt``, atomically."""
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)


#: what every checkpoint of CHECKPOINT_FORMAT holds, and the type of each
_CHECKPOINT_KEYS = {"config": dict, "epoch": int, "state": dict, "optimizer": dict, "history": list, "best": dict,
                    "bad_epochs": int, "seconds": float}


def load_checkpoint(path: Path) -> dict:
    """Read ``checkpoint.pt`` with torch's ``weights_only`` unpickler: tensors, dicts, lists,
    numbers, strings and ``None`` only, so a planted file's code never runs.

    Returns:
        the checkpoint dict (``format`` :data:`CHECKPOINT_FORMAT`, the keys of ``_CHECKPOINT_KEYS``).

    Raises:
        CheckpointError: the file holds anything else (a pickled object or function: not a
            checkpoint fewshot wrote, and not loaded), is damaged, or is not a training checkpoint.
    """
    hint = f"train again without resume=True (add overwrite=True to discard what {path.parent} holds)"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(f"{path} cannot be resumed safely: it holds more than tensors and plain values"
                              + (f" (it refers to {found.group(1)})" if found else "")
                              + "; fewshot did not write it like this (or it is damaged), so it was not loaded",
                              hint=hint, options=RESUME_OPTIONS) from None
    except Exception as exc:
        raise CheckpointError(f"{path} is damaged or not a training checkpoint ({exc})", hint=hint,
                              options=RESUME_OPTIONS) from None
    problem = _checkpoint_problem(state)
    if problem:
        raise CheckpointError(f"{path} is not a fewshot training checkpoint ({problem})", hint=hint,
                              options=RESUME_OPTIONS)
    return state


def _checkpoint_problem(state: object) -> str | None:
    """What makes ``state`` no checkpoint of :data:`CHECKPOINT_FORMAT`, or ``None``."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return f"no format {CHECKPOINT_FORMAT} checkpoint dict"
    for key, kind in _CHECKPOINT_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is missing or not a {kind.__name__}"
    if not isinstance(state["state"].get("head"), dict):
        return "no head weights"
    return None


def _flat(config: dict) -> dict:
    """A train_config with its options as ``options.NAME`` keys."""
    out = {k: v for k, v in config.items() if k != "options"}
    out.update({f"options.{k}": v for k, v in (config.get("options") or {}).items()})
    return out


def check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` (its ``saved`` config) with settings ``cfg``
    that differ beyond :data:`RESUMABLE_CHANGES`.

    Raises:
        CheckpointError: naming the settings that differ.
    """
    saved = _flat(TrainConfig.from_dict(saved).to_dict())  # a checkpoint of 0.1.0 kept options flat
    now = _flat(cfg.to_dict())
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:6])
        raise CheckpointError(f"cannot resume {path}: settings differ from the interrupted run ({pairs})",
                              hint="resume with the same settings, or train into a new out folder", options=("out",))


def method_state(method: Method, ft: FineTune | None) -> dict:
    """The trained weights of a checkpoint: ``head``, ``extra`` (the method's tensors) and, when
    fine-tuning, ``backbone`` (CPU copies)."""
    st = {"head": {k: v.detach().cpu().clone() for k, v in method.head.state_dict().items()},
          "extra": {k: v.detach().cpu().clone() for k, v in method.extra_tensors().items()}}
    if ft is not None:
        st["backbone"] = {k: v.detach().cpu().clone() for k, v in ft.backbone.model.state_dict().items()}
    return st


def restore_method_state(method: Method, ft: FineTune | None, st: dict) -> None:
    """Load :func:`method_state` output into ``method`` (and the fine-tuned backbone)."""
    method.head.load_state_dict(st["head"])
    method.load_extra_tensors(st.get("extra", {}))
    if ft is not None and "backbone" in st:
        ft.backbone.model.load_state_dict(st["backbone"])


def staging_dir(run_dir: str | Path) -> Path:
    """Where a run into ``run_dir`` is trained: ``RUN_DIR.partial`` beside it. It replaces
    ``run_dir`` only when training completes, so a failed or interrupted run never touches a
    previous good run (and ``--model`` refuses the partial one: it is not marked complete)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)


def resume_source(cfg: TrainConfig, run_dir: Path, stage: Path) -> Path | None:
    """The folder whose checkpoint this call continues (``stage`` or ``run_dir``), or ``None``
    for a new run; refuses outputs that this call may not replace."""
    from ..data.protocol import data_protection

    protect = data_protection(cfg.data)
    for folder in (run_dir, stage):  # anything there that is not a fewshot run is refused outright
        check_output(folder, what="fewshot training run", is_ours=is_run_dir, overwrite=True, owned=run_file,
                     **protect)
    if cfg.resume:
        for folder in (stage, run_dir):
            if (folder / CHECKPOINT).is_file():
                return folder
        log.info("no checkpoint in %s or %s: starting a new run", run_dir, stage)
    if is_run_dir(stage) and not cfg.overwrite:
        raise CheckpointError(f"{stage} holds an interrupted training run for {run_dir}",
                              hint="pass resume=True to continue it, or overwrite=True to discard it and start again",
                              options=RESUME_OPTIONS)
    if is_run_dir(run_dir) and not cfg.overwrite:
        raise CheckpointError(f"{run_dir} already holds a training run",
                              hint="pass resume=True to continue it, overwrite=True to replace it, or another out",
                              options=(*RESUME_OPTIONS, "out"))
    return None


#: the folders of a run's final evaluations (``RUN_DIR/eval_<part>/``, written by :func:`~fewshot.training.train`)
FINAL_EVAL_DIRS = ("eval_test", "eval_val", "eval_train")


def _earlier_evaluations(folder: str, names: list[str]) -> list[str]:
    """``copytree``'s ignore for a finished run that trains on: its final evaluations and its
    whitening prior, which describe the earlier weights (the new run writes its own prior, and
    its own evaluation unless ``final_eval`` is none)."""
    old = sorted(n for n in names if (n in FINAL_EVAL_DIRS and (Path(folder) / n / "metrics.json").is_file())
                 or n == WHITENING_PRIOR)
    if old:
        log.info("not carried over from %s: %s (made with its earlier weights)", folder, ", ".join(old))
    return old


def prepare_stage(stage: Path, source: Path | None, run_dir: Path) -> None:
    """Make ``stage`` the folder to train in (called once every argument has been checked)."""
    import shutil

    if source == stage:
        return
    if stage.exists():  # an interrupted run that overwrite discards (checked by resume_source)
        shutil.rmtree(stage)
    if source == run_dir:  # continue a finished run (larger --epochs) without touching it
        shutil.copytree(run_dir, stage, ignore=lambda folder, names: _earlier_evaluations(folder, names)
                        if Path(folder) == Path(run_dir) else [])
    else:
        stage.mkdir(parents=True)
    log.info("training in %s (it replaces %s when training completes)", stage, run_dir)
