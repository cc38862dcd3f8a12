"""CSV manifests (``source="csv"``): one row per image, columns ``path,label`` and optionally
``group`` and ``split``, in the dialects :func:`load_csv` accepts."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path, PurePosixPath

from ..errors import DataError
from .records import Dataset, ImageRecord
from .rows import MAX_EXAMPLES, Row, log, warn

__all__ = ["CSV_COLUMNS", "load_csv"]

#: Accepted CSV header names (lower-cased, stripped) for each logical column.
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "image", "image_path", "filepath", "file_path", "file", "filename"),
    "label": ("label", "class", "class_name"),
    "group": ("group",),
    "split": ("split",),
}


def _read_manifest_text(path: Path, warnings: list[str]) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror or exc}", hint="check the file's permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        note = f"{path} is not valid UTF-8; read it as Windows-1252 (check accented names)"
        log.warning("%s", note)
        warnings.append(note)
        return data.decode("cp1252", errors="replace")


def _sniff_delimiter(header_line: str) -> str:
    """The header's delimiter: ``,`` when it has one, else what :class:`csv.Sniffer` finds among
    ``;``, tab and ``|`` (a one-column header: ``,``)."""
    if "," in header_line:
        return ","
    try:
        return csv.Sniffer().sniff(header_line, delimiters=";\t|").delimiter
    except csv.Error:
        return ","


def _csv_columns(path: Path, header: list[str], names: list[str], ignored: set[int]) -> dict[str, int]:
    """Column index of each logical column (:data:`CSV_COLUMNS`) found in the header.

    Raises:
        DataError: no ``path`` or no ``label`` column (the message lists what was found).
    """
    col: dict[str, int] = {}
    for logical, aliases in CSV_COLUMNS.items():
        for alias in aliases:
            idx = next((i for i, n in enumerate(names) if n == alias and i not in ignored), None)
            if idx is not None:
                col[logical] = idx
                break
    missing = [c for c in ("path", "label") if c not in col]
    if missing:
        found = [header[i].strip() for i in range(len(header)) if i not in ignored]
        raise DataError(
            f"manifest {path} is missing required column(s): {', '.join(missing)} "
            f"(found: {', '.join(repr(f) for f in found) or 'none'})",
            hint="the header must name a 'path' column (image path relative to the CSV's folder) and a "
                 "'label' column; optional: 'group', 'split'. Accepted path names: "
                 + ", ".join(CSV_COLUMNS["path"]) + "; label names: " + ", ".join(CSV_COLUMNS["label"]),
        )
    return col


def load_csv(path: Path, strict: bool) -> tuple[Dataset, list[Row], list[str]]:
    """Read a CSV manifest.

    Accepted dialects: UTF-8 with or without BOM (Windows-1252 as a fallback, with a
    warning); ``,`` (or, when the header has no comma, ``;``/tab/``|``) delimiters with
    standard CSV quoting; a leading pandas index column (empty header cell or
    ``Unnamed: 0``) and any ``Unnamed: N`` column are ignored; header names are matched
    case-insensitively with aliases (:data:`CSV_COLUMNS`); ``\\`` in paths is read as a
    folder separator; cell values are stripped; fully empty rows are skipped. The ``split``
    column, when present, is lower-cased into ``ImageRecord.split``.
    """
    path = path.resolve()
    warnings: list[str] = []
    text = _read_manifest_text(path, warnings)
    first_line = text.split("\n", 1)[0]
    delim = "\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(first_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"manifest {path} is empty", hint="write a header 'path,label' and one row per image") from None
    except csv.Error as exc:
        raise DataError(f"manifest {path} is not valid CSV: {exc}", hint="save it as CSV (comma-separated, UTF-8)") from None

    names = [h.strip().lower() for h in header]
    ignored = {i for i, n in enumerate(names) if n == "" or re.fullmatch(r"unnamed:\s*\d+", n)}
    col = _csv_columns(path, header, names, ignored)
    base = str(path.parent)
    rows: list[Row] = []
    seen: dict[str, tuple[str, int]] = {}
    bad: list[str] = []
    dupes: list[str] = []
    conflicts: list[str] = []
    ncols = len(header)
    try:
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) < ncols:
                row = row + [""] * (ncols - len(row))
            raw_path = row[col["path"]].strip()
            label = row[col["label"]].strip()
            if not raw_path or not label:
                bad.append(f"line {line}: empty {'path' if not raw_path else 'label'}")
                continue
            rel = raw_path.replace("\\", "/")
            full = os.path.normpath(os.path.join(base, rel))
            prev = seen.get(full)
            if prev is not None:
                if prev[0] == label:
                    dupes.append(f"line {line}: {raw_path!r} repeats line {prev[1]}")
                else:
                    conflicts.append(f"line {line}: {raw_path!r} labelled {label!r} but {prev[0]!r} on line {prev[1]}")
                continue
            seen[full] = (label, line)
            group = (row[col["group"]].strip() or None) if "group" in col else None
            split_value = (row[col["split"]].strip().lower() or None) if "split" in col else None
            cells = {names[i]: row[i] for i in range(ncols) if i not in ignored and names[i]}
            rows.append(Row(ImageRecord(Path(full), label, group, split_value),
                             tuple(p for p in PurePosixPath(rel).parts if p != "/"), cells))
    except csv.Error as exc:
        raise DataError(f"manifest {path} line {reader.line_num} is not valid CSV: {exc}",
                        hint="check the quoting on that line (a stray '\"'?)") from None

    for items, what, hint in (
        (bad, "row(s) without a path or label skipped", "fill in or delete those rows"),
        (conflicts, "path(s) listed again with another label; the first label was kept",
         "give each image exactly one label"),
        (dupes, "duplicate row(s) skipped", "delete the repeated rows"),
    ):
        if items:
            shown = "; ".join(items[:MAX_EXAMPLES]) + (f"; ... and {len(items) - MAX_EXAMPLES} more"
                                                         if len(items) > MAX_EXAMPLES else "")
            warn(warnings, f"{path.name}: {len(items)} {what} ({shown})", strict and what != "duplicate row(s) skipped",
                  path, hint)

    columns = [n for i, n in enumerate(names) if i not in ignored]
    return Dataset([], name=path.stem, root=path, source="csv", warnings=warnings), rows, columns
