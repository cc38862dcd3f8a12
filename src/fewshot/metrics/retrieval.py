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

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from fewshot.checks import as_embeddings, as_list

__all__ = ["RetrievalReport", "retrieval_metrics", "nearest_neighbors"]

logger = logging.getLogger("fewshot")

#: similarity block (chunk x gallery) elements per chunk: 2**25 float32 = 128 MiB
_BLOCK_ELEMENTS = 1 << 25
#: (query, relevant gallery item) pairs per chunk, about 80 bytes each at the peak
_PAIR_ELEMENTS = 1 << 22


@dataclass
class RetrievalReport:
    """Retrieval metrics for one query set against one gallery.

    Attributes:
        map: mean over queries of the full-ranking average precision.
        map_at_r: MAP@R (Musgrave et al. 2020).
        precision_at_1: fraction of queries whose nearest gallery item is relevant.
        recall_at_k: ``{"1": ..., "5": ..., "10": ...}``: fraction of queries with a relevant
            item in the top k.
        map_at_k: ``{"10": ...}``: truncated AP ``(1/min(k,R)) sum_{i<=k} P(i) rel(i)``.
        num_queries: queries that were evaluated (the means are over these).
        num_skipped_queries: queries with no relevant gallery item, left out of the means.
        per_group: ``{group: {"map", "map_at_r", "precision_at_1", "num_queries"}}`` over the
            evaluated queries of each group (empty when no groups were given).
        r_precision: mean R-precision (fraction of the top ``R`` results that are relevant;
            Musgrave et al. 2020). Not part of :meth:`to_dict`.
        average_precisions: float64 ``[Q]`` full-ranking AP per query, NaN when skipped.
        average_precisions_at_r: float64 ``[Q]`` MAP@R term per query, NaN when skipped.
        first_relevant_rank: int64 ``[Q]`` 1-based rank of the first relevant item, 0 when
            skipped.
        num_relevant: int64 ``[Q]`` number of relevant gallery items ``R`` per query.

    All means are NaN when every query was skipped.
    """

    map: float
    map_at_r: float
    precision_at_1: float
    recall_at_k: dict[str, float]
    map_at_k: dict[str, float]
    num_queries: int
    num_skipped_queries: int
    per_group: dict[str, dict[str, float | int]] = field(default_factory=dict)
    r_precision: float = float("nan")
    average_precisions: np.ndarray | None = field(default=None, repr=False)
    average_precisions_at_r: np.ndarray | None = field(default=None, repr=False)
    first_relevant_rank: np.ndarray | None = field(default=None, repr=False)
    num_relevant: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with exactly the keys ``map, map_at_r, precision_at_1,
        recall_at_k, map_at_k, num_queries, num_skipped_queries, per_group``.

        NaN (nothing evaluated) becomes ``None`` so the result is valid JSON.
        """
        return {
            "map": _json_float(self.map),
            "map_at_r": _json_float(self.map_at_r),
            "precision_at_1": _json_float(self.precision_at_1),
            "recall_at_k": {k: _json_float(v) for k, v in self.recall_at_k.items()},
            "map_at_k": {k: _json_float(v) for k, v in self.map_at_k.items()},
            "num_queries": int(self.num_queries),
            "num_skipped_queries": int(self.num_skipped_queries),
            "per_group": {
                g: {
                    k: (int(v) if k == "num_queries" else _json_float(v))
                    for k, v in values.items()
                }
                for g, values in self.per_group.items()
            },
        }


def _json_float(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


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


# --------------------------------------------------------------------------- core


class _Pool:
    """Runs row ranges on ``torch.get_num_threads()`` threads (numpy's sort releases the GIL)."""

    def __init__(self) -> None:
        self.workers = max(1, torch.get_num_threads())
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def map_rows(self, fn, weights: np.ndarray) -> None:
        """Call ``fn(first_row, stop_row)`` on row ranges of about equal total ``weights``."""
        n = len(weights)
        if self.pool is None or n < 2:
            fn(0, n)
            return
        cum = np.cumsum(weights, dtype=np.float64)
        targets = cum[-1] * np.arange(1, self.workers) / self.workers
        cuts = np.concatenate([[0], np.searchsorted(cum, targets, side="right"), [n]])
        cuts = np.unique(np.clip(cuts, 0, n))
        list(self.pool.map(lambda i: fn(cuts[i], cuts[i + 1]), range(len(cuts) - 1)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _relevant_ranks(
    sims: np.ndarray, rows: np.ndarray, gidx: np.ndarray, pool: _Pool
) -> np.ndarray:
    """1-based rank of each (row, gallery index) pair under the stable descending order.

    ``rows`` must be non-decreasing. rank = 1 + (items with a strictly higher score) + (items
    with an equal score and a lower gallery index). Only the items scoring at least as high
    as the row's worst relevant item can precede a relevant item, so only those
    "candidates" are extracted and sorted; a row where a relevant score is tied with another
    item falls back to a stable argsort of the whole row.
    """
    n_rows, n_gallery = sims.shape
    scores = sims[rows, gidx]
    counts = np.bincount(rows, minlength=n_rows)
    ends = np.cumsum(counts)
    starts = ends - counts
    present = counts > 0
    floor = np.full(n_rows, np.inf, dtype=np.float32)
    floor[present] = np.minimum.reduceat(scores, starts[present])
    ranks = np.empty(len(rows), dtype=np.int64)

    def work(first: int, stop: int) -> None:
        block = sims[first:stop]
        flat = np.flatnonzero(block >= floor[first:stop, None])
        cand = block.ravel()[flat]  # row-major: each row's candidates are contiguous
        bounds = np.searchsorted(flat, np.arange(stop - first + 1) * n_gallery)
        for r in range(first, stop):
            if not counts[r]:
                continue
            a, b = starts[r], ends[r]
            seg = cand[bounds[r - first] : bounds[r - first + 1]]
            seg.sort()
            s = scores[a:b]
            right = np.searchsorted(seg, s, side="right")
            if np.any(right - np.searchsorted(seg, s, side="left") > 1):
                # a relevant score is shared with another item: order ties by gallery index
                order = np.argsort(-sims[r], kind="stable")
                position = np.empty(n_gallery, dtype=np.int64)
                position[order] = np.arange(n_gallery)
                ranks[a:b] = position[gidx[a:b]] + 1
            else:
                ranks[a:b] = len(seg) - right + 1

    pool.map_rows(work, np.ones(n_rows))
    return ranks


def _encode_labels(
    query_labels: list, gallery_labels: list
) -> tuple[np.ndarray, np.ndarray, int]:
    vocab: dict[Any, int] = {}
    qc = np.fromiter(
        (vocab.setdefault(x, len(vocab)) for x in query_labels),
        dtype=np.int64,
        count=len(query_labels),
    )
    gc = np.fromiter(
        (vocab.setdefault(x, len(vocab)) for x in gallery_labels),
        dtype=np.int64,
        count=len(gallery_labels),
    )
    return qc, gc, len(vocab)


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
    n_q, n_g = qt.shape[0], gt.shape[0]
    q_lab = as_list(query_labels, n_q, "query_labels", "labels")
    g_lab = q_lab if loo else as_list(gallery_labels, n_g, "gallery_labels", "labels")
    groups = (
        None if query_groups is None else as_list(query_groups, n_q, "query_groups", "groups")
    )
    qc, gc, n_classes = _encode_labels(q_lab, [] if loo else g_lab)
    if loo:
        gc = qc
    classes = _GalleryClasses.of(gc, n_classes)
    chunk = _check_chunk(chunk_size, n_q, n_g, int(classes.count[qc].max()))
    acc = _PerQuery.empty(n_q, map_at_ks)
    block = torch.empty((chunk, n_g), dtype=torch.float32)
    pool = _Pool()
    try:
        for start in range(0, n_q, chunk):
            stop = min(n_q, start + chunk)
            rows, gidx = classes.relevant_pairs(qc[start:stop], start, loo)
            if len(rows) == 0:
                continue
            sims_t = block[: stop - start]
            torch.mm(qt[start:stop], gt.T, out=sims_t)
            sims = sims_t.numpy()
            if loo:
                sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
            acc.add_chunk(start, stop, rows, _relevant_ranks(sims, rows, gidx, pool), map_at_ks)
    finally:
        pool.close()
    n_rel = classes.count[qc] - (1 if loo else 0)
    return _report(acc, n_rel, groups, recall_ks, map_at_ks)


@dataclass
class _GalleryClasses:
    """Gallery indices grouped by class (ascending within each class)."""

    order: np.ndarray
    count: np.ndarray
    start: np.ndarray

    @classmethod
    def of(cls, gallery_codes: np.ndarray, n_classes: int) -> "_GalleryClasses":
        count = np.bincount(gallery_codes, minlength=n_classes)
        return cls(np.argsort(gallery_codes, kind="stable"), count, np.cumsum(count) - count)

    def relevant_pairs(self, codes: np.ndarray, start: int, loo: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(row in chunk, gallery index)`` of every relevant pair of a chunk of queries
        (rows non-decreasing); leave-one-out drops each query itself."""
        cnt = self.count[codes]
        total = int(cnt.sum())
        rows = np.repeat(np.arange(len(codes)), cnt)
        offsets = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        gidx = self.order[np.repeat(self.start[codes], cnt) + offsets]
        if loo:
            keep = gidx != rows + start
            rows, gidx = rows[keep], gidx[keep]
        return rows, gidx


@dataclass
class _PerQuery:
    """Per-query values (NaN / 0 until a query's chunk is scored)."""

    ap: np.ndarray
    ap_r: np.ndarray
    r_prec: np.ndarray
    ap_k: dict[int, np.ndarray]
    first: np.ndarray

    @classmethod
    def empty(cls, n_q: int, map_at_ks: list[int]) -> "_PerQuery":
        return cls(np.full(n_q, np.nan), np.full(n_q, np.nan), np.full(n_q, np.nan),
                   {k: np.full(n_q, np.nan) for k in map_at_ks}, np.zeros(n_q, dtype=np.int64))

    def add_chunk(self, start: int, stop: int, rows: np.ndarray, ranks: np.ndarray,
                  map_at_ks: list[int]) -> None:
        """Fill queries ``start:stop`` from the 1-based ``ranks`` of their relevant items."""
        c = stop - start
        order = np.lexsort((ranks, rows))  # ranks ascending within each row
        rows, ranks = rows[order], ranks[order]
        counts = np.bincount(rows, minlength=c)
        row_start = np.cumsum(counts) - counts
        m = np.arange(len(rows)) - row_start[rows] + 1  # i-th relevant item of its row
        prec = m / ranks
        valid = counts > 0
        idx = np.arange(start, stop)[valid]
        r = counts[valid].astype(np.float64)
        self.ap[idx] = np.bincount(rows, weights=prec, minlength=c)[valid] / r
        within_r = ranks <= counts[rows]
        self.ap_r[idx] = np.bincount(rows, weights=prec * within_r, minlength=c)[valid] / r
        self.r_prec[idx] = np.bincount(rows, weights=within_r, minlength=c)[valid] / r
        for k in map_at_ks:
            s = np.bincount(rows, weights=prec * (ranks <= k), minlength=c)[valid]
            self.ap_k[k][idx] = s / np.minimum(r, k)
        self.first[idx] = ranks[row_start[valid]]


def _mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else float("nan")


def _report(acc: _PerQuery, n_rel: np.ndarray, groups: list | None, recall_ks: list[int],
            map_at_ks: list[int]) -> RetrievalReport:
    n_q = len(n_rel)
    evaluated = n_rel > 0
    n_eval = int(evaluated.sum())
    n_skipped = n_q - n_eval
    if n_skipped:
        logger.debug("retrieval_metrics: %d of %d queries have no relevant item", n_skipped, n_q)
    if n_eval == 0:
        logger.warning("retrieval_metrics: no query has a relevant gallery item; metrics are NaN")
    hit1 = (acc.first == 1).astype(np.float64)
    per_group: dict[str, dict[str, float | int]] = {}
    if groups is not None:
        garr = np.array([None if g is None else str(g) for g in groups], dtype=object)
        for name in sorted({str(g) for g in groups if g is not None}):
            mask = (garr == name) & evaluated
            per_group[name] = {"map": _mean(acc.ap, mask), "map_at_r": _mean(acc.ap_r, mask),
                               "precision_at_1": _mean(hit1, mask), "num_queries": int(mask.sum())}
    return RetrievalReport(
        map=_mean(acc.ap, evaluated),
        map_at_r=_mean(acc.ap_r, evaluated),
        precision_at_1=_mean(hit1, evaluated),
        recall_at_k={str(k): _mean(((acc.first >= 1) & (acc.first <= k)).astype(np.float64), evaluated)
                     for k in recall_ks},
        map_at_k={str(k): _mean(acc.ap_k[k], evaluated) for k in map_at_ks},
        num_queries=n_eval,
        num_skipped_queries=n_skipped,
        per_group=per_group,
        r_precision=_mean(acc.r_prec, evaluated),
        average_precisions=acc.ap,
        average_precisions_at_r=acc.ap_r,
        first_relevant_rank=acc.first,
        num_relevant=np.maximum(n_rel, 0).astype(np.int64),
    )


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
