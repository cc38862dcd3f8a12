"""Folder trees whose depth is mixed (issue 27, item 7): refused by ``auto`` with the folders
named, read as told with ``layout`` / ``--layout``; clean trees load as before. Drawn JPEGs, no
../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import fewshot
from fewshot.cli import app
from fewshot.data import load_dataset
from fewshot.errors import DataError

BRANDS = [f"Brand{b}" for b in range(5)]
runner = CliRunner()


def _photo(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 40, 200 - shade)).save(path, quality=80)


def brand_tree(root: Path, strays: int = 2) -> Path:
    """``root/<brand>/<article>/*.jpg``: 5 brands x 4 articles x 2 photos (20 articles), plus
    ``strays`` photos lying directly in ``Brand0``."""
    for b, brand in enumerate(BRANDS):
        for a in range(4):
            for i in range(2):
                _photo(root / brand / f"Article{b}{a}" / f"{i}.jpg", 10 * b + a)
    for i in range(strays):
        _photo(root / "Brand0" / f"stray{i}.jpg", 250)
    return root


def test_auto_refuses_a_mixed_tree_and_names_the_folder(tmp_path):
    root = brand_tree(tmp_path / "shop")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    text = str(err.value)
    assert "Brand0" in text and "2 photo(s)" in text  # the folder with the strays, and how many
    assert "4 of 5" in text  # the other top-level folders hold only sub-folders
    assert "layout='group/class'" in err.value.hint and "--" not in err.value.hint and "move the stray photos" in err.value.hint
    with pytest.raises(DataError):  # the Python API and the pipeline refuse it the same way
        fewshot.load_dataset(root)


def test_explicit_layouts_read_the_mixed_tree_as_told(tmp_path):
    root = brand_tree(tmp_path / "shop")
    ds = load_dataset(root, layout="group/class")
    assert len(ds.classes) == 20 and len(ds) == 40
    assert set(ds.groups) == set(BRANDS) and ds.group_of()["Article02"] == "Brand0"
    strays = [w for w in ds.warnings if "stray" in w or "skipped" in w]
    assert len(strays) == 1 and "2 photo(s)" in strays[0] and "Brand0" in strays[0]
    assert not any("stray" in str(p) for p in ds.paths)
    with pytest.raises(DataError, match="Brand0"):
        load_dataset(root, layout="group/class", strict=True)
    ds = fewshot.load_dataset(root, layout="group/class")  # the Python API passes it on
    assert len(ds.classes) == 20
    ds = load_dataset(root, layout="class")  # every top-level folder is one class, sub-folders included
    assert ds.class_counts() == {"Brand0": 10, **{b: 8 for b in BRANDS[1:]}}


def test_clean_trees_load_as_before(tmp_path):
    root = brand_tree(tmp_path / "shop", strays=0)
    ds = load_dataset(root)
    assert len(ds.classes) == 20 and set(ds.groups) == set(BRANDS) and ds.warnings == []
    assert load_dataset(root, layout="group/class").records == ds.records
    flat = tmp_path / "flat"
    for a in range(3):
        _photo(flat / f"Article{a}" / "0.jpg", a)
    ds = load_dataset(flat)
    assert ds.classes == ["Article0", "Article1", "Article2"] and set(ds.groups) == {None}
    assert load_dataset(flat, layout="class").records == ds.records


def test_a_class_folder_of_sub_folders_is_mixed_depth_too(tmp_path):
    """``root/Fruit/Apple/Granny/*.jpg`` beside ``root/Fruit/Banana/*.jpg``: Apple may be a class
    or a group of classes; auto refuses, --layout group/class counts Granny's photos in Apple."""
    root = tmp_path / "store"
    _photo(root / "Fruit" / "Banana" / "0.jpg", 1)
    _photo(root / "Fruit" / "Apple" / "Granny" / "0.jpg", 2)
    _photo(root / "Fruit" / "Apple" / "Pink" / "0.jpg", 3)
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert "Fruit/Apple" in str(err.value) and "layout='group/class'" in err.value.hint and "--" not in err.value.hint
    ds = load_dataset(root, layout="group/class")
    assert ds.class_counts() == {"Banana": 1, "Apple": 2}


def test_bad_layout_values(tmp_path):
    root = brand_tree(tmp_path / "shop", strays=0)
    with pytest.raises(ValueError, match="layout"):
        load_dataset(root, layout="brand")
    with pytest.raises(TypeError, match="layout"):
        load_dataset(root, layout=2)


def _commands_reading_a_tree() -> dict[str, object]:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in ("evaluate", "index", "classify", "embed", "train", "split")}


def test_every_command_that_reads_a_tree_has_layout():
    for name, cmd in _commands_reading_a_tree().items():
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--layout" in opts, name


def test_cli_refuses_then_reads_with_layout(tmp_path):
    root = brand_tree(tmp_path / "shop")
    r = runner.invoke(app, ["split", "--data", str(root), "--out", str(tmp_path / "s.json"), "--by", "class"])
    assert r.exit_code == 1 and "Brand0" in r.output and "--layout" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s.json").exists()
    r = runner.invoke(app, ["split", "--data", str(root), "--out", str(tmp_path / "c.json"), "--by", "class",
                            "--layout", "group/class", "--fractions", "0.4", "0.3", "0.3"])
    assert r.exit_code == 0, r.output
    assert "2 photo(s)" in r.output  # the skipped strays are reported
    assert f"next: fewshot train --data {root} --layout group/class" in r.output  # read alike next time
    import json

    split = json.loads((tmp_path / "c.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 20
    r = runner.invoke(app, ["split", "--data", str(root), "--out", str(tmp_path / "x.json"), "--layout", "brand"])
    assert r.exit_code == 2 and "auto, class, group/class" in r.output
    r = runner.invoke(app, ["train", "--data", str(root), "--split-file", str(tmp_path / "c.json"),
                            "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 1 and "Brand0" in r.output and "Traceback" not in r.output
