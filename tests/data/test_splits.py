"""Class-disjoint splits, their JSON files, and the cross-visit query/gallery protocol."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fewshot.data import ClassSplit, Dataset, ImageRecord, dataset_for, load_dataset, make_class_split, protocol_sets
from fewshot.data.splits import check_fractions
from fewshot.errors import DataError


@pytest.fixture(scope="module")
def grocery(grocery_root: Path) -> Dataset:
    return load_dataset(grocery_root)


@pytest.fixture(scope="module")
def omniglot(omniglot_root: Path) -> Dataset:
    return load_dataset(omniglot_root)


def _check_partition(ds: Dataset, split: ClassSplit) -> None:
    parts = [set(split.train), set(split.val), set(split.test)]
    assert all(parts), "every part non-empty"
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(ds.classes)
    assert split.train == sorted(split.train)


def _check_groups_whole(ds: Dataset, split: ClassSplit) -> None:
    part_of = split.part_of()
    by_group: dict[str, set[str]] = {}
    for label, group in ds.group_of().items():
        by_group.setdefault(group, set()).add(part_of[label])
    assert all(len(parts) == 1 for parts in by_group.values()), by_group


def test_grocery_split_deterministic_and_whole_groups(grocery: Dataset) -> None:
    a = make_class_split(grocery, seed=0)
    b = make_class_split(grocery, seed=0)
    assert a == b
    _check_partition(grocery, a)
    _check_groups_whole(grocery, a)
    n = len(grocery.classes)
    # fractions of classes, approximately (groups are indivisible)
    assert abs(len(a.train) - 0.5 * n) <= 8 and abs(len(a.test) - 0.35 * n) <= 8 and len(a.val) >= 1
    assert a.dataset == "grocery" and a.seed == 0 and a.keep_groups_together
    assert a.query_split == ["test"] and a.gallery_split == ["train"]
    c = make_class_split(grocery, seed=1)
    assert (c.train, c.val, c.test) != (a.train, a.val, a.test)
    _check_groups_whole(grocery, c)


def test_split_independent_of_record_order(grocery: Dataset) -> None:
    shuffled = Dataset(list(reversed(grocery.records)), name="grocery")
    assert make_class_split(shuffled, seed=3) == make_class_split(grocery, seed=3)


def test_split_without_groups_together(grocery: Dataset) -> None:
    s = make_class_split(grocery, fractions=(0.6, 0.0, 0.4), seed=2, keep_groups_together=False)
    assert s.val == [] and len(s.train) == round(0.6 * 81) and len(s.train) + len(s.test) == 81
    assert not s.keep_groups_together


def test_omniglot_split_by_alphabet(omniglot: Dataset) -> None:
    s = make_class_split(omniglot, seed=0)
    _check_partition(omniglot, s)
    _check_groups_whole(omniglot, s)


def test_every_part_nonempty_on_tiny_dataset() -> None:
    recs = [ImageRecord(Path(f"/x/{c}{i}.jpg"), c, None) for c in "abc" for i in range(2)]
    ds = Dataset(recs, name="tiny")
    for seed in range(10):
        s = make_class_split(ds, seed=seed)
        assert len(s.train) == len(s.val) == len(s.test) == 1


def test_too_few_classes() -> None:
    ds = Dataset([ImageRecord(Path("/x/a.jpg"), "a", "g"), ImageRecord(Path("/x/b.jpg"), "b", "g")], name="two")
    with pytest.raises(DataError, match="too few"):
        make_class_split(ds)
    with pytest.raises(DataError, match="keep_groups_together=False"):
        make_class_split(ds, fractions=(0.5, 0.0, 0.5))
    s = make_class_split(ds, fractions=(0.5, 0.0, 0.5), keep_groups_together=False)
    assert len(s.train) == len(s.test) == 1
    with pytest.raises(DataError, match=r"invalid fractions \(0.5 -0.1 0.6\): a share is negative"):
        make_class_split(ds, fractions=(0.5, -0.1, 0.6))


@pytest.mark.parametrize("fractions, reason", [
    ((math.inf, 1, 1), "a share is infinite"), ((1e308, 1e308, 1e308), "their sum overflows"),
    ((math.nan, 1, 1), "not a number"), ((0, 0, 0), "all shares are 0"), ((1, 2), "needs three values"),
    (("a", 1, 1), "must be numbers"),
])
def test_make_class_split_refuses_hostile_fractions(fractions, reason) -> None:
    """The Python API checks fractions as the CLI does (one check_fractions): a DataError naming
    ``fractions`` and the reason, with the fix (inf used to end in ``max() arg is an empty
    sequence``)."""
    ds = Dataset([ImageRecord(Path(f"/x/{c}.jpg"), c, None) for c in "abcdef"], name="six")
    with pytest.raises(DataError, match=reason) as err:
        make_class_split(ds, fractions=fractions, keep_groups_together=False)
    assert str(err.value).startswith("invalid fractions (") and "fractions=(0.5, 0.15, 0.35)" in err.value.hint
    assert check_fractions((1e-300, 1e-300, 2e-300)) == (0.25, 0.25, 0.5)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-0.5", "1.5"])
def test_split_file_with_a_bad_gallery_fraction_is_refused(tmp_path: Path, value: str) -> None:
    """A hand-edited gallery_fraction of NaN or Infinity used to end in a ValueError /
    OverflowError from math.floor in protocol_sets; it is refused when the file is read."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 0, "train": ["a"], "val": [], "test": ["b"], "gallery_fraction": %s}' % value)
    with pytest.raises(DataError, match="gallery_fraction must be a number from 0 to 1") as err:
        ClassSplit.load(bad)
    assert str(bad) in str(err.value)


def test_save_load_round_trip(grocery: Dataset, tmp_path: Path) -> None:
    s = make_class_split(grocery, seed=7, name="grocery-unseen")
    path = s.save(tmp_path / "splits" / "grocery.json")
    data = json.loads(path.read_text())
    assert data["seed"] == 7 and data["fractions"] == [0.5, 0.15, 0.35] and data["dataset"] == "grocery"
    assert data["query_split"] == ["test"] and data["gallery_split"] == ["train"]
    assert "rule" in data["protocol"] and data["counts"]["train"] == len(s.train)
    back = ClassSplit.load(path)
    assert back == s
    assert [p.name for p in path.parent.iterdir()] == ["grocery.json"]  # no temp files left


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split file not found"):
        ClassSplit.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 0, "train": [')
    with pytest.raises(DataError) as err:
        ClassSplit.load(bad)
    assert "not valid JSON" in str(err.value) and "line 1" in str(err.value) and str(bad) in str(err.value)
    bad.write_text('{"seed": 0, "train": ["a"]}')
    with pytest.raises(DataError, match=r"missing key\(s\) val, test"):
        ClassSplit.load(bad)
    bad.write_text('{"seed": 0, "train": ["a"], "val": [], "test": ["a"]}')
    with pytest.raises(DataError, match="in both 'train' and 'test'"):
        ClassSplit.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="not a class split"):
        ClassSplit.load(bad)


def test_protocol_cross_visit_grocery(grocery: Dataset) -> None:
    s = make_class_split(grocery, seed=0)
    queries, gallery = protocol_sets(grocery, s, "test")
    assert set(queries.labels) == set(s.test) == set(gallery.labels)
    assert {r.split for r in queries} <= {"test", "val"}
    assert {r.split for r in gallery} == {"train"}
    assert not set(queries.paths) & set(gallery.paths)
    # queries are every test photo of those classes
    n_test = sum(1 for r in grocery if r.label in set(s.test) and r.split == "test")
    assert len(queries) == n_test
    assert queries.name == "grocery-test-queries" and gallery.name == "grocery-test-gallery"


def test_protocol_val_fallback() -> None:
    recs = [
        ImageRecord(Path("/d/a1.jpg"), "a", None, "train"),
        ImageRecord(Path("/d/a2.jpg"), "a", None, "test"),
        ImageRecord(Path("/d/b1.jpg"), "b", None, "train"),
        ImageRecord(Path("/d/b2.jpg"), "b", None, "val"),  # no test photo: val is the query
    ]
    ds = Dataset(recs, name="mini")
    s = ClassSplit(name="m", seed=0, train=[], val=[], test=["a", "b"])
    q, g = protocol_sets(ds, s, "test")
    assert [p.name for p in q.paths] == ["a2.jpg", "b2.jpg"]
    assert [p.name for p in g.paths] == ["a1.jpg", "b1.jpg"]


def test_protocol_without_image_splits(omniglot: Dataset) -> None:
    s = make_class_split(omniglot, seed=0)
    q1, g1 = protocol_sets(omniglot, s, "val")
    q2, g2 = protocol_sets(omniglot, s, "val")
    assert q1.paths == q2.paths and g1.paths == g2.paths  # seeded
    assert set(q1.labels) == set(g1.labels) == set(s.val)
    assert not set(q1.paths) & set(g1.paths)
    assert len(q1) == len(g1) == 10 * len(s.val)  # 20 images per character, half each
    q3, _ = protocol_sets(omniglot, s, "val", seed=5)
    assert q3.paths != q1.paths
    assert any("divided per class" in w for w in q1.warnings)


def test_protocol_single_image_class_is_gallery_only() -> None:
    recs = [ImageRecord(Path(f"/d/a{i}.jpg"), "a") for i in range(3)] + [ImageRecord(Path("/d/b.jpg"), "b")]
    s = ClassSplit(name="m", seed=0, train=[], val=[], test=["a", "b"])
    q, g = protocol_sets(Dataset(recs), s, "test")
    assert q.labels == ["a"] and sorted(g.labels) == ["a", "a", "b"]  # 3 images: 2 gallery (half, rounded up)
    assert any("no query images" in w for w in q.warnings)


def test_protocol_errors(grocery: Dataset, grocery_root: Path) -> None:
    s = make_class_split(grocery, seed=0)
    with pytest.raises(DataError, match="unknown split part 'holdout'"):
        protocol_sets(grocery, s, "holdout")
    only_test = load_dataset(grocery_root, split="test")
    with pytest.raises(DataError, match="no gallery images"):
        protocol_sets(only_test, s, "test")
    other = ClassSplit(name="o", seed=0, train=["x"], val=["y"], test=["z"], dataset="other")
    with pytest.raises(DataError, match="none of the 1 'test' classes"):
        protocol_sets(grocery, other, "test")


def test_dataset_for_and_classes_of(grocery: Dataset) -> None:
    s = make_class_split(grocery, seed=0)
    assert s.classes_of("train") == s.train
    train = dataset_for(grocery, s, "train")
    assert set(train.labels) == set(s.train)
    assert {r.split for r in train} == {"train", "val", "test"}  # all images of those classes
    assert len(train) == sum(1 for r in grocery if r.label in set(s.train))
