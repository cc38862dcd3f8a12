"""Class-disjoint splits (articles unseen in training): the split file and how a split is made.

A :class:`ClassSplit` assigns every class (label) of a dataset to exactly one part,
``train``, ``val`` or ``test``, so that evaluation happens on articles never seen during
training. With ``keep_groups_together`` every group (brand, Grocery coarse class, Omniglot
alphabet) lands whole in one part, so that near-identical sibling articles cannot leak.

The evaluation protocol that applies a split to a dataset (queries and gallery per part) is
:func:`fewshot.data.protocol.protocol_sets`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError
from ..io import atomic_write_json
from .records import Dataset

__all__ = ["ClassSplit", "make_class_split", "check_fractions", "PARTS"]

PARTS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FORMAT = "fewshot.class_split"
SPLIT_VERSION = 1

_REQUIRED_KEYS = ("seed", "train", "val", "test")


@dataclass
class ClassSplit:
    """A class-disjoint split of a dataset's labels.

    Attributes:
        name: a short name for reports and file names.
        seed: the seed used to shuffle the groups / classes (and the per-class division of
            datasets without image splits).
        train, val, test: sorted class labels of each part; disjoint.
        keep_groups_together: whether every group's classes were kept in one part.
        fractions: requested (train, val, test) fractions of the classes.
        dataset: the name of the dataset the split was made from.
        query_split: image splits whose images are queries (default ``["test"]``).
        gallery_split: image splits whose images form the gallery (default ``["train"]``).
        notes: free text (how it was made; shown in reports).
        query_fallback: image splits used as queries for a class without any
            ``query_split`` image (default ``["val"]``).
        gallery_fraction: share of each class's images put in the gallery for datasets
            without image splits (default 0.5).
    """

    name: str
    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    keep_groups_together: bool = True
    fractions: tuple[float, float, float] = (0.5, 0.15, 0.35)
    dataset: str = "dataset"
    query_split: list[str] = field(default_factory=lambda: ["test"])
    gallery_split: list[str] = field(default_factory=lambda: ["train"])
    notes: str = ""
    query_fallback: list[str] = field(default_factory=lambda: ["val"])
    gallery_fraction: float = 0.5

    def classes_of(self, part: str) -> list[str]:
        """The labels of ``part`` (``"train"``, ``"val"`` or ``"test"``).

        Raises:
            DataError: ``part`` is not one of those names.
        """
        if part not in PARTS:
            raise DataError(f"unknown split part {part!r}", hint=f"use one of: {', '.join(PARTS)}")
        return list(getattr(self, part))

    def part_of(self) -> dict[str, str]:
        """Map label -> part name."""
        return {c: p for p in PARTS for c in getattr(self, p)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written by :meth:`save` (includes a readable ``protocol``)."""
        d = asdict(self)
        d["fractions"] = list(self.fractions)
        return {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            **d,
            "counts": {p: len(getattr(self, p)) for p in PARTS},
            "protocol": {
                "rule": "class-disjoint parts; for the classes of a part, gallery = their images "
                        "from gallery_split, queries = their images from query_split (classes with "
                        "none: from query_fallback); datasets without image splits: seeded per-class "
                        "division, gallery_fraction of each class's images in the gallery",
                "gallery_split": list(self.gallery_split),
                "query_split": list(self.query_split),
                "query_fallback": list(self.query_fallback),
                "gallery_fraction": self.gallery_fraction,
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write the split as indented JSON, atomically; returns the path written."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "split") -> "ClassSplit":
        """Build a split from :meth:`to_dict` output.

        Raises:
            DataError: not an object, required keys (seed, train, val, test) missing, wrong
                types, a ``gallery_fraction`` outside 0..1 (or NaN), or a class listed in two
                parts.
        """
        hint = ("recreate it in Python: fewshot.data.make_class_split(fewshot.data.load_dataset(DATA), "
                "seed=0).save(PATH)")
        if not isinstance(data, dict):
            raise DataError(f"{source} is not a class split (expected a JSON object)", hint=hint)
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise DataError(
                f"{source} is not a class split: missing key(s) {', '.join(missing)} "
                f"(found: {', '.join(sorted(map(str, data))) or 'none'})",
                hint=hint,
            )
        parts: dict[str, list[str]] = {}
        for p in PARTS:
            v = data[p]
            if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                raise DataError(f"{source}: {p!r} must be a list of class names", hint=hint)
            parts[p] = list(v)
        seen: dict[str, str] = {}
        for p in PARTS:
            for c in parts[p]:
                if c in seen and seen[c] != p:
                    raise DataError(f"{source}: class {c!r} is in both {seen[c]!r} and {p!r}", hint=hint)
                seen[c] = p
        try:
            seed = int(data["seed"])
            fractions = tuple(float(x) for x in data.get("fractions", (0.5, 0.15, 0.35)))
            if len(fractions) != 3:
                raise ValueError("fractions must have three values")
            gallery_fraction = float(data.get("gallery_fraction", 0.5))
            if not 0 <= gallery_fraction <= 1:  # also refuses NaN
                raise ValueError(f"gallery_fraction must be a number from 0 to 1, not {gallery_fraction}")

            def _strs(key: str, default: list[str]) -> list[str]:
                v = data.get(key, default)
                if isinstance(v, str):
                    v = [v]
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise ValueError(f"{key} must be a list of split names")
                return list(v)

            return cls(
                name=str(data.get("name", Path(str(source)).stem)),
                seed=seed,
                train=parts["train"],
                val=parts["val"],
                test=parts["test"],
                keep_groups_together=bool(data.get("keep_groups_together", True)),
                fractions=fractions,  # type: ignore[arg-type]
                dataset=str(data.get("dataset", "dataset")),
                query_split=_strs("query_split", ["test"]),
                gallery_split=_strs("gallery_split", ["train"]),
                notes=str(data.get("notes", "")),
                query_fallback=_strs("query_fallback", ["val"]),
                gallery_fraction=gallery_fraction,
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: invalid value ({exc})", hint=hint) from None

    @classmethod
    def load(cls, path: str | Path) -> "ClassSplit":
        """Read a split written by :meth:`save`.

        Raises:
            DataError: the file is missing or unreadable, is not valid JSON (message gives
                line and column), or does not describe a class split (missing keys, wrong
                types, a class in two parts).
        """
        path = Path(path)
        hint = "give the JSON file written by ClassSplit.save (CLI: --split-file)"
        if not path.is_file():
            raise DataError(f"split file not found: {path}", hint=hint)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read split file {path}: {exc}", hint=hint) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"split file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                hint="recreate it with make_class_split(...).save(path)",
            ) from None
        return cls.from_dict(data, source=f"split file {path}")


def _class_units(dataset: Dataset, keep_groups_together: bool) -> list[list[str]]:
    """Classes bundled into units that must stay together (sorted within and across units).

    With groups, units are the connected components of the label-group relation (a label
    seen under two groups joins them); labels without a group are units of their own.
    """
    labels = sorted(set(dataset.labels))
    if not keep_groups_together:
        return [[c] for c in labels]
    parent = {c: c for c in labels}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_of_group: dict[str, str] = {}
    for r in dataset.records:
        if r.group is None:
            continue
        other = first_of_group.setdefault(r.group, r.label)
        a, b = find(r.label), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    units: dict[str, list[str]] = {}
    for c in labels:
        units.setdefault(find(c), []).append(c)
    return sorted(units.values(), key=lambda u: u[0])


def _fractions_problem(values: list[float]) -> str | None:
    """Why ``values`` cannot be (train, val, test) shares, or ``None`` when they can."""
    if len(values) != 3:
        return f"needs three values (train, val, test), got {len(values)}"
    for what, bad in (("not a number", math.isnan), ("infinite", math.isinf), ("negative", lambda f: f < 0)):
        if any(bad(f) for f in values):
            return f"a share is {what}"
    total = sum(values)
    if total <= 0:
        return "all shares are 0"
    if math.isinf(total):
        return "the shares are too large (their sum overflows)"
    return None


def check_fractions(fractions: Sequence[float], option: str = "fractions") -> tuple[float, float, float]:
    """Check (train, val, test) shares and normalise them to sum 1.

    Args:
        fractions: three finite, non-negative numbers with a positive (finite) sum.
        option: how the caller names them in messages (``"--fractions"`` for the CLI).

    Returns:
        the three shares as floats divided by their sum (each in ``[0, 1]``, at least one
        ``>= 1/3``).

    Raises:
        DataError: not three numbers; a NaN, infinite or negative share; all zero; or a sum
            that overflows. The message names ``option`` and the values given.
    """
    example = f"{option} 0.5 0.15 0.35" if option.startswith("-") else f"{option}=(0.5, 0.15, 0.35)"
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        values, problem = [], "the shares must be numbers"
    else:
        problem = _fractions_problem(values)
    if problem is not None:
        shown = " ".join(map(str, fractions)) if isinstance(fractions, (list, tuple)) else repr(fractions)
        raise DataError(f"invalid {option} ({shown}): {problem}",
                        hint=f"give three finite, non-negative shares (train val test) with a positive sum, "
                             f"e.g. {example}")
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def make_class_split(
    dataset: Dataset,
    fractions: Sequence[float] = (0.5, 0.15, 0.35),
    seed: int = 0,
    keep_groups_together: bool = True,
    name: str | None = None,
    *,
    query_split: Sequence[str] = ("test",),
    gallery_split: Sequence[str] = ("train",),
) -> ClassSplit:
    """Split the dataset's classes into disjoint train / val / test parts.

    Units (whole groups with ``keep_groups_together``, else single classes) are shuffled
    with ``random.Random(seed)`` and assigned greedily, each to the part whose class count
    is furthest below its target ``fraction * n_classes``. The result is deterministic for
    a seed (independent of record order and of ``PYTHONHASHSEED``); fractions are met
    approximately (a large group can overshoot). Every part with a positive fraction gets
    at least one unit: an empty part takes the smallest unit of the part with the largest
    surplus.

    Args:
        dataset: the records; labels are the classes, groups the units kept together.
        fractions: (train, val, test) fractions of classes; non-negative, normalised to sum 1.
            A zero fraction leaves that part empty.
        seed: shuffling seed.
        keep_groups_together: keep every group's classes in one part (classes without a
            group are free).
        name: the split's name (default ``"<dataset.name>-seed<seed>"``).
        query_split / gallery_split: stored in the split for :func:`fewshot.data.protocol.protocol_sets`.

    Returns:
        A :class:`ClassSplit` with sorted, disjoint, covering class lists.

    Raises:
        DataError: bad fractions, or fewer classes (or groups, with
            ``keep_groups_together``) than parts with a positive fraction.
    """
    fr = list(check_fractions(fractions))
    positive = [i for i, f in enumerate(fr) if f > 0]
    units = _class_units(dataset, keep_groups_together)
    n_classes = sum(len(u) for u in units)
    if n_classes < len(positive):
        raise DataError(
            f"dataset {dataset.name!r} has {n_classes} class(es): too few for a {len(positive)}-part class split",
            hint="use a dataset with more classes, or set some fractions to 0",
        )
    if len(units) < len(positive):
        raise DataError(
            f"dataset {dataset.name!r} has only {len(units)} group(s) for a {len(positive)}-part split "
            "with groups kept together",
            hint="call make_class_split with keep_groups_together=False, or set some fractions to 0",
        )

    rng = random.Random(seed)
    order = list(units)
    rng.shuffle(order)
    targets = [f * n_classes for f in fr]
    assigned: list[list[list[str]]] = [[], [], []]
    counts = [0, 0, 0]
    for unit in order:
        best = max(positive, key=lambda i: (targets[i] - counts[i], -i))
        assigned[best].append(unit)
        counts[best] += len(unit)

    for i in positive:  # make every positive part non-empty
        if assigned[i]:
            continue
        donors = [j for j in positive if len(assigned[j]) > 1]
        j = max(donors, key=lambda j: (counts[j] - targets[j], -j))
        unit = min(assigned[j], key=lambda u: (len(u), u[0]))
        assigned[j].remove(unit)
        assigned[i].append(unit)
        counts[j] -= len(unit)
        counts[i] += len(unit)

    parts = [sorted(c for u in assigned[i] for c in u) for i in range(3)]
    n_groups = len({g for g in dataset.groups if g is not None})
    notes = (
        f"{n_classes} classes"
        + (f" in {n_groups} groups" if n_groups else "")
        + f" -> train {len(parts[0])} / val {len(parts[1])} / test {len(parts[2])} classes; "
        + ("whole groups per part" if keep_groups_together and n_groups else "classes assigned individually")
        + f"; seeded shuffle (seed {seed}) then greedy fill to fractions"
    )
    return ClassSplit(
        name=name or f"{dataset.name}-seed{seed}",
        seed=int(seed),
        train=parts[0],
        val=parts[1],
        test=parts[2],
        keep_groups_together=bool(keep_groups_together),
        fractions=(fr[0], fr[1], fr[2]),
        dataset=dataset.name,
        query_split=list(query_split),
        gallery_split=list(gallery_split),
        notes=notes,
    )
