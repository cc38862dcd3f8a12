"""The index-kind contract: what a FAISS image index type decides, in one class per kind.

A kind (:class:`IndexKind`) declares its options as a dataclass made with
:func:`fewshot.options.option` (the CLI makes one flag per field) and answers every question the
catalogue asks about its image index: how the index is created, trained and built, how vectors
are added and searched, whether the article prototypes stay in memory, whether the index is
saved or rebuilt from the exact vectors, how ids continue after removals and what compaction
does. The catalogue (:class:`fewshot.index.CatalogueIndex`) never asks which kind it holds.

Kinds register themselves in :data:`INDEX_KINDS` with :func:`register_kind`; the package
``__init__`` imports each built-in kind file (one line per kind). The built-in kind files import
FAISS and NumPy inside the methods that use them, so that the kinds' names and options (every
``fewshot`` command's help) load without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import DataError, FewshotError, InputError
from ...options import check_options
from ...registry import Registry

if TYPE_CHECKING:
    import faiss
    import numpy as np

__all__ = ["INDEX_KINDS", "SHARD_ROWS", "IndexKind", "IndexOptionError", "NoOptions", "register_kind", "shards"]

#: vectors added per shard when an index is built (bounds the float copy held at once)
SHARD_ROWS = 100_000


def shards(n: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most :data:`SHARD_ROWS` covering ``range(n)``."""
    for start in range(0, n, SHARD_ROWS):
        yield start, min(n, start + SHARD_ROWS)


class IndexOptionError(InputError):
    """An index option (or the index kind itself, ``index_type``) that does not fit the catalogue.

    ``message`` and ``hint`` name the option as in Python (``option m = 7``, ``index_type='ivfpq'``);
    it is the error's one :attr:`~fewshot.errors.FewshotError.options`, so that the CLI shows its
    flag. Both a :class:`~fewshot.errors.DataError` and a ``ValueError``.

    Attributes:
        option: the option's field name, or ``"index_type"``.
    """

    def __init__(self, option: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.option = option
        self.options = (option,)


@dataclass(frozen=True)
class NoOptions:
    """The options of a kind that has none."""


class IndexKind:
    """One FAISS image index type: its options (:attr:`opts`, an instance of :attr:`Config`)
    and everything the catalogue does with its index. Vectors are ``float32 [N, D]``,
    L2-normalised; scores are inner products (cosines); ids are ``int64``.

    Class attributes a kind sets:
        name: the registered name (``flat``, ``ivfpq``, ...).
        summary: one line for ``--help`` (what it is, when to use it).
        Config: its options, a frozen dataclass whose fields are made with ``option()``.
        search_options: the :attr:`Config` fields that may change at query time
            (``classify --nprobe``); their stored values are the defaults.
        prototypes_in_memory: ``True``: every article prototype is held in memory and scanned
            exactly; ``False``: prototype rows are read from disk on demand and a shortlist of
            the articles of the nearest images is re-ranked exactly.
        saves_index: ``True``: the FAISS index is written to the index folder; ``False``: it is
            rebuilt from the exact vectors when the folder is loaded.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    search_options: ClassVar[tuple[str, ...]] = ()
    prototypes_in_memory: ClassVar[bool] = False
    saves_index: ClassVar[bool] = True

    def __init__(self, opts: Any) -> None:
        self.opts = opts

    # ----------------------------------------------------------------- options
    @classmethod
    def make_options(cls, **given: Any) -> Any:
        """The kind's :attr:`Config` from ``given`` (its field names; the others keep their
        defaults), checked against each field's ``min`` / ``choices``.

        Raises:
            InputError: a name that is not one of its options, or a value out of range.
        """
        own = {f.name for f in fields(cls.Config)}
        unknown = sorted(set(given) - own)
        if unknown:
            raise InputError(f"{', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'} "
                             f"of index kind '{cls.name}'", hint=f"its options: {', '.join(sorted(own)) or 'none'}")
        opts = cls.Config(**given)
        try:
            check_options(f"index kind '{cls.name}'", opts)
        except FewshotError as exc:
            raise InputError(exc.message, hint=exc.hint) from None
        return opts

    def resolve(self, n: int, dim: int) -> Any:
        """The options with their size-dependent defaults filled in for ``n`` vectors of
        dimension ``dim`` (the same options when resolved twice).

        Raises:
            IndexOptionError: options that do not fit such a catalogue.
        """
        return self.opts

    # ----------------------------------------------------------------- building
    def create(self, dim: int, sample: Callable[[np.ndarray], np.ndarray] | None = None, n: int = 0) -> faiss.Index:
        """An empty index of ``dim``-d vectors, ready for :meth:`add`. A kind that trains (IVF)
        trains here on ``sample(rows)`` (``float32 [rows, D]`` for sorted row numbers drawn
        from ``range(n)``). The options must be resolved (:meth:`resolve`)."""
        raise NotImplementedError

    def build(self, vectors: np.ndarray, progress: Callable[[int], None] | None = None) -> faiss.Index:
        """The index of ``vectors float32 [N, D]`` (a memory map is fine: read shard by shard),
        ids ``0..N-1``; ``progress(rows)`` is called after each shard."""
        import numpy as np

        n, dim = vectors.shape
        index = self.create(dim, lambda rows: vectors[rows], n)
        for start, stop in shards(n):
            index.add(np.ascontiguousarray(vectors[start:stop], dtype=np.float32))
            if progress:
                progress(stop)
        return index

    # ----------------------------------------------------------------- changes
    def add(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append ``vectors float32 [n, D]`` as ``ids int64 [n]`` (consecutive, from
        :meth:`first_new_id`). By default the index numbers vectors in insertion order,
        tombstones included, so ``ids`` must start at ``index.ntotal``."""
        assert ids[0] == index.ntotal, "image index and vector store disagree"
        index.add(vectors)

    def first_new_id(self, index: faiss.Index, ids: np.ndarray) -> int:
        """The id of the next vector added to a loaded ``index`` whose live ids are ``ids``
        (sorted ``int64``). By default ids run to ``ntotal``, tombstones included."""
        return max(int(index.ntotal), int(ids[-1]) + 1 if len(ids) else 0)

    def compact(self, index: faiss.Index, live: np.ndarray, id_end: int) -> None:
        """Before a save, with tombstones: drop what the index can drop of the ids in
        ``range(id_end)`` not in ``live`` (sorted ``int64``). By default nothing: the
        tombstones stay in the index, masked at query time."""

    # ----------------------------------------------------------------- searching
    def search_params(self, extra: dict[str, Any]) -> faiss.SearchParameters | None:
        """Query-time parameters; ``extra`` holds the id selector (``sel``) when some ids are
        tombstones. ``None``: plain search."""
        import faiss

        return faiss.SearchParameters(**extra) if extra else None

    def shortlist(self, k: int) -> int:
        """How many approximate candidates to fetch for ``k`` results when they are re-ranked
        with the exact vectors (``k``: no re-ranking)."""
        return k


#: every index kind by name; the built-in files register theirs when
#: :mod:`fewshot.index.kinds` is imported
INDEX_KINDS: Registry[type[IndexKind]] = Registry("index type", DataError)


def register_kind(name: str) -> Callable[[type[IndexKind]], type[IndexKind]]:
    """Class decorator: register an :class:`IndexKind` subclass as ``name`` (its :attr:`name`).

    Raises:
        TypeError: not an :class:`IndexKind` subclass, or its options are not a dataclass.
        ValueError: ``name`` is already registered, or is not the class's :attr:`~IndexKind.name`.
    """

    def wrap(cls: type[IndexKind]) -> type[IndexKind]:
        if not (isinstance(cls, type) and issubclass(cls, IndexKind)):
            raise TypeError(f"@register_kind({name!r}) needs an IndexKind subclass, got {cls!r}")
        if cls.name != name:
            raise ValueError(f"@register_kind({name!r}) on a kind whose name is {cls.name!r}")
        fields(cls.Config)  # TypeError when it is not a dataclass
        return INDEX_KINDS.add(name, cls)

    return wrap
