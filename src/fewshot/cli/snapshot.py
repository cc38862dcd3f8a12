"""What the command line's flags and help take from modules that import torch: the training
loop's options (:class:`~fewshot.training.config.TrainConfig`), every registered method's options,
the catalogue check's levels and the embedding batch size.

``fewshot --version`` and every ``fewshot ... --help`` start without torch because they read these
from :mod:`.snapshot_data`, a copy that :func:`write` makes from the modules
themselves: ``python -c "import fewshot.cli.snapshot as s; s.write()"``. ``tests/cli/test_cli_snapshot.py`` fails, naming that command, as soon as the copy
differs from them (an option added, a default or help text changed). A process that has already
imported a module (the tests, a script that registers a plugin method before it builds the CLI)
reads that module itself, so a plugin's flags show too.

Each part is plain data (text, numbers, lists, dicts), the same from either source.
"""

from __future__ import annotations

import dataclasses
import pprint
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PARTS", "current", "describe", "write"]

#: a type by the name the snapshot stores
TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "path": Path}


def _type_name(hint: Any) -> str:
    """``"int"`` of ``int | None``."""
    typ = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    name = next((k for k, v in TYPES.items() if v is typ), None)
    if name is None:
        raise TypeError(f"an option of type {hint!r}: the command line takes int, float, str, bool or a path")
    return name


def _shown(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` without the keys whose value is ``None`` or ``False`` (``default`` kept)."""
    return {k: v for k, v in entry.items() if k == "default" or (v is not None and v is not False)}


def _loop() -> list[dict[str, Any]]:
    """The loop's options, in declaration order: flag, help, type, command-line default, limits
    and the command line's metadata (``fewshot.training.config.loop_option``)."""
    from ..options import flag_of
    from ..training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if "help" not in meta:
            continue
        cli = meta["cli"]
        typ = "path" if cli.get("path") else "str" if cli.get("parse") else _type_name(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        out.append(_shown({"name": f.name, "flag": flag_of(f), "type": typ, "default": default, "help": meta["help"],
                           "min": meta.get("min"), "max": meta.get("max"), "above": meta.get("above"),
                           **{k: bool(cli.get(k)) for k in ("required", "unset", "hidden", "invert")}}))
    return out


def _methods() -> dict[str, list[dict[str, Any]]]:
    """Each registered method's options: name, flag, type, default, help."""
    from ..methods import get_method, list_methods
    from ..options import flag_of

    out = {}
    for name in list_methods():
        cls = get_method(name).Config
        hints = typing.get_type_hints(cls)
        out[name] = [{"name": f.name, "flag": flag_of(f), "type": _type_name(hints[f.name]), "default": f.default,
                      "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls)]
    return out


def _check_levels() -> dict[str, Any]:
    from ..catalogue.check import CheckLevels

    return {f.name: f.default for f in dataclasses.fields(CheckLevels)}


def _embed_batch_size() -> int:
    from ..embed import DEFAULT_BATCH_SIZE

    return DEFAULT_BATCH_SIZE


#: each part: the module it comes from, and how it is read from there
PARTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "embed_batch_size": ("fewshot.embed", _embed_batch_size),
    "check_levels": ("fewshot.catalogue.check", _check_levels),
    "loop": ("fewshot.training.config", _loop),
    "methods": ("fewshot.methods", _methods),
}


def describe() -> dict[str, Any]:
    """Every part read from its module (imports torch)."""
    return {name: read() for name, (_, read) in PARTS.items()}


def current(part: str) -> Any:
    """One part: from its module when that is imported already, else from the snapshot (from
    the module too when the snapshot lacks it, e.g. before the first :func:`write`)."""
    module, read = PARTS[part]
    if module not in sys.modules:
        try:
            from .snapshot_data import SNAPSHOT

            return SNAPSHOT[part]
        except (ImportError, KeyError):
            pass
    return read()


def write(path: Path | None = None) -> Path:
    """Write :mod:`.snapshot_data` from the modules (``path``: elsewhere, e.g. to compare)."""
    path = path or Path(__file__).with_name("snapshot_data.py")
    lines = ['"""Written by :func:`fewshot.cli.snapshot.write` from the modules: do not edit; write it again',
             'when tests/cli/test_cli_snapshot.py says so."""', "", "SNAPSHOT = {"]
    for name, value in describe().items():
        if isinstance(value, list):
            lines += [f"    {name!r}: ["] + [f"        {item!r}," for item in value] + ["    ],"]
        elif isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            lines.append(f"    {name!r}: {{")
            for key, items in value.items():
                lines += [f"        {key!r}: ["] + [f"            {item!r}," for item in items] + ["        ],"]
            lines.append("    },")
        else:
            lines.append(f"    {name!r}: {pprint.pformat(value, width=10_000, sort_dicts=False)},")
    path.write_text("\n".join([*lines, "}", ""]), encoding="utf-8")
    return path
