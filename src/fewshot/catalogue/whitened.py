"""A whitened catalogue (:mod:`fewshot.index.whiten`) and the calibration of its reject threshold.

A whitening fitted on the catalogue's photos has seen how each of its articles' photos vary, and
a photo of an absent article is new to it: whitened, it lands further from every prototype than
a left-out catalogue photo does. Calibrating as for a plain catalogue (the fit of every article,
each photo's own article left out of the prototypes) therefore sets the threshold too high:
on Grocery's open-set protocol (the default fine-tuned run, seed 0, 20 draws) 3.1% false accepts
for a 5% target and 30.0% of catalogue-article photos accepted with the right article.

So each photo's absent score comes from a whitening fitted without its article: the articles are
dealt into :data:`WHITEN_FOLDS` folds (seeded), and the photos of each fold are scored against
every other article's prototype in a whitening fitted on the other folds. On the same protocol
(``fewshot evaluate --open-set --whiten``, which builds each draw's catalogue as ``fewshot index
--whiten`` does), seeds 0 / 1 / 2: with 10 folds 5.0% / 4.6% / 4.6% false accepts and 44.2% /
42.6% / 46.2% accepted and right; with 5 folds (fewshot 0.6.0) the fits lacked a fifth of the
other articles and the threshold came out stricter: 4.6% / 3.9% / 4.2% and 40.7% / 40.3% /
43.8%. Offline, seed 0, one fit per left-out article (14 folds): 4.9% and 43.9%. A catalogue of
fewer than 10 articles has one fold per article.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError
from ..index import CatalogueIndex
from ..index.whiten import Whitening, WithinStats, check_spread, distinct_photos, fit_from_stats, within_stats
from .calibrate import CalibrationScores, calibration_scores

__all__ = ["WHITEN_FOLDS", "article_folds", "check_whitenable", "whitened_calibration_scores"]

#: folds of articles for the calibration of a whitened catalogue (module docstring: 10 came closer to
#: the target than 5; each fold costs a D x D eigendecomposition and a whitening of every photo)
WHITEN_FOLDS = 10


def article_folds(articles: np.ndarray, folds: int, seed: int) -> dict[str, int]:
    """The calibration fold of each of ``articles`` (sorted, unique): dealt in turn after a
    permutation seeded by ``seed``, into ``min(folds, len(articles))`` folds."""
    order = articles[np.random.default_rng(seed).permutation(len(articles))]
    return {str(a): int(i % min(folds, len(articles))) for i, a in enumerate(order)}


def check_whitenable(labels: Sequence[str], *, folds: int = WHITEN_FOLDS, seed: int = 0) -> None:
    """Refuse, from the labels alone (before anything is embedded), a catalogue that
    :func:`whitened_catalogue` or :func:`whitened_calibration_scores` could not fit: the whole
    catalogue and each fold's complement need photos that vary within an article.

    Raises:
        DataError: naming the ``whiten`` option (:func:`fewshot.index.whiten.check_spread`).
    """
    names, counts = np.unique(np.array([str(x) for x in labels], dtype=object), return_counts=True)
    check_spread(counts)
    fold_of = article_folds(names, folds, seed)
    fold = np.array([fold_of[a] for a in names])
    for k in np.unique(fold):
        with _in_fold(k, names[fold == k]):
            check_spread(counts[fold != k])


@contextlib.contextmanager
def _in_fold(k: int, left_out: Sequence[str]) -> Iterator[None]:
    """Say which calibration fold a refusal of the fit (a :class:`DataError`) is about."""
    try:
        yield
    except DataError as e:
        names = ", ".join(repr(str(a)) for a in list(left_out)[:5]) + (" ..." if len(left_out) > 5 else "")
        raise DataError(f"the reject threshold of a whitened catalogue is calibrated in whitenings fitted without "
                        f"each fold of its articles in turn; without fold {k + 1} ({len(left_out)} article(s): "
                        f"{names}), {e.message.replace('the catalogue has', 'the rest has', 1)}",
                        hint="add a second photo to more articles, or leave whiten off", options=("whiten",)) from None


def _build(vectors: np.ndarray, labels: np.ndarray, groups: Sequence[str | None], paths: Sequence[str],
           whitening: Whitening) -> CatalogueIndex:
    return CatalogueIndex.build(vectors, labels.tolist(), list(groups), list(paths), {}, whitening=whitening)


def whitened_calibration_scores(vectors: np.ndarray, labels: Sequence[str], groups: Sequence[str | None],
                                scores: Sequence[str], *, folds: int = WHITEN_FOLDS, seed: int = 0,
                                digests: Sequence[str | None] | None = None,
                                prior: WithinStats | None = None) -> dict[str, CalibrationScores]:
    """The calibration scores (:func:`calibration_scores`) of a whitened catalogue for each open-set
    score in ``scores``, every photo scored in a whitening fitted without its article's fold
    (module docstring): ``folds`` fits, each on the photos of the other folds' articles.

    Args:
        vectors: ``float32 [N, D]`` unwhitened embeddings of the catalogue's photos.
        labels, groups: article and brand (``None``: none) of each photo.
        scores: open-set score names (:data:`fewshot.catalogue.scores.OPEN_SCORES`).
        folds: folds of articles (at most the number of articles).
        seed: seed of how the articles are dealt into folds.
        digests: optional SHA-256 of each photo's file: byte-identical copies count once in the
            fits, as in the index's own (:func:`~fewshot.index.whiten.distinct_photos`).
        prior: the whitening prior the index's own fit pooled in (``index.whitening.prior``),
            pooled into every fold's fit too.

    Returns:
        per score, the scores of every photo, fold by fold.

    Raises:
        DataError: a fold's other articles have too few photos to fit (:func:`fit_from_stats`), or
            the catalogue is too small to calibrate. InputError: an unknown score.
    """
    labels = np.array([str(x) for x in labels], dtype=object)
    fold_of = article_folds(np.unique(labels), folds, seed)
    fold = np.array([fold_of[a] for a in labels])
    paths = [f"catalogue:{i}" for i in range(len(labels))]
    parts: dict[str, list[CalibrationScores]] = {name: [] for name in scores}
    distinct = distinct_photos(labels, digests)
    stats = {int(k): within_stats(vectors[(fold == k) & distinct], labels[(fold == k) & distinct])
             for k in np.unique(fold)}
    whole = functools.reduce(WithinStats.plus, stats.values())
    for k in np.unique(fold):  # the fit without fold k: the whole's statistics minus its own
        with _in_fold(int(k), np.unique(labels[fold == k])):
            whitening = fit_from_stats(whole.minus(stats[int(k)]), prior)
        index = _build(vectors, labels, groups, paths, whitening)
        for name in scores:  # the index keeps the photos' order
            parts[name].append(calibration_scores(index, score=name, rows=np.flatnonzero(fold == k)))
    return {name: CalibrationScores(**{f: np.concatenate([getattr(p, f) for p in got])
                                       for f in CalibrationScores.__dataclass_fields__})
            for name, got in parts.items()}
