"""The retrieval report: per-query values gathered block by block (:class:`PerQuery`) and their
means over the evaluated queries, overall and per group (:class:`RetrievalReport`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PerQuery", "RetrievalReport", "build_report"]

logger = logging.getLogger("fewshot")


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


@dataclass
class PerQuery:
    """Per-query values (NaN / 0 until a query's chunk is scored)."""

    ap: np.ndarray
    ap_r: np.ndarray
    r_prec: np.ndarray
    ap_k: dict[int, np.ndarray]
    first: np.ndarray

    @classmethod
    def empty(cls, n_q: int, map_at_ks: list[int]) -> "PerQuery":
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


def build_report(acc: PerQuery, n_rel: np.ndarray, groups: list | None, recall_ks: list[int],
                 map_at_ks: list[int]) -> RetrievalReport:
    """The report of every query's values in ``acc``; ``n_rel`` int64 ``[Q]`` relevant items per
    query (a query with none is skipped), ``groups`` ``Q`` group names or ``None``."""
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
