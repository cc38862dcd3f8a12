"""load_dataset / load_grocery_catalogue on the real Grocery and Omniglot data, folder trees and CSV manifests."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from fewshot.data import load_dataset, load_grocery_catalogue, load_image, parse_group_from, summarize
from fewshot.errors import DataError

# --------------------------------------------------------------------------- Grocery


@pytest.fixture(scope="module")
def grocery(grocery_root: Path):
    return load_dataset(grocery_root)


def test_grocery_all_splits(grocery) -> None:
    assert grocery.source == "grocery" and grocery.name == "grocery"
    assert len(grocery) == 2640 + 296 + 2485
    per_split = {s: sum(1 for r in grocery if r.split == s) for s in ("train", "val", "test")}
    assert per_split == {"train": 2640, "val": 296, "test": 2485}
    assert len(grocery.classes) == 81
    # The published README says 42 coarse classes; classes.csv really has 43 (ids 0..42).
    assert len({g for g in grocery.groups}) == 43
    assert None not in grocery.groups
    assert grocery.group_of()["Granny-Smith"] == "Apple"
    assert grocery.group_of()["Golden-Delicious"] == "Apple"
    assert all(p.is_absolute() for p in grocery.paths[:10])
    assert grocery.paths[0].is_file()


@pytest.mark.parametrize("split,count", [("train", 2640), ("val", 296), ("test", 2485)])
def test_grocery_one_split(grocery_root: Path, split: str, count: int) -> None:
    ds = load_dataset(grocery_root, split=split)
    assert len(ds) == count and ds.split == split
    assert {r.split for r in ds} == {split}
    first = ds.records[0]
    assert f"/{split}/" in first.path.as_posix() and first.path.is_file()


def test_grocery_label_is_fine_class(grocery_root: Path) -> None:
    ds = load_dataset(grocery_root / "dataset", split="test")  # the dataset/ folder itself works too
    granny = [r for r in ds if r.label == "Granny-Smith"]
    assert granny and all(r.group == "Apple" for r in granny)
    assert all("Granny-Smith" in r.path.name for r in granny)
    assert len(ds.classes) == 81


def test_grocery_loader_opens_no_image(grocery_root: Path, monkeypatch) -> None:
    """Loading reads the split files only (fast at any size); images are opened when embedded."""
    import PIL.Image

    def refuse(*a, **k):
        raise AssertionError("the loader must not open images")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    assert len(load_dataset(grocery_root)) == 5421


def test_grocery_unknown_split(grocery_root: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(grocery_root, split="validation")
    msg = str(err.value)
    assert "unknown split 'validation'" in msg
    assert "train, val, test" in msg and "catalogue" in msg


def test_grocery_group_from_override(grocery_root: Path) -> None:
    ds = load_dataset(grocery_root, split="val", group_from="path:1")  # val/<Fruit|Packages|Vegetables>/...
    assert {r.group for r in ds} == {"Fruit", "Packages", "Vegetables"}
    ds = load_dataset(grocery_root, split="val", group_from="label:0")
    assert next(r for r in ds if r.label == "Granny-Smith").group == "Granny"


def test_grocery_catalogue(grocery_root: Path, grocery) -> None:
    cat = load_grocery_catalogue(grocery_root)
    assert len(cat) == 81 and cat.split == "catalogue"
    assert sorted(cat.labels) == grocery.classes
    assert all(p.is_file() for p in cat.paths)
    assert all("iconic-images-and-descriptions" in p.as_posix() for p in cat.paths)
    granny = next(r for r in cat if r.label == "Granny-Smith")
    assert granny.group == "Apple" and granny.path.name == "Granny-Smith_Iconic.jpg"
    assert load_image(granny.path).mode == "RGB"
    assert len(load_dataset(grocery_root, split="catalogue")) == 81
    assert len(load_grocery_catalogue(grocery_root / "dataset")) == 81


def test_grocery_catalogue_wrong_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a Grocery Store Dataset folder"):
        load_grocery_catalogue(tmp_path)


# --------------------------------------------------------------------------- Omniglot


def test_omniglot(omniglot_root: Path) -> None:
    ds = load_dataset(omniglot_root)
    assert ds.source == "omniglot"
    assert len(ds) == 2720
    alphabets = sorted(p.name for p in omniglot_root.iterdir() if p.is_dir())
    assert sorted({g for g in ds.groups}) == alphabets
    assert len(ds.classes) == 136
    # character folder names repeat across alphabets; labels must not
    assert "Balinese/character01" in ds.classes and "Korean/character01" in ds.classes
    assert all(r.label.split("/")[0] == r.group for r in ds)
    assert set(ds.class_counts().values()) == {20}
    with pytest.raises(DataError, match="no image splits"):
        load_dataset(omniglot_root, split="test")


# --------------------------------------------------------------------------- folder trees


@pytest.fixture(scope="module")
def jpegs(grocery_root: Path) -> list[Path]:
    files = sorted((grocery_root / "dataset" / "train" / "Fruit" / "Apple" / "Granny-Smith").glob("*.jpg"))[:6]
    assert len(files) == 6
    return files


def _fill(folder: Path, sources: list[Path], names: list[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        shutil.copyfile(src, folder / (names[i] if names else src.name))


def test_one_level_tree(tmp_path: Path, jpegs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "shop"
    _fill(root / "Granny-Smith", jpegs[:2])
    _fill(root / "Pink Lady", jpegs[2:4], ["a.JPG", "b.jpeg"])  # suffixes in any case
    _fill(root / "Pink Lady" / "side views", jpegs[4:5])  # deeper folders belong to the class
    (root / "Pink Lady" / "notes.txt").write_text("not an image")
    (root / "Pink Lady" / ".hidden.jpg").write_bytes(b"")
    (root / "Empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        ds = load_dataset(root)
    assert ds.source == "folder" and ds.name == "shop"
    assert ds.class_counts() == {"Granny-Smith": 2, "Pink Lady": 3}
    assert set(ds.groups) == {None}
    assert all(p.is_file() for p in ds.paths)
    assert any("empty class folder" in w and "Empty" in w for w in ds.warnings)
    assert "empty class folder" in caplog.text
    with pytest.raises(DataError, match="empty class folder"):
        load_dataset(root, strict=True)


def test_two_level_tree(tmp_path: Path, jpegs: list[Path]) -> None:
    root = tmp_path / "brands"
    _fill(root / "Apple" / "Granny-Smith", jpegs[:2])
    _fill(root / "Apple" / "Pink-Lady", jpegs[2:3])
    _fill(root / "Pear" / "Conference", jpegs[3:5])
    (root / "Pear" / "Williams").mkdir()
    ds = load_dataset(root)
    assert ds.source == "folder"
    assert ds.class_counts() == {"Granny-Smith": 2, "Pink-Lady": 1, "Conference": 2}
    assert ds.group_of() == {"Granny-Smith": "Apple", "Pink-Lady": "Apple", "Conference": "Pear"}
    assert any("empty class folder" in w and "Williams" in w for w in ds.warnings)
    assert summarize(ds).startswith("brands (folder): 5 images, 3 classes, 2 groups")
    assert "1 class with a single image" in summarize(ds)


def test_two_level_tree_repeated_class_names(tmp_path: Path, jpegs: list[Path]) -> None:
    root = tmp_path / "brands"
    _fill(root / "Acme" / "Tote", jpegs[:2])
    _fill(root / "Zeta" / "Tote", jpegs[2:4])
    _fill(root / "Zeta" / "Clutch", jpegs[4:5])
    ds = load_dataset(root)
    assert ds.classes == ["Acme/Tote", "Zeta/Clutch", "Zeta/Tote"]
    assert any("repeat across groups" in w for w in ds.warnings)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "nothing" / "Class A").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "nothing")
    assert "no images found" in str(err.value) and err.value.hint


def test_images_without_class_folders(tmp_path: Path, jpegs: list[Path]) -> None:
    _fill(tmp_path / "flat", jpegs[:2])
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path / "flat")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "does-not-exist")
    assert "dataset path not found" in str(err.value)
    assert "does-not-exist" in str(err.value)
    assert "folder" in err.value.hint


def test_not_a_csv(tmp_path: Path) -> None:
    p = tmp_path / "list.json"
    p.write_text("{}")
    with pytest.raises(DataError, match="not a .csv manifest"):
        load_dataset(p)


# --------------------------------------------------------------------------- CSV manifests

BRAND = "Maison Éclair & Fils"
ARTICLES = [
    # (brand, gender, category, subcategory, article, colour)
    (BRAND, "WOMEN", "BAGS", "Shoulder Bags", 'Sac "Étoile" 25', "white"),
    (BRAND, "WOMEN", "BAGS", "Shoulder Bags", 'Sac "Étoile" 25', "noir"),
    ("Ça-Va Co", "MEN", "SHOES", "Loafers", "Mocassin d'été, cuir", "brown"),
]


@pytest.fixture()
def catalogue_csv(tmp_path: Path, jpegs: list[Path]) -> Path:
    """A pandas-style manifest (unnamed index column, BOM, CRLF, Windows paths) over real images."""
    import csv

    root = tmp_path / "catalogue"
    rows = []
    n = 0
    for art in ARTICLES:
        for k in (1, 4):
            parts = [*art, f"image_{k}.jpg"]
            target = root.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(jpegs[n % len(jpegs)], target)
            n += 1
            rows.append(["\\".join(parts), "-".join(art), art[0]])
    manifest = root / "manifest.csv"
    with open(manifest, "w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh, lineterminator="\r\n")
        w.writerow(["", "path", "label", "brand"])
        for i, row in enumerate(rows):
            w.writerow([i, *row])
    return manifest


def test_pandas_style_manifest(catalogue_csv: Path) -> None:
    text = catalogue_csv.read_text(encoding="utf-8-sig")
    assert text.startswith(",path,label,brand") and "\\WOMEN\\BAGS\\" in text
    ds = load_dataset(catalogue_csv)
    assert ds.source == "csv" and ds.name == "manifest" and len(ds) == 6
    assert all(p.is_file() for p in ds.paths)  # backslashes became folders, accents and quotes kept
    assert set(ds.groups) == {None}  # no 'group' column
    assert f'{BRAND}-WOMEN-BAGS-Shoulder Bags-Sac "Étoile" 25-white' in ds.classes
    assert len(ds.classes) == 3 and set(ds.class_counts().values()) == {2}
    assert load_image(ds.paths[0]).mode == "RGB"


@pytest.mark.parametrize("spec,expected", [
    ("path:0", {BRAND, "Ça-Va Co"}),
    ("label:0", {"Maison Éclair & Fils", "Ça"}),  # dashes inside a brand split it: documented
    ("column:brand", {BRAND, "Ça-Va Co"}),
    ("path:-2", {"white", "noir", "brown"}),
])
def test_manifest_group_from(catalogue_csv: Path, spec: str, expected: set[str]) -> None:
    ds = load_dataset(catalogue_csv, group_from=spec)
    assert set(ds.groups) == expected


def test_manifest_unnamed_index_and_group_column(tmp_path: Path, jpegs: list[Path]) -> None:
    _fill(tmp_path / "imgs", jpegs[:3])
    p = tmp_path / "m.csv"
    p.write_text(
        "Unnamed: 0,path,label,group,split\n"
        f"0,imgs/{jpegs[0].name},a,G1,train\n"
        f"1,imgs/{jpegs[1].name},a,G1,TEST\n"
        f"2,imgs/{jpegs[2].name},b,,test\n"
        "\n",
        encoding="utf-8",
    )
    ds = load_dataset(p)
    assert ds.labels == ["a", "a", "b"]
    assert ds.groups == ["G1", "G1", None]
    assert [r.split for r in ds] == ["train", "test", "test"]
    assert len(load_dataset(p, split="test")) == 2
    with pytest.raises(DataError) as err:
        load_dataset(p, split="val")
    assert "unknown split 'val'" in str(err.value) and "available splits: test, train" in str(err.value)


def test_manifest_semicolon_and_problem_rows(tmp_path: Path, jpegs: list[Path]) -> None:
    _fill(tmp_path / "imgs", jpegs[:3])
    p = tmp_path / "m.csv"
    p.write_text(
        "Path;Label\n"
        f"imgs/{jpegs[0].name};x\n"
        f"imgs/{jpegs[1].name};\n"            # no label
        f"imgs/{jpegs[0].name};x\n"           # duplicate
        f"imgs/{jpegs[2].name};y\n",
        encoding="utf-8",
    )
    ds = load_dataset(p)
    assert ds.labels == ["x", "y"]
    assert any("without a path or label" in w for w in ds.warnings)
    assert any("duplicate" in w for w in ds.warnings)
    with pytest.raises(DataError, match="without a path or label"):
        load_dataset(p, strict=True)


def test_manifest_missing_columns(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("file_name,category\nx.jpg,a\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_dataset(p)
    msg = str(err.value)
    assert str(p) in msg
    assert "missing required column(s): path, label" in msg
    assert "'file_name'" in msg and "'category'" in msg
    assert "path" in err.value.hint and "label" in err.value.hint


def test_manifest_missing_label_column_only(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(",path,brand\n0,x.jpg,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing required column\(s\): label \(found: 'path', 'brand'\)"):
        load_dataset(p)


def test_manifest_empty(tmp_path: Path) -> None:
    p = tmp_path / "empty.csv"
    p.write_text("path,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="no images found in .*empty.csv"):
        load_dataset(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_dataset(p)


def test_manifest_does_not_check_files(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("path,label\nmissing/one.jpg,a\n", encoding="utf-8")
    ds = load_dataset(p)  # existence is the embedding step's business
    assert ds.paths == [tmp_path / "missing" / "one.jpg"]


def test_bad_group_from(catalogue_csv: Path, omniglot_root: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(catalogue_csv, group_from="brand")
    assert "invalid group_from 'brand'" in str(err.value) and "path:N" in err.value.hint
    with pytest.raises(DataError, match="not an integer"):
        parse_group_from("path:first")
    with pytest.raises(DataError, match="has only 7 path component"):
        load_dataset(catalogue_csv, group_from="path:9")
    with pytest.raises(DataError, match="has no column 'colour'"):
        load_dataset(catalogue_csv, group_from="column:colour")
    with pytest.raises(DataError, match="needs a CSV manifest"):
        load_dataset(omniglot_root, group_from="column:brand")
