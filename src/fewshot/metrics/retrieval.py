"""Retrieval metrics (mAP, MAP@R, Precision@1, Recall@k, mAP@k) and exact nearest neighbours.

Every query ranks a gallery by cosine similarity (the dot product of L2-normalised
embeddings; with ``normalize=False`` the raw dot product). With no gallery the query set is
its own gallery and each query ranks all *other* items (leave-one-out).

Definitions (per query; ``rel(i)`` is 1 when the item at rank ``i`` has the query's label,
``P(i)`` is the precision of the first ``i`` results, ``R`` the number of relevant gallery
items)

* **AP** (full ranking): ``(1/R) * sum_i P(i) * rel(i)`` over the whole ranked gallery: the mean
  of the precision at the rank of each relevant item. ``map`` is its mean over queries. On
  tie-free scores this equals ``sklearn.metrics.average_precision_score``.
* **MAP@R** (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020):
  ``(1/R) * sum_{i<=R} P(i) * rel(i)``; equals pytorch-metric-learning's
  ``mean_average_precision_at_r``.
* **mAP@k**: ``(1/min(k, R)) * sum_{i<=k} P(i) * rel(i)`` (the common truncated AP, as in
  ``ml_metrics.apk``): 1.0 when the top ``min(k, R)`` results are all relevant.
* **Precision@1**: the fraction of queries whose first result is relevant.
* **Recall@k**: the fraction of queries with at least one relevant item in the top ``k``
  (the metric-learning convention of e.g. Song et al. 2016 / Musgrave et al. 2020, *not* the
  fraction of the ``R`` relevant items that were found). ``Recall@1 == Precision@1``.

Ties are broken deterministically: the ranking is a *stable* sort by descending score, so
among equal scores the item with the lower gallery index ranks first. Every metric here
(and :func:`nearest_neighbors`) follows that one rule.

Queries whose label has no relevant gallery item (no *other* item of the class in
leave-one-out mode) are skipped: they count in ``num_skipped_queries``, their per-query values
are NaN, and every mean is over the remaining ``num_queries`` queries.

Memory and speed: queries are processed in chunks (``chunk x G`` similarities at a time, never
``Q x G``). For each chunk the similarity block is computed with one ``torch.mm``; then, per
row, only the items scoring at least as high as the row's worst relevant item (the only ones
that can precede a relevant item) are extracted and sorted (numpy's sort, rows spread over
``torch.get_num_threads()`` threads), and the rank of each relevant item is found by binary
search. The metrics follow from the ranks of the relevant items alone. With the automatic
chunk size the working memory is a few hundred MiB (a 128 MiB similarity block, the extracted
candidates, the relevant-pair lists) plus one normalised float32 copy of the inputs, so
100,000 x 1,280 leave-one-out stays well under 2 GiB beyond the inputs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from fewshot.checks import as_embeddings, as_list

from .ranking import GalleryClasses, RowPool, encode_labels, relevant_ranks
from .retrieval_report import PerQuery, RetrievalReport, build_report

__all__ = ["RetrievalReport", "retrieval_metrics", "ranking_metrics", "nearest_neighbors"]

#: similarity block (chunk x gallery) elements per chunk: 2**25 float32 = 128 MiB
_BLOCK_ELEMENTS = 1 << 25
#: (query, relevant gallery item) pairs per chunk, about 80 bytes each at the peak
_PAIR_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- validation


def _check_ks(ks: Sequence[int], name: str) -> list[int]:
    out = []
    for k in ks:
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"{name} must hold positive integers, got {k!r}")
        out.append(int(k))
    return out


def _check_chunk(
    chunk_size: int | None, n_query: int, n_gallery: int, max_relevant: int = 1
) -> int:
    if chunk_size is None:
        by_block = _BLOCK_ELEMENTS // max(1, n_gallery)
        by_pairs = _PAIR_ELEMENTS // max(1, max_relevant)
        return max(1, min(n_query, by_block, by_pairs))
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return min(int(chunk_size), n_query)


def _prepare(
    query: Any, gallery: Any, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validated (query, gallery, leave_one_out) as float32 torch tensors."""
    q = as_embeddings(query, "query")
    loo = gallery is None
    g = q if loo else as_embeddings(gallery, "gallery")
    if g.shape[1] != q.shape[1]:
        raise ValueError(
            f"query has dimension {q.shape[1]} but gallery has dimension {g.shape[1]}"
        )
    qt = torch.from_numpy(q)
    if normalize:
        qt = torch.nn.functional.normalize(qt, dim=1)
    if loo:
        gt = qt
    else:
        gt = torch.from_numpy(g)
        if normalize:
            gt = torch.nn.functional.normalize(gt, dim=1)
    return qt.contiguous(), gt.contiguous(), loo


def retrieval_metrics(
    query: np.ndarray,
    query_labels: Sequence[str | int],
    gallery: np.ndarray | None = None,
    gallery_labels: Sequence[str | int] | None = None,
    *,
    query_groups: Sequence[str | None] | None = None,
    recall_ks: Sequence[int] = (1, 5, 10),
    map_at_ks: Sequence[int] = (10,),
    normalize: bool = True,
    chunk_size: int | None = None,
) -> RetrievalReport:
    """Rank a gallery for every query and compute mAP, MAP@R, Precision@1, Recall@k, mAP@k.

    Args:
        query: float32 ``[Q, D]`` embeddings (numpy array or CPU tensor).
        query_labels: ``Q`` labels (``str`` or ``int``; compared with ``==``).
        gallery: float32 ``[G, D]`` embeddings, or ``None`` for leave-one-out within
            ``query`` (each query ranks the other ``Q - 1`` items).
        gallery_labels: ``G`` labels; required with ``gallery``, ignored without.
        query_groups: optional ``Q`` group names (brand, coarse class); queries whose group is
            ``None`` count only in the overall numbers. Fills ``per_group``.
        recall_ks: the ``k`` of Recall@k; report keys are ``str(k)``.
        map_at_ks: the ``k`` of mAP@k; report keys are ``str(k)``.
        normalize: L2-normalise both sets first (cosine similarity); ``False`` ranks by the raw
            dot product.
        chunk_size: queries per block; ``None`` picks ``2**25 // G`` (128 MiB of float32
            similarities per block), fewer when classes are so large that the
            (query, relevant item) pairs of a block would pass ``2**22``.

    Returns:
        A :class:`RetrievalReport` (see the module docstring for the exact definitions, the tie
        rule and how queries without relevant items are skipped).

    Raises:
        ValueError: an input is empty, not 2-D, holds NaN/inf, the dimensions of query and
            gallery differ, a label list's length differs from its embeddings, ``gallery`` and
            ``gallery_labels`` are not given together, or a ``k`` / ``chunk_size`` is not a
            positive integer.
    """
    if gallery is not None and gallery_labels is None:
        raise ValueError("gallery_labels is required when gallery is given")
    if gallery is None and gallery_labels is not None:
        raise ValueError(
            "gallery_labels given without gallery: pass both, or neither for leave-one-out"
        )
    recall_ks = _check_ks(recall_ks, "recall_ks")
    map_at_ks = _check_ks(map_at_ks, "map_at_ks")

    qt, gt, loo = _prepare(query, gallery, normalize)
    block: torch.Tensor | None = None

    def scores(start: int, stop: int) -> np.ndarray:
        nonlocal block
        if block is None or block.shape[0] < stop - start:
            block = torch.empty((stop - start, gt.shape[0]), dtype=torch.float32)
        sims_t = block[: stop - start]
        torch.mm(qt[start:stop], gt.T, out=sims_t)
        sims = sims_t.numpy()
        if loo:
            sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        return sims

    return _ranked(scores, (qt.shape[0], gt.shape[0]), query_labels, None if loo else gallery_labels,
                   query_groups, recall_ks, map_at_ks, chunk_size)


def _ranked(scores: Any, shape: tuple[int, int], query_labels: Sequence, gallery_labels: Sequence | None,
            query_groups: Sequence | None, recall_ks: list[int], map_at_ks: list[int],
            chunk_size: int | None) -> RetrievalReport:
    """The metrics of rankings whose ``scores(start, stop)`` gives rows ``start:stop`` of the
    ``[Q, G]`` similarity (``gallery_labels`` ``None``: leave-one-out, the caller masked the diagonal)."""
    n_q, n_g = shape
    loo = gallery_labels is None
    q_lab = as_list(query_labels, n_q, "query_labels", "labels")
    g_lab = q_lab if loo else as_list(gallery_labels, n_g, "gallery_labels", "labels")
    groups = (
        None if query_groups is None else as_list(query_groups, n_q, "query_groups", "groups")
    )
    qc, gc, n_classes = encode_labels(q_lab, [] if loo else g_lab)
    if loo:
        gc = qc
    classes = GalleryClasses.of(gc, n_classes)
    chunk = _check_chunk(chunk_size, n_q, n_g, int(classes.count[qc].max()))
    acc = PerQuery.empty(n_q, map_at_ks)
    pool = RowPool()
    try:
        for start in range(0, n_q, chunk):
            stop = min(n_q, start + chunk)
            rows, gidx = classes.relevant_pairs(qc[start:stop], start, loo)
            if len(rows) == 0:
                continue
            acc.add_chunk(start, stop, rows, relevant_ranks(scores(start, stop), rows, gidx, pool), map_at_ks)
    finally:
        pool.close()
    n_rel = classes.count[qc] - (1 if loo else 0)
    return build_report(acc, n_rel, groups, recall_ks, map_at_ks)


def ranking_metrics(
    scores: np.ndarray,
    query_labels: Sequence[str | int],
    gallery_labels: Sequence[str | int],
    *,
    query_groups: Sequence[str | None] | None = None,
    recall_ks: Sequence[int] = (1, 5, 10),
    map_at_ks: Sequence[int] = (10,),
) -> RetrievalReport:
    """The metrics of :func:`retrieval_metrics` for rankings given as scores (higher ranks
    first, the same stable tie rule): for re-ranked galleries (:mod:`fewshot.index.rerank`).

    Args:
        scores: float32 ``[Q, G]`` similarity of each query to each gallery item (NaN not allowed;
            ``-inf`` ranks an item last).
        query_labels / gallery_labels: ``Q`` / ``G`` labels; query_groups, recall_ks,
        map_at_ks: as :func:`retrieval_metrics`.

    Raises:
        ValueError: ``scores`` is not 2-D or holds NaN, a label list's length differs, a bad ``k``.
    """
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty [Q, G] array, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN")
    return _ranked(lambda a, b: s[a:b].copy(), s.shape, query_labels, gallery_labels, query_groups,
                   _check_ks(recall_ks, "recall_ks"), _check_ks(map_at_ks, "map_at_ks"), None)


def nearest_neighbors(
    query: np.ndarray,
    gallery: np.ndarray | None = None,
    k: int = 5,
    normalize: bool = True,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` gallery items for every query (for retrieval grids and error analysis).

    Args:
        query: float32 ``[Q, D]``.
        gallery: float32 ``[G, D]``, or ``None`` to search ``query`` itself excluding each
            query's own index (leave-one-out).
        k: neighbours per query; clipped to the number of candidates (``G``, or ``Q - 1``
            in leave-one-out).
        normalize: cosine similarity (``True``) or raw dot product.
        chunk_size: queries per block (``None``: automatic, as in :func:`retrieval_metrics`).

    Returns:
        ``(scores, indices)``: float32 ``[Q, k]`` similarities in descending order and int64
        ``[Q, k]`` gallery indices. Ties follow the same rule as :func:`retrieval_metrics`:
        equal scores are ordered by ascending gallery index.

    Raises:
        ValueError: empty / non-2-D / non-finite input, mismatched dimensions, ``k < 1``.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    qt, gt, loo = _prepare(query, gallery, normalize)
    n_q, n_g = qt.shape[0], gt.shape[0]
    k = min(int(k), n_g - 1 if loo else n_g)
    scores = np.empty((n_q, k), dtype=np.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    if k == 0:
        return scores, indices
    chunk = _check_chunk(chunk_size, n_q, n_g)
    block = torch.empty((chunk, n_g), dtype=torch.float32)
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        c = stop - start
        sims = block[:c]
        torch.mm(qt[start:stop], gt.T, out=sims)
        if loo:
            sims[torch.arange(c), torch.arange(start, stop)] = -math.inf
        kth = torch.topk(sims, k, dim=1, sorted=True).values[:, -1:]
        # every item scoring >= the k-th best is a candidate (more than k only with ties)
        r, g = torch.nonzero(sims >= kth, as_tuple=True)
        v = sims[r, g].numpy()
        r, g = r.numpy(), g.numpy()
        order = np.lexsort((g, -v, r))  # by row, descending score, ascending index
        r, g, v = r[order], g[order], v[order]
        counts = np.bincount(r, minlength=c)
        pos = np.arange(len(r)) - (np.cumsum(counts) - counts)[r]
        take = pos < k
        scores[start:stop] = v[take].reshape(c, k)
        indices[start:stop] = g[take].reshape(c, k)
    return scores, indices
