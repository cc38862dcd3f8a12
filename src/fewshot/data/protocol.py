"""The evaluation protocol's data rules: which images a command reads, and what it refuses.

:func:`load_data` resolves a dataset (path or fetched name) and picks an image split;
:func:`load_protocol` reads every image and a class split file; :func:`split_protocol_sets` and
:func:`leave_one_out_protocol` give the query and gallery sets and the protocol description
recorded in result files; :func:`check_evaluable` refuses data whose numbers would be empty or
true by construction; :func:`data_protection` keeps a command's output away from its input data.

The cross-visit rule of :func:`protocol_sets`, for the classes of one part of a
:class:`~fewshot.data.splits.ClassSplit`:

* datasets **with** image splits (``ImageRecord.split`` set, e.g. Grocery): the gallery
  (support set) is the images from ``split.gallery_split`` (default ``["train"]``) and the
  queries are the images from ``split.query_split`` (default ``["test"]``); a class with no
  query-split images uses its images from ``split.query_fallback`` (default ``["val"]``)
  as queries. Queries and gallery then come from different shelf visits, which avoids the
  near-duplicate shots that inflate within-split retrieval.
* datasets **without** image splits (``split`` is ``None``, e.g. Omniglot, folder trees): a
  seeded per-class division: each class's ``n`` images are shuffled with a generator seeded
  by ``(seed, label)``; the first ``n * gallery_fraction`` of them (rounded half up, at least
  1, at most ``n - 1`` so that a class with two or more images keeps a query) form the
  gallery, the rest are queries. A class with a single image is gallery only.

The decision is made per class, so a manifest that gives splits to some classes only works.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

from ..errors import DataError
from .fetch import resolve_data
from .loaders import load_dataset
from .records import Dataset, ImageRecord
from .splits import ClassSplit

log = logging.getLogger("fewshot")

#: ``--split all``: every image, whatever image splits the dataset has
ALL_SPLITS = "all"

__all__ = [
    "ALL_SPLITS",
    "check_evaluable",
    "data_protection",
    "dataset_for",
    "leave_one_out_protocol",
    "load_data",
    "load_protocol",
    "protocol_sets",
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
                        hint=f"pass split={available[0]!r} (one of: {', '.join(available)}) or split='all'",
                        options=("split",))
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


def _records_of(dataset: Dataset, split: ClassSplit, part: str) -> tuple[list[ImageRecord], list[str]]:
    classes = split.classes_of(part)
    wanted = set(classes)
    records = [r for r in dataset.records if r.label in wanted]
    if classes and not records:
        raise DataError(
            f"none of the {len(classes)} {part!r} classes of split {split.name!r} are in dataset "
            f"{dataset.name!r} (split made from {split.dataset!r})",
            hint="use the split file made for this dataset, or make a new one",
        )
    if not classes:
        raise DataError(
            f"split {split.name!r} has no {part!r} classes",
            hint="make the split with a positive fraction for that part",
        )
    present = {r.label for r in records}
    missing = sorted(wanted - present)
    notes = []
    if missing:
        notes.append(
            f"{len(missing)} {part} class(es) of split {split.name!r} have no images in {dataset.name!r} "
            f"(e.g. {', '.join(missing[:3])})"
        )
    return records, notes


def dataset_for(dataset: Dataset, split: ClassSplit, part: str) -> Dataset:
    """All records (every image split) of the classes of ``part``, e.g. for training.

    Raises:
        DataError: unknown part, the part has no classes, or none of them is in ``dataset``.
    """
    records, notes = _records_of(dataset, split, part)
    return Dataset(records, name=f"{dataset.name}-{part}", root=dataset.root, source=dataset.source,
                   split=dataset.split, warnings=list(dataset.warnings) + notes)


def protocol_sets(
    dataset: Dataset,
    split: ClassSplit,
    part: str,
    *,
    seed: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Queries and gallery for the classes of ``part`` under the cross-visit rule.

    See the module docstring for the rule. Records keep the dataset's order.

    Args:
        dataset: the full dataset (all image splits loaded, e.g. ``load_dataset(root)``).
        split: the class split.
        part: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the per-class division for datasets without image splits
            (default: ``split.seed``).

    Returns:
        ``(queries, gallery)``: two :class:`Dataset` objects named
        ``"<name>-<part>-queries"`` / ``"<name>-<part>-gallery"``; their ``warnings`` list
        classes without queries or without gallery images.

    Raises:
        DataError: unknown part, the part has no classes, none of its classes is in the
            dataset, or the result has no queries or no gallery images (e.g. a dataset
            loaded with only one image split).
    """
    records, notes = _records_of(dataset, split, part)
    seed = split.seed if seed is None else seed
    gallery_splits = set(split.gallery_split)
    query_splits = set(split.query_split)
    fallback = [s for s in split.query_fallback if s not in gallery_splits and s not in query_splits]

    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.label, []).append(i)

    is_query = [False] * len(records)
    is_gallery = [False] * len(records)
    no_query: list[str] = []
    no_gallery: list[str] = []
    divided = 0
    for label, idx in by_class.items():
        if all(records[i].split is None for i in idx):
            divided += 1
            order = list(idx)
            random.Random(f"{seed}:{label}").shuffle(order)
            n = len(order)
            g = 1 if n == 1 else min(n - 1, max(1, math.floor(n * split.gallery_fraction + 0.5)))
            for i in order[:g]:
                is_gallery[i] = True
            for i in order[g:]:
                is_query[i] = True
        else:
            q = [i for i in idx if records[i].split in query_splits]
            if not q:
                for s in fallback:
                    q = [i for i in idx if records[i].split == s]
                    if q:
                        break
            for i in q:
                is_query[i] = True
            for i in idx:
                if records[i].split in gallery_splits:
                    is_gallery[i] = True
        if not any(is_query[i] for i in idx):
            no_query.append(label)
        if not any(is_gallery[i] for i in idx):
            no_gallery.append(label)

    if no_query:
        notes.append(f"{len(no_query)} {part} class(es) have no query images (e.g. {', '.join(sorted(no_query)[:3])})")
    if no_gallery:
        notes.append(f"{len(no_gallery)} {part} class(es) have no gallery images "
                     f"(e.g. {', '.join(sorted(no_gallery)[:3])})")
    if divided:
        notes.append(f"{divided} class(es) without image splits divided per class with seed {seed} "
                     f"(gallery fraction {split.gallery_fraction:g})")
    queries = [r for r, k in zip(records, is_query) if k]
    gallery = [r for r, k in zip(records, is_gallery) if k]
    if not queries or not gallery:
        which = "query" if not queries else "gallery"
        raise DataError(
            f"no {which} images for the {part!r} classes of the {split.name!r} class split in dataset {dataset.name!r} "
            f"(queries from {sorted(query_splits)}, gallery from {sorted(gallery_splits)})",
            hint="load the dataset with all its image splits (split='all'), or change the class split's "
                 "query_split / gallery_split",
            options=("split",),
        )
    mixed = divided < len(by_class)
    q_name = ",".join(sorted(query_splits)) if mixed else None
    g_name = ",".join(sorted(gallery_splits)) if mixed else None
    warns = list(dataset.warnings) + notes
    return (
        Dataset(queries, name=f"{dataset.name}-{part}-queries", root=dataset.root, source=dataset.source,
                split=q_name, warnings=list(warns)),
        Dataset(gallery, name=f"{dataset.name}-{part}-gallery", root=dataset.root, source=dataset.source,
                split=g_name, warnings=list(warns)),
    )
