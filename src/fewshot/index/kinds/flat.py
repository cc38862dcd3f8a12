"""``flat``: FAISS ``IndexFlatIP``, an exact scan (every query reads every vector: 5 GB at 1M x 1,280)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import IndexKind, register_kind

if TYPE_CHECKING:
    import faiss


@register_kind("flat")
class Flat(IndexKind):
    """Exact inner-product search; every prototype in memory, scanned exactly. The index is not
    saved: loading rebuilds it from the exact vectors (ids ``0..N-1`` again)."""

    name = "flat"
    summary = "exact (every query scans every image; fast below about 200,000 images)"
    prototypes_in_memory = True
    saves_index = False

    def create(self, dim, sample=None, n=0) -> faiss.Index:
        import faiss

        return faiss.IndexFlatIP(dim)
