"""The evaluation protocol's data rules: which images a command reads, and what it refuses.

:func:`load_data` resolves a dataset (path or fetched name) and picks an image split;
:func:`load_protocol` reads every image and a class split file; :func:`split_protocol_sets` and
:func:`leave_one_out_protocol` give the query and gallery sets and the protocol description
recorded in result files; :func:`check_evaluable` refuses data whose numbers would be empty or
true by construction; :func:`data_protection` keeps a command's output away from its input data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError
from .fetch import resolve_data
from .loaders import load_dataset
from .records import Dataset
from .splits import ClassSplit, protocol_sets

log = logging.getLogger("fewshot")

#: ``--split all``: every image, whatever image splits the dataset has
ALL_SPLITS = "all"

__all__ = [
    "ALL_SPLITS",
    "check_evaluable",
    "data_protection",
    "leave_one_out_protocol",
    "load_data",
    "load_protocol",
    "split_protocol_sets",
    "warn_unknown_classes",
]


def load_data(data: str, split: str | None = None, group_from: str | None = None,
              strict: bool = False, *, default_split: str | None = None, layout: str = "auto") -> Dataset:
    """Resolve ``data`` (path or fetched dataset name) and load it.

    Args:
        split: an image split name (``train``, ``val``, ``test``, ...), ``"all"`` for every
            image, or ``None`` for the command's ``default_split``.
        default_split: the split used when ``split`` is ``None`` and the dataset has image
            splits; a dataset without image splits (a plain folder tree, a CSV without a
            ``split`` column) then uses all its images. ``None`` = all images.
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).

    Raises:
        DataError: an unknown split (the message lists the dataset's splits), or a dataset
            with image splits but none called ``default_split``.
    """
    root = resolve_data(data)
    if split not in (None, ALL_SPLITS):
        return load_dataset(root, split=split, group_from=group_from, strict=strict, layout=layout)
    dataset = load_dataset(root, split=None, group_from=group_from, strict=strict, layout=layout)
    if split == ALL_SPLITS or default_split is None:
        return dataset
    available = sorted({r.split for r in dataset.records if r.split is not None})
    if not available:
        log.info("%s has no image splits: using all %d images", root, len(dataset))
        return dataset
    if default_split not in available:
        raise DataError(f"{root} has image splits {', '.join(available)} but no '{default_split}' split",
                        hint=f"pass --split {available[0]} (one of: {', '.join(available)}) or --split all")
    dataset.records = [r for r in dataset.records if r.split == default_split]
    dataset.split = default_split
    return dataset


def load_protocol(data: str, split_file: str | Path, group_from: str | None = None,
                  strict: bool = False, layout: str = "auto") -> tuple[Dataset, ClassSplit]:
    """Every image of ``data`` and the class split of ``split_file`` (classes it names that the
    data lacks are named in a warning); :func:`protocol_sets` then gives each part's images."""
    dataset = load_data(data, ALL_SPLITS, group_from, strict, layout=layout)
    class_split = ClassSplit.load(split_file)
    warn_unknown_classes(class_split, dataset, split_file)
    return dataset, class_split


def warn_unknown_classes(split: ClassSplit, dataset: Dataset, split_file: str | Path) -> list[str]:
    """Log the classes a split file names that the dataset does not have (a typo or another
    dataset's split); returns them."""
    present = set(dataset.labels)
    missing = sorted(c for c in split.train + split.val + split.test if c not in present)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        log.warning("%d class(es) of %s are not in %s and are left out: %s", len(missing), split_file,
                    dataset.name, shown)
    return missing


def split_protocol_sets(dataset: Dataset, class_split: ClassSplit, split_file: str | Path,
                        part: str) -> tuple[Dataset, Dataset, dict]:
    """``(queries, gallery, protocol description)`` of the classes of ``part`` of a class split."""
    queries, gallery = protocol_sets(dataset, class_split, part)
    protocol = {"mode": "query_vs_gallery", "split_file": str(split_file), "part": part,
                "split_name": class_split.name, "classes": len(set(queries.labels) | set(gallery.labels)),
                "query_split": class_split.query_split, "gallery_split": class_split.gallery_split}
    return queries, gallery, protocol


def leave_one_out_protocol(dataset: Dataset) -> dict:
    """The protocol description of a leave-one-out evaluation within ``dataset``."""
    return {"mode": "leave_one_out", "split": dataset.split or ALL_SPLITS}


def check_evaluable(query_labels: list[str], gallery_labels: list[str] | None, name: str) -> None:
    """Refuse an evaluation whose numbers would be empty or true by construction.

    Leave-one-out (``gallery_labels`` is ``None``) needs a class with two or more images;
    query vs gallery needs a query whose class is in the gallery. Either needs two or more
    classes to rank among (with one class every retrieved item is relevant: mAP 1.0).

    Raises:
        DataError: naming ``name`` and what it lacks.
    """
    from collections import Counter

    ref = Counter(gallery_labels if gallery_labels is not None else query_labels)
    need = 1 if gallery_labels is not None else 2
    if not any(ref.get(lab, 0) >= need for lab in set(query_labels)):
        what = ("every class has a single image, and leave-one-out needs two or more per class"
                if gallery_labels is None else "no query's class is in the gallery")
        raise DataError(f"no query of {name} has a relevant item to retrieve: {what}",
                        hint="add photos (at least 2 per article), or evaluate other data")
    if len(ref) < 2:
        raise DataError(f"{name} has a single class ({next(iter(ref))}): every retrieved item would be "
                        "relevant, so mAP, MAP@R and P@1 would be 1.0 by construction",
                        hint="evaluate on data with at least two classes (articles)")


def data_protection(data: str, *datasets: Dataset | None) -> dict:
    """``check_output`` arguments that keep an output away from the input data: the image
    files of ``datasets``, the manifest file, and the data folder itself."""
    root = resolve_data(data)
    inputs: list[str | Path] = [p for ds in datasets if ds is not None for p in ds.paths]
    if root.is_file():
        inputs.append(root)
    return {"inputs": inputs, "input_roots": [root] if root.is_dir() else []}
