""":class:`CatalogueIndex`: catalogue embeddings in a FAISS image index plus per-article
prototypes (what the package :mod:`fewshot.index` is about: read its docstring first).

Kept out of the package ``__init__`` so that importing :mod:`fewshot.index.kinds` (the index
kinds' names and options, which every ``fewshot`` command's help shows) loads neither FAISS
nor NumPy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from ..checks import positive_int
from ..errors import CheckpointError, DataError
from . import ann
from .ann import AnnConfig
from .ranking import Neighbor, Ranking
from .vectors import Growable, OnDemandPrototypes, Prototypes, VectorStore, l2_normalize, normalized_copy
from .whiten import Whitening

__all__ = ["CatalogueIndex"]

log = logging.getLogger("fewshot")


@dataclass
class CatalogueIndex(Ranking):
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
        whitening: the catalogue whitening (:mod:`fewshot.index.whiten`) fixed when the index was
            built, or ``None``. With one, the stored vectors and prototypes are whitened, and every
            vector given to :meth:`add_article` and every query is whitened by it first: callers
            always pass the model's embeddings.
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
    #: the folder this index was loaded from or last saved to (where its enrolled photos are),
    #: set by :mod:`fewshot.catalogue.store`
    folder: Path | None = field(default=None, repr=False)
    #: what that folder looked like when the store last read or wrote it (``None``: unknown)
    folder_state: tuple | None = field(default=None, repr=False)
    #: what is computed from the contents (a reject calibration), emptied by every change
    derived: dict = field(default_factory=dict, repr=False, compare=False)
    whitening: Whitening | None = field(default=None, repr=False, compare=False)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(cls, vectors: np.ndarray, labels: Sequence[str], groups: Sequence[str | None],
              paths: Sequence[str | Path], config: dict | None = None,
              digests: Sequence[str | None] | None = None, ann_config: AnnConfig | None = None,
              progress: Callable[[int], None] | None = None,
              whitening: Whitening | None = None) -> "CatalogueIndex":
        """Index ``vectors float32 [N, D]`` (normalised here, into one copy; a memory map is
        read block by block; whitened first by ``whitening``) with per-image metadata.

        ``digests``: the SHA-256 of each image file (:func:`fewshot.embed.read_digests`).
        ``ann_config``: the image index type (default exact ``flat``; ``auto`` picks by size).

        Raises:
            DataError: no vectors, metadata lengths that differ from ``N``, or index options
                that do not fit the catalogue (:func:`fewshot.index.ann.resolve`).
        """
        vectors = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise DataError("cannot build an index from an empty catalogue",
                            hint="check data / split: no image was embedded", options=("data", "split"))
        n = len(vectors)
        digests = list(digests) if digests is not None else [None] * n
        if not (len(labels) == len(groups) == len(paths) == len(digests) == n):
            raise DataError(f"catalogue metadata lengths differ: {n} vectors, {len(labels)} labels, "
                            f"{len(groups)} groups, {len(paths)} paths, {len(digests)} digests")
        resolved = ann.resolve(ann_config or AnnConfig(), n, vectors.shape[1])
        normed = normalized_copy(vectors) if whitening is None else whitening.apply(vectors)
        self = cls(dim=vectors.shape[1], labels=list(labels), groups=list(groups),
                   paths=[str(p) for p in paths], config=dict(config or {}), digests=digests,
                   ann=resolved, ids=np.arange(n, dtype=np.int64), whitening=whitening)
        self.image_index = ann.build(resolved, normed, progress)
        self._vectors = VectorStore(normed, self.ids, n)
        self._init_articles(None)
        return self

    @classmethod
    def restore(cls, *, dim: int, labels: list[str], groups: list[str | None], paths: list[str],
                digests: list[str | None], config: dict, image_index: faiss.Index, ids: np.ndarray,
                vectors: np.ndarray, first_new: int, ann_config: AnnConfig | None = None,
                sums: np.ndarray | None = None, articles: list[str] | None = None,
                whitening: Whitening | None = None) -> "CatalogueIndex":
        """An index from its stored parts (:mod:`fewshot.catalogue.formats`), no check made.

        Args:
            vectors: ``float32 [N, D]`` normalised image vectors by position (an array, or a
                :class:`~fewshot.index.vectors.RowFile` read on demand).
            ids: int64 ``[N]``: each position's id in ``image_index`` (sorted).
            first_new: the id the next added image gets.
            sums: ``float32 [C, D]`` per-article sums of the image vectors, in ``articles``
                order (``None``: computed from the vectors, articles in order of appearance).
        """
        self = cls(dim=dim, labels=labels, groups=groups, paths=paths, config=config, digests=digests,
                   ann=ann_config or AnnConfig(), image_index=image_index, ids=ids, whitening=whitening)
        self._vectors = VectorStore(vectors, ids, first_new)
        self._init_articles(sums, articles)
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
        """The stored (normalised, and whitened when the index is) image embeddings, ``float32 [N, D]``, by position."""
        assert self._vectors is not None
        return self._vectors.get(self.ids)

    def embedding_rows(self, start: int, stop: int) -> np.ndarray:
        """The model's unit embeddings of positions ``start..stop-1``, ``float32 [stop - start, D]``:
        the stored vectors, unwhitened when the index is whitened (:meth:`Whitening.unapply`)."""
        rows = self.vector_rows(start, stop)
        return rows if self.whitening is None else self.whitening.unapply(rows)

    @property
    def prototypes(self) -> np.ndarray:
        """The normalised article prototypes, ``float32 [C, D]`` (a view for a flat index; read
        whole, into a new array, for an approximate one, which keeps them on disk)."""
        assert self._protos is not None
        if isinstance(self._protos, Prototypes):
            return self._protos.normed.view
        return self._protos.normed_rows(np.arange(len(self._protos)))

    def vector_rows(self, start: int, stop: int) -> np.ndarray:
        """The stored (normalised) vectors of positions ``start..stop-1``, ``float32 [stop - start, D]``."""
        assert self._vectors is not None
        return self._vectors.get(self.ids[start:stop])

    def prototype_sums(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` of the per-article sums of image vectors (``articles`` order),
        ``float32 [stop - start, D]``."""
        assert self._protos is not None
        return self._protos.sums(start, stop)

    def purge_tombstones(self) -> None:
        """Remove the removed images from an image index whose kind can drop them (before it is
        written, :meth:`~fewshot.index.kinds.IndexKind.compact`); other kinds keep them masked."""
        assert self._vectors is not None and self.image_index is not None
        if self.num_tombstones:
            self.ann.index_kind.compact(self.image_index, self.ids, self._vectors.first_new + self._vectors.new.n)

    # ----------------------------------------------------------------- changes
    def add_article(self, label: str, group: str | None, vectors: np.ndarray,
                    paths: Sequence[str | Path], digests: Sequence[str | None] | None = None) -> None:
        """Add images of one article (new or existing) and update its prototype: appends to
        the image index and writes one prototype row (time independent of the catalogue size,
        except FAISS's amortised growth).

        ``digests``: the SHA-256 of each image file (``None`` = unknown). Callers that take
        labels from people check them first (:func:`fewshot.catalogue.labels.clean_label`).

        Raises:
            TypeError: ``label`` is not a ``str`` or ``group`` neither a ``str`` nor ``None``
                (the saved index could not be read back).
            DataError: no vectors, wrong dimension, or paths that do not match the vectors.
        """
        self.derived.clear()
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
        normed = self._in_space(vectors)
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
        self.derived.clear()
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
        """Removed images still in the image index (until it is written again:
        :meth:`purge_tombstones`)."""
        assert self.image_index is not None
        return int(self.image_index.ntotal) - len(self.ids)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise CheckpointError(
                f"query embeddings have dimension {queries.shape[1]} but the index has {self.dim}",
                hint="embed queries with the backbone/model the index was built with")
        return self._in_space(queries)

    def _in_space(self, vectors: np.ndarray) -> np.ndarray:
        """The model's embeddings ``float32 [M, D]`` as the index stores them: unit rows, whitened
        when the index is."""
        return l2_normalize(vectors) if self.whitening is None else self.whitening.apply(vectors)

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors of image ``positions`` (int64 ``[M]``), ``float32 [M, D]``."""
        assert self._vectors is not None
        return self._vectors.get(self.ids[np.asarray(positions, dtype=np.int64)])

    def search_positions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], positions int64 [Q, k])`` of the ``k`` nearest live images of unit
        ``queries float32 [Q, D]``, already whitened when the index is (``-1`` pads); positions
        index :attr:`labels` / :attr:`paths`."""
        return self._search_images(np.ascontiguousarray(queries, dtype=np.float32), k)

    def _search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], positions int64 [Q, k])`` of the nearest live images (``-1`` pads)."""
        assert self.image_index is not None and self._vectors is not None and self._alive is not None
        alive = self._alive.view if self.num_tombstones else None
        scores, ids = ann.search(self.image_index, self.ann, queries, k, alive=alive, exact=self._vectors.get)
        pos = np.searchsorted(self.ids, np.maximum(ids, 0))
        ok = (ids >= 0) & (pos < len(self.ids))
        ok[ok] = self.ids[pos[ok]] == ids[ok]
        return scores, np.where(ok, pos, -1)

    def search(self, queries: np.ndarray, k: int = 5, rerank: Any = None) -> list[list[Neighbor]]:
        """Nearest catalogue images for ``queries float32 [Q, D]`` (cosine, best first); ``k``
        at most the catalogue's size (0: none). ``rerank``: ``None`` / ``"none"``, or ``"qe"``,
        ``"dba"``, ``"dba-qe"`` (or :class:`~fewshot.index.rerank.RerankOptions`): the shortlist
        re-ranked by :func:`fewshot.index.rerank.rerank_shortlist` (``.score`` is then the
        re-ranked cosine).

        Raises:
            TypeError / ValueError: ``k`` is not a whole number of at least 0.
            FewshotError: an unknown ``rerank`` or ``k-reciprocal`` (it needs the whole gallery).
        """
        from .rerank import rerank_shortlist, search_rerank

        k = positive_int(k, "k", minimum=0)
        opts = search_rerank(rerank)
        queries = self._check_queries(queries)
        k = min(k, len(self.labels))
        if k == 0:
            return [[] for _ in range(len(queries))]
        if opts.kind == "none":
            scores, idx = self._search_images(queries, k)
        else:
            scores, idx = rerank_shortlist(queries, k, opts, self.search_positions, self.vectors_at, len(self))
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

