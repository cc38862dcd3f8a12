"""Open-set scores: how sure the catalogue is that a photo shows one of its articles.

Each score is computed from a photo's best prototype cosines, best first (``top float32 [Q, m]``,
``m >= 2``; ``-inf`` pads a row when the catalogue has fewer articles), higher meaning "more
likely a catalogue article". Measured on Grocery's open-set protocol (``bench/openset.py``,
docs/benchmarks.md) before choosing the default:

* ``cosine``: the best prototype cosine (Snell et al. 2017's nearest prototype as a score).
* ``margin``: best minus second best (a photo between two articles is not sure of either).
* ``relative``: best minus half the second best, the default: it keeps the cosine's ranking of
  far-away photos and the margin's doubt between two articles. Frozen Lite0, Grocery unseen
  articles, 20 draws: AUROC 0.768 against the cosine's 0.729 and the margin's 0.629 (chosen on the
  validation articles: 0.789 against 0.764 / 0.714).
* ``softmax``: the largest probability of a softmax over the ``SCORE_DEPTH`` best prototypes at
  temperature ``SOFTMAX_TEMPERATURE`` (the maximum softmax probability of Hendrycks and Gimpel
  2017; the prototypes further down add under ``exp(-10)`` each at Grocery's cosines).

The same functions score brands (:func:`brand_scores`): the best article's cosine relative to
the best article of another brand.

**Rivals** (:func:`with_rivals`): a whitened catalogue made with a trained run also scores each
photo against the run's own articles (its training and validation articles, never a catalogue
article: :mod:`fewshot.index.prior`). They cannot be the answer, but they compete for every other
place: a photo nearer to one of them than to the catalogue's second best article is judged
against it. A photo of an article the catalogue does not hold often lies near such an article.
Grocery's open-set protocol, whitened, seeds 0 / 1 / 2 (docs/measurements.md): the triplet
runs of 0.4.0 FPR@95TPR 0.352 / 0.349 / 0.344 -> 0.340 / 0.335 / 0.342, known photos accepted
and right at a 5% false-accept threshold chosen in hindsight 53.9 / 52.7 / 56.0% -> 61.8 /
62.7 / 62.1%; the calibrated threshold is less cautious with rivals (7.7-8.2% false accepts for
5% with triplet, 6.2-6.8% with the ArcFace default). Checked on the 13 validation articles too
(the training articles as rivals: AUROC 0.905 / 0.911 / 0.918 -> 0.921 / 0.924 / 0.930).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import InputError
from ..registry import Registry

__all__ = ["OPEN_SCORES", "DEFAULT_SCORE", "SCORE_DEPTH", "SOFTMAX_TEMPERATURE", "open_scores",
           "brand_scores", "top_scores", "with_rivals"]

#: the best prototype cosines a score reads per photo
SCORE_DEPTH = 10
#: the temperature of the ``softmax`` score (cosines divided by it)
SOFTMAX_TEMPERATURE = 0.1
#: the weight of the second best cosine in the ``relative`` score
RELATIVE_WEIGHT = 0.5
DEFAULT_SCORE = "relative"

ScoreFn = Callable[[np.ndarray], np.ndarray]
OPEN_SCORES: Registry[ScoreFn] = Registry("open-set score", InputError, hint="the default is 'relative'")


def _second(top: np.ndarray) -> np.ndarray:
    """The second best cosine of each row (``-1`` when the catalogue has one article: a cosine's floor)."""
    return np.where(np.isfinite(top[:, 1]), top[:, 1], -1.0)


@OPEN_SCORES.register("cosine")
def cosine_score(top: np.ndarray) -> np.ndarray:
    """The best prototype cosine, ``[Q]``."""
    return top[:, 0]


@OPEN_SCORES.register("margin")
def margin_score(top: np.ndarray) -> np.ndarray:
    """Best minus second best prototype cosine, ``[Q]``: in ``[0, 2]``, below 0 when a rival
    (:func:`with_rivals`) is nearer than the best article."""
    return top[:, 0] - _second(top)


@OPEN_SCORES.register("relative")
def relative_score(top: np.ndarray) -> np.ndarray:
    """Best minus ``RELATIVE_WEIGHT`` x second best prototype cosine, ``[Q]``."""
    return top[:, 0] - RELATIVE_WEIGHT * _second(top)


@OPEN_SCORES.register("softmax")
def softmax_score(top: np.ndarray) -> np.ndarray:
    """The largest softmax probability over the given cosines at ``SOFTMAX_TEMPERATURE``, ``[Q]`` in ``(0, 1]``."""
    z = (top - top[:, :1]) / SOFTMAX_TEMPERATURE  # at most 2 / 0.1 (a rival above the best): no overflow; -inf pads give 0
    return 1.0 / np.exp(z).sum(axis=1)


def top_scores(sims: np.ndarray, depth: int = SCORE_DEPTH) -> np.ndarray:
    """The ``depth`` largest values of each row of ``sims float32 [Q, C]`` (``-inf``: left out),
    best first, ``-inf`` padded to at least 2 columns: the input of every score."""
    sims = np.asarray(sims, np.float32)
    m = min(depth, sims.shape[1])
    part = -np.partition(-sims, m - 1, axis=1)[:, :m] if m < sims.shape[1] else sims.copy()
    part = -np.sort(-part, axis=1)
    if part.shape[1] < 2:
        part = np.concatenate([part, np.full((len(part), 2 - part.shape[1]), -np.inf, np.float32)], axis=1)
    return part


def with_rivals(top: np.ndarray, rivals: np.ndarray | None) -> np.ndarray:
    """``top`` (best catalogue cosines ``[Q, m]``, best first) with each photo's best rival cosine
    ``rivals float [Q]`` among the places after the first, ``float32 [Q, m + 1]``: the first
    column stays the best catalogue article's, the rest is sorted, and may exceed it (module
    docstring). ``rivals=None``: ``top`` unchanged."""
    if rivals is None:
        return top
    rest = np.concatenate([np.asarray(top[:, 1:], np.float32), np.asarray(rivals, np.float32).reshape(-1, 1)], axis=1)
    return np.concatenate([np.asarray(top[:, :1], np.float32), -np.sort(-rest, axis=1)], axis=1)


def open_scores(top: np.ndarray, score: str = DEFAULT_SCORE) -> np.ndarray:
    """Score ``name`` of photos from their best prototype cosines ``top float32 [Q, m]`` (best
    first, ``m >= 2``): ``float64 [Q]``.

    Raises:
        InputError: an unknown score name (the hint lists the known ones).
    """
    top = np.asarray(top, np.float64)
    if top.ndim != 2 or top.shape[1] < 2:
        raise InputError(f"open-set scores need the 2 best cosines of each photo, got shape {top.shape}")
    return OPEN_SCORES.get(score)(top)


def brand_scores(top: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """How sure the catalogue is of the brand of each photo, whatever its article: the best
    article's cosine minus ``RELATIVE_WEIGHT`` x the best cosine of an article of another brand,
    ``float64 [Q]`` (the ``relative`` score over brands).

    Args:
        top: best prototype cosines ``[Q, m]``, best first.
        groups: the brand of each of those articles, ``object [Q, m]`` (``None``: no brand).
            When no other brand is among the ``m``, the ``m``-th cosine stands for it (a bound).
    """
    top = np.asarray(top, np.float64)
    other = np.array([next((s for s, g in zip(srow[1:], grow[1:]) if g != grow[0]), srow[-1])
                      for srow, grow in zip(top, groups)], np.float64)
    return top[:, 0] - RELATIVE_WEIGHT * np.where(np.isfinite(other), other, -1.0)
