"""``hnsw``: FAISS ``HNSW32`` (Malkov & Yashunin 2018), a navigable small-world graph over the full
vectors; ``efSearch`` candidates are explored per query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...options import option
from .base import IndexKind, register_kind

if TYPE_CHECKING:
    import faiss


@dataclass(frozen=True)
class HnswOptions:
    hnsw_m: int = option(32, "Graph neighbours per image (HNSW's M).", min=1)
    ef_construction: int = option(40, "Candidates explored per image while the graph is built.", min=1)
    ef_search: int = option(64, "Candidates explored per query, stored as the query-time default; "
                                "classify can override.", min=1)


@register_kind("hnsw")
class Hnsw(IndexKind):
    """A graph over the full vectors (FAISS cannot remove from it: removed images stay in the
    graph as tombstones, masked at query time, after a save too); prototypes read on demand."""

    name = "hnsw"
    summary = "approximate graph search over the full vectors (memory grows with the catalogue)"
    Config = HnswOptions
    search_options = ("ef_search",)

    def create(self, dim, sample=None, n=0) -> faiss.Index:
        import faiss

        index = faiss.IndexHNSWFlat(dim, self.opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.opts.ef_construction
        return index

    def search_params(self, extra):
        import faiss

        return faiss.SearchParametersHNSW(efSearch=self.opts.ef_search, **extra)
