"""A searchable catalogue: a FAISS image index over L2-normalised embeddings plus per-article
prototypes, for catalogues from a few images to millions.

The catalogue is the support set of the main job: a few labelled photos per article. New
photos are classified by cosine similarity either to each article's prototype (the mean of
its L2-normalised embeddings, re-normalised; Snell et al. 2017) or to its nearest catalogue
image (the article's score is its best image's score). The image index is exact (``flat``)
or approximate (``ivfpq``, ``hnsw``: :mod:`fewshot.index.ann`). A flat index keeps every
prototype in memory and scans them exactly; an approximate one reads prototype rows from disk
on demand and ranks the articles of the nearest images (a shortlist) by their exact prototype
cosine, so that its memory does not grow with the number of articles.

Enrolling or removing an article changes only that article: its images are appended to the
image index (removed ones become tombstones, masked at query time), its prototype row is
updated, and :meth:`CatalogueIndex.append_change` persists the change as one journal entry
(:mod:`fewshot.index.journal`) instead of rewriting the folder. :meth:`CatalogueIndex.save`
writes the whole folder (compaction).

On disk (format 2; ``save`` writes the folder atomically as a whole)::

    INDEX_DIR/meta.json            labels, groups, paths and content digests (SHA-256) per image;
                                   config (backbone, run, model weights digest); index type; version
    INDEX_DIR/vectors.npy          float32 [N, D] exact normalised image vectors (rows read on demand)
    INDEX_DIR/ids.npy              int64 [N] each image's id in images.faiss (sorted)
    INDEX_DIR/prototype_sums.npy   float32 [C, D] per article, the sum of its image vectors
                                   (read on demand for ivfpq / hnsw)
    INDEX_DIR/images.faiss         the ivfpq / hnsw index (a flat index is rebuilt from vectors.npy)
    INDEX_DIR/journal/             changes since the base files (replayed by ``load``)

Format 1 folders (``images.faiss`` flat, ``prototypes.faiss``, ``meta.json``) still load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from ..version import __version__
from ..checks import positive_int
from ..errors import CheckpointError, DataError, FewshotError, FolderBusyError
from ..io import atomic_dir, recover_dir, writer_lock
from . import ann
from .ann import BLAS_MIN_QUERIES, INDEX_TYPES, AnnConfig, faiss_blas_setting
from .journal import Change, Journal
from .vectors import Growable, OnDemandPrototypes, Prototypes, RowFile, VectorStore, l2_normalize, normalized_copy

__all__ = ["AnnConfig", "BLAS_MIN_QUERIES", "ENROLLED_DIR", "CatalogueIndex", "Change", "INDEX_FILES", "INDEX_TYPES",
           "MODES", "Neighbor", "Prediction", "check_classify", "faiss_blas_setting", "is_index_dir", "l2_normalize"]

FORMAT_VERSION = 2
#: sub-folder of an index folder with the photos ``fewshot serve`` enrolled (kept by ``save``)
ENROLLED_DIR = "enrolled"
#: the service's append-only log of changes (:class:`fewshot.serve.security.AuditLog`), kept by every save
AUDIT_FILE = "audit.jsonl"
#: prototype search of an approximate index (:meth:`CatalogueIndex._shortlist`): the articles
#: of the nearest max(SHORTLIST_MIN, SHORTLIST_PER_RESULT x k) images are re-ranked exactly
#: (100: on Grocery, 81 articles, the top-5 of a 50-image shortlist missed an article of the
#: exact top-5 for 3 of 2,485 test photos; 100 gave the flat scan's top-5 accuracy exactly)
SHORTLIST_MIN = 100
SHORTLIST_PER_RESULT = 10
#: queries per shortlist batch (their candidate prototypes are read together)
SHORTLIST_BATCH = 256
log = logging.getLogger("fewshot")


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


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def is_index_dir(path: str | Path) -> bool:
    """Whether ``path`` is an index folder written by :meth:`CatalogueIndex.save` (its
    ``meta.json`` records a format and a fewshot version, and its vectors are there)."""
    meta = _read_meta(Path(path))
    return (meta is not None and "format_version" in meta and "fewshot_version" in meta
            and any((Path(path) / f).is_file() for f in ("vectors.npy", "images.faiss")))


#: what an index folder holds at its top level (the service adds ``enrolled/``)
INDEX_FILES = frozenset({"meta.json", "images.faiss", "prototypes.faiss", "vectors.npy", "ids.npy",
                         "prototype_sums.npy", "journal", "enrolled", "audit.jsonl"})


@dataclass
class CatalogueIndex:
    """Catalogue embeddings with their labels, groups, paths and per-article prototypes.

    Build with :meth:`build`; all vectors are stored L2-normalised, ``float32``. Images are
    addressed by position ``0..N-1`` (the order of ``labels``); removing an article shifts
    the later positions down.

    Attributes:
        dim: embedding dimension ``D``.
        labels, groups, paths: per catalogue image, aligned with the image positions.
        config: how the embeddings were made (backbone, model run, image size, data, split).
        ann: the image index type and its build / query parameters.
        articles, article_groups: per article, in prototype order.
        image_article: int64 ``[N]``: each image's position in ``articles``.
        digests: SHA-256 of each catalogue image's file (``None`` where unknown); finds queries
            that are catalogue images (:meth:`find_images`).
    """

    dim: int
    labels: list[str]
    groups: list[str | None]
    paths: list[str]
    config: dict = field(default_factory=dict)
    ann: AnnConfig = field(default_factory=AnnConfig)
    image_index: faiss.Index | None = None
    articles: list[str] = field(default_factory=list)
    article_groups: list[str | None] = field(default_factory=list)
    image_article: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    digests: list[str | None] = field(default_factory=list)
    #: int64 ``[N]``: each position's id in ``image_index`` (sorted; gaps are tombstones)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _vectors: VectorStore | None = field(default=None, repr=False)
    _protos: Prototypes | None = field(default=None, repr=False)
    _article_of: dict[str, int] = field(default_factory=dict, repr=False)
    _alive: Growable | None = field(default=None, repr=False)
    _by_digest: dict[str, list[int]] | None = field(default=None, repr=False)
    #: growable buffers behind ``ids`` / ``image_article`` (``None`` after a removal)
    _position_bufs: tuple[Growable, Growable] | None = field(default=None, repr=False)
    #: the folder this index was loaded from or last saved to: where its enrolled photos are
    folder: Path | None = field(default=None, repr=False)
    #: :func:`_folder_state` of ``folder`` when this index last read or wrote it
    _seen: tuple | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(cls, vectors: np.ndarray, labels: Sequence[str], groups: Sequence[str | None],
              paths: Sequence[str | Path], config: dict | None = None,
              digests: Sequence[str | None] | None = None, ann_config: AnnConfig | None = None,
              progress: Callable[[int], None] | None = None) -> "CatalogueIndex":
        """Index ``vectors float32 [N, D]`` (normalised here, into one copy; a memory map is
        read block by block) with per-image metadata.

        ``digests``: the SHA-256 of each image file (:func:`fewshot.embed.read_digests`).
        ``ann_config``: the image index type (default exact ``flat``; ``auto`` picks by size).

        Raises:
            DataError: no vectors, metadata lengths that differ from ``N``, or index options
                that do not fit the catalogue (:func:`fewshot.index.ann.resolve`).
        """
        vectors = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise DataError("cannot build an index from an empty catalogue",
                            hint="check --data / --split: no image was embedded")
        n = len(vectors)
        digests = list(digests) if digests is not None else [None] * n
        if not (len(labels) == len(groups) == len(paths) == len(digests) == n):
            raise DataError(f"catalogue metadata lengths differ: {n} vectors, {len(labels)} labels, "
                            f"{len(groups)} groups, {len(paths)} paths, {len(digests)} digests")
        resolved = ann.resolve(ann_config or AnnConfig(), n, vectors.shape[1])
        normed = normalized_copy(vectors)
        self = cls(dim=vectors.shape[1], labels=list(labels), groups=list(groups),
                   paths=[str(p) for p in paths], config=dict(config or {}), digests=digests,
                   ann=resolved, ids=np.arange(n, dtype=np.int64))
        self.image_index = ann.build(resolved, normed, progress)
        self._vectors = VectorStore(normed, self.ids, n)
        self._init_articles(None)
        return self

    def _init_articles(self, sums: np.ndarray | None, articles: list[str] | None = None) -> None:
        """Articles (in the order ``articles`` when given, else first appearance),
        ``image_article``, prototypes (from ``sums [C, D]`` in that order, or the vectors) and
        the alive bitmap, from the per-image metadata."""
        order: dict[str, int] = {}
        for label in (articles if articles is not None else self.labels):
            order.setdefault(label, len(order))
        self._article_of = order
        self.articles = list(order)
        group_of: dict[str, str | None] = {}
        for label, group in zip(self.labels, self.groups):
            group_of.setdefault(label, group)
        self.article_groups = [group_of[a] for a in self.articles]
        self.image_article = np.fromiter((order[lab] for lab in self.labels), np.int64, len(self.labels))
        self._position_bufs = None
        if sums is None:
            sums = np.zeros((len(order), self.dim), np.float32)
            for start in range(0, len(self.ids), ann.SHARD_ROWS):
                part = slice(start, start + ann.SHARD_ROWS)
                np.add.at(sums, self.image_article[part], self._vectors.get(self.ids[part]))
        counts = np.bincount(self.image_article, minlength=len(order))
        if self.ann.index_kind.prototypes_in_memory:  # an exact scan: every prototype in memory
            self._protos = Prototypes(self.dim)
            self._protos.extend(sums, counts)
        else:  # a shortlist re-ranked: prototype rows read on demand
            self._protos = OnDemandPrototypes(sums, counts)
        self._alive = Growable((), np.uint8, capacity=(self._vectors.first_new + self._vectors.new.n) // 8 + 1)
        self._mark_alive(self.ids)
        self._by_digest = None

    def image_vectors(self) -> np.ndarray:
        """The stored (normalised) image embeddings, ``float32 [N, D]``, by position."""
        assert self._vectors is not None
        return self._vectors.get(self.ids)

    @property
    def prototypes(self) -> np.ndarray:
        """The normalised article prototypes, ``float32 [C, D]`` (a view for a flat index; read
        whole, into a new array, for an approximate one, which keeps them on disk)."""
        assert self._protos is not None
        if isinstance(self._protos, Prototypes):
            return self._protos.normed.view
        return self._protos.normed_rows(np.arange(len(self._protos)))

    # ----------------------------------------------------------------- changes
    def add_article(self, label: str, group: str | None, vectors: np.ndarray,
                    paths: Sequence[str | Path], digests: Sequence[str | None] | None = None) -> None:
        """Add images of one article (new or existing) and update its prototype: appends to
        the image index and writes one prototype row (time independent of the catalogue size,
        except FAISS's amortised growth).

        ``digests``: the SHA-256 of each image file (``None`` = unknown). Callers that take
        labels from people check them first (:func:`fewshot.index.labels.clean_label`).

        Raises:
            TypeError: ``label`` is not a ``str`` or ``group`` neither a ``str`` nor ``None``
                (the saved index could not be read back).
            DataError: no vectors, wrong dimension, or paths that do not match the vectors.
        """
        if not isinstance(label, str) or not (group is None or isinstance(group, str)):
            raise TypeError(f"an article's label must be a str and its group a str or None, got "
                            f"{type(label).__name__} and {type(group).__name__}")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise DataError(f"article '{label}' has no images to add")
        if vectors.shape[1] != self.dim:
            raise DataError(f"embedding dimension {vectors.shape[1]} does not match the index's {self.dim}")
        digests = list(digests) if digests is not None else [None] * len(vectors)
        if not (len(paths) == len(digests) == len(vectors)):
            raise DataError(f"{len(paths)} paths and {len(digests)} digests for {len(vectors)} vectors")
        assert self._vectors is not None and self._protos is not None and self.image_index is not None
        normed = l2_normalize(vectors)
        new_ids = self._vectors.append(normed)
        self.ann.index_kind.add(self.image_index, normed, new_ids)
        a = self._article_of.get(label)
        if a is None:
            a = self._article_of[label] = len(self.articles)
            self.articles.append(label)
            self.article_groups.append(group)
            self._protos.append(normed.sum(axis=0), len(normed))
        else:
            self._protos.update(a, normed.sum(axis=0), len(normed))
        start = len(self.labels)
        self.labels += [label] * len(vectors)
        self.groups += [group] * len(vectors)
        self.paths += [str(p) for p in paths]
        self.digests += digests
        self._append_positions(new_ids, a)
        self._mark_alive(new_ids)
        if self._by_digest is not None:
            for pos, d in enumerate(digests, start):
                if d is not None:
                    self._by_digest.setdefault(d, []).append(int(self.ids[pos]))

    def _append_positions(self, new_ids: np.ndarray, a: int) -> None:
        """Append to ``ids`` and ``image_article`` in amortised O(len(new_ids))."""
        if self._position_bufs is None:
            bufs = (Growable((), np.int64, 2 * len(self.ids) + 16), Growable((), np.int64, 2 * len(self.ids) + 16))
            bufs[0].append(self.ids)
            bufs[1].append(self.image_article)
            self._position_bufs = bufs
        ids_buf, art_buf = self._position_bufs
        ids_buf.append(new_ids)
        art_buf.append(np.full(len(new_ids), a, np.int64))
        self.ids, self.image_article = ids_buf.view, art_buf.view

    def _mark_alive(self, ids: np.ndarray) -> None:
        """Set the alive bits of ``ids`` (growing the bitmap as needed)."""
        assert self._alive is not None
        if not len(ids):
            return
        need = int(ids.max()) // 8 + 1
        if need > self._alive.n:
            self._alive.append(np.zeros(need - self._alive.n, np.uint8))
        np.bitwise_or.at(self._alive.view, ids >> 3, (1 << (ids & 7)).astype(np.uint8))

    def remove_article(self, label: str) -> int:
        """Remove every image of an article; returns how many were removed. The images become
        tombstones in the image index; the last article takes the removed one's prototype row
        (so ``articles`` changes order).

        Raises:
            KeyError: the article is not in the catalogue.
        """
        a = self._article_of.get(label)
        if a is None:
            raise KeyError(label)
        assert self._alive is not None and self._protos is not None
        gone = np.flatnonzero(self.image_article == a)
        dead = self.ids[gone]
        gone_digests = {self.digests[p] for p in gone.tolist()} - {None}
        np.bitwise_and.at(self._alive.view, dead >> 3, (~(1 << (dead & 7))).astype(np.uint8))
        for lst in (self.labels, self.groups, self.paths, self.digests):
            for p in gone[::-1].tolist():
                del lst[p]
        self.ids = np.delete(self.ids, gone)
        self.image_article = np.delete(self.image_article, gone)
        self._position_bufs = None
        last = len(self.articles) - 1
        if a != last:  # swap-remove: the last article moves into row a
            self.image_article[self.image_article == last] = a
            self.articles[a], self.article_groups[a] = self.articles[last], self.article_groups[last]
            self._article_of[self.articles[a]] = a
        self._protos.swap_remove(a)
        self.articles.pop()
        self.article_groups.pop()
        del self._article_of[label]
        if self._by_digest is not None:
            dead_set = set(dead.tolist())
            for d in gone_digests:
                self._by_digest[d] = [i for i in self._by_digest.get(d, []) if i not in dead_set]
        return len(gone)

    def apply(self, change: Change) -> None:
        """Apply one journal :class:`Change` in memory."""
        if change.op == "add":
            self.add_article(change.label, change.group, change.vectors, change.paths, change.digests)
        elif change.op == "remove":
            self.remove_article(change.label)
        else:
            raise CheckpointError(f"unknown journal operation '{change.op}'", hint="rebuild the index")

    def append_change(self, path: str | Path, change: Change, *, owner: object | None = None) -> Path:
        """Persist ``change`` as one journal entry of the index folder ``path`` (durable when
        this returns), then apply it in memory. Writes only the change's own vectors.

        ``owner``: the holder of the folder's writer lock (:func:`fewshot.io.writer_lock`), when
        the caller holds it (a service); otherwise the lock is taken for this write.

        Raises:
            FolderBusyError: another writer holds the folder.
        """
        with writer_lock(path, "a catalogue change", owner=owner or self):
            in_step = self._tracks(Path(path)) and _folder_state(path) == self._seen
            entry = Journal(path).append(change)
            if in_step:  # the folder is as this index last saw it, plus this entry
                assert self._seen is not None
                self._seen = (*self._seen[:3], self._seen[3] + (entry.name,))
        self.apply(change)
        return entry

    # ----------------------------------------------------------------- querying
    def with_search(self, **options: int | None) -> "CatalogueIndex":
        """This index with other query-time options of its kind, e.g. ``nprobe`` or ``ef_search``
        (``None`` keeps the index's own; another kind's option is ignored with a warning:
        :meth:`AnnConfig.with_search`); returns ``self``.

        Raises:
            InputError (a ValueError): not a query-time option, or a value out of range.
        """
        self.ann = self.ann.with_search(**options)
        return self

    def __len__(self) -> int:
        return len(self.labels)

    def has_article(self, label: str) -> bool:
        return label in self._article_of

    def num_images(self, label: str) -> int:
        """Images of article ``label`` (0 when it is not in the catalogue)."""
        a = self._article_of.get(label)
        return 0 if a is None or self._protos is None else int(self._protos.counts.view[a])

    def article_group(self, label: str) -> str | None:
        """The group of article ``label``. Raises ``KeyError`` when it is not in the catalogue."""
        return self.article_groups[self._article_of[label]]

    def article_paths(self, label: str) -> list[str]:
        """The paths of article ``label``'s images (an O(N) scan)."""
        a = self._article_of.get(label)
        return [] if a is None else [self.paths[i] for i in np.flatnonzero(self.image_article == a).tolist()]

    @property
    def num_tombstones(self) -> int:
        """Removed images still in the image index (until the next :meth:`save`)."""
        assert self.image_index is not None
        return int(self.image_index.ntotal) - len(self.ids)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise CheckpointError(
                f"query embeddings have dimension {queries.shape[1]} but the index has {self.dim}",
                hint="embed queries with the backbone/model the index was built with")
        return l2_normalize(queries)

    def _search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], positions int64 [Q, k])`` of the nearest live images (``-1`` pads)."""
        assert self.image_index is not None and self._vectors is not None and self._alive is not None
        alive = self._alive.view if self.num_tombstones else None
        scores, ids = ann.search(self.image_index, self.ann, queries, k, alive=alive, exact=self._vectors.get)
        pos = np.searchsorted(self.ids, np.maximum(ids, 0))
        ok = (ids >= 0) & (pos < len(self.ids))
        ok[ok] = self.ids[pos[ok]] == ids[ok]
        return scores, np.where(ok, pos, -1)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Neighbor]]:
        """Nearest catalogue images for ``queries float32 [Q, D]`` (cosine, best first); ``k``
        at most the catalogue's size (0: none).

        Raises:
            TypeError / ValueError: ``k`` is not a whole number of at least 0.
        """
        k = positive_int(k, "k", minimum=0)
        queries = self._check_queries(queries)
        k = min(k, len(self.labels))
        if k == 0:
            return [[] for _ in range(len(queries))]
        scores, idx = self._search_images(queries, k)
        return [[Neighbor(self.paths[j], self.labels[j], self.groups[j], float(s))
                 for s, j in zip(srow, irow) if j >= 0] for srow, irow in zip(scores, idx)]

    def find_images(self, digests: Sequence[str | None]) -> list[list[int]]:
        """Catalogue images with the same content as each query: ``digests`` are the queries'
        file SHA-256 (``None`` = unknown); returns, per query, the positions of the catalogue
        images with that digest (empty when none)."""
        if self._by_digest is None:
            where: dict[str, list[int]] = {}
            for i, d in zip(self.ids.tolist(), self.digests):
                if d is not None:
                    where.setdefault(d, []).append(i)
            self._by_digest = where
        out = []
        for d in digests:
            ids = np.asarray(self._by_digest.get(d, []) if d is not None else [], np.int64)
            out.append(np.searchsorted(self.ids, ids).tolist())
        return out

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

    # ----------------------------------------------------------------- persistence
    def _meta(self) -> dict:
        return {"format_version": FORMAT_VERSION, "fewshot_version": __version__, "dim": self.dim,
                "num_images": len(self.labels), "num_articles": len(self.articles),
                "index_type": self.ann.kind, "index": self.ann.to_dict(), "config": self.config,
                "articles": self.articles,
                "labels": self.labels, "groups": self.groups, "paths": self.paths, "digests": self.digests}

    def save(self, path: str | Path, *, owner: object | None = None) -> Path:
        """Write the index folder atomically (the old folder survives a crash): the base files
        with every change so far, and no journal (compaction). An ``ivfpq`` index drops its
        tombstones here; an ``hnsw`` graph keeps them masked (FAISS cannot remove from it).

        Holds the folder's writer lock (:func:`fewshot.io.writer_lock`) while it writes;
        ``owner``: its holder when the caller holds it already (a service, ``fewshot index``).

        Raises:
            DataError: the catalogue has no images (such a folder could not be loaded again).
            FolderBusyError: another writer holds the folder.
            CheckpointError: ``path`` is the folder this index was loaded from and another
                process changed it since (a service enrolled or deleted, a rebuild): saving
                would undo those changes and drop their enrolled photos.
        """
        if not self.labels:
            raise DataError(f"the catalogue has no images: an empty index cannot be saved to {path}",
                            hint="add an article first")
        with writer_lock(path, "saving a catalogue index", owner=owner or self):
            self._check_unchanged(Path(path))
            out = self._save(Path(path))
            self._seen = _folder_state(out)
            return out

    def _tracks(self, path: Path) -> bool:
        """Whether ``path`` is the folder this index came from, with its state recorded."""
        return self.folder is not None and self._seen is not None and Path(self.folder).resolve() == path.resolve()

    def _check_unchanged(self, path: Path) -> None:
        """Refuse to save over the folder this index came from when it changed since."""
        if self._tracks(path) and _folder_state(path) != self._seen:
            raise CheckpointError(
                f"{path} has changed since this catalogue was loaded from it (another process enrolled or "
                "removed articles, or rebuilt it): saving now would undo those changes",
                hint="load the folder again and repeat your changes, or save to another folder")

    def _save(self, path: Path) -> Path:
        assert self.image_index is not None and self._vectors is not None and self._alive is not None
        if self.num_tombstones:
            self.ann.index_kind.compact(self.image_index, self.ids, self._vectors.first_new + self._vectors.new.n)
        origin = self.folder or path
        with atomic_dir(path) as tmp:
            self._write_vectors(tmp / "vectors.npy")
            np.save(tmp / "ids.npy", self.ids)
            self._write_rows(tmp / "prototype_sums.npy", len(self._protos), self._protos.sums)
            if self.ann.index_kind.saves_index:
                faiss.write_index(self.image_index, str(tmp / "images.faiss"))
            self.paths = self._carry_enrolled(origin, tmp, path)
            _carry_file(AUDIT_FILE, [Path(origin), path], tmp)
            (tmp / "meta.json").write_text(json.dumps(self._meta(), indent=1, default=str), encoding="utf-8")
        self.folder = path
        return path

    def enrolled_files(self, folder: str | Path) -> list[Path]:
        """The distinct photos under ``folder/enrolled/`` that the index references: the
        service's enrolments, stored relative to the folder (``enrolled/...``) or, by fewshot
        before 2026-12, as absolute paths. String prefixes only, no file-system call per image."""
        root = Path(folder).resolve() / ENROLLED_DIR
        relative, absolute = ENROLLED_DIR + "/", str(root) + os.sep
        return [root.parent / p if p.startswith(relative) else Path(p)
                for p in dict.fromkeys(self.paths) if p.startswith(relative) or p.startswith(absolute)]

    def _carry_enrolled(self, old: Path, new: Path, fallback: Path) -> list[str]:
        """Hard-link (or copy) into the new folder the enrolled photos the index references
        (:meth:`enrolled_files` of ``old``, the folder the index came from, which may be another
        folder than the one being written); photos of removed articles are left behind with the
        old folder. Returns :attr:`paths` with each enrolled photo as ``enrolled/...``, relative
        to the new folder (an absolute path of before 2026-12 included). A photo missing from
        ``old`` is taken from ``fallback``, the folder being replaced (whose enrolled articles a
        rebuild keeps, :func:`fewshot.pipeline.build_index`)."""
        base, fallback = Path(old).resolve(), Path(fallback).resolve()
        moved: dict[str, str] = {}  # absolute path of before 2026-12 -> enrolled/...
        for src in self.enrolled_files(old):
            rel = src.relative_to(base)
            moved[str(src)] = rel.as_posix()
            if not src.is_file() and (fallback / rel).is_file():  # carried from the folder being replaced
                src = fallback / rel
            if not src.is_file():  # pragma: no cover - the folder was edited by hand
                log.warning("enrolled image %s is missing from the index folder", src)
                continue
            dst = new / rel
            _link_or_copy(src, dst)
        return [moved.get(p, p) for p in self.paths]  # an ``enrolled/...`` path is already relative

    def _write_vectors(self, path: Path) -> None:
        """``vectors.npy`` (float32 [N, D], by position)."""
        assert self._vectors is not None
        self._write_rows(path, len(self.ids), lambda a, b: self._vectors.get(self.ids[a:b]))

    def _write_rows(self, path: Path, n: int, rows: Callable[[int, int], np.ndarray]) -> None:
        """A ``float32 [n, D]`` ``.npy`` written block by block (``rows(start, stop)``) with plain
        file writes: a memory map would keep every written page resident in this process."""
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                      "shape": (n, self.dim)})
            for start in range(0, n, ann.SHARD_ROWS):
                fh.write(np.ascontiguousarray(rows(start, min(n, start + ann.SHARD_ROWS)), np.float32).tobytes())

    @classmethod
    def load(cls, path: str | Path) -> "CatalogueIndex":
        """Read an index folder written by :meth:`save` and replay its journal.

        Raises:
            CheckpointError: the folder is missing, incomplete, damaged or inconsistent.
        """
        path = Path(path)
        if not path.exists():
            _recover_or_wait(path)
        _check_folder(path)
        seen = _folder_state(path)  # before reading: a change made meanwhile makes a later save refuse
        meta = _read_meta(path)
        if meta is None:
            raise CheckpointError(f"index folder {path} is damaged: meta.json cannot be read",
                                  hint="rebuild it with `fewshot index`")
        version = meta.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise CheckpointError(f"index {path} has format {version}, expected {FORMAT_VERSION}",
                                  hint="rebuild it with this version of fewshot")
        try:
            self = _load_v1(path, meta) if version == 1 else _load_v2(path, meta)
            for change in Journal(path).read():
                self.apply(change)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"index folder {path} is damaged: {exc}",
                                  hint="rebuild it with `fewshot index`") from exc
        self.folder = path
        self._seen = seen
        return self


def _folder_state(path: Path) -> tuple | None:
    """What tells whether an index folder changed: its ``meta.json`` (a save writes a new one)
    and the names of its journal entries (each change adds one)."""
    try:
        st = (path / "meta.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, tuple(p.name for _, p in Journal(path).sequence())


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst`` (a copy where the file system has no hard links)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_file(name: str, folders: list[Path], new: Path) -> None:
    """Hard-link (or copy) ``name`` from the first of ``folders`` that has it into ``new``."""
    for folder in folders:
        src = folder / name
        if src.is_file():
            _link_or_copy(src, new / name)
            return


def _recover_or_wait(path: Path, wait_s: float = 10.0) -> None:
    """A missing index folder: a writer may be between the two renames of its save (then wait
    for it, up to ``wait_s``), or one was killed there (then put its old folder back, under
    the writer lock, so that no live writer's rename is undone)."""
    import time

    if not path.parent.is_dir() or not any(path.parent.glob(f".{path.name}.*")):
        return  # no save was ever under way here (and no folder is made for a mistyped path)
    deadline = time.monotonic() + wait_s
    while not path.exists():
        try:
            with writer_lock(path, "recovering an interrupted save"):
                if recover_dir(path):
                    log.warning("recovered index %s from an interrupted save", path)
                return
        except FolderBusyError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        except FewshotError:  # no lock file can be made (a read-only parent): nothing to recover here
            return


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"index folder {path} " + ("is a file, not a folder" if path.exists() else "does not exist"),
                              hint="build one with `fewshot index --data ... --out DIR`")
    if not (path / "meta.json").is_file() and not (path / "images.faiss").is_file():
        raise CheckpointError(f"{path} is not a fewshot index (no meta.json or images.faiss)",
                              hint="pass --index the folder written by `fewshot index --out DIR`")
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"index folder {path} is incomplete: meta.json is missing",
                              hint="rebuild it with `fewshot index`")


def _metadata(path: Path, meta: dict, n: int) -> tuple[list, list, list, list]:
    labels, groups, paths = meta["labels"], meta["groups"], meta["paths"]
    digests = meta.get("digests") or [None] * len(labels)
    if not (n == len(labels) == len(groups) == len(paths) == len(digests)):
        raise CheckpointError(f"index {path} is inconsistent: {n} vectors for {len(labels)} labels "
                              f"and {len(digests)} digests", hint="rebuild it with `fewshot index`")
    return labels, groups, paths, digests


def _load_v1(path: Path, meta: dict) -> CatalogueIndex:
    """A format-1 folder: a flat ``images.faiss`` holding the vectors."""
    if not (path / "images.faiss").is_file():
        raise CheckpointError(f"index folder {path} is incomplete: images.faiss is missing",
                              hint="rebuild it with `fewshot index`")
    flat = faiss.read_index(str(path / "images.faiss"))
    if flat.d != meta["dim"]:
        raise CheckpointError(f"index {path} is inconsistent: {flat.d}-d vectors, meta says {meta['dim']}",
                              hint="rebuild it with `fewshot index`")
    labels, groups, paths, digests = _metadata(path, meta, flat.ntotal)
    vectors = np.asarray(flat.reconstruct_n(0, flat.ntotal), np.float32) if flat.ntotal else np.zeros((0, flat.d), np.float32)
    ids = np.arange(flat.ntotal, dtype=np.int64)
    self = CatalogueIndex(dim=meta["dim"], labels=labels, groups=groups, paths=paths, config=meta.get("config", {}),
                          image_index=flat, digests=digests, ids=ids)
    self._vectors = VectorStore(vectors, ids, len(ids))
    self._init_articles(None)
    return self


def _load_v2(path: Path, meta: dict) -> CatalogueIndex:
    """A format-2 folder: ``vectors.npy`` (rows read on demand, :class:`RowFile`), ``ids.npy``,
    prototype sums and, for an approximate index, ``images.faiss``."""
    for name in ("vectors.npy", "ids.npy", "prototype_sums.npy"):
        if not (path / name).is_file():
            raise CheckpointError(f"index folder {path} is incomplete: {name} is missing",
                                  hint="rebuild it with `fewshot index`")
    config = AnnConfig.from_dict(meta.get("index"))
    vectors = RowFile(path / "vectors.npy")
    ids = np.load(path / "ids.npy")
    kind = config.index_kind
    sums = np.load(path / "prototype_sums.npy") if kind.prototypes_in_memory else RowFile(path / "prototype_sums.npy")
    labels, groups, paths, digests = _metadata(path, meta, len(vectors))
    if vectors.ndim != 2 or vectors.shape[1] != meta["dim"] or len(ids) != len(vectors):
        raise CheckpointError(f"index {path} is inconsistent: vectors {vectors.shape}, {len(ids)} ids",
                              hint="rebuild it with `fewshot index`")
    if not kind.saves_index:  # rebuilt from the file (a memory map, dropped afterwards)
        image_index = ann.build(config, np.load(path / "vectors.npy", mmap_mode="r"))
        ids = np.arange(len(vectors), dtype=np.int64)
    else:
        if not (path / "images.faiss").is_file():
            raise CheckpointError(f"index folder {path} is incomplete: images.faiss is missing",
                                  hint="rebuild it with `fewshot index`")
        image_index = faiss.read_index(str(path / "images.faiss"))
    first_new = kind.first_new_id(image_index, ids)
    self = CatalogueIndex(dim=meta["dim"], labels=labels, groups=groups, paths=paths, config=meta.get("config", {}),
                          ann=config, image_index=image_index, digests=digests, ids=ids)
    self._vectors = VectorStore(vectors, ids, first_new)
    articles = meta.get("articles")
    if (articles is None or sorted(articles) != sorted(dict.fromkeys(labels)) or len(sums) != len(articles)
            or sums.shape[1:] != (meta["dim"],)):
        raise CheckpointError(f"index {path} is inconsistent: its article list does not match its images",
                              hint="rebuild it with `fewshot index`")
    self._init_articles(sums, list(articles))
    return self
