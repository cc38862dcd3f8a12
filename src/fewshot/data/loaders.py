"""Read a dataset (a list of labelled image paths) from a folder, a CSV manifest or a known layout.

:func:`load_dataset` detects the layout from what ``path`` points at, in this order:

1. **Grocery Store Dataset** (``source="grocery"``): a folder holding
   ``dataset/classes.csv`` and ``dataset/{train,val,test}.txt`` (or the ``dataset/`` folder
   itself). Each ``*.txt`` line is ``path, fine_id, coarse_id`` with the path relative to
   ``dataset/``. ``label`` = fine class name (``"Granny-Smith"``), ``group`` = coarse class
   name (``"Apple"``), ``split`` = ``"train"``/``"val"``/``"test"``. ``split="catalogue"``
   returns :func:`load_grocery_catalogue` (the 81 iconic studio images).
2. **CSV manifest** (``source="csv"``): a ``.csv`` file with columns ``path,label`` and
   optionally ``group`` and ``split`` (see :func:`fewshot.data.manifest.load_csv` for the accepted dialects:
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

import os
import statistics
from pathlib import Path

from ..errors import DataError
from .grocery import CATALOGUE_SPLIT, grocery_dir, load_grocery, load_grocery_catalogue
from .group_from import GroupFrom, apply_group_from, parse_group_from
from .manifest import load_csv
from .records import Dataset
from .rows import MAX_EXAMPLES, Row
from .tree import FOLDER_HINT, LAYOUTS, check_layout, load_tree

__all__ = ["load_dataset", "load_grocery_catalogue", "summarize", "parse_group_from", "GroupFrom", "LAYOUTS"]

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
        records = apply_group_from(rows, spec, source_file, columns)
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
                hint=(f"use one of ({', '.join(available)}) as split" if available
                      else "leave split out (or add a 'split' column to the manifest)"),
                options=("split",),
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
        return load_csv(p, strict=strict)
    gdir = grocery_dir(p)
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
    ds, rows = load_grocery(gdir, split)
    return ds, rows, None


def _layout_is_auto(layout: str, p: Path, what: str) -> None:
    if layout != "auto":
        raise DataError(f"layout={layout!r} applies to folder trees, but {p} is {what}",
                        hint="leave layout out, or give the folder tree itself", options=("layout",))


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


