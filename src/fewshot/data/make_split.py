"""``fewshot split`` as a function: a dataset's classes split into class-disjoint train / val /
test parts, refused when a part would be too small to use."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import check_output
from .protocol import ALL_SPLITS, data_protection, load_data
from .records import Dataset
from .splits import ClassSplit, check_fractions, make_class_split

__all__ = ["MIN_PART_CLASSES", "MIN_VAL_CLASSES", "SplitSummary", "is_split_file", "make_split"]


#: a val part needs this many classes with 2+ images for a meaningful val MAP@R each epoch
MIN_VAL_CLASSES = 5
#: train and test parts need this many classes with 2+ images (pairs to learn from; a ranking)
MIN_PART_CLASSES = 2


@dataclass
class SplitSummary:
    """What :func:`make_split` made: the split and, per part, its classes, groups and images."""

    split: ClassSplit
    parts: dict[str, dict[str, int]]
    path: Path | None = None


def is_split_file(path: Path) -> bool:
    """Whether ``path`` is a class split JSON that fewshot wrote (``"format": "fewshot.class_split"``)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("format") == "fewshot.class_split"
    except (OSError, ValueError, AttributeError):
        return False


def make_split(data: str, out: str | Path | None = None, *, by: str = "group",
               fractions: tuple[float, float, float] = (0.5, 0.15, 0.35), seed: int = 0,
               group_from: str | None = None, overwrite: bool = False, layout: str = "auto") -> SplitSummary:
    """Split a dataset's classes into class-disjoint train / val / test parts (``fewshot split``).

    Args:
        data: dataset path (folder tree, CSV) or a fetched dataset's name.
        out: the JSON file to write (``None``: only return the split); an existing file is
            replaced only when it is a split file and ``overwrite`` is set.
        by: ``"group"`` keeps every group's (brand's) classes in one part; ``"class"``
            splits single classes.
        fractions: (train, val, test) shares of the classes (normalised to sum 1).
        seed: the shuffling seed (:func:`fewshot.data.make_class_split`).
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).

    Returns:
        a :class:`SplitSummary` (classes, groups and images per part).

    Raises:
        DataError: an unknown ``by``; ``by="group"`` on data without groups; bad fractions
            (NaN, infinite, negative, all zero, or a sum that overflows; checked before the
            data is read);
            or a part too small to use (val: fewer than :data:`MIN_VAL_CLASSES` classes with
            2+ images; train or test: fewer than :data:`MIN_PART_CLASSES`), with the fix.
        FewshotError: ``out`` exists and is not a split file we may replace.
    """
    if by not in ("group", "class"):
        raise DataError(f"unknown option by = {by!r}", hint="use by='group' (whole brands per part) or by='class'",
                        options=("by",))
    check_fractions(fractions, "--fractions")
    dataset = load_data(data, ALL_SPLITS, group_from, layout=layout)
    if out is not None:
        check_output(out, what="fewshot split", is_ours=is_split_file, overwrite=overwrite,
                     **data_protection(data, dataset))
    if by == "group" and all(g is None for g in dataset.groups):
        raise DataError(f"{data} has no groups (brands) to keep together",
                        hint="use by='class', give groups with group_from, or use a Brand/Article/photo folder tree",
                        options=("by", "group_from"))
    split = make_class_split(dataset, fractions, seed, keep_groups_together=(by == "group"),
                             name=Path(out).stem if out is not None else None)
    parts = _split_parts(split, dataset)
    _check_split_parts(parts, by, fractions)
    path = split.save(out) if out is not None else None
    return SplitSummary(split, parts, path)


def _split_parts(split: ClassSplit, dataset: Dataset) -> dict[str, dict[str, int]]:
    counts = Counter(dataset.labels)
    group_of = dict(zip(dataset.labels, dataset.groups))
    out = {}
    for part in ("train", "val", "test"):
        classes = split.classes_of(part)
        out[part] = {"classes": len(classes), "groups": len({group_of.get(c) for c in classes} - {None}),
                     "images": sum(counts[c] for c in classes),
                     "classes_with_2_images": sum(counts[c] >= 2 for c in classes)}
    return out


def _check_split_parts(parts: dict[str, dict[str, int]], by: str, fractions) -> None:
    for part, need in (("train", MIN_PART_CLASSES), ("val", MIN_VAL_CLASSES), ("test", MIN_PART_CLASSES)):
        have = parts[part]["classes_with_2_images"]
        if have >= need:
            continue
        total = sum(p["classes"] for p in parts.values())
        hint = (f"give {part} a larger share (fractions, now {' '.join(f'{f:g}' for f in fractions)})"
                + (", or split single classes with by='class' (fewer, larger brands make uneven parts)"
                   if by == "group" else "")
                + (f"; with {total} classes in all, the data may simply be too small for three parts"
                   if total < 3 * MIN_VAL_CLASSES else ""))
        raise DataError(f"the {part} part would have {have} class(es) with 2+ images; it needs at least {need}"
                        + (" for a meaningful val MAP@R each epoch" if part == "val" else ""), hint=hint,
                        options=("by", "fractions"))
