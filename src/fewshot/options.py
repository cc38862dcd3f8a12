"""Options declared once: a dataclass field made with :func:`option` carries its default, its
help text, its command-line flag, a minimum and the allowed values.

Method options (:mod:`fewshot.methods`), the training loop's fields (:mod:`fewshot.training`)
and index kinds' options (:mod:`fewshot.index.kinds`) are all declared this way; the CLI
generates one flag per field from this metadata and :func:`check_options` enforces it (a bound
``min`` cannot say, e.g. a scale above 0: :func:`check_above`, from ``__post_init__``). Any
layer may import this module (it imports nothing of fewshot but :mod:`fewshot.errors`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import Field, field, fields
from typing import Any

from .errors import FewshotError

__all__ = ["option", "check_options", "check_above", "flag_of"]


def option(default: Any, help: str, *, flag: str | None = None, min: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field declared as an option.

    Args:
        default: the value when none is given.
        help: one sentence shown by ``--help`` and ``fewshot methods``.
        flag: the CLI flag (default ``--name-with-dashes``).
        min: the smallest allowed value (numbers), enforced by :func:`check_options`.
        choices: the allowed values, enforced by :func:`check_options`.

    Returns:
        A :func:`dataclasses.field` whose ``metadata`` holds ``help``, ``flag``, ``min`` and ``choices``.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "min": min, "choices": choices})


def flag_of(f: Field) -> str:
    """The CLI flag of an option field: its declared ``flag`` or ``--name-with-dashes``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_options(what: str, opts: Any) -> None:
    """Enforce each option's ``min`` and ``choices`` (see :func:`option`) and finite numbers.

    Args:
        what: who owns the options, for the message (e.g. ``"method 'triplet'"``).
        opts: a dataclass instance whose fields were made with :func:`option`.

    Raises:
        FewshotError: naming the option (by its field name, also in ``options``), its value and
            what is allowed.
    """
    for f in fields(opts):
        value, meta = getattr(opts, f.name), f.metadata
        _check_number(what, f, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise FewshotError(f"option {f.name} = {value}: {what} needs a finite number",
                               hint=f"use e.g. {f.name} = {f.default}", options=(f.name,))
        if meta.get("min") is not None and value is not None and value < meta["min"]:
            default = f" (default {f.default})" if f.default is not None else ""
            raise FewshotError(f"option {f.name} = {value}: {what} needs at least {meta['min']}",
                               hint=f"use {f.name} = {meta['min']} or more{default}", options=(f.name,))
        if meta.get("choices") and value not in meta["choices"]:
            raise FewshotError(f"unknown option {f.name} = {value!r} for {what}",
                               hint=f"use one of: {', '.join(map(str, meta['choices']))}",
                               options=(f.name,))


def _check_number(what: str, f: Any, value: Any) -> None:
    """A field with a ``min``, ``max`` or ``above`` holds a number (``None`` where allowed); one annotated
    ``int`` (and not ``float``) a whole number.

    Raises:
        FewshotError: naming the option and the kind of value it takes.
    """
    meta = f.metadata
    if value is None or all(meta.get(k) is None for k in ("min", "max", "above")):
        return
    kind = str(f.type)
    whole = "int" in kind and "float" not in kind
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (whole and not isinstance(value, numbers.Integral)):
        raise FewshotError(f"option {f.name} = {value!r}: {what} needs {'a whole number' if whole else 'a number'}",
                           hint=f"use e.g. {f.name} = {f.default if f.default is not None else meta.get('min')}",
                           options=(f.name,))


def check_above(opts: Any, **limits: float) -> None:
    """Refuse an option that is not greater than its limit, which ``min`` cannot say (e.g. a
    scale or an exponent that must be positive). Call it from the options dataclass's
    ``__post_init__``: building the options (:func:`fewshot.methods.method_options`, the CLI)
    then refuses them.

    Args:
        opts: a dataclass instance whose fields were made with :func:`option`.
        limits: option name -> the value it must exceed.

    Raises:
        FewshotError: naming the option (by its field name, also in ``options``) and its default.
    """
    defaults = {f.name: f.default for f in fields(opts)}
    for name, limit in limits.items():
        value = getattr(opts, name)
        if not value > limit:  # NaN too
            raise FewshotError(f"option {name} = {value}: must be a number greater than {limit}",
                               hint=f"use e.g. {name} = {defaults[name]}, the default", options=(name,))
