"""Dataset records: one labelled image each.

A dataset is a list of :class:`ImageRecord`; ``label`` is the article (the class to
retrieve) and ``group`` its super-class (a brand, or the Grocery coarse class).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image.

    Attributes:
        path: absolute path of the image file.
        label: article / class name (the retrieval target).
        group: super-class (brand, coarse class, alphabet); ``None`` when unknown.
        split: the dataset's own image split (``"train"``, ``"val"``, ``"test"``) or ``None``.
    """

    path: Path
    label: str
    group: str | None = None
    split: str | None = None


@dataclass
class Dataset:
    """An ordered list of records plus where they came from.

    Attributes:
        records: the images, in a stable order.
        name: a short name for reports (e.g. ``"grocery"``).
        root: the folder or manifest the records were read from.
        source: the detected layout: ``"folder"``, ``"csv"``, ``"grocery"``, ``"omniglot"``.
        split: the image split that was selected, if any.
        warnings: notes gathered while loading (empty class folders and the like).
    """

    records: list[ImageRecord]
    name: str = "dataset"
    root: Path | None = None
    source: str = "unknown"
    split: str | None = None
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def labels(self) -> list[str]:
        """Per-record labels, same order as ``records``."""
        return [r.label for r in self.records]

    @property
    def groups(self) -> list[str | None]:
        """Per-record groups, same order as ``records``."""
        return [r.group for r in self.records]

    @property
    def paths(self) -> list[Path]:
        """Per-record image paths."""
        return [r.path for r in self.records]

    @property
    def classes(self) -> list[str]:
        """Sorted distinct labels."""
        return sorted(set(self.labels))

    def class_counts(self) -> Counter:
        """Images per label."""
        return Counter(self.labels)

    def group_of(self) -> dict[str, str | None]:
        """Map label -> group (the first group seen for that label)."""
        out: dict[str, str | None] = {}
        for r in self.records:
            out.setdefault(r.label, r.group)
        return out

    def subset(self, keep: Iterable[int] | Sequence[bool], name: str | None = None) -> "Dataset":
        """A new dataset with the records at the given indices (or where the mask is True)."""
        keep = list(keep)
        if keep and isinstance(keep[0], (bool,)):
            idx = [i for i, k in enumerate(keep) if k]
        else:
            idx = [int(i) for i in keep]
        return replace(self, records=[self.records[i] for i in idx], name=name or self.name,
                       warnings=list(self.warnings))

    def with_classes(self, classes: Iterable[str]) -> "Dataset":
        """Only the records whose label is in ``classes``."""
        wanted = set(classes)
        return self.subset([r.label in wanted for r in self.records])

    def with_split(self, split: str | Sequence[str]) -> "Dataset":
        """Only the records of the dataset's own image split(s)."""
        splits = {split} if isinstance(split, str) else set(split)
        return replace(self.subset([r.split in splits for r in self.records]), split=",".join(sorted(splits)))
