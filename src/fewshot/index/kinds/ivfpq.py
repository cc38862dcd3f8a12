"""``ivfpq``: FAISS ``IVF{nlist},PQ{m}`` (Jegou et al. 2011, "Product quantization for nearest
neighbor search"): a coarse k-means quantizer with ``nlist`` cells, each vector stored as ``m``
one-byte codes of its residual; a query scans the ``nprobe`` nearest cells. The shortlist is
re-ranked with the exact vectors (kept on disk, rows read on demand), so the scores returned are
exact cosines.

The build is sharded as the FAISS wiki describes ("Indexing 1G vectors"): the index is trained
once on a sample, each shard of vectors is added to its own copy of the empty trained index
(independently: another process or machine could do it), and the shards are merged with
``merge_from``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ...options import option
from .base import IndexKind, IndexOptionError, register_kind, shards

if TYPE_CHECKING:
    import faiss
    import numpy as np

#: IVF-PQ needs this many training vectors (256 centroids per sub-quantizer)
MIN_IVFPQ_IMAGES = 1_000


@dataclass(frozen=True)
class IvfPqOptions:
    nlist: int | None = option(None, "Coarse cells (default: the power of two nearest sqrt(N), at most N / 39).",
                               min=1)
    m: int | None = option(None, "Bytes per image (PQ sub-quantizers; must divide the dimension; default: the "
                                 "largest divisor <= 64).", flag="--pq-m", min=1)
    train_size: int | None = option(None, "Images sampled to train the quantizers (default max(39 x nlist, "
                                          "9,984), at most N).", min=1)
    nprobe: int | None = option(None, "Cells scanned per query (default max(16, nlist / 8): recall@10 0.97 at 1M "
                                      "clustered images); stored as the query-time default, classify can override.",
                                min=1)
    rerank: int = option(4, "The rerank x k best approximate candidates are re-scored with the exact vectors "
                            "(0: off).", min=0)
    seed: int = option(0, "Seed of the training sample and the k-means.", flag="--index-seed", min=0)


@register_kind("ivfpq")
class IvfPq(IndexKind):
    """Compressed codes in memory, exact vectors and prototypes on disk (read on demand)."""

    name = "ivfpq"
    summary = "approximate, compressed (64 bytes per image in memory; for 200,000 images and more)"
    Config = IvfPqOptions
    search_options = ("nprobe",)

    def resolve(self, n, dim):
        o = self.opts
        if n < MIN_IVFPQ_IMAGES:
            raise IndexOptionError("index_type", f"index_type='ivfpq' needs at least {MIN_IVFPQ_IMAGES:,} catalogue images "
                                   f"to train its quantizers; this catalogue has {n:,}",
                                   hint="use index_type='flat' (exact, and fast at this size) or auto")
        nlist = o.nlist or int(min(max(16, 2 ** round(math.log2(math.sqrt(n)))), max(16, n // 39)))
        m = o.m or max(d for d in range(1, min(64, dim) + 1) if dim % d == 0)
        if m < 1 or dim % m:
            divisors = [d for d in (8, 16, 32, 64, 128) if dim % d == 0]
            raise IndexOptionError("m", f"option m = {m} does not divide the embedding dimension {dim}",
                                   hint=f"use a divisor of {dim}, e.g. m = {' / '.join(map(str, divisors)) or 1}")
        if nlist < 1 or nlist > n // 39:
            raise IndexOptionError("nlist", f"option nlist = {nlist} is too many cells for {n:,} images (FAISS wants 39 "
                                   "training images per cell)",
                                   hint=f"use nlist = {max(1, n // 39)} or fewer, or leave it out")
        train = min(n, o.train_size or max(39 * nlist, 256 * 39))
        if train < max(256, nlist):
            raise IndexOptionError("train_size", f"option train_size = {train} is below max(256, nlist={nlist})",
                                   hint=f"use train_size = {max(256, nlist)} or more, or leave it out "
                                   "(the default samples enough)")
        nprobe = min(nlist, o.nprobe or max(16, nlist // 8))
        return replace(o, nlist=nlist, m=m, train_size=train, nprobe=nprobe)

    def create(self, dim, sample=None, n=0) -> faiss.Index:
        import faiss
        import numpy as np

        o = self.opts
        assert sample is not None and o.nlist and o.m and o.train_size
        index = faiss.index_factory(dim, f"IVF{o.nlist},PQ{o.m}", faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(o.seed).choice(n, size=o.train_size, replace=False))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = o.seed
        ivf.do_polysemous_training = False  # slow simulated annealing, only for Hamming-filtered search
        if o.train_size < 39 * 256:  # small catalogues: fewer than FAISS's 39 points per PQ centroid
            ivf.pq.cp.min_points_per_centroid = 1  # is fine here; do not print a warning per training
        index.train(np.ascontiguousarray(sample(rows), dtype=np.float32))
        return index

    def build(self, vectors, progress=None) -> faiss.Index:
        n, dim = vectors.shape
        index = self.create(dim, lambda rows: vectors[rows], n)
        for start, stop in shards(n):
            shard = add_shard(index, vectors[start:stop])
            index.merge_from(shard, start)  # the shard's ids 0.. become start..
            if progress:
                progress(stop)
        return index

    def add(self, index, vectors, ids) -> None:
        index.add_with_ids(vectors, ids)  # ids continue after removed ones (IVF drops them on save)

    def first_new_id(self, index, ids) -> int:
        return int(ids[-1]) + 1 if len(ids) else 0  # removed ids are gone from the index, not reused

    def compact(self, index, live, id_end) -> None:
        import faiss
        import numpy as np

        index.remove_ids(faiss.IDSelectorBatch(np.setdiff1d(np.arange(id_end), live)))

    def search_params(self, extra):
        import faiss

        return faiss.SearchParametersIVF(nprobe=self.opts.nprobe, **extra)

    def shortlist(self, k: int) -> int:
        return k * self.opts.rerank if self.opts.rerank else k


def add_shard(trained: faiss.Index, vectors: np.ndarray) -> faiss.Index:
    """A copy of the empty ``trained`` IVF index holding ``vectors float32 [n, D]`` (ids
    ``0..n-1``): one independent shard of the sharded build, mergeable with
    ``merge_from(shard, offset)``."""
    import faiss
    import numpy as np

    shard = faiss.clone_index(trained)
    shard.reset()
    shard.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return shard
