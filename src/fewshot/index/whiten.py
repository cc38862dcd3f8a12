"""Catalogue whitening: a metric fitted to the catalogue's own labelled photos.

Photos of one article differ by viewpoint, light, background and the shelf they were taken on;
those differences are much alike from article to article. Whitening with the **within-article
covariance** of the catalogue's photos (the shared covariance of Lee et al. 2018's Mahalanobis
score; the learned whitening of Mikolajczyk and Matas 2007 and Radenovic et al. 2018 without
the matching pairs they mine) shrinks the directions in which photos of one article vary, so
the directions that tell articles apart count more:

    y = normalize((normalize(x) - mean) @ W),   W = C^(-1/2),

with ``mean`` the mean of the catalogue's unit embeddings and ``C`` the covariance of each unit
embedding minus its article's mean, shrunk towards a multiple of the identity by Ledoit and
Wolf's (2004) formula (``sklearn.covariance.LedoitWolf``): no setting to choose, and the fewer
photos per article, the more it shrinks. Cosine similarity on ``y`` is the measure.

Measured (Grocery; ``docs/measurements.md``): the main job's frozen 81-article catalogue, test
photos' prototype top-1 0.599 -> 0.720 (0.533 -> 0.641 with 5 photos an article); the default
fine-tuned run on the 28 unseen test articles, MAP@R 0.617 -> 0.813 with the gallery as the
catalogue (its labels used: not comparable with other retrieval figures), and the open-set
protocol (each draw's catalogue fitted on its own) relative AUROC 0.872 -> 0.898.

It needs labelled photos of the articles being compared, so it applies to a catalogue (a
gallery) and never to a single photo or a 1-shot support set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from ..checks import as_embeddings, as_list
from ..errors import DataError
from .vectors import l2_normalize

__all__ = ["Whitening", "check_spread", "fit_whitening", "MIN_SPREAD_PHOTOS"]

#: the fewest photos that vary within an article (photos minus articles, over articles of two or
#: more photos) a catalogue needs to fit a whitening
MIN_SPREAD_PHOTOS = 2


@dataclass(frozen=True)
class Whitening:
    """A fitted catalogue whitening (module docstring).

    Attributes:
        mean: ``float64 [D]``, the mean of the catalogue's unit embeddings.
        matrix: ``float64 [D, D]``, ``C^(-1/2)`` of the shrunk within-article covariance.
        shrinkage: the Ledoit-Wolf shrinkage intensity in ``[0, 1]`` (1: the identity's multiple,
            so plain centring).
        photos, articles: what it was fitted on.
    """

    mean: np.ndarray
    matrix: np.ndarray
    shrinkage: float
    photos: int
    articles: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Whitened unit vectors of ``vectors float32 [N, D]`` (normalised first), ``float32 [N, D]``.

        Raises:
            ValueError: ``vectors`` of another dimension than the fit's.
        """
        x = as_embeddings(vectors, "vectors")
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the whitening {self.dim}")
        y = (l2_normalize(x).astype(np.float64) - self.mean) @ self.matrix
        return l2_normalize(y.astype(np.float32))

    @cached_property
    def _inverse(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)

    def unapply(self, whitened: np.ndarray) -> np.ndarray:
        """The unit vectors that :meth:`apply` turned into ``whitened float32 [N, D]``, ``float32 [N, D]``
        (the whitening loses nothing: ``y`` gives the direction of ``x - mean``, and the one point
        of that ray at distance 1 from the origin is ``x``, since ``|mean| < 1``). Exact to about
        1e-7 on Grocery's embeddings; a whitened catalogue keeps only its whitened vectors.

        Raises:
            ValueError: ``whitened`` of another dimension than the fit's.
        """
        y = as_embeddings(whitened, "whitened")
        if y.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {y.shape[1]}, the whitening {self.dim}")
        v = y.astype(np.float64) @ self._inverse
        a, b, c = (v * v).sum(1), v @ self.mean, float(self.mean @ self.mean) - 1.0
        t = (-b + np.sqrt(np.maximum(b * b - a * c, 0.0))) / np.maximum(a, 1e-300)  # |mean + t v| = 1, t > 0
        return l2_normalize((self.mean + t[:, None] * v).astype(np.float32))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that :meth:`from_arrays` reads back (``mean``, ``matrix``, ``float64``)."""
        return {"mean": np.ascontiguousarray(self.mean, np.float64),
                "matrix": np.ascontiguousarray(self.matrix, np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], described: dict) -> "Whitening":
        """A whitening from :meth:`to_arrays` and :meth:`describe`.

        Raises:
            ValueError / KeyError: arrays or a description that do not fit together.
        """
        mean, matrix = np.asarray(arrays["mean"], np.float64), np.asarray(arrays["matrix"], np.float64)
        if mean.ndim != 1 or matrix.shape != (len(mean), len(mean)) or not np.isfinite(matrix).all():
            raise ValueError(f"a whitening of mean {mean.shape} and matrix {matrix.shape}")
        return cls(mean=mean, matrix=matrix, shrinkage=float(described["shrinkage"]),
                   photos=int(described["photos"]), articles=int(described["articles"]))

    def describe(self) -> dict:
        """What a result file records of it."""
        return {"kind": "within-article, Ledoit-Wolf", "shrinkage": round(self.shrinkage, 6),
                "photos": self.photos, "articles": self.articles}


def check_spread(counts: Sequence[int] | np.ndarray) -> None:
    """Refuse a catalogue whose articles' photo counts (``counts``, one per article) leave fewer
    than :data:`MIN_SPREAD_PHOTOS` photos beyond the first of their article: cheap, so callers
    check it before embedding anything.

    Raises:
        DataError: naming the ``whiten`` option.
    """
    counts = np.asarray(counts, np.int64)
    spread = int((counts[counts > 1] - 1).sum())
    if spread < MIN_SPREAD_PHOTOS:
        raise DataError(f"the catalogue has {int(counts.sum())} photos of {len(counts)} articles, and only {spread} "
                        f"of them are a second or later photo of an article: at least {MIN_SPREAD_PHOTOS} are needed "
                        "to see how photos of an article vary, so no whitening can be fitted",
                        hint="add a second photo to some articles, or leave whiten off", options=("whiten",))


def fit_whitening(vectors: np.ndarray, labels: Sequence[str]) -> Whitening:
    """Fit the whitening of a catalogue (module docstring).

    Args:
        vectors: ``float32 [N, D]`` embeddings of the catalogue's photos (normalised here).
        labels: the article of each photo.

    Returns:
        the :class:`Whitening`; fitting costs one ``D x D`` covariance and its eigendecomposition
        (about a second for ``D`` 1280 on 2 CPU cores).

    Raises:
        DataError: fewer than :data:`MIN_SPREAD_PHOTOS` photos beyond the first of their article
            (:func:`check_spread`), or those photos identical to the rest of their article.
        ValueError / TypeError: bad arrays, or labels of the wrong length.
    """
    from sklearn.covariance import LedoitWolf

    x = l2_normalize(as_embeddings(vectors, "vectors")).astype(np.float64)
    names = np.array([str(v) for v in as_list(labels, len(x), "labels")], dtype=object)
    _, article, counts = np.unique(names, return_inverse=True, return_counts=True)
    check_spread(counts)
    means = np.zeros((len(counts), x.shape[1]))
    np.add.at(means, article, x)
    means /= counts[:, None]
    multi = counts[article] > 1  # a single photo equals its article's mean: no spread to learn from
    residual = (x - means[article])[multi]
    if float((residual ** 2).sum()) <= 1e-12 * len(residual):
        raise DataError(f"the {int(multi.sum())} photos of articles with two or more photos are identical to "
                        "the other photos of their article: nothing shows how photos of an article vary, so no "
                        "whitening can be fitted",
                        hint="add photos that differ (another view, another shelf), or leave whiten off",
                        options=("whiten",))
    fit = LedoitWolf(assume_centered=True).fit(residual)
    eigenvalues, eigenvectors = np.linalg.eigh(fit.covariance_)
    floor = max(float(eigenvalues.max()), 1e-12) * 1e-9
    matrix = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))
    return Whitening(mean=x.mean(axis=0), matrix=matrix, shrinkage=float(fit.shrinkage_), photos=len(x),
                     articles=len(counts))
