"""FAISS image indexes for catalogues of any size: an index kind (:mod:`fewshot.index.kinds`:
exact ``flat``, approximate ``ivfpq`` and ``hnsw``) with its options, built and searched.

All indexes use inner product over L2-normalised vectors (= cosine). Vector ids are insertion
order; removed vectors stay in the index as tombstones, masked out at query time with an
``IDSelectorBitmap`` until the catalogue is compacted (:func:`fewshot.catalogue.store.save_index`; what
compaction does is the kind's: :meth:`~fewshot.index.kinds.IndexKind.compact`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import faiss
import numpy as np

from ..errors import InputError
from .kinds import AUTO, AUTO_FLAT_MAX, DEFAULT_KIND, IndexKind, choose_kind, get_kind, is_auto, list_kinds
from .kinds.base import SHARD_ROWS

#: INDEX_TYPES (module attribute, read when asked): ``auto`` and every registered kind
__all__ = ["AUTO_FLAT_MAX", "BLAS_MIN_QUERIES", "SHARD_ROWS", "AnnConfig", "build", "faiss_blas_setting",
           "resolve", "search", "search_params"]

log = logging.getLogger("fewshot")


def __getattr__(name: str) -> Any:
    if name == "INDEX_TYPES":  # the index types accepted now: auto and every registered kind
        return (AUTO, *list_kinds())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _option_names(kind: str) -> set[str]:
    """The option fields of ``kind`` (of every registered kind for ``auto``)."""
    names = list_kinds() if is_auto(kind) else [kind]
    return {f.name for n in names for f in fields(get_kind(n).Config)}


@dataclass(frozen=True, init=False)
class AnnConfig:
    """How the image index is built and searched: an index kind and its options (what an index
    folder's ``meta.json`` stores under ``index``).

    ``AnnConfig(kind="flat", **options)``: ``kind`` a registered index kind
    (:func:`fewshot.index.kinds.list_kinds`) or ``auto`` (chosen by the catalogue's size in
    :func:`resolve`); ``options`` its option fields by name (for ``auto``, those of any kind: the
    chosen kind takes its own). ``AnnConfig(kind, opts)`` takes a kind's ``Config`` instance.

    Attributes:
        kind: the kind's name (``auto`` until :func:`resolve`).
        options: the kind's options (an instance of its ``Config``); for ``auto`` the dict of
            options given.

    Raises:
        DataError: an unknown kind. InputError: an option the kind does not have, or a value out
        of range (an :class:`~fewshot.errors.InputError` is also a ``ValueError``).
    """

    kind: str
    options: Any

    def __init__(self, kind: str = DEFAULT_KIND, options: Any = None, **given: Any) -> None:
        if is_auto(kind):
            options = dict(options or {}, **given)
            unknown = sorted(set(options) - _option_names(kind))
            if unknown:
                raise InputError(f"unknown index option {', '.join(unknown)}",
                                 hint=f"use one of: {', '.join(sorted(_option_names(kind)))}")
            for name in list_kinds():  # each value checked by the kinds that have it
                own = _option_names(name)
                get_kind(name).make_options(**{k: v for k, v in options.items() if k in own})
        elif options is None:
            options = get_kind(kind).make_options(**given)
        elif given or not isinstance(options, get_kind(kind).Config):
            raise TypeError(f"AnnConfig({kind!r}, options) takes a {get_kind(kind).Config.__name__} and no keywords")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", options)

    @property
    def index_kind(self) -> IndexKind:
        """The kind with these options (an :class:`~fewshot.index.kinds.IndexKind`).

        Raises:
            ValueError: ``auto`` (:func:`resolve` chooses the kind).
        """
        if is_auto(self.kind):
            raise ValueError("an auto index config has no kind yet: resolve() it for a catalogue size")
        return get_kind(self.kind)(self.options)

    def to_dict(self) -> dict:
        """``{"kind": name, **options}`` (JSON-ready)."""
        return {"kind": self.kind, **(dict(self.options) if is_auto(self.kind) else asdict(self.options))}

    @classmethod
    def from_dict(cls, d: dict | None) -> AnnConfig:
        """The config :meth:`to_dict` wrote (``None``: a default flat index). Keys that are not
        options of the kind are ignored: an index written before each kind had its own options
        stored every kind's parameters.

        Raises:
            DataError: an unknown kind. InputError: an option value out of range.
        """
        d = dict(d or {})
        kind = d.pop("kind", DEFAULT_KIND)
        own = _option_names(kind)
        return cls(kind, **{k: v for k, v in d.items() if k in own})

    def with_search(self, **given: Any) -> AnnConfig:
        """This config with other query-time options (``None`` keeps the stored value). An
        option of another kind is ignored, with a warning.

        Raises:
            InputError: not a query-time option of any kind, or a value out of range.
        """
        given = {k: v for k, v in given.items() if v is not None}
        owners = {n: [k for k in list_kinds() if n in get_kind(k).search_options] for n in given}
        unknown = sorted(n for n, kinds in owners.items() if not kinds)
        if unknown:
            known = sorted({n for k in list_kinds() for n in get_kind(k).search_options})
            raise InputError(f"{', '.join(unknown)}: not a query-time index option",
                             hint=f"use one of: {', '.join(known) or 'none'}")
        for name, kinds in owners.items():
            get_kind(kinds[0]).make_options(**{name: given[name]})  # the value is checked either way
            if self.kind not in kinds:
                log.warning("%s applies to %s index; this one is %s, so it is ignored", name,
                            " / ".join(_an(k) for k in kinds), self.kind)
                del given[name]
        return AnnConfig(self.kind, get_kind(self.kind).make_options(**{**asdict(self.options), **given}))


def _an(name: str) -> str:
    return ("an " if name[:1] in "aeiouh" else "a ") + name


def resolve(config: AnnConfig, n: int, dim: int) -> AnnConfig:
    """``config`` with ``auto`` and the size-dependent defaults filled in for ``n`` vectors of
    dimension ``dim`` (resolving a resolved config changes nothing).

    Raises:
        DataError: an unknown kind. IndexOptionError (a DataError): options that do not fit the
        catalogue, e.g. ``ivfpq`` on too few images.
    """
    kind = choose_kind(config.kind, n)
    cls = get_kind(kind)
    opts = config.options
    if is_auto(config.kind):
        own = _option_names(kind)
        opts = cls.make_options(**{k: v for k, v in opts.items() if k in own})
    return AnnConfig(kind, cls(opts).resolve(n, dim))


def build(config: AnnConfig, vectors: np.ndarray, progress: Callable[[int], None] | None = None) -> faiss.Index:
    """The index of ``vectors float32 [N, D]`` (L2-normalised; a memory map is fine: it is read
    shard by shard), ids ``0..N-1``. ``config`` must be resolved (:func:`resolve`).
    ``progress(rows)`` is called after each shard."""
    return config.index_kind.build(vectors, progress)


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
    """Query-time parameters: the kind's own (``nprobe``, ``efSearch``) and, when ``alive`` (a
    little-endian bit per id, ``uint8``) is given, a selector that skips tombstoned ids. The
    caller keeps ``alive`` referenced while the parameters are used."""
    sel = faiss.IDSelectorBitmap(len(alive) * 8, faiss.swig_ptr(alive)) if alive is not None else None
    extra = {"sel": sel} if sel is not None else {}
    return config.index_kind.search_params(extra)


def search(index: faiss.Index, config: AnnConfig, queries: np.ndarray, k: int,
           alive: np.ndarray | None = None,
           exact: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``queries float32 [Q, D]`` -> ``(scores float32 [Q, k], ids int64 [Q, k])``, best first
    (``-1`` ids pad rows with fewer than ``k`` results).

    With ``exact`` (``ids int64 [n] -> float32 [n, D]``), a kind that re-ranks (IVF-PQ with
    ``rerank > 0``) re-scores its best approximate candidates
    (:meth:`~fewshot.index.kinds.IndexKind.shortlist`) with the exact vectors.
    """
    params = search_params(config, alive)
    shortlist = config.index_kind.shortlist(k) if exact else k
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
