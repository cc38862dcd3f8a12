"""FAISS image indexes for catalogues of any size: exact (flat) and approximate (IVF-PQ, HNSW).

* ``flat``: ``IndexFlatIP``, an exact scan (every query reads every vector: 5 GB at 1M x 1,280).
* ``ivfpq``: ``IVF{nlist},PQ{m}`` (Jegou et al. 2011, "Product quantization for nearest
  neighbor search"): a coarse k-means quantizer with ``nlist`` cells, each vector stored as
  ``m`` one-byte codes of its residual; a query scans the ``nprobe`` nearest cells. The
  shortlist is re-ranked with the exact vectors (kept on disk, rows read on demand), so the scores
  returned are exact cosines.
* ``hnsw``: ``HNSW32`` (Malkov & Yashunin 2018): a navigable small-world graph over the full
  vectors; ``efSearch`` candidates are explored per query.

All indexes use inner product over L2-normalised vectors (= cosine). Vector ids are insertion
order; removed vectors stay in the index as tombstones, masked out at query time with an
``IDSelectorBitmap`` until the catalogue is compacted (:meth:`CatalogueIndex.save`).

The IVF-PQ build is sharded as the FAISS wiki describes ("Indexing 1G vectors"): the index is
trained once on a sample, each shard of vectors is added to its own copy of the empty trained
index (independently: another process or machine could do it), and the shards are merged
with ``merge_from``.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

import faiss
import numpy as np

from ..errors import DataError

INDEX_TYPES = ("auto", "flat", "ivfpq", "hnsw")
#: ``auto`` picks ``flat`` below this many catalogue images and ``ivfpq`` from here on
AUTO_FLAT_MAX = 200_000
#: vectors added per shard in the IVF-PQ build (bounds the float copy held at once)
SHARD_ROWS = 100_000
#: IVF-PQ needs this many training vectors (256 centroids per sub-quantizer)
MIN_IVFPQ_IMAGES = 1_000


@dataclass(frozen=True)
class AnnConfig:
    """How the image index is built and searched.

    Attributes:
        kind: ``flat``, ``ivfpq`` or ``hnsw`` (``auto`` is resolved by :func:`resolve`).
        nlist: IVF cells (default: the power of two nearest ``sqrt(N)``, at most ``N / 39``).
        m: PQ sub-quantizers = bytes per vector (default: the largest divisor of ``D`` <= 64).
        train_size: vectors sampled to train IVF-PQ (default ``max(39 * nlist, 256 * 39)``).
        nprobe: IVF cells scanned per query (query time; more = better recall, slower;
            default ``max(16, nlist // 8)``: recall@10 0.97 at 1M clustered images, benchmarks part 8).
        rerank: IVF-PQ shortlist = ``rerank * k`` candidates re-scored exactly (0: off).
        hnsw_m: HNSW neighbours per node; ef_construction / ef_search: HNSW beam widths.
        seed: the training sample and k-means seed.
    """

    kind: str = "flat"
    nlist: int | None = None
    m: int | None = None
    train_size: int | None = None
    nprobe: int | None = None
    rerank: int = 4
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AnnConfig":
        d = dict(d or {})
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def resolve(config: AnnConfig, n: int, dim: int) -> AnnConfig:
    """``config`` with ``auto`` and the size-dependent defaults filled in for ``n`` vectors of
    dimension ``dim``.

    Raises:
        DataError: an unknown kind, bad parameters, or ``ivfpq`` on too few images.
    """
    if config.kind not in INDEX_TYPES:
        raise DataError(f"unknown index type '{config.kind}'", hint="use --index-type " + "|".join(INDEX_TYPES))
    kind = config.kind if config.kind != "auto" else ("flat" if n < AUTO_FLAT_MAX else "ivfpq")
    for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise DataError(f"index option {name} must be at least 1, got {getattr(config, name)}")
    if config.rerank < 0:
        raise DataError(f"index option rerank must be 0 or more, got {config.rerank}")
    if kind != "ivfpq":
        return replace(config, kind=kind)
    if n < MIN_IVFPQ_IMAGES:
        raise DataError(f"--index-type ivfpq needs at least {MIN_IVFPQ_IMAGES:,} catalogue images to train "
                        f"its quantizers; this catalogue has {n:,}",
                        hint="use --index-type flat (exact, and fast at this size) or auto")
    nlist = config.nlist or int(min(max(16, 2 ** round(math.log2(math.sqrt(n)))), max(16, n // 39)))
    m = config.m or max(d for d in range(1, min(64, dim) + 1) if dim % d == 0)
    if m < 1 or dim % m:
        divisors = [d for d in (8, 16, 32, 64, 128) if dim % d == 0]
        raise DataError(f"--pq-m {m} does not divide the embedding dimension {dim}",
                        hint=f"use a divisor of {dim}, e.g. --pq-m {' / '.join(map(str, divisors)) or 1}")
    if nlist < 1 or nlist > n // 39:
        raise DataError(f"--nlist {nlist} is too many cells for {n:,} images (FAISS wants 39 training images per cell)",
                        hint=f"use --nlist {max(1, n // 39)} or fewer, or leave it out")
    train = min(n, config.train_size or max(39 * nlist, 256 * 39))
    if train < max(256, nlist):
        raise DataError(f"AnnConfig.train_size {train} is below max(256, nlist={nlist})",
                        hint="leave train_size out (the default samples enough)")
    nprobe = min(nlist, config.nprobe or max(16, nlist // 8))
    return replace(config, kind=kind, nlist=nlist, m=m, train_size=train, nprobe=nprobe)


def empty_index(config: AnnConfig, dim: int, sample: Callable[[np.ndarray], np.ndarray] | None = None,
                n: int = 0) -> faiss.Index:
    """An empty index ready for ``add``: IVF-PQ is trained on ``sample(rows)`` (``float32
    [train_size, D]`` for the sorted row numbers drawn from ``range(n)``)."""
    if config.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        return index
    assert sample is not None and config.nlist and config.m and config.train_size
    index = faiss.index_factory(dim, f"IVF{config.nlist},PQ{config.m}", faiss.METRIC_INNER_PRODUCT)
    rows = np.sort(np.random.default_rng(config.seed).choice(n, size=config.train_size, replace=False))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = config.seed
    ivf.do_polysemous_training = False  # slow simulated annealing, only for Hamming-filtered search
    if config.train_size < 39 * 256:  # small catalogues: fewer than FAISS's 39 points per PQ centroid
        ivf.pq.cp.min_points_per_centroid = 1  # is fine here; do not print a warning per training
    index.train(np.ascontiguousarray(sample(rows), dtype=np.float32))
    return index


def build(config: AnnConfig, vectors: np.ndarray, progress: Callable[[int], None] | None = None) -> faiss.Index:
    """The index of ``vectors float32 [N, D]`` (L2-normalised; a memory map is fine: IVF-PQ
    reads it shard by shard). ``config`` must be resolved (:func:`resolve`). ``progress(rows)``
    is called after each shard."""
    n, dim = vectors.shape
    index = empty_index(config, dim, lambda rows: vectors[rows], n)
    if config.kind != "ivfpq":
        for start in range(0, n, SHARD_ROWS):
            index.add(np.ascontiguousarray(vectors[start:start + SHARD_ROWS], dtype=np.float32))
            if progress:
                progress(min(n, start + SHARD_ROWS))
        return index
    for start in range(0, n, SHARD_ROWS):
        shard = add_shard(index, vectors[start:start + SHARD_ROWS])
        index.merge_from(shard, start)  # the shard's ids 0.. become start..
        if progress:
            progress(min(n, start + SHARD_ROWS))
    return index


def add_shard(trained: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    """A copy of the empty ``trained`` IVF index holding ``vectors`` (ids ``0..len-1``): one
    independent shard of the sharded build, mergeable with ``merge_from(shard, offset)``."""
    shard = faiss.clone_index(trained)
    shard.reset()
    shard.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return shard


_BLAS_SETTING = threading.Lock()
#: FAISS's flat search runs a SIMD loop below ``faiss.cvar.distance_compute_blas_threshold``
#: (compared, in faiss 1.15, with queries x dimension; default 128,000 = 100 queries of 1,280-d)
#: and one BLAS matrix product at or above it. On 2 CPU cores the BLAS path is 1.4-8x faster
#: per query from 4 queries upward and slower at 2 (docs/benchmarks.md, part 3), so the
#: catalogue searches batches of at least this many queries with BLAS.
BLAS_MIN_QUERIES = 4


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


def search_params(config: AnnConfig, alive: np.ndarray | None) -> faiss.SearchParameters | None:
    """Query-time parameters: ``nprobe`` / ``efSearch`` and, when ``alive`` (a little-endian
    bit per id, ``uint8``) is given, a selector that skips tombstoned ids. The caller keeps
    ``alive`` referenced while the parameters are used."""
    sel = faiss.IDSelectorBitmap(len(alive) * 8, faiss.swig_ptr(alive)) if alive is not None else None
    extra = {"sel": sel} if sel is not None else {}
    if config.kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=config.nprobe, **extra)
    if config.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=config.ef_search, **extra)
    return faiss.SearchParameters(**extra) if extra else None


def search(index: faiss.Index, config: AnnConfig, queries: np.ndarray, k: int,
           alive: np.ndarray | None = None,
           exact: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``queries float32 [Q, D]`` -> ``(scores float32 [Q, k], ids int64 [Q, k])``, best first
    (``-1`` ids pad rows with fewer than ``k`` results).

    For IVF-PQ with ``rerank > 0`` and ``exact`` (``ids int64 [n] -> float32 [n, D]``), the
    ``rerank * k`` best approximate candidates are re-scored with the exact vectors.
    """
    params = search_params(config, alive)
    shortlist = k * config.rerank if (config.kind == "ivfpq" and config.rerank and exact) else k
    shortlist = min(shortlist, max(k, index.ntotal))
    scores, ids = _raw_search(index, queries, shortlist, params)
    if shortlist == k or exact is None:
        return scores, ids
    return _rerank(queries, ids, k, exact)


def _raw_search(index: faiss.Index, queries: np.ndarray, k: int,
                params: faiss.SearchParameters | None) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` through the SWIG entry point: once ``faiss.contrib.torch_utils`` is
    imported (pytorch-metric-learning does it), the Python ``search`` wrapper takes no
    ``params``."""
    x = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(x), k), np.float32)
    ids = np.empty((len(x), k), np.int64)
    with faiss_blas_setting(index.d):
        index.search_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(scores), faiss.swig_ptr(ids), params)
    return scores, ids


def _rerank(queries: np.ndarray, ids: np.ndarray, k: int,
            exact: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row's candidate ``ids [Q, K]`` by exact inner product."""
    valid = ids >= 0
    flat = ids[valid]
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    if len(flat):
        vectors = exact(flat)
        rows = np.repeat(np.arange(len(ids)), valid.sum(axis=1))
        scores[valid] = np.einsum("ij,ij->i", vectors, queries[rows])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top = np.take_along_axis(scores, order, axis=1)
    top_ids[~np.isfinite(top)] = -1
    return np.where(np.isfinite(top), top, -np.inf).astype(np.float32), top_ids
