"""``group_from``: where each record's group comes from when the dataset's own groups are not
wanted (``"path:N"``, ``"label:N"``, ``"column:NAME"``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .records import ImageRecord
from .rows import Row

__all__ = ["GroupFrom", "apply_group_from", "parse_group_from"]


@dataclass(frozen=True)
class GroupFrom:
    """A parsed ``group_from`` spec: ``kind`` is ``"path"``, ``"label"`` or ``"column"``."""

    kind: str
    index: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.column if self.kind == 'column' else self.index}"


_GROUP_FROM_HINT = (
    "use 'path:N' (N-th component of the image path, 0-based, -1 = last folder is 'path:-2'), "
    "'label:N' (N-th dash-separated field of the label) or 'column:NAME' (a CSV column)"
)


def parse_group_from(spec: str | None) -> GroupFrom | None:
    """Parse a ``group_from`` spec (``"path:N"``, ``"label:N"``, ``"column:NAME"``).

    Returns ``None`` for ``None``/empty. Negative ``N`` counts from the end (Python indexing).

    Raises:
        DataError: the spec has another form or ``N`` is not an integer.
    """
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip()
    m = re.fullmatch(r"(path|label|column)\s*:\s*(.+)", text, flags=re.IGNORECASE)
    if not m:
        raise DataError(f"invalid group_from {text!r}", hint=_GROUP_FROM_HINT)
    kind, arg = m.group(1).lower(), m.group(2).strip()
    if kind == "column":
        return GroupFrom("column", column=arg)
    try:
        return GroupFrom(kind, index=int(arg))
    except ValueError:
        raise DataError(f"invalid group_from {text!r}: {arg!r} is not an integer", hint=_GROUP_FROM_HINT) from None


def apply_group_from(rows: list[Row], spec: GroupFrom, source: Path, columns: Sequence[str] | None) -> list[ImageRecord]:
    """The records of ``rows`` with their group taken as ``spec`` says (``None`` where empty).

    ``columns``: the manifest's column names, ``None`` for a folder dataset.

    Raises:
        DataError: a column spec on a folder dataset or naming a missing column, or an index
            past a path's components or a label's fields (the message names ``source``).
    """
    out: list[ImageRecord] = []
    if spec.kind == "column":
        if columns is None:
            raise DataError(
                f"group_from {str(spec)!r} needs a CSV manifest, but {source} is a folder dataset",
                hint="use 'path:N' or 'label:N' for folder datasets",
            )
        key = spec.column.strip().lower()
        if key not in columns:
            raise DataError(
                f"group_from {str(spec)!r}: {source} has no column {spec.column!r} "
                f"(found: {', '.join(c for c in columns if c) or 'none'})",
                hint="name one of the manifest's columns after 'column:'",
            )
    for row in rows:
        r = row.record
        if spec.kind == "column":
            value = (row.cells or {}).get(key, "").strip()
        elif spec.kind == "path":
            parts = row.rel_parts
            try:
                value = parts[spec.index]
            except IndexError:
                raise DataError(
                    f"group_from {str(spec)!r}: {'/'.join(parts)!r} in {source} has only {len(parts)} "
                    f"path component(s)",
                    hint=f"pick an index between 0 and {max(len(parts) - 2, 0)} (the folders of the path)",
                ) from None
        else:
            fields = r.label.split("-")
            try:
                value = fields[spec.index]
            except IndexError:
                raise DataError(
                    f"group_from {str(spec)!r}: label {r.label!r} in {source} has only {len(fields)} "
                    f"dash-separated field(s)",
                    hint="pick a smaller index, or use 'path:N' / 'column:NAME'",
                ) from None
            value = value.strip()
        out.append(ImageRecord(r.path, r.label, value or None, r.split))
    return out
