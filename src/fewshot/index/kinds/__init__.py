"""Index kinds behind the one :class:`~fewshot.registry.Registry`: each FAISS image index type is
one file with one :class:`~.base.IndexKind` subclass, registered by name.

Importing this package registers the built-in kinds (one import line per kind file); a plugin
imports its own file. ``auto`` is not a kind but a rule: :func:`choose_kind`.
"""

from __future__ import annotations

from . import flat, hnsw, ivfpq  # noqa: F401  (register flat, hnsw, ivfpq: one line per kind)
from .base import INDEX_KINDS, IndexKind, IndexOptionError, NoOptions, register_kind

__all__ = ["AUTO", "AUTO_FLAT_MAX", "DEFAULT_KIND", "INDEX_KINDS", "IndexKind", "IndexOptionError", "NoOptions", "choose_kind",
           "get_kind", "is_auto", "list_kinds", "register_kind"]

#: the index type that picks a kind by the catalogue's size
AUTO = "auto"
#: the kind of an index built without one (:class:`fewshot.index.AnnConfig`), and of format-1 folders
DEFAULT_KIND = "flat"
#: ``auto`` picks ``flat`` below this many catalogue images and ``ivfpq`` from here on
AUTO_FLAT_MAX = 200_000
INDEX_KINDS.hint = f"or {AUTO} (flat below {AUTO_FLAT_MAX:,} images, else ivfpq)"


def get_kind(name: str) -> type[IndexKind]:
    """The kind class registered as ``name``.

    Raises:
        DataError: unknown name (the hint lists the registered ones and ``auto``).
    """
    return INDEX_KINDS.get(name)


def list_kinds() -> list[str]:
    """Names of the registered kinds, sorted (``auto`` is not one)."""
    return INDEX_KINDS.names()


def is_auto(name: str) -> bool:
    """Whether ``name`` is :data:`AUTO`, the size rule, rather than a kind."""
    return name == AUTO


def choose_kind(name: str, n: int) -> str:
    """The kind an index of ``n`` images gets for the index type ``name``: ``name`` itself, or
    for ``auto`` ``flat`` below :data:`AUTO_FLAT_MAX` images and ``ivfpq`` from there on.

    Raises:
        DataError: unknown name.
    """
    kind = ("flat" if n < AUTO_FLAT_MAX else "ivfpq") if is_auto(name) else name
    get_kind(kind)
    return kind
