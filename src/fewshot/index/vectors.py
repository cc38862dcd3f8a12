"""State of a catalogue: exact vectors by id, prototypes by article.

Both grow by appending into buffers that double their capacity, so enrolling an article costs
time proportional to its own images, not to the catalogue (amortised).
"""

from __future__ import annotations

import abc
import os

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


class RowFile:
    """Rows of a ``float32 [N, D]`` ``.npy`` file read on demand with ``os.pread``.

    Used instead of a memory map for the exact vectors of a loaded index: re-ranking reads a
    few rows per query, and a memory map makes whole page-cache folios (up to 2 MB) resident
    in the process per row touched (measured: 40 rows -> +71 MB RSS), so a 1M-image
    catalogue's 5 GB file became resident after a hundred queries. Rows are read in file order,
    whatever order they are asked in, and consecutive rows with one call.
    """

    def __init__(self, path) -> None:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            self.offset = fh.tell()
        if dtype != np.float32 or fortran or len(shape) != 2:
            raise ValueError(f"{path} holds {dtype} {shape}, not float32 [N, D] in C order")
        self.shape = tuple(shape)
        self.ndim = 2
        self._row = self.shape[1] * 4
        size = os.stat(path).st_size
        if size != self.offset + self.shape[0] * self._row:  # checked here, not at the first read
            raise ValueError(f"{path} is truncated or padded: {size} bytes for float32 {self.shape}")
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        got = np.empty_like(out)
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)]):
            data = os.pread(self._fd, int(b - a) * self._row, self.offset + int(ordered[a]) * self._row)
            got[a:b] = np.frombuffer(data, np.float32).reshape(int(b - a), self.shape[1])
        out[order] = got
        return out


class VectorStore:
    """Exact L2-normalised image vectors by FAISS id.

    ``base``: ``float32 [n0, D]`` rows (an array, or a :class:`RowFile` of ``vectors.npy``)
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
            out[old] = self.base[np.searchsorted(self.base_ids, ids[old])]
        if (~old).any():
            out[~old] = self.new.view[ids[~old] - self.first_new]
        return out


class _PrototypeRows(abc.ABC):
    """What both prototype stores share: per-article image counts and the updates that are
    written in terms of an article's sum of normalised image vectors."""

    counts: Growable

    def __len__(self) -> int:
        return self.counts.n

    def append(self, total: np.ndarray, count: int) -> None:
        """A new article with ``total float32 [D]`` (sum of its normalised vectors)."""
        self.extend(total[None], np.array([count]))

    def update(self, a: int, delta: np.ndarray, count: int) -> None:
        """Add ``delta float32 [D]`` and ``count`` images to article ``a``: one row written."""
        self._set(a, self.sum_of(a).astype(np.float64) + delta)
        self.counts.view[a] += count

    @abc.abstractmethod
    def extend(self, totals: np.ndarray, counts: np.ndarray) -> None:
        """See the subclasses."""

    @abc.abstractmethod
    def sum_of(self, a: int) -> np.ndarray:
        """See the subclasses."""

    @abc.abstractmethod
    def _set(self, a: int, total: np.ndarray) -> None:
        """See the subclasses."""


class Prototypes(_PrototypeRows):
    """Per-article normalised prototypes in memory (Snell et al. 2017: the mean embedding,
    re-normalised for cosine), for the exact scan of a flat catalogue, with the norm of each
    article's sum of normalised image vectors and its image count: ``sum = normed * norm``, so
    the sums take no memory of their own (at 200,000 articles of 1,280-d, 1 GB saved)."""

    def __init__(self, dim: int) -> None:
        self.normed = Growable((dim,), np.float32)
        self.norms = Growable((), np.float64)
        self.counts = Growable((), np.int64)

    def extend(self, totals: np.ndarray, counts: np.ndarray) -> None:
        """New articles with ``totals float32 [k, D]`` (sums of their normalised vectors)."""
        totals = np.asarray(totals, np.float32).reshape(len(counts), -1)
        self.norms.append(np.linalg.norm(totals.astype(np.float64), axis=1))
        self.normed.append(l2_normalize(totals))
        self.counts.append(np.asarray(counts, np.int64))

    def sum_of(self, a: int) -> np.ndarray:
        """Article ``a``'s sum of normalised image vectors, ``float32 [D]``."""
        return (self.normed.view[a] * self.norms.view[a]).astype(np.float32)

    def sums(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the sums, ``float32 [k, D]``."""
        return (self.normed.view[start:stop] * self.norms.view[start:stop, None]).astype(np.float32)

    def normed_rows(self, rows: np.ndarray) -> np.ndarray:
        """The normalised prototypes of articles ``rows int64 [k]``, ``float32 [k, D]``."""
        return self.normed.view[np.asarray(rows, np.int64)]

    def _set(self, a: int, total: np.ndarray) -> None:
        norm = float(np.linalg.norm(total))
        self.norms.view[a] = norm
        self.normed.view[a] = (total / max(norm, 1e-12)).astype(np.float32)

    def swap_remove(self, a: int) -> None:
        """Drop article ``a``; the last article takes its row."""
        for g in (self.normed, self.norms, self.counts):
            g.pop_into(a)


class OnDemandPrototypes(_PrototypeRows):
    """Per-article prototype sums read on demand, for an approximate catalogue, whose
    prototype search re-ranks a shortlist (:meth:`fewshot.index.CatalogueIndex.classify`) and
    so never needs them all at once.

    ``base``: the sums ``float32 [C0, D]`` as saved (a :class:`RowFile` of
    ``prototype_sums.npy``, or an array right after a build); the rows changed since (updates,
    new articles, swap-removals) live in memory, so memory grows with the changes, not with
    the catalogue: at 200,000 articles of 1,280-d the in-memory store would take 1 GB.
    """

    def __init__(self, base, counts: np.ndarray) -> None:
        self.base = base
        self.counts = Growable((), np.int64, capacity=len(counts) + 16)
        self.counts.append(np.asarray(counts, np.int64))
        self._changed: dict[int, np.ndarray] = {}

    def extend(self, totals: np.ndarray, counts: np.ndarray) -> None:
        """New articles with ``totals float32 [k, D]`` (sums of their normalised vectors)."""
        totals = np.asarray(totals, np.float32).reshape(len(counts), -1)
        for i, row in enumerate(totals, len(self)):
            self._changed[i] = row.copy()
        self.counts.append(np.asarray(counts, np.int64))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The sums of articles ``rows int64 [k]`` (each ``< len(self)``), ``float32 [k, D]``."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.base.shape[1]), np.float32)
        in_base = rows < len(self.base)
        if in_base.any():
            out[in_base] = self.base[rows[in_base]]
        if self._changed:
            for i, a in enumerate(rows.tolist()):
                row = self._changed.get(a)
                if row is not None:
                    out[i] = row
        return out

    def sum_of(self, a: int) -> np.ndarray:
        """Article ``a``'s sum of normalised image vectors, ``float32 [D]``."""
        return self.rows(np.array([a]))[0]

    def sums(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the sums, ``float32 [k, D]``."""
        return self.rows(np.arange(start, stop))

    def normed_rows(self, rows: np.ndarray) -> np.ndarray:
        """The normalised prototypes of articles ``rows int64 [k]``, ``float32 [k, D]``."""
        return l2_normalize(self.rows(rows))

    def _set(self, a: int, total: np.ndarray) -> None:
        self._changed[a] = np.asarray(total, np.float32)

    def swap_remove(self, a: int) -> None:
        """Drop article ``a``; the last article takes its row."""
        last = len(self) - 1
        if a != last:
            self._changed[a] = self.sum_of(last)
        self._changed.pop(last, None)
        self.counts.pop_into(a)
