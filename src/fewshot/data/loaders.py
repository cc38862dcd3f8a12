"""Read a dataset (a list of labelled image paths) from a folder, a CSV manifest or a known layout.

:func:`load_dataset` detects the layout from what ``path`` points at, in this order:

1. **Grocery Store Dataset** (``source="grocery"``): a folder holding
   ``dataset/classes.csv`` and ``dataset/{train,val,test}.txt`` (or the ``dataset/`` folder
   itself). Each ``*.txt`` line is ``path, fine_id, coarse_id`` with the path relative to
   ``dataset/``. ``label`` = fine class name (``"Granny-Smith"``), ``group`` = coarse class
   name (``"Apple"``), ``split`` = ``"train"``/``"val"``/``"test"``. ``split="catalogue"``
   returns :func:`load_grocery_catalogue` (the 81 iconic studio images).
2. **CSV manifest** (``source="csv"``): a ``.csv`` file with columns ``path,label`` and
   optionally ``group`` and ``split`` (see :func:`_load_csv` for the accepted dialects:
   pandas index column, ``;``/tab delimiters, Windows ``\\`` paths, UTF-8 with or without BOM).
   Paths are relative to the CSV's folder (absolute paths are used as they are).
3. **Folder tree** (``source="folder"``, or ``"omniglot"``; :mod:`fewshot.data.tree`):

   * one level, ``root/<class>/<images>``: ``label`` = class folder name, ``group`` = None;
   * two levels, ``root/<group>/<class>/<images>``: ``group`` = group folder name and
     ``label`` = class folder name, **unless** some class folder name occurs under more
     than one group: then every label is ``"<group>/<class>"`` (so labels stay unique;
     a note is added to ``Dataset.warnings``).

   ``layout`` says which: ``"class"``, ``"group/class"`` or ``"auto"`` (the default: two-level
   when no top-level folder holds image files directly; a tree of mixed depth, such as stray
   photos lying directly in one brand folder of a brand/article tree, is refused with the
   folders named). Images in deeper sub-folders of a class folder belong to that class. A
   two-level tree of PNG files whose path mentions ``omniglot`` (or whose class folders are
   named ``characterNN``) is Omniglot: ``source="omniglot"`` and labels are always
   ``"<alphabet>/<character>"`` (character names repeat across alphabets).

Image files are recognised by suffix (``jpg jpeg png bmp gif tif tiff webp``, any case);
hidden files and folders (``.name``, ``__MACOSX``) are skipped. The loaders never open or
stat the images (the embedding step reports unreadable files), so loading is fast.

Problems a user can cause raise :class:`fewshot.errors.DataError` (message names the file,
``hint`` names the fix). Softer problems (an empty class folder, a manifest row without a
label) are logged on the ``fewshot.data.loaders`` logger and kept in ``Dataset.warnings``;
with ``strict=True`` they raise :class:`DataError` instead.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from ..errors import DataError
from .records import Dataset, ImageRecord
from .rows import MAX_EXAMPLES, Row, warn
from .tree import FOLDER_HINT, LAYOUTS, check_layout, load_tree

__all__ = ["load_dataset", "load_grocery_catalogue", "summarize", "parse_group_from", "GroupFrom", "LAYOUTS"]

log = logging.getLogger(__name__)

GROCERY_SPLITS: tuple[str, ...] = ("train", "val", "test")
CATALOGUE_SPLIT = "catalogue"

#: Accepted CSV header names (lower-cased, stripped) for each logical column.
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "image", "image_path", "filepath", "file_path", "file", "filename"),
    "label": ("label", "class", "class_name"),
    "group": ("group",),
    "split": ("split",),
}



# --------------------------------------------------------------------------- group_from


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


def _apply_group_from(rows: list[Row], spec: GroupFrom, source: Path, columns: Sequence[str] | None) -> list[ImageRecord]:
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


# --------------------------------------------------------------------------- entry points


def load_dataset(
    path: str | os.PathLike,
    split: str | None = None,
    group_from: str | None = None,
    *,
    strict: bool = False,
    layout: str = "auto",
) -> Dataset:
    """Load a labelled image dataset, auto-detecting its layout (see the module docstring).

    Args:
        path: a dataset folder (folder tree, Grocery root or its ``dataset/`` folder) or a
            CSV manifest file.
        split: keep only the images of this image split (``"train"``, ``"val"``, ``"test"``
            for Grocery or a manifest with a ``split`` column; ``"catalogue"`` for the Grocery
            iconic images). ``None`` keeps every image (for Grocery: train + val + test).
        group_from: where each record's ``group`` comes from, overriding the default
            (Grocery coarse class, the two-level folder's group folder, the manifest's
            ``group`` column, else ``None``): ``"path:N"`` = N-th component of the image
            path (as written in the manifest, or relative to the dataset folder; 0-based,
            negative from the end), ``"label:N"`` = N-th ``-``-separated field of the label,
            ``"column:NAME"`` = a manifest column.
        strict: raise :class:`DataError` for problems that are otherwise only warnings
            (empty class folders, manifest rows without a path or label, conflicting rows,
            photos lying directly in a group folder).
        layout: how a folder tree is read: ``"auto"``, ``"class"`` or ``"group/class"``
            (:data:`fewshot.data.tree.LAYOUTS`, see :mod:`fewshot.data.tree`); a manifest or
            the Grocery dataset takes only ``"auto"``.

    Returns:
        A :class:`Dataset` with records in a stable order (Grocery: file order of
        train, val, test; folders: sorted; CSV: row order), ``source`` set to the layout,
        ``split`` to the selected split and ``warnings`` to the notes gathered.

    Raises:
        DataError: ``path`` does not exist or is neither a folder nor a ``.csv`` file;
            a manifest lacks the ``path``/``label`` columns (message lists the missing and
            the found columns); no images were found, or the selected split is empty;
            ``split`` names a split the dataset does not have (message lists the available
            ones); ``group_from`` is malformed or does not fit the data; a folder tree of
            mixed depth with ``layout="auto"`` (the message names the folders); a ``layout``
            other than ``"auto"`` for a manifest or the Grocery dataset.
        TypeError / ValueError: ``layout`` is not one of :data:`~fewshot.data.tree.LAYOUTS`.
    """
    check_layout(layout)
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise DataError(
            f"dataset path not found: {p}",
            hint="give an existing folder of class folders, a CSV manifest (path,label[,group]) "
            "or a Grocery Store Dataset folder",
        )
    spec = parse_group_from(group_from)
    read = _read(p, split, spec, strict, layout)
    if isinstance(read, Dataset):  # the Grocery catalogue
        return read
    ds, rows, columns = read
    source_file = Path(ds.root) if ds.root else p
    if spec is not None:
        records = _apply_group_from(rows, spec, source_file, columns)
    else:
        records = [r.record for r in rows]

    if not records:
        raise DataError(
            f"no images found in {source_file}",
            hint=_empty_hint(ds.source),
        )
    # (Grocery checked the split name already, reading only that split's list file.)
    available = sorted({r.split for r in records if r.split is not None})
    if split is not None:
        if split not in available:
            raise DataError(
                f"unknown split {split!r} for {source_file}: "
                + (f"available splits: {', '.join(available)}" if available else "this dataset has no image splits"),
                hint=(f"use one of: {', '.join(available)}" if available
                      else "omit the split (or add a 'split' column to the manifest)"),
            )
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(
                f"split {split!r} of {source_file} is empty (no images)",
                hint=f"use another split ({', '.join(s for s in available if s != split)}) or none",
            )
    ds.records = records
    ds.split = split
    return ds


def _read(p: Path, split: str | None, spec: GroupFrom | None, strict: bool,
          layout: str) -> Dataset | tuple[Dataset, list[Row], list[str] | None]:
    """``(dataset without records, rows, manifest columns or None)`` of whatever ``p`` is, or
    the finished Grocery catalogue for ``split="catalogue"``."""
    if p.is_file():
        if p.suffix.lower() not in (".csv", ".tsv"):
            raise DataError(
                f"not a dataset: {p} is a file but not a .csv manifest",
                hint="give a folder of class folders or a CSV manifest with columns path,label[,group]",
            )
        _layout_is_auto(layout, p, "a CSV manifest")
        return _load_csv(p, strict=strict)
    gdir = _grocery_dir(p)
    if gdir is None:
        ds, rows = load_tree(p, strict=strict, layout=layout)
        return ds, rows, None
    _layout_is_auto(layout, p, "the Grocery Store Dataset (read from its list files)")
    if split == CATALOGUE_SPLIT:
        if spec is not None:
            raise DataError(
                "group_from cannot be used with split='catalogue'",
                hint="drop group_from: catalogue groups are the coarse classes",
            )
        return load_grocery_catalogue(gdir)
    ds, rows = _load_grocery(gdir, split)
    return ds, rows, None


def _layout_is_auto(layout: str, p: Path, what: str) -> None:
    if layout != "auto":
        raise DataError(f"--layout {layout} applies to folder trees, but {p} is {what}",
                        hint="drop --layout (Python: layout=), or give the folder tree itself")


def load_grocery_catalogue(root: str | os.PathLike) -> Dataset:
    """The Grocery Store Dataset's iconic (studio) catalogue images, one per fine class.

    Args:
        root: the dataset's root folder (holding ``dataset/``) or its ``dataset/`` folder.

    Returns:
        A :class:`Dataset` of 81 records (``label`` = fine class, ``group`` = coarse class,
        ``split="catalogue"``), ordered by fine class id; ``name="grocery-catalogue"``,
        ``source="grocery"``. Paths come from ``classes.csv`` (``/iconic-images-...``,
        relative to ``dataset/``); existence is not checked.

    Raises:
        DataError: ``root`` is not a Grocery Store Dataset folder, or ``classes.csv`` lacks
            the needed columns.
    """
    p = Path(os.path.expanduser(os.fspath(root)))
    if not p.exists():
        raise DataError(f"dataset path not found: {p}", hint="give the Grocery Store Dataset folder")
    gdir = _grocery_dir(p) if p.is_dir() else None
    if gdir is None:
        raise DataError(
            f"not a Grocery Store Dataset folder: {p} (no dataset/classes.csv with train/val/test.txt)",
            hint="give the folder that holds dataset/classes.csv, or the dataset/ folder itself",
        )
    gdir = gdir.resolve()
    classes = _grocery_classes(gdir)
    records = []
    for cid in sorted(classes):
        fine, coarse, iconic = classes[cid]
        if not iconic:
            continue
        rel = iconic.replace("\\", "/").lstrip("/")
        records.append(ImageRecord(Path(os.path.normpath(gdir / rel)), fine, coarse, CATALOGUE_SPLIT))
    if not records:
        raise DataError(
            f"{gdir / 'classes.csv'} lists no iconic image paths",
            hint="check the 'Iconic Image Path (str)' column of classes.csv",
        )
    return Dataset(records, name="grocery-catalogue", root=gdir, source="grocery", split=CATALOGUE_SPLIT)


def summarize(dataset: Dataset) -> str:
    """A few human-readable lines: images, classes, groups, per-class counts, warnings.

    Example::

        grocery (grocery, split test): 2485 images, 81 classes, 43 groups
          images per class: min 2, median 25, max 112; 0 classes with a single image
    """
    counts = dataset.class_counts()
    groups = {g for g in dataset.groups if g is not None}
    head = f"{dataset.name} ({dataset.source}"
    head += f", split {dataset.split})" if dataset.split else ")"
    lines = [f"{head}: {len(dataset)} images, {len(counts)} classes, "
             + (f"{len(groups)} groups" if groups else "no groups")]
    if counts:
        values = sorted(counts.values())
        singles = sum(1 for v in values if v == 1)
        lines.append(
            f"  images per class: min {values[0]}, median {statistics.median(values):g}, max {values[-1]}; "
            f"{singles} class{'es' if singles != 1 else ''} with a single image"
        )
    splits = sorted({r.split for r in dataset.records if r.split is not None})
    if splits:
        per = {s: 0 for s in splits}
        for r in dataset.records:
            if r.split is not None:
                per[r.split] += 1
        lines.append("  image splits: " + ", ".join(f"{s} {n}" for s, n in per.items()))
    if dataset.warnings:
        lines.append(f"  {len(dataset.warnings)} warning(s):")
        lines.extend(f"    - {w}" for w in dataset.warnings[:MAX_EXAMPLES])
        if len(dataset.warnings) > MAX_EXAMPLES:
            lines.append(f"    ... and {len(dataset.warnings) - MAX_EXAMPLES} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _empty_hint(source: str) -> str:
    if source == "csv":
        return "the manifest has no usable rows: add rows 'path,label' (paths relative to the CSV's folder)"
    if source == "grocery":
        return "check that dataset/train.txt, val.txt and test.txt list image paths"
    return FOLDER_HINT


# --------------------------------------------------------------------------- Grocery


def _grocery_dir(p: Path) -> Path | None:
    for cand in (p / "dataset", p):
        if (cand / "classes.csv").is_file() and any((cand / f"{s}.txt").is_file() for s in GROCERY_SPLITS):
            return cand
    return None


_G_NAME, _G_ID, _G_COARSE, _G_ICONIC = (
    "Class Name (str)", "Class ID (int)", "Coarse Class Name (str)", "Iconic Image Path (str)")


def _grocery_classes(gdir: Path) -> dict[int, tuple[str, str | None, str]]:
    """``fine_id -> (fine name, coarse name, iconic path)`` from ``classes.csv``."""
    path = gdir / "classes.csv"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="restore classes.csv from the dataset's repository") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    found = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = found
    missing = [c for c in (_G_NAME, _G_ID) if c not in found]
    if missing:
        raise DataError(
            f"{path} is missing column(s) {', '.join(missing)} (found: {', '.join(found) or 'none'})",
            hint="restore classes.csv from the dataset's repository",
        )
    out: dict[int, tuple[str, str | None, str]] = {}
    for row in reader:
        if not row or not (row.get(_G_NAME) or "").strip():
            continue
        try:
            cid = int(row[_G_ID].strip())
        except (TypeError, ValueError):
            raise DataError(
                f"{path} line {reader.line_num}: class id {row.get(_G_ID)!r} is not an integer",
                hint="restore classes.csv from the dataset's repository",
            ) from None
        coarse = (row.get(_G_COARSE) or "").strip() or None
        out[cid] = (row[_G_NAME].strip(), coarse, (row.get(_G_ICONIC) or "").strip())
    return out


def _load_grocery(gdir: Path, split: str | None) -> tuple[Dataset, list[Row]]:
    gdir = gdir.resolve()
    classes = _grocery_classes(gdir)
    available = [s for s in GROCERY_SPLITS if (gdir / f"{s}.txt").is_file()]
    if split is not None and split not in available:
        raise DataError(
            f"unknown split {split!r} for {gdir}: available splits: {', '.join(available + [CATALOGUE_SPLIT])}",
            hint=f"use one of: {', '.join(available + [CATALOGUE_SPLIT])}",
        )
    wanted = [split] if split is not None else available
    rows: list[Row] = []
    base = str(gdir)
    for s in wanted:
        list_file = gdir / f"{s}.txt"
        try:
            lines = list_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {list_file}: {exc}", hint="restore the file from the dataset's repository") from None
        for lineno, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            parts = [x.strip() for x in line.rsplit(",", 2)]
            try:
                rel, fine = parts[0], int(parts[1])
                fine_name, coarse, _ = classes[fine]
            except (IndexError, ValueError, KeyError):
                raise DataError(
                    f"{list_file} line {lineno}: expected 'path, fine_id, coarse_id' with a fine id "
                    f"listed in classes.csv, got {line!r}",
                    hint="restore the file from the dataset's repository",
                ) from None
            rel = rel.replace("\\", "/")
            rows.append(Row(
                ImageRecord(Path(os.path.normpath(os.path.join(base, rel))), fine_name, coarse, s),
                tuple(PurePosixPath(rel).parts),
            ))
    return Dataset([], name="grocery", root=gdir, source="grocery"), rows


# --------------------------------------------------------------------------- CSV manifest


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


def _load_csv(path: Path, strict: bool) -> tuple[Dataset, list[Row], list[str]]:
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
