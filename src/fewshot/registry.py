"""One registry type for everything looked up by name: backbones, methods, datasets.

timm's pattern: a module registers its entries when it is imported (the package ``__init__``
imports every built-in module), and callers create things by name. Registering a name twice
raises, so two plugins cannot silently replace each other.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import FewshotError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: what the entries are, for messages (``"backbone"``, ``"method"``, ``"dataset"``).
        error: the :class:`~fewshot.errors.FewshotError` subclass raised for an unknown name.
        hint: extra text for the unknown-name hint (after the list of known names).
    """

    def __init__(self, kind: str, error: type[FewshotError] = FewshotError, hint: str = "") -> None:
        self.kind = kind
        self.error = error
        self.hint = hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Register ``entry`` as ``name``; returns it.

        Raises:
            ValueError: ``name`` is empty or already registered (and not ``replace``).
        """
        if not name:
            raise ValueError(f"a {self.kind} needs a name")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = entry
        return entry

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry, replace=replace)

    def remove(self, name: str) -> None:
        """Forget ``name`` (no error when absent; for tests and plugins)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            FewshotError (``error``): unknown name; the hint lists the known ones.
        """
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise self.error(f"unknown {self.kind} '{name}'",
                             hint=f"use one of: {known}" + (f"; {self.hint}" if self.hint else "")) from None

    def find(self, name: str) -> T | None:
        """The entry registered as ``name``, or ``None``."""
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
