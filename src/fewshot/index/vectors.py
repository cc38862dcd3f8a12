"""Growable in-memory state of a catalogue: exact vectors by id, prototypes by article.

Both grow by appending into buffers that double their capacity, so enrolling an article costs
time proportional to its own images, not to the catalogue (amortised).
"""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``float32 [N, D]`` (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def normalized_copy(x: np.ndarray, rows: int = 65_536) -> np.ndarray:
    """:func:`l2_normalize` of ``x [N, D]`` (an array or a memory map) into one new
    ``float32`` array, a block of ``rows`` at a time: no second full-size temporary."""
    out = np.empty(x.shape, np.float32)
    for start in range(0, len(x), rows):
        out[start:start + rows] = l2_normalize(x[start:start + rows])
    return out


class Growable:
    """A ``[n, *shape]`` array with amortised O(rows) appends."""

    def __init__(self, shape: tuple[int, ...], dtype, capacity: int = 16) -> None:
        self._buf = np.zeros((max(1, capacity), *shape), dtype=dtype)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._buf):
            grown = np.zeros((max(need, 2 * len(self._buf)), *self._buf.shape[1:]), self._buf.dtype)
            grown[:self.n] = self._buf[:self.n]
            self._buf = grown
        self._buf[self.n:need] = rows
        self.n = need

    @property
    def view(self) -> np.ndarray:
        """The ``n`` rows (a view: valid until the next append)."""
        return self._buf[:self.n]

    def pop_into(self, i: int) -> None:
        """Move the last row into row ``i`` and drop the last row (swap-remove, O(row))."""
        self._buf[i] = self._buf[self.n - 1]
        self.n -= 1


class VectorStore:
    """Exact L2-normalised image vectors by FAISS id.

    ``base``: ``float32 [n0, D]`` rows (an array or a read-only memory map of ``vectors.npy``)
    for the sorted ids ``base_ids int64 [n0]``; later vectors get consecutive ids from
    ``first_new`` and live in a growable buffer.
    """

    def __init__(self, base: np.ndarray, base_ids: np.ndarray, first_new: int) -> None:
        self.base, self.base_ids = base, np.asarray(base_ids, np.int64)
        self.first_new = int(first_new)
        self.new = Growable((base.shape[1],), np.float32)

    def append(self, vectors: np.ndarray) -> np.ndarray:
        """Store normalised ``vectors [n, D]``; returns their ids ``int64 [n]``."""
        start = self.first_new + self.new.n
        self.new.append(vectors)
        return np.arange(start, start + len(vectors), dtype=np.int64)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids int64 [k]`` (each a stored id), ``float32 [k, D]``."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.base.shape[1]), np.float32)
        old = ids < self.first_new
        if old.any():
            rows = np.searchsorted(self.base_ids, ids[old])
            order = np.argsort(rows, kind="stable")  # memory maps read best in file order
            got = np.empty((len(rows), self.base.shape[1]), np.float32)
            got[order] = self.base[rows[order]]
            out[old] = got
        if (~old).any():
            out[~old] = self.new.view[ids[~old] - self.first_new]
        return out


class Prototypes:
    """Per-article sums of normalised image vectors, image counts and the normalised
    prototypes (Snell et al. 2017: the mean embedding, re-normalised for cosine)."""

    def __init__(self, dim: int) -> None:
        self.sums = Growable((dim,), np.float32)
        self.normed = Growable((dim,), np.float32)
        self.counts = Growable((), np.int64)

    def __len__(self) -> int:
        return self.counts.n

    def append(self, total: np.ndarray, count: int) -> None:
        """A new article with ``total float32 [D]`` (sum of its normalised vectors)."""
        self.sums.append(total[None])
        self.normed.append(l2_normalize(total[None]))
        self.counts.append(np.array([count], np.int64))

    def update(self, a: int, delta: np.ndarray, count: int) -> None:
        """Add ``delta float32 [D]`` and ``count`` images to article ``a``: one row written."""
        self.sums.view[a] += delta
        self.counts.view[a] += count
        self.normed.view[a] = l2_normalize(self.sums.view[a][None])[0]

    def swap_remove(self, a: int) -> None:
        """Drop article ``a``; the last article takes its row."""
        for g in (self.sums, self.normed, self.counts):
            g.pop_into(a)
