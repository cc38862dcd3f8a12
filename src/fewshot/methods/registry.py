"""The ``METHODS`` registry: every training method by name, and each method's options.

The built-in modules register theirs when :mod:`fewshot.methods` is imported; a plugin
registers its own class with :func:`register_method` when its module is imported.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

from ..errors import FewshotError
from ..options import check_options
from ..registry import Registry
from .base import Method

__all__ = ["METHODS", "register_method", "get_method", "list_methods", "method_options"]

#: every training method by name
METHODS: Registry[type[Method]] = Registry("method", FewshotError)


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` subclass under ``name`` (one class may take several).

    Raises:
        TypeError: not a :class:`Method` subclass.
        ValueError: ``name`` is already registered.
    """

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) needs a Method subclass, got {cls!r}")
        return METHODS.add(name, cls)

    return wrap


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``.

    Raises:
        FewshotError: unknown name (the hint lists the registered ones).
    """
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def method_options(method: str, **given: Any) -> Any:
    """``method``'s :attr:`Method.Config` with ``given`` values (``None`` = its default).

    Raises:
        FewshotError: unknown method, an option the method does not have, or a value outside
            its ``min`` / ``choices`` (:func:`fewshot.options.check_options`; ``options`` names it).
    """
    cls = get_method(method).Config
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        listed = ", ".join(known) or "none"
        raise FewshotError(f"method '{method}' has no option {', '.join(unknown)} (its options: {listed})",
                           hint=f"see `fewshot methods {method}`")
    opts = cls(**{k: v for k, v in given.items() if v is not None})
    check_options(f"method '{method}'", opts)
    return opts
