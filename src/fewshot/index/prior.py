"""A trained run's whitening prior: how photos of one article vary, measured on the run's own
training photos, pooled into every catalogue whitening made with that run
(:func:`fewshot.index.whiten.fit_whitening`'s ``prior``).

A catalogue of a few dozen articles shows the within-article spread of only those articles, and
its mean sits among them. The run's training photos (other articles, the same model) show more
of both: pooled with the catalogue's, the whitening's mean and within-article covariance are
those of both sets. Measured on Grocery's open-set protocol (the 28 unseen test articles halved
20 times, each half's train photos a whitened catalogue; the three default ``fewshot train``
runs, seeds 0 / 1 / 2): relative AUROC 0.898 / 0.898 / 0.902 -> 0.907 / 0.908 / 0.911,
FPR@95TPR 0.389 / 0.402 / 0.396 -> 0.352 / 0.349 / 0.344 (docs/measurements.md).

The file, written by ``fewshot train`` after the run's weights (:func:`save_prior`)::

    RUN_DIR/whitening-prior.safetensors   float64 scatter [D, D], total [D]
                                          (:class:`~fewshot.index.whiten.WithinStats`); its
                                          metadata: the counts, the weights' SHA-256, the image
                                          size and test-time augmentation it was embedded with

A run without the file (trained before 0.10.0, or a frozen backbone) has no prior: its
catalogues are whitened on their own photos, as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import atomic_path
from ..methods.runs import WHITENING_PRIOR as PRIOR_FILE
from ..model import EmbeddingModel
from ..version import __version__
from .whiten import WithinStats

__all__ = ["PRIOR_FILE", "save_prior", "load_prior", "read_prior"]

log = logging.getLogger("fewshot")


def save_prior(run_dir: str | Path, stats: WithinStats, model: EmbeddingModel, tta: str = "none") -> Path:
    """Write ``stats`` (the run's training photos embedded by ``model``, the run's own) as
    ``run_dir/whitening-prior.safetensors``, atomically; returns its path."""
    from safetensors.numpy import save_file

    meta = {"format": "fewshot.whitening_prior", "version": __version__, "weights_sha256": model.weights_digest(),
            "image_size": str(model.backbone.image_size), "tta": tta, "stats": json.dumps(stats.describe())}
    path = Path(run_dir) / PRIOR_FILE
    with atomic_path(path) as tmp:
        save_file(stats.to_arrays(), str(tmp), metadata=meta)
    return path


def read_prior(path: str | Path) -> tuple[WithinStats, dict]:
    """The statistics and the metadata of a prior file.

    Raises:
        OSError, ValueError, KeyError, TypeError (and safetensors' own errors): an unreadable or
            damaged file (:meth:`WithinStats.from_arrays`).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("format") != "fewshot.whitening_prior":
        raise ValueError(f"not a fewshot whitening prior (format {meta.get('format')!r})")
    return WithinStats.from_arrays(load_file(str(path)), json.loads(meta["stats"])), meta


def load_prior(model: EmbeddingModel) -> WithinStats | None:
    """The whitening prior of ``model``'s run, or ``None``: a frozen backbone, a run without the
    file (warned when its ``config.json`` says it wrote one), or a file that does not belong to
    these weights or cannot be read (warned): the catalogue is then whitened on its own photos,
    and the index records ``prior: null``."""
    if model.run_dir is None:
        return None
    path = Path(model.run_dir) / PRIOR_FILE
    if not path.is_file():
        if (model.run_config or {}).get("whitening_prior"):  # the run wrote one: it was removed since
            log.warning("warning: the run's whitening prior %s is missing: whitening on the catalogue's photos alone "
                        "(fewshot.training.add_whitening_prior(RUN_DIR) writes it again)", PRIOR_FILE)
        return None
    try:
        stats, meta = read_prior(path)
    except Exception as exc:  # safetensors raises its own errors
        log.warning("warning: the run's whitening prior %s cannot be read (%s): whitening on the catalogue's "
                    "photos alone (retrain the run to write it again)", PRIOR_FILE, exc)
        return None
    if meta.get("weights_sha256") != model.weights_digest() or stats.dim != model.dim:
        log.warning("warning: the run's whitening prior %s was measured with other weights: not used, whitening on "
                    "the catalogue's photos alone (retrain the run to write it again)", PRIOR_FILE)
        return None
    return stats
