"""Index-kind options on the command line: one flag per option of every registered index kind
(:mod:`fewshot.index.kinds`), generated from the kind's ``Config`` as ``fewshot train`` does for
methods, shown in one help panel per kind (``ivfpq options``).

``fewshot index`` takes every option (:func:`index_config` refuses those of another kind than
``--index-type``); ``fewshot classify`` takes the query-time ones. Library errors name an option
by its field (:class:`~fewshot.index.kinds.IndexOptionError`); the command's error handling
(:func:`~fewshot.cli.common.show_flags`) shows the flag.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, Optional

import typer
from rich.markup import escape

from ..errors import DataError
from ..index.kinds import AUTO, AUTO_FLAT_MAX, get_kind, is_auto, list_kinds
from ..options import flag_of

if typing.TYPE_CHECKING:
    from ..index.ann import AnnConfig

__all__ = ["KindFlag", "index_config", "index_type_help", "kind_flags", "kind_options"]

#: the flag that chooses the kind
INDEX_TYPE_FLAG = "--index-type"


@dataclasses.dataclass
class KindFlag:
    """One CLI flag made from the index kinds' option fields of the same name."""

    name: str
    flag: str
    type: type
    min: float | None
    kinds: list[str] = dataclasses.field(default_factory=list)
    helps: list[str] = dataclasses.field(default_factory=list)
    defaults: list[Any] = dataclasses.field(default_factory=list)

    def help(self, search: bool) -> str:
        """What the flag does, per kind where they differ, with the default (``search``: the
        index's stored value is the default)."""
        def one(h: str, d: Any) -> str:
            if search:  # what the option does, not how the index chose its stored value
                return re.split(r" \(|;|, stored", h, maxsplit=1)[0].rstrip(". ") + ". Default: the index's own."
            return h + (f" Default {d!r}." if d is not None else "")
        if len(set(self.helps)) == 1 and len({repr(d) for d in self.defaults}) == 1:
            return one(self.helps[0], self.defaults[0])
        return " ".join(f"{k}: {one(h, d)}" for k, h, d in zip(self.kinds, self.helps, self.defaults))

    @property
    def panel(self) -> str:
        return f"{' / '.join(self.kinds)} options"


def _base_type(hint: Any) -> type:
    """``int`` of ``int | None``."""
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def kind_flags(search: bool = False) -> dict[str, KindFlag]:
    """Every option of every registered index kind by field name (``search``: only the query-time
    ones); a flag serves every kind whose ``Config`` has a field of that name."""
    out: dict[str, KindFlag] = {}
    for name in list_kinds():
        kind = get_kind(name)
        hints = typing.get_type_hints(kind.Config)
        for f in dataclasses.fields(kind.Config):
            if search and f.name not in kind.search_options:
                continue
            flag = out.setdefault(f.name, KindFlag(f.name, flag_of(f), _base_type(hints[f.name]), f.metadata.get("min")))
            flag.kinds.append(name)
            flag.helps.append(f.metadata.get("help", ""))
            flag.defaults.append(f.default)
    return out


def index_type_help() -> str:
    """``--index-type``'s help: ``auto`` and each registered kind's summary."""
    kinds = "; ".join(f"{name}: {get_kind(name).summary}" for name in list_kinds())
    return f"{kinds}; {AUTO} = flat below {AUTO_FLAT_MAX:,} images, else ivfpq."


def kind_options(search: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: give a command one flag per index-kind option (``search``: only the query-time
    ones), in a help panel per kind; the command declares a keyword ``kind_opts`` and receives
    the options given as ``{field: value}`` (flags left out are not in it)."""

    def wrap(fn: Callable) -> Callable:
        flags = kind_flags(search)
        sig = inspect.signature(fn)
        clash = sorted(set(flags) & set(sig.parameters))
        if clash:
            raise RuntimeError(f"index kind option(s) {', '.join(clash)} clash with parameters of {fn.__name__}")
        own = [p for name, p in sig.parameters.items() if name != "kind_opts"]
        extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[f.type],
                                   default=typer.Option(None, f.flag, min=f.min, help=escape(f.help(search)),
                                                        rich_help_panel=f.panel))
                 for f in flags.values()]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in flags}
            return fn(kind_opts={k: v for k, v in given.items() if v is not None}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        hints = {k: v for k, v in typing.get_type_hints(fn).items() if k != "kind_opts"}
        wrapper.__annotations__ = {**hints, **{p.name: p.annotation for p in extra}}
        return wrapper

    return wrap


def index_config(index_type: str, given: dict[str, Any]) -> AnnConfig:
    """``--index-type`` and the kind flags given as an :class:`~fewshot.index.AnnConfig`.

    Raises:
        DataError: an unknown index type (the hint lists the known ones).
        typer.BadParameter: a flag of another kind than ``--index-type`` (``auto`` takes any
            kind's: the chosen kind uses its own).
    """
    from ..index.ann import AnnConfig

    known = "|".join([AUTO, *list_kinds()])
    try:
        kind = None if is_auto(index_type) else get_kind(index_type)
    except DataError as exc:
        raise DataError(exc.message, hint=f"use {INDEX_TYPE_FLAG} {known}") from None
    if kind is not None:
        own = {f.name for f in dataclasses.fields(kind.Config)}
        foreign = [name for name in given if name not in own]
        if foreign:
            flags = kind_flags()
            owners = sorted({k for name in foreign for k in flags[name].kinds})
            raise typer.BadParameter(
                f"{', '.join(flags[n].flag for n in foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to "
                f"{INDEX_TYPE_FLAG} {index_type} (an option of {', '.join(owners)}); options of {index_type}: "
                f"{', '.join(flags[n].flag for n in sorted(own)) or 'none'}", param_hint=INDEX_TYPE_FLAG)
    return AnnConfig(index_type, **given)
