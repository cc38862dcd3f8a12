"""Calibration of a reject threshold from the catalogue alone (issue 29, first part).

A photo whose article is absent from the catalogue still gets a best prototype cosine; the
question is which score is too low to trust. The catalogue itself answers it without any other
photos:

* **absent scores**: the articles are split into ``folds`` (whole groups, i.e. brands, with
  ``by="group"``); each fold's photos are scored against the prototypes of the other folds'
  articles only, as photos of articles the catalogue does not hold;
* **present scores**: each photo is scored against every prototype with its own article's
  prototype recomputed without it (leave-one-photo-out; single-photo articles give none).

:func:`calibrate` returns the lowest threshold that accepts at most ``target_far`` of the absent
scores (:func:`fewshot.metrics.threshold_for_far`), with the share of present scores it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..index import CatalogueIndex
from ..index.vectors import l2_normalize
from ..metrics.openset import threshold_for_far

__all__ = ["Calibration", "calibrate", "calibration_scores", "MIN_ARTICLES", "MIN_FOLDS"]

#: the fewest articles (or groups, with ``by="group"``) a catalogue needs to be calibrated
MIN_ARTICLES = 6
#: the fewest folds: each fold is held out once
MIN_FOLDS = 2


@dataclass(frozen=True)
class Calibration:
    """A reject threshold for the best prototype cosine, and what it was calibrated on.

    ``threshold``: accept a photo when its best score is at least this; ``target_far``: the
    share of absent-article scores it accepts at most; ``present_accepted``: the share of the
    catalogue's own photos (left out in turn) it accepts; ``num_present`` / ``num_absent``: the
    scores it was calibrated on; ``by``, ``folds``, ``seed``: how the absent scores were made."""

    threshold: float
    target_far: float
    present_accepted: float
    num_present: int
    num_absent: int
    by: str
    folds: int
    seed: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _fold_of_articles(index: CatalogueIndex, by: str, folds: int, seed: int) -> np.ndarray:
    """The fold of each article (``index.articles`` order): articles, or their groups, dealt at random."""
    units = list(index.articles) if by == "article" else list(index.article_groups)
    names = sorted(set(units))
    if len(names) < max(MIN_ARTICLES, folds):
        raise DataError(f"the catalogue has {len(names)} {by}s: too few to calibrate a reject threshold "
                        f"(at least {max(MIN_ARTICLES, folds)} are needed)",
                        hint="add articles, or classify without a reject threshold")
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of_name = {names[i]: k % folds for k, i in enumerate(order)}
    return np.array([fold_of_name[u] for u in units])


def calibration_scores(index: CatalogueIndex, *, by: str = "article", folds: int = 5,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(present float32 [P], absent float32 [A])``: the best prototype cosine of each catalogue
    photo with its own photo left out, and of each photo against the other folds' articles only.

    Raises:
        DataError: fewer than :data:`MIN_ARTICLES` articles (groups); ``by`` not article / group.
    """
    if by not in ("article", "group"):
        raise DataError(f"unknown calibration unit {by!r}", hint="use by='article' or by='group'")
    if folds < MIN_FOLDS:
        raise DataError(f"folds = {folds}: at least {MIN_FOLDS} are needed", hint="use folds=5")
    x = index.image_vectors()  # normalised, float32 [N, D]
    article = np.asarray(index.image_article)
    sums = index.prototype_sums(0, len(index.articles))  # the index's own, float32 [C, D]
    counts = np.bincount(article, minlength=len(index.articles))
    protos = l2_normalize(sums)
    fold = _fold_of_articles(index, by, folds, seed)
    scores = x @ protos.T  # [N, articles]
    scores[:, counts == 0] = -np.inf  # removed articles keep a row but no photo
    absent = np.concatenate([scores[fold[article] == k][:, fold != k].max(1) for k in range(folds)
                             if (fold != k).any() and (fold[article] == k).any()])
    own = counts[article] > 1
    loo = l2_normalize(sums[article[own]] - x[own])  # own article's prototype without the photo
    others = scores[own].copy()
    others[np.arange(own.sum()), article[own]] = -np.inf
    present = np.maximum(others.max(1), (loo * x[own]).sum(1))
    return present, absent


def calibrate(index: CatalogueIndex, target_far: float = 0.05, *, by: str = "article", folds: int = 5,
              seed: int = 0) -> Calibration:
    """The reject threshold of ``index`` for a target false-accept rate (:func:`calibration_scores`).

    Raises:
        DataError: the catalogue is too small to calibrate, or has no article with two photos.
        InputError: ``target_far`` outside ``[0, 1)``.
    """
    present, absent = calibration_scores(index, by=by, folds=folds, seed=seed)
    if not len(present):
        raise DataError("no article of the catalogue has two photos: nothing to calibrate the present scores on",
                        hint="add a second photo to some articles, or classify without a reject threshold")
    threshold = threshold_for_far(absent, target_far)
    return Calibration(threshold=threshold, target_far=target_far, present_accepted=float((present >= threshold).mean()),
                       num_present=len(present), num_absent=len(absent), by=by, folds=folds, seed=seed)
