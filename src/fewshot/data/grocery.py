"""The Grocery Store Dataset (Klasson et al., 2019) as fewshot reads it: its list files and
``classes.csv`` (:func:`fewshot.data.loaders.load_dataset` with ``source="grocery"``) and its
iconic studio images (:func:`load_grocery_catalogue`)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path, PurePosixPath

from ..errors import DataError
from .records import Dataset, ImageRecord
from .rows import Row

__all__ = ["CATALOGUE_SPLIT", "GROCERY_SPLITS", "grocery_dir", "load_grocery", "load_grocery_catalogue"]

GROCERY_SPLITS: tuple[str, ...] = ("train", "val", "test")
CATALOGUE_SPLIT = "catalogue"


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
    gdir = grocery_dir(p) if p.is_dir() else None
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


def grocery_dir(p: Path) -> Path | None:
    """The ``dataset/`` folder of a Grocery Store Dataset at ``p`` (or ``p`` itself), else ``None``."""
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


def load_grocery(gdir: Path, split: str | None) -> tuple[Dataset, list[Row]]:
    """``(dataset without records, rows)`` of the list files of ``split`` (``None``: every split).

    Raises:
        DataError: an unknown split, or a list file or ``classes.csv`` that cannot be read.
    """
    gdir = gdir.resolve()
    classes = _grocery_classes(gdir)
    available = [s for s in GROCERY_SPLITS if (gdir / f"{s}.txt").is_file()]
    if split is not None and split not in available:
        raise DataError(
            f"unknown split {split!r} for {gdir}: available splits: {', '.join(available + [CATALOGUE_SPLIT])}",
            hint=f"use one of ({', '.join(available + [CATALOGUE_SPLIT])}) as split",
            options=("split",),
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
