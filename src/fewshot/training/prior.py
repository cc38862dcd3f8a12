"""The last step of ``fewshot train``: the run's whitening prior (:mod:`fewshot.index.prior`),
its training and validation photos embedded once more with the final weights (no test-time
augmentation, the run's own image size): the within-article statistics of the training photos,
and the mean of every article's photos (the rivals of :func:`fewshot.catalogue.scores.with_rivals`),
written beside the weights.

Cost: one embedding pass over those photos (Grocery's 2,415 training and 844 validation photos at
288 px: about 20-25 s on 2 CPU cores), against 3-4 minutes of training.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data import dataset_for
from ..errors import DataError, FewshotError
from ..index.prior import save_prior
from ..index.vectors import l2_normalize
from ..index.whiten import MIN_SPREAD_PHOTOS, within_stats
from ..methods.from_options import model_from_options
from .config import TrainConfig
from .data import run_embed_options, run_split

__all__ = ["write_whitening_prior", "add_whitening_prior"]

log = logging.getLogger("fewshot")


def write_whitening_prior(cfg: TrainConfig, run_dir: str | Path, *, strict: bool = False) -> dict | None:
    """Embed ``cfg``'s training and validation photos with the run in ``run_dir`` and write its
    prior (module docstring); returns what ``config.json`` records of it (``{"file", "photos",
    "articles"}`` of the training photos, ``"rivals"``: all the articles), or ``None`` with a
    warning when the photos show no within-article spread or cannot be embedded (the run stays
    complete: its catalogues are then whitened on their own photos). ``strict``: raise instead.

    Raises:
        FewshotError / OSError (``strict`` only): the data or the split file cannot be read.
        DataError (``strict`` only): no within-article spread in the training photos.
    """
    opts = run_embed_options(cfg, run_dir, "none")
    try:
        model = model_from_options(opts)
        dataset, split = run_split(cfg)
        own = replace(split, train=sorted({*split.train, *split.val}))  # the rivals: every article but the test ones
        emb = opts.embed(model, dataset_for(dataset, own, "train"))
        train = np.isin(np.array(emb.labels, dtype=object), list(split.train))
        digests = emb.digests or [None] * len(emb.labels)
        stats = within_stats(emb.vectors[train], [x for x, t in zip(emb.labels, train) if t],
                             [d for d, t in zip(digests, train) if t] if emb.digests else None)
        names, means = article_means(emb.vectors, emb.labels)
        stats = replace(stats, rivals=means, rival_names=names)
    except (FewshotError, OSError) as exc:
        if strict:
            raise
        log.warning("no whitening prior written (%s): catalogues whitened with this run use their own "
                    "photos alone", exc)
        return None
    if stats.spread < MIN_SPREAD_PHOTOS:
        if strict:
            raise DataError("the run's training photos show no within-article spread: no whitening prior to write")
        log.warning("no whitening prior written: the training photos show no within-article spread")
        return None
    path = save_prior(run_dir, stats, model, emb.labels, digests)
    return {"file": path.name, "photos": stats.photos, "articles": stats.articles, "rivals": len(stats.rivals)}


def article_means(vectors: np.ndarray, labels: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """The articles of ``labels`` (sorted by name) and the mean unit embedding of each,
    ``float64 [B, D]``: a prior's ``rival_names`` and ``rivals``."""
    x = l2_normalize(np.asarray(vectors, np.float32)).astype(np.float64)
    names, inverse = np.unique(np.array([str(v) for v in labels], dtype=object), return_inverse=True)
    sums = np.zeros((len(names), x.shape[1]))
    np.add.at(sums, inverse, x)
    return tuple(str(n) for n in names), sums / np.bincount(inverse)[:, None]


def add_whitening_prior(run_dir: str | Path) -> dict | None:
    """Write the whitening prior of a complete run trained before 0.10.0 (or whose last step was
    interrupted): its training photos as its ``config.json`` records them, under the run folder's
    writer lock; ``config.json`` then records it too. The data and the split file are found as
    the training found them: a relative path from the folder ``fewshot train`` ran in (run it
    from there), a fetched dataset by its name.

    Returns:
        what :func:`write_whitening_prior` returns (never ``None``: it raises instead).

    Raises:
        CheckpointError: ``run_dir`` is not a complete fewshot run. DataError: its data or split
            file cannot be read, or its photos show no spread. FewshotError: another fewshot
            command writes the folder.
    """
    import json

    from ..errors import CheckpointError
    from ..io import atomic_write_json, writer_lock
    from ..methods.runs import CONFIG, WHITENING_PRIOR, is_run_dir

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a fewshot training run", hint="pass the folder `fewshot train --out` wrote")
    with writer_lock(run_dir, "fewshot add_whitening_prior"):
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
        if not config.get("complete"):
            raise CheckpointError(f"{run_dir} is an unfinished run", hint="finish it with `fewshot train ... --resume`")
        target = run_dir / WHITENING_PRIOR
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise CheckpointError(f"{target} is not a file fewshot wrote (a folder, a link or a device)",
                                  hint="move it out of the run folder, then run this again")
        cfg = TrainConfig.from_dict(config["train_config"])
        config["whitening_prior"] = write_whitening_prior(cfg, run_dir, strict=True)
        atomic_write_json(run_dir / CONFIG, config)
    return config["whitening_prior"]
