"""A searchable catalogue: FAISS index over L2-normalised embeddings plus per-article prototypes.

The catalogue is the support set of the main job: a few labelled photos per article. New
photos are classified by cosine similarity either to each article's prototype (the mean of
its L2-normalised embeddings, re-normalised; Snell et al. 2017) or to its nearest catalogue
image (the article's score is its best image's score).

On disk (``save``/``load``, written atomically as a whole folder)::

    INDEX_DIR/images.faiss       faiss.IndexFlatIP over the image embeddings  [N, D]
    INDEX_DIR/prototypes.faiss   faiss.IndexFlatIP over the article prototypes [C, D]
    INDEX_DIR/meta.json          labels, groups, paths and content digests (SHA-256) per image;
                                 config (backbone, run, model weights digest); version
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np

from ..version import __version__
from ..errors import CheckpointError, DataError
from ..io import atomic_dir, recover_dir

FORMAT_VERSION = 1


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


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``float32 [N, D]`` (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


#: FAISS's flat search runs a SIMD loop below ``faiss.cvar.distance_compute_blas_threshold``
#: (compared, in faiss 1.15, with queries x dimension; default 128,000 = 100 queries of 1,280-d)
#: and one BLAS matrix product at or above it. On 2 CPU cores the BLAS path is 1.4-8x faster
#: per query from 4 queries upward and slower at 2 (docs/benchmarks.md, part 3), so the
#: catalogue searches batches of at least this many queries with BLAS.
BLAS_MIN_QUERIES = 4
_BLAS_SETTING = threading.Lock()


@contextmanager
def faiss_blas_setting(dim: int) -> Iterator[None]:
    """Within the block, FAISS flat searches of :data:`BLAS_MIN_QUERIES` or more ``dim``-d
    queries take the BLAS path.

    ``faiss.cvar.distance_compute_blas_threshold`` is process-wide, so it is set under a lock
    and restored on exit: searches from several threads take turns (each one already uses
    every OpenMP thread). Both paths give the same neighbours up to float32 rounding.
    """
    with _BLAS_SETTING:
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * int(dim)
        try:
            yield
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved


def _faiss_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries float32 [Q, D], k)`` -> ``(float32 [Q, k], int64 [Q, k])`` under
    :func:`faiss_blas_setting`."""
    with faiss_blas_setting(index.d):
        return index.search(queries, k)


def _best_image_per_article(idx: np.ndarray, image_article: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each article's first (best) image in ranked FAISS results.

    Args:
        idx: int64 ``[Q, k]`` image indices, best first per row (``-1``: no result).
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


def _flat_ip(vectors: np.ndarray, dim: int) -> faiss.Index:
    index = faiss.IndexFlatIP(dim)
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def is_index_dir(path: str | Path) -> bool:
    """Whether ``path`` is an index folder written by :meth:`CatalogueIndex.save` (its
    ``meta.json`` records a format and a fewshot version, and ``images.faiss`` is there)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
        return (isinstance(meta, dict) and "format_version" in meta and "fewshot_version" in meta
                and (Path(path) / "images.faiss").is_file())
    except (OSError, ValueError):
        return False


#: what an index folder holds at its top level (the service adds ``enrolled/``)
INDEX_FILES = frozenset({"meta.json", "images.faiss", "prototypes.faiss", "enrolled"})


@dataclass
class CatalogueIndex:
    """Catalogue embeddings with their labels, groups, paths and per-article prototypes.

    Build with :meth:`build`; all vectors are stored L2-normalised, ``float32``.

    Attributes:
        dim: embedding dimension ``D``.
        labels, groups, paths: per catalogue image, aligned with the image index.
        config: how the embeddings were made (backbone, model run, image size, data, split).
    """

    dim: int
    labels: list[str]
    groups: list[str | None]
    paths: list[str]
    config: dict = field(default_factory=dict)
    image_index: faiss.Index | None = None
    articles: list[str] = field(default_factory=list)
    article_groups: list[str | None] = field(default_factory=list)
    prototype_index: faiss.Index | None = None
    #: int64 ``[N]``: each image's position in ``articles`` (kept by ``_rebuild_prototypes``)
    image_article: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    #: SHA-256 of each catalogue image's file (``None`` where unknown, e.g. an index written by
    #: fewshot 0.1.0); finds queries that are catalogue images (:meth:`find_images`)
    digests: list[str | None] = field(default_factory=list)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(cls, vectors: np.ndarray, labels: Sequence[str], groups: Sequence[str | None],
              paths: Sequence[str | Path], config: dict | None = None,
              digests: Sequence[str | None] | None = None) -> "CatalogueIndex":
        """Index ``vectors float32 [N, D]`` (normalised here) with per-image metadata.

        ``digests``: the SHA-256 of each image file (:func:`fewshot.embed.read_digests`).

        Raises:
            DataError: no vectors, or metadata lengths that differ from ``N``.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise DataError("cannot build an index from an empty catalogue",
                            hint="check --data / --split: no image was embedded")
        n = len(vectors)
        if not (len(labels) == len(groups) == len(paths) == n):
            raise DataError(f"catalogue metadata lengths differ: {n} vectors, {len(labels)} "
                            f"labels, {len(groups)} groups, {len(paths)} paths")
        digests = list(digests) if digests is not None else [None] * n
        if len(digests) != n:
            raise DataError(f"catalogue metadata lengths differ: {n} vectors, {len(digests)} digests")
        self = cls(dim=vectors.shape[1], labels=list(labels), groups=list(groups),
                   paths=[str(p) for p in paths], config=dict(config or {}), digests=digests)
        self.image_index = _flat_ip(l2_normalize(vectors), self.dim)
        self._rebuild_prototypes()
        return self

    def image_vectors(self) -> np.ndarray:
        """The stored (normalised) image embeddings, ``float32 [N, D]``."""
        assert self.image_index is not None
        if self.image_index.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        # np.asarray: once faiss.contrib.torch_utils is imported (pytorch-metric-learning's
        # inference module does it), FAISS returns torch tensors here
        return np.asarray(self.image_index.reconstruct_n(0, self.image_index.ntotal), dtype=np.float32)

    def _rebuild_prototypes(self) -> None:
        vectors = self.image_vectors()
        order: dict[str, int] = {}
        for label in self.labels:
            order.setdefault(label, len(order))
        self.articles = list(order)
        group_of: dict[str, str | None] = {}
        for label, group in zip(self.labels, self.groups):
            group_of.setdefault(label, group)
        self.article_groups = [group_of[a] for a in self.articles]
        sums = np.zeros((len(self.articles), self.dim), np.float32)
        idx = np.array([order[lab] for lab in self.labels], dtype=np.int64)
        self.image_article = idx
        if len(idx):
            np.add.at(sums, idx, vectors)
        self.prototype_index = _flat_ip(l2_normalize(sums), self.dim)

    def add_article(self, label: str, group: str | None, vectors: np.ndarray,
                    paths: Sequence[str | Path], digests: Sequence[str | None] | None = None) -> None:
        """Add images of one article (new or existing) and update its prototype.

        ``digests``: the SHA-256 of each image file (``None`` = unknown).

        Raises:
            DataError: no vectors, wrong dimension, or paths that do not match the vectors.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise DataError(f"article '{label}' has no images to add")
        if vectors.shape[1] != self.dim:
            raise DataError(f"embedding dimension {vectors.shape[1]} does not match the index's {self.dim}")
        if len(paths) != len(vectors):
            raise DataError(f"{len(paths)} paths for {len(vectors)} vectors")
        assert self.image_index is not None
        self.image_index.add(l2_normalize(vectors))
        self.labels += [label] * len(vectors)
        self.groups += [group] * len(vectors)
        self.paths += [str(p) for p in paths]
        self.digests += list(digests) if digests is not None else [None] * len(vectors)
        self._rebuild_prototypes()

    def remove_article(self, label: str) -> int:
        """Remove every image of an article; returns how many were removed.

        Raises:
            KeyError: the article is not in the catalogue.
        """
        keep = [i for i, lab in enumerate(self.labels) if lab != label]
        removed = len(self.labels) - len(keep)
        if removed == 0:
            raise KeyError(label)
        vectors = self.image_vectors()[keep]
        self.labels = [self.labels[i] for i in keep]
        self.groups = [self.groups[i] for i in keep]
        self.paths = [self.paths[i] for i in keep]
        self.digests = [self.digests[i] for i in keep]
        self.image_index = _flat_ip(vectors, self.dim)
        self._rebuild_prototypes()
        return removed

    # ----------------------------------------------------------------- querying
    def __len__(self) -> int:
        return len(self.labels)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise CheckpointError(
                f"query embeddings have dimension {queries.shape[1]} but the index has {self.dim}",
                hint="embed queries with the backbone/model the index was built with")
        return l2_normalize(queries)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Neighbor]]:
        """Nearest catalogue images for ``queries float32 [Q, D]`` (cosine, best first)."""
        queries = self._check_queries(queries)
        assert self.image_index is not None
        k = min(k, len(self.labels))
        if k == 0:
            return [[] for _ in range(len(queries))]
        scores, idx = _faiss_search(self.image_index, queries, k)
        return [[Neighbor(self.paths[j], self.labels[j], self.groups[j], float(s))
                 for s, j in zip(srow, irow) if j >= 0] for srow, irow in zip(scores, idx)]

    def find_images(self, digests: Sequence[str | None]) -> list[list[int]]:
        """Catalogue images with the same content as each query: ``digests`` are the queries'
        file SHA-256 (``None`` = unknown); returns, per query, the positions of the catalogue
        images with that digest (empty when none)."""
        where: dict[str, list[int]] = {}
        for i, d in enumerate(self.digests):
            if d is not None:
                where.setdefault(d, []).append(i)
        return [list(where.get(d, [])) if d is not None else [] for d in digests]

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
            CheckpointError: query dimension differs from the index's.
        """
        queries = self._check_queries(queries)
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if mode not in ("prototype", "nearest"):
            raise ValueError(f"unknown mode '{mode}': use 'prototype' or 'nearest'")
        exclude = [list(e) for e in exclude] if exclude is not None else [[] for _ in range(len(queries))]
        if len(exclude) != len(queries):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(queries)} queries")
        top_k = min(top_k, len(self.articles))
        if mode == "prototype":
            return self._classify_prototype(queries, top_k, exclude)
        return self._classify_nearest(queries, top_k, exclude)

    def _classify_prototype(self, queries: np.ndarray, top_k: int,
                            exclude: list[list[int]]) -> list[list[Prediction]]:
        assert self.prototype_index is not None
        extra = max((len({int(self.image_article[i]) for i in e}) for e in exclude), default=0)
        k = min(len(self.articles), top_k + extra)
        scores, idx = _faiss_search(self.prototype_index, queries, k)
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
        assert self.image_index is not None
        gone = set(exclude)
        out: dict[int, float | None] = {}
        for a in sorted({int(self.image_article[i]) for i in exclude}):
            keep = [int(i) for i in np.flatnonzero(self.image_article == a) if int(i) not in gone]
            if not keep:
                out[a] = None
                continue
            proto = np.sum([np.asarray(self.image_index.reconstruct(i), dtype=np.float32) for i in keep], axis=0)
            out[a] = float(l2_normalize(proto[None])[0] @ query)
        return out

    def _classify_nearest(self, queries: np.ndarray, top_k: int,
                          exclude: list[list[int]]) -> list[list[Prediction]]:
        assert self.image_index is not None
        n = len(self.labels)
        k = min(n, max(50, top_k * 20) + max((len(e) for e in exclude), default=0))
        while True:
            scores, idx = _faiss_search(self.image_index, queries, k)
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
    def save(self, path: str | Path) -> Path:
        """Write the index folder atomically (the old folder survives a crash)."""
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "fewshot_version": __version__,
            "dim": self.dim,
            "num_images": len(self.labels),
            "num_articles": len(self.articles),
            "config": self.config,
            "labels": self.labels,
            "groups": self.groups,
            "paths": self.paths,
            "digests": self.digests,
        }
        with atomic_dir(path) as tmp:
            faiss.write_index(self.image_index, str(tmp / "images.faiss"))
            faiss.write_index(self.prototype_index, str(tmp / "prototypes.faiss"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CatalogueIndex":
        """Read an index folder written by :meth:`save`.

        Raises:
            CheckpointError: the folder is missing, incomplete, damaged or inconsistent.
        """
        path = Path(path)
        if recover_dir(path):
            import logging

            logging.getLogger("fewshot").warning("recovered index %s from an interrupted save", path)
        if not path.is_dir():
            raise CheckpointError(f"index folder {path} " + ("is a file, not a folder" if path.exists() else "does not exist"),
                                  hint="build one with `fewshot index --data ... --out DIR`")
        if not (path / "meta.json").is_file() and not (path / "images.faiss").is_file():
            raise CheckpointError(f"{path} is not a fewshot index (no meta.json or images.faiss)",
                                  hint="pass --index the folder written by `fewshot index --out DIR`")
        for name in ("meta.json", "images.faiss"):
            if not (path / name).is_file():
                raise CheckpointError(f"index folder {path} is incomplete: {name} is missing",
                                      hint="rebuild it with `fewshot index`")
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            image_index = faiss.read_index(str(path / "images.faiss"))
        except Exception as exc:
            raise CheckpointError(f"index folder {path} is damaged: {exc}",
                                  hint="rebuild it with `fewshot index`") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"index {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}",
                                  hint="rebuild it with this version of fewshot")
        if image_index.ntotal != len(meta["labels"]) or image_index.d != meta["dim"]:
            raise CheckpointError(f"index {path} is inconsistent: {image_index.ntotal} vectors for "
                                  f"{len(meta['labels'])} labels", hint="rebuild it with `fewshot index`")
        digests = meta.get("digests") or [None] * len(meta["labels"])
        if len(digests) != len(meta["labels"]):
            raise CheckpointError(f"index {path} is inconsistent: {len(digests)} digests for "
                                  f"{len(meta['labels'])} images", hint="rebuild it with `fewshot index`")
        self = cls(dim=meta["dim"], labels=meta["labels"], groups=meta["groups"], paths=meta["paths"],
                   config=meta.get("config", {}), image_index=image_index, digests=digests)
        self._rebuild_prototypes()
        return self
