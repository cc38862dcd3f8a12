"""How a :class:`~fewshot.index.CatalogueIndex` ranks articles for query embeddings.

``prototype`` mode compares a query with each article's prototype (the mean of its
L2-normalised embeddings, re-normalised; Snell et al. 2017): a flat index scans every prototype,
an approximate one re-ranks the articles of the nearest images (a shortlist) by their exact
prototype cosine. ``nearest`` mode scores an article by its best-matching catalogue image.
Either mode can leave out given catalogue images per query (leave-one-out for a query that is a
catalogue image). :class:`Ranking` holds these methods; :class:`~fewshot.index.CatalogueIndex`
inherits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from ..checks import positive_int
from ..errors import InputError
from .ann import faiss_blas_setting
from .vectors import Prototypes, l2_normalize

__all__ = ["MODES", "BATCH_TRANSDUCTIVE", "TRANSDUCTIVE_CANDIDATES", "Neighbor", "Prediction", "Ranking",
           "check_classify"]

#: prototype search of an approximate index (:meth:`CatalogueIndex._shortlist`): the articles
#: of the nearest max(SHORTLIST_MIN, SHORTLIST_PER_RESULT x k) images are re-ranked exactly
#: (100: on Grocery, 81 articles, the top-5 of a 50-image shortlist missed an article of the
#: exact top-5 for 3 of 2,485 test photos; 100 gave the flat scan's top-5 accuracy exactly)
SHORTLIST_MIN = 100
SHORTLIST_PER_RESULT = 10
#: queries per shortlist batch (their candidate prototypes are read together)
SHORTLIST_BATCH = 256


@dataclass(frozen=True)
class Prediction:
    """One ranked article for a query: ``score`` is a cosine similarity in [-1, 1]."""

    label: str
    group: str | None
    score: float

    def to_dict(self) -> dict:
        return {"label": self.label, "group": self.group, "score": round(float(self.score), 6)}


@dataclass(frozen=True)
class Neighbor:
    """One catalogue image returned by :meth:`CatalogueIndex.search`."""

    path: str
    label: str
    group: str | None
    score: float

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "group": self.group,
                "score": round(float(self.score), 6)}


#: how :meth:`CatalogueIndex.classify` ranks articles
MODES = ("prototype", "nearest")
#: the transductive classifiers a batch of photos may be classified with
#: (:meth:`Ranking.transductive_first`): BD-CSPN and TIM assume the photos cover the articles
BATCH_TRANSDUCTIVE = ("none", "paddle")
#: each photo's nearest articles (by prototype cosine) that a transductive batch chooses among:
#: the union over the batch's photos
TRANSDUCTIVE_CANDIDATES = 20
#: the largest batch x candidate articles a transductive batch may hold (each of its 30 rounds
#: makes a few float32 matrices of this size: about 40 MB each)
TRANSDUCTIVE_MAX_CELLS = 10_000_000


def check_classify(top_k: object, mode: object) -> int:
    """``top_k`` as an ``int``, once ``top_k`` and ``mode`` are known to be valid (call it before
    embedding anything).

    Raises:
        TypeError: ``top_k`` is not a number. ValueError: ``top_k < 1``, or ``mode`` is not one
        of :data:`MODES`.
    """
    top_k = positive_int(top_k, "top_k")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'prototype' or 'nearest'")
    return top_k


def _best_image_per_article(idx: np.ndarray, image_article: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each article's first (best) image in ranked FAISS results.

    Args:
        idx: int64 ``[Q, k]`` image positions, best first per row (``-1``: no result).
        image_article: int64 ``[N]`` article of each image.

    Returns:
        ``(rows, cols)`` int64: the ``(query, rank)`` of every article's best image, ordered by
        query, then by rank (so each query's articles come best first).
    """
    q, k = idx.shape
    art = np.where(idx >= 0, image_article[np.maximum(idx, 0)], -1).ravel()
    row = np.repeat(np.arange(q), k)
    col = np.tile(np.arange(k), q)
    order = np.lexsort((col, art, row))  # by query, article, rank
    r, a = row[order], art[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (a[1:] != a[:-1])
    keep = order[first & (a >= 0)]
    keep.sort()  # flat position = query * k + rank: back to query-major, rank order
    return row[keep], col[keep]


class Ranking:
    """The classification methods of :class:`~fewshot.index.CatalogueIndex` (which holds the
    image index, the prototypes and the per-image metadata they read)."""

    def classify(self, queries: np.ndarray, top_k: int = 5, mode: str = "prototype",
                 exclude: Sequence[Sequence[int]] | None = None) -> list[list[Prediction]]:
        """Top-k articles for ``queries float32 [Q, D]``.

        Args:
            top_k: articles to return per query (at least 1; at most the number of articles).
            mode: ``"prototype"`` (cosine to the article's mean embedding) or ``"nearest"``
                (the article's best-matching catalogue image).
            exclude: per query, catalogue image positions to leave out of its ranking
                (leave-one-out for a query that is a catalogue image, :meth:`find_images`):
                in nearest mode those images are skipped; in prototype mode the article's
                prototype is recomputed without them (an article left with no image drops out).

        Raises:
            ValueError: unknown mode, ``top_k < 1``, or ``exclude`` of the wrong length.
            TypeError: ``top_k`` is not a number.
            CheckpointError: query dimension differs from the index's.
        """
        top_k = check_classify(top_k, mode)
        queries = self._check_queries(queries)
        exclude = [list(e) for e in exclude] if exclude is not None else [[] for _ in range(len(queries))]
        if len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        top_k = min(top_k, len(self.articles))
        if mode == "prototype":
            return self._classify_prototype(queries, top_k, exclude)
        return self._classify_nearest(queries, top_k, exclude)

    def _search_prototypes(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], article rows int64 [Q, k])`` of the prototypes nearest to
        ``queries [Q, D]`` (``-1`` pads). A flat index scans every prototype (``faiss.knn``,
        exact inner product); an approximate one re-ranks a shortlist (:meth:`_shortlist`)."""
        if isinstance(self._protos, Prototypes):
            with faiss_blas_setting(self.dim):
                scores, idx = faiss.knn(queries, self._protos.normed.view, k, metric=faiss.METRIC_INNER_PRODUCT)
            return np.asarray(scores, np.float32), np.asarray(idx, np.int64)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        idx = np.full((len(queries), k), -1, np.int64)
        for start in range(0, len(queries), SHORTLIST_BATCH):
            part = slice(start, start + SHORTLIST_BATCH)
            scores[part], idx[part] = self._shortlist(queries[part], k)
        return scores, idx

    def _shortlist(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Prototype search of an approximate index: the articles of the nearest
        ``max(SHORTLIST_MIN, SHORTLIST_PER_RESULT * k)`` images (from the image index, widened
        until each query has ``k`` distinct articles), re-ranked by the exact cosine to their
        prototypes (read once per batch). Exact whenever the best prototypes' articles have an
        image among that many nearest images; ``bench/scale_index.py`` measures the recall."""
        assert self._protos is not None
        n = len(self.labels)
        m = min(n, max(SHORTLIST_MIN, SHORTLIST_PER_RESULT * k))
        while True:
            _, pos = self._search_images(queries, m)
            cands = [np.unique(self.image_article[row[row >= 0]]) for row in pos]
            if min(len(c) for c in cands) >= k or m >= n:
                break
            m = min(n, m * 4)
        union = np.unique(np.concatenate(cands))
        protos = self._protos.normed_rows(union)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        idx = np.full((len(queries), k), -1, np.int64)
        for r, c in enumerate(cands):
            s = protos[np.searchsorted(union, c)] @ queries[r]
            top = np.argsort(-s, kind="stable")[:k]
            scores[r, :len(top)], idx[r, :len(top)] = s[top], c[top]
        return scores, idx

    def _classify_prototype(self, queries: np.ndarray, top_k: int,
                            exclude: list[list[int]]) -> list[list[Prediction]]:
        extra = max((len({int(self.image_article[i]) for i in e}) for e in exclude), default=0)
        k = min(len(self.articles), top_k + extra)
        scores, idx = self._search_prototypes(queries, k)
        results = []
        for q, (srow, irow, ex) in enumerate(zip(scores, idx, exclude)):
            ranked = [(float(sc), int(j)) for sc, j in zip(srow, irow) if j >= 0]
            if ex:
                changed = self._loo_prototype_scores(queries[q], ex)
                ranked = [(sc, j) for sc, j in ranked if j not in changed]
                ranked += [(sc, j) for j, sc in changed.items() if sc is not None]
                ranked.sort(key=lambda t: (-t[0], t[1]))
            results.append([Prediction(self.articles[j], self.article_groups[j], sc) for sc, j in ranked[:top_k]])
        return results

    def _loo_prototype_scores(self, query: np.ndarray, exclude: list[int]) -> dict[int, float | None]:
        """Cosine of ``query [D]`` (normalised) to each affected article's prototype without the
        ``exclude`` images; ``None`` for an article left with no image."""
        assert self._protos is not None and self._vectors is not None
        out: dict[int, float | None] = {}
        by_article: dict[int, list[int]] = {}
        for i in exclude:
            by_article.setdefault(int(self.image_article[i]), []).append(int(i))
        for a, positions in sorted(by_article.items()):
            positions = sorted(set(positions))
            if len(positions) >= int(self._protos.counts.view[a]):
                out[a] = None
                continue
            proto = self._protos.sum_of(a) - self._vectors.get(self.ids[positions]).sum(axis=0)
            out[a] = float(l2_normalize(proto[None])[0] @ query)
        return out

    def _classify_nearest(self, queries: np.ndarray, top_k: int,
                          exclude: list[list[int]]) -> list[list[Prediction]]:
        n = len(self.labels)
        k = min(n, max(50, top_k * 20) + max((len(e) for e in exclude), default=0))
        while True:
            scores, idx = self._search_images(queries, k)
            for r, ex in enumerate(exclude):
                if ex:
                    idx[r][np.isin(idx[r], ex)] = -1
            rows, cols = _best_image_per_article(idx, self.image_article)
            counts = np.bincount(rows, minlength=len(queries))
            if counts.min() < top_k and k < n:  # too few distinct articles among k images
                k = min(n, k * 4)
                continue
            results: list[list[Prediction]] = [[] for _ in range(len(queries))]
            for r, c in zip(rows.tolist(), cols.tolist()):
                if len(results[r]) < top_k:
                    a = int(self.image_article[idx[r, c]])
                    results[r].append(Prediction(self.articles[a], self.article_groups[a], float(scores[r, c])))
            return results

    def transductive_first(self, queries: np.ndarray, predictions: Sequence[Sequence[Prediction]],
                           name: str = "paddle") -> list[list[Prediction]]:
        """The predictions of a batch of photos classified together (transductive inference):
        each photo's list gets, first, the article the batch's classifier ``name`` gives it
        (:data:`BATCH_TRANSDUCTIVE`; :func:`fewshot.methods.transductive.paddle`), with its
        prototype cosine as score; the others follow in their cosine order, the list keeping its
        length; a single photo keeps its own ranking. The classifier chooses among the union of the
        photos' ranked articles
        (``predictions``, prototype mode, at least :data:`TRANSDUCTIVE_CANDIDATES` deep where the
        catalogue has that many), their prototypes as the support set, each weighing as many
        photos as its article has (``paddle``'s ``support_weight``).

        Args:
            queries: the photos' embeddings, ``float32 [Q, D]`` (as for :meth:`classify`).
            predictions: each photo's ranked articles from :meth:`classify` (no leave-one-out).

        Raises:
            ValueError: an unknown ``name``, or ``predictions`` not one list per query.
            InputError: the batch times its candidate articles exceeds :data:`TRANSDUCTIVE_MAX_CELLS`.
        """
        if name not in BATCH_TRANSDUCTIVE:
            raise ValueError(f"unknown batch classifier {name!r}: use one of {', '.join(BATCH_TRANSDUCTIVE)}")
        if len(predictions) != len(queries):
            raise ValueError(f"{len(predictions)} prediction lists for {len(queries)} queries")
        if name == "none" or len(queries) < 2:  # a batch of one photo is that photo alone
            return [list(p) for p in predictions]
        import torch

        from ..methods.transductive import paddle

        queries = self._check_queries(queries)
        rows = np.unique(np.fromiter((self._article_of[p.label] for ps in predictions for p in ps), np.int64))
        if len(queries) * len(rows) > TRANSDUCTIVE_MAX_CELLS:
            most = max(1, TRANSDUCTIVE_MAX_CELLS // len(rows))
            raise InputError(f"a batch of {len(queries):,} photos over {len(rows):,} candidate articles is too large to "
                             f"classify together ({len(queries) * len(rows):,} pairs; at most "
                             f"{TRANSDUCTIVE_MAX_CELLS:,})", hint=f"classify the photos in batches of at most {most:,} "
                             "(a shelf, a listing) or use transductive='none'", options=("transductive",))
        protos = np.ascontiguousarray(self._prototype_rows(rows), dtype=np.float32)
        counts = torch.from_numpy(self._protos.counts.view[rows].astype(np.float32))
        chosen = rows[np.asarray(paddle(torch.from_numpy(protos), torch.arange(len(rows)),
                                        torch.from_numpy(np.ascontiguousarray(queries)), len(rows),
                                        support_weight=counts))]
        at = {int(r): i for i, r in enumerate(rows)}
        out = []
        for q, (ps, j) in enumerate(zip(predictions, chosen)):
            first = Prediction(self.articles[j], self.article_groups[j], float(queries[q] @ protos[at[int(j)]]))
            out.append(([first] + [p for p in ps if p.label != first.label])[:max(len(ps), 1)])
        return out

    def _prototype_rows(self, rows: np.ndarray) -> np.ndarray:
        """The normalised prototypes of article ``rows`` (int64), ``float32 [len(rows), D]``."""
        if isinstance(self._protos, Prototypes):
            return self._protos.normed.view[rows]
        return self._protos.normed_rows(rows)
