"""A searchable catalogue in memory: a FAISS image index over L2-normalised embeddings plus
per-article prototypes, for catalogues from a few images to millions.

The catalogue is the support set of the main job: a few labelled photos per article. New
photos are classified by cosine similarity either to each article's prototype (the mean of
its L2-normalised embeddings, re-normalised; Snell et al. 2017) or to its nearest catalogue
image (the article's score is its best image's score; :mod:`fewshot.index.ranking`). The image
index is exact (``flat``) or approximate (``ivfpq``, ``hnsw``: :mod:`fewshot.index.ann`). A flat
index keeps every prototype in memory and scans them exactly; an approximate one reads prototype
rows on demand and ranks the articles of the nearest images (a shortlist) by their exact
prototype cosine, so that its memory does not grow with the number of articles.

Adding or removing an article changes only that article: its images are appended to the image
index (removed ones become tombstones, masked at query time) and its prototype row is updated.

This package does not read or write index folders (it may read the rows of a loaded folder's
vectors on demand): the folder (its files, journal, enrolled photos, locks) is
:mod:`fewshot.catalogue.store`, which builds a :class:`CatalogueIndex` from stored parts with
:meth:`CatalogueIndex.restore` and writes one with :meth:`CatalogueIndex.vector_rows` and
:meth:`CatalogueIndex.prototype_sums`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are, for readers and tools; at run time they load on first use
    from .ann import BLAS_MIN_QUERIES, INDEX_TYPES, AnnConfig, faiss_blas_setting
    from .catalogue_index import CatalogueIndex
    from .ranking import MODES, Neighbor, Prediction, check_classify
    from .vectors import l2_normalize

#: the module of each public name: imported on first use, so that ``import fewshot.index.kinds``
#: (the ``fewshot`` commands' help) does not load FAISS and NumPy
_EXPORTS = {"AnnConfig": "ann", "BLAS_MIN_QUERIES": "ann", "INDEX_TYPES": "ann", "faiss_blas_setting": "ann",
            "CatalogueIndex": "catalogue_index", "MODES": "ranking", "Neighbor": "ranking",
            "Prediction": "ranking", "check_classify": "ranking", "l2_normalize": "vectors",
            # importable here before the lazy imports of 0.2.0 (not in __all__)
            "Ranking": "ranking", "Growable": "vectors", "OnDemandPrototypes": "vectors", "Prototypes": "vectors",
            "VectorStore": "vectors", "normalized_copy": "vectors", "ann": None}

__all__ = ["AnnConfig", "BLAS_MIN_QUERIES", "CatalogueIndex", "INDEX_TYPES", "MODES", "Neighbor", "Prediction",
           "check_classify", "faiss_blas_setting", "l2_normalize"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    value = import_module(f".{name}", __name__) if module is None else getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
