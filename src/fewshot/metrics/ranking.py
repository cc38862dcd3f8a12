"""How :func:`fewshot.metrics.retrieval_metrics` ranks: the 1-based rank of every relevant gallery
item of a block of queries under the stable descending order (ties by gallery index), found
without sorting whole rows (see the module docstring of :mod:`fewshot.metrics.retrieval`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["GalleryClasses", "RowPool", "encode_labels", "relevant_ranks"]


class RowPool:
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


def relevant_ranks(
    sims: np.ndarray, rows: np.ndarray, gidx: np.ndarray, pool: RowPool
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


def encode_labels(
    query_labels: list, gallery_labels: list
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(query codes int64 [Q], gallery codes int64 [G], number of labels)``: labels mapped
    to shared integer codes (in order of first appearance)."""
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


@dataclass
class GalleryClasses:
    """Gallery indices grouped by class (ascending within each class)."""

    order: np.ndarray
    count: np.ndarray
    start: np.ndarray

    @classmethod
    def of(cls, gallery_codes: np.ndarray, n_classes: int) -> "GalleryClasses":
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
