"""What the dataset loaders share: the row a loader yields, how a loader warns, which names it
skips. (:mod:`fewshot.data.manifest` reads manifests, :mod:`fewshot.data.grocery` Grocery,
:mod:`fewshot.data.tree` folder trees; :mod:`fewshot.data.loaders` picks one.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .records import ImageRecord

log = logging.getLogger("fewshot.data.loaders")

#: folders that hold no data (operating-system and NAS litter)
SKIP_NAMES = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}
#: examples a message lists before "... and N more"
MAX_EXAMPLES = 5


@dataclass
class Row:
    """A record plus what ``group_from`` may need: the path as written and the CSV row."""

    record: ImageRecord
    rel_parts: tuple[str, ...]
    cells: dict[str, str] | None = None


def warn(ds_warnings: list[str], message: str, strict: bool, source: Path, hint: str,
         options: tuple[str, ...] = ()) -> None:
    """Log ``message`` and keep it in ``ds_warnings``; with ``strict``, raise it instead
    (``options``: those the hint names, see :class:`~fewshot.errors.FewshotError`).

    Raises:
        DataError: ``strict`` is set (the message names ``source``, the hint the fix).
    """
    if strict:
        raise DataError(f"{message} (in {source})", hint=hint + " (or leave strict off to skip it)",
                        options=("strict", *options))
    log.warning("%s", message)
    ds_warnings.append(message)


def note(ds_warnings: list[str], message: str) -> None:
    """Log ``message`` (info) and keep it in ``ds_warnings``: worth knowing, never an error."""
    log.info("%s", message)
    ds_warnings.append(message)


def hidden(name: str) -> bool:
    """Whether a file or folder name is skipped (``.name``, :data:`SKIP_NAMES`)."""
    return name.startswith(".") or name in SKIP_NAMES


def examples(items: Sequence[str], limit: int = MAX_EXAMPLES) -> str:
    """``"a, b, c"`` or ``"a, b, c and 4 more"``: the first ``limit`` items of a list."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
