"""The RUN_DIR format shared by every training method.

::

    RUN_DIR/config.json          method, backbone (name, image size), head spec, fine-tune mode,
                                 protocol (split file, classes), seed, hyper-parameters,
                                 best epoch and its validation metrics, package version
    RUN_DIR/model.safetensors    ``head.*`` weights (and ``backbone.*`` when fine-tuned, and
                                 ``method.*`` tensors of the method, e.g. MAML's output layer)

Both are written atomically; ``config.json`` records ``weights_sha256``, a digest of the tensors,
so that a damaged weights file is refused even when it still parses. :func:`load_run` rebuilds
the :class:`EmbeddingModel` (and lets the run's method attach its episode classifier, see
:meth:`fewshot.methods.base.Method.attach`) and refuses a run whose backbone differs from the
one asked for, or whose files are damaged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..version import __version__
from ..backbones import check_tta, create_backbone
from ..errors import CheckpointError, FewshotError
from ..io import atomic_path, atomic_write_json
from ..model import EmbeddingModel, weights_digest
from .heads import build_head

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
#: the run's whitening prior (:mod:`fewshot.index.prior`), written after its weights
WHITENING_PRIOR = "whitening-prior.safetensors"


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a training run written by fewshot, complete or not (its
    ``config.json`` records a weights digest and a fewshot version; the trainer writes it at
    epoch 0, before any checkpoint)."""
    try:
        cfg = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
        return isinstance(cfg, dict) and "weights_sha256" in cfg and "fewshot_version" in cfg
    except (OSError, ValueError):
        return False


def run_file(name: str) -> bool:
    """Whether ``name`` is one of the files a training run writes at its top level."""
    return name in {CONFIG, WEIGHTS, CHECKPOINT, WHITENING_PRIOR, "history.csv", "curves.png"} or name.startswith("eval_")


def run_completed(cfg: dict) -> bool:
    """Whether a run's ``config.json`` says that training finished (``"complete": true``; a
    run of fewshot 0.1.0 recorded ``epochs_run`` only when it finished)."""
    return bool(cfg.get("complete", "epochs_run" in cfg and "complete" not in cfg))


def save_run(run_dir: str | Path, model: EmbeddingModel, config: dict,
             extra_tensors: dict[str, torch.Tensor] | None = None, *, complete: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``run_dir``.

    ``config`` must hold at least ``method``; backbone, head spec, version and the weights'
    digest are added here. ``extra_tensors`` (method state) are stored as ``method.<key>``.
    ``complete`` records that training finished; :func:`load_run` refuses a run without it
    (the trainer saves each best epoch with ``complete=False`` and marks the run at the end).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if model.head is not None:
        tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()})
    fine_tuned = config.get("fine_tune", "none") != "none"
    if fine_tuned:
        tensors.update({f"backbone.{k}": v.detach().cpu().contiguous()
                        for k, v in model.backbone.model.state_dict().items()})
    for k, v in (extra_tensors or {}).items():
        tensors[f"method.{k}"] = v.detach().cpu().contiguous()
    full = dict(config)
    full.update({
        "fewshot_version": __version__,
        "backbone": {"name": model.backbone.name, "image_size": model.backbone.image_size,
                     "pretrained": model.backbone.pretrained, "dim": model.backbone.dim},
        "head": getattr(model.head, "spec", None),
        "fine_tune": config.get("fine_tune", "none"),
        "weights_sha256": weights_digest(tensors),
        "complete": bool(complete),
    })
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"fewshot_version": __version__})
    atomic_write_json(run_dir / CONFIG, full)
    return run_dir


def load_run(run_dir: str | Path, expected_backbone: str | None = None) -> EmbeddingModel:
    """Rebuild the embedding model saved in ``run_dir``.

    Args:
        expected_backbone: if given (e.g. from ``--backbone``) and different from the run's
            backbone, the run is refused.

    Raises:
        CheckpointError: missing folder or files, unreadable JSON or weights, a run whose
            training did not complete (:func:`run_completed`), a backbone mismatch, or
            weights that do not fit the recorded architecture.
    """
    run_dir = Path(run_dir)
    cfg_path, w_path = run_dir / CONFIG, run_dir / WEIGHTS
    if not run_dir.is_dir():
        raise CheckpointError(f"model folder {run_dir} " + ("is a file, not a folder" if run_dir.exists() else "does not exist"),
                              hint="pass the folder a training run wrote (fewshot.train, `fewshot train --out RUN_DIR`)")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p} is missing: {run_dir} is not a complete training run",
                                  hint="pass a RUN_DIR written by `fewshot train`, or re-run training")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        backbone_cfg = cfg["backbone"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{cfg_path} is damaged ({exc})", hint="re-run training") from exc
    if not run_completed(cfg):
        raise CheckpointError(f"{run_dir} is not a completed training run: its training was interrupted or "
                              "failed, so its weights are not a trained model",
                              hint="finish it by training again with the same settings plus resume=True, "
                                   "or train again into a new out folder", options=("resume", "out"))
    name = backbone_cfg["name"]
    if expected_backbone and expected_backbone != name:
        raise CheckpointError(
            f"run {run_dir} was trained on backbone '{name}', not '{expected_backbone}'",
            hint=f"leave backbone out, or pass backbone={name!r}", options=("backbone",))
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:
        raise CheckpointError(f"{w_path} is damaged or not a safetensors file ({exc})",
                              hint="re-run training (or resume=True) to write it again", options=("resume",)) from exc
    expected_digest = cfg.get("weights_sha256")
    if expected_digest and weights_digest(tensors) != expected_digest:
        raise CheckpointError(f"{w_path} is damaged: its tensors do not match the digest recorded in {cfg_path}",
                              hint="re-run training (or resume=True) to write it again", options=("resume",))
    backbone = create_backbone(name, pretrained=backbone_cfg.get("pretrained", True),
                               image_size=int(backbone_cfg["image_size"]))
    if backbone.dim != backbone_cfg.get("dim", backbone.dim):
        raise CheckpointError(f"run {run_dir} expects a {backbone_cfg['dim']}-d backbone, got {backbone.dim}")
    try:
        bb_state = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
        if bb_state:
            backbone.model.load_state_dict(bb_state)
            backbone.weights_tag = "ft" + weights_digest(bb_state)
        head = None
        if cfg.get("head"):
            head = build_head(cfg["head"])
            head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
            head.eval()
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"weights in {w_path} do not match the architecture in {cfg_path}: {exc}",
                              hint="the run folder was mixed up or damaged; re-run training") from exc
    model = EmbeddingModel(backbone=backbone, head=head, run_dir=run_dir, run_config=cfg)
    from .registry import get_method

    method_cls = None
    if cfg.get("method") not in (None, "", "frozen"):
        try:  # imports the method's module
            method_cls = get_method(cfg["method"])
        except FewshotError:
            method_cls = None
    method_tensors = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    if method_cls is not None:
        try:
            method_cls.attach(model, cfg, method_tensors)
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"method state in {w_path} does not fit method '{cfg['method']}': {exc}",
                                  hint="the run folder was mixed up or damaged; re-run training") from exc
    return model


def load_embedding_model(backbone: str | None = "efficientnet_lite0", model_dir: str | Path | None = None,
                         image_size: int = 224, pretrained: bool = True, tta: str = "none") -> EmbeddingModel:
    """Frozen ``backbone`` at ``image_size``, or the run saved in ``model_dir``, embedding with
    test-time augmentation ``tta`` (:data:`~fewshot.backbones.TTA_MODES`).

    With ``model_dir`` the run's own backbone and image size are used; a ``backbone`` that
    differs from the run's raises :class:`~fewshot.errors.CheckpointError`; an unknown ``tta``
    raises :class:`~fewshot.errors.BackboneError` (before anything is loaded).
    """
    check_tta(tta)
    if model_dir is not None:
        model = load_run(model_dir, expected_backbone=backbone)
    else:
        model = EmbeddingModel(backbone=create_backbone(backbone or "efficientnet_lite0",
                                                        pretrained=pretrained, image_size=image_size))
    model.backbone.tta = tta
    return model
