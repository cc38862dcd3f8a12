"""`fewshot split`, `fewshot --version` and `fewshot backbones`: a new user's first commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewshot import __version__
from fewshot.cli import app
from fewshot.data.splits import ClassSplit

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_split_of_the_grocery_tree_is_the_shipped_unseen_split(grocery_root, tmp_path):
    """On the Grocery folder tree, the defaults give splits/grocery-unseen.json's parts exactly:
    40 / 13 / 28 articles, each brand (coarse class) whole in one part."""
    out = tmp_path / "grocery.json"
    res = _run("split", "--data", str(grocery_root), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "train    40 classes in 24 group(s)" in res.output and "test     28 classes in 11 group(s)" in res.output
    assert f"--split-file {out}" in res.output
    made, shipped = ClassSplit.load(out), ClassSplit.load(REPO / "splits" / "grocery-unseen.json")
    assert (made.train, made.val, made.test) == (shipped.train, shipped.val, shipped.test)
    from fewshot.data.loaders import load_dataset

    group_of = dict(zip(load_dataset(grocery_root).labels, load_dataset(grocery_root).groups))
    parts_of_group: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for c in made.classes_of(part):
            parts_of_group.setdefault(group_of[c], set()).add(part)
    assert all(len(p) == 1 for p in parts_of_group.values())
    # by class: single articles, a different split of the same 81
    res = _run("split", "--data", str(grocery_root), "--out", str(tmp_path / "c.json"), "--by", "class",
               "--fractions", "0.6", "0.2", "0.2", "--seed", "3")
    assert res.exit_code == 0, res.output
    c = ClassSplit.load(tmp_path / "c.json")
    assert len(c.train) + len(c.val) + len(c.test) == 81 and not c.keep_groups_together
    assert abs(len(c.val) - 16) <= 1


def test_split_refuses_what_would_not_train_and_protects_files(drawn_tree, tmp_path):
    """6 drawn articles in 2 shapes: too few for a val part of 5 classes; --by group on 2
    groups cannot fill 3 parts; an existing file that is not a split is never replaced."""
    out = tmp_path / "s.json"
    res = _run("split", "--data", str(drawn_tree), "--out", str(out), "--by", "class")
    assert res.exit_code == 1 and "val part would have" in res.output and "needs at least 5" in res.output
    assert "--fractions" in res.output and not out.exists()
    res = _run("split", "--data", str(drawn_tree), "--out", str(out))
    assert res.exit_code == 1 and "has no groups" in res.output and "--by class" in res.output
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    res = _run("split", "--data", str(drawn_tree), "--out", str(mine), "--by", "class", "--overwrite")
    assert res.exit_code == 1 and json.loads(mine.read_text()) == {"my": "notes"}
    res = _run("split", "--data", str(drawn_tree), "--out", str(out), "--by", "brand")
    assert res.exit_code == 1 and "unknown --by 'brand'" in res.output


def _brand_tree(drawn_tree: Path, root: Path, per_brand: int = 3) -> Path:
    """``root/Brand<b>/B<b>-<article>/``: 4 brands of ``per_brand`` drawn articles (6 photos each)."""
    articles = sorted(p for p in drawn_tree.iterdir() if p.is_dir())
    for b in range(4):
        for src in articles[:per_brand]:
            shutil.copytree(src, root / f"Brand{b}" / f"B{b}-{src.name}")
    return root


@pytest.mark.parametrize("fractions, reason", [
    (("inf", "1", "1"), "a share is infinite"),
    (("1", "-inf", "1"), "a share is infinite"),
    (("1e308", "1e308", "1e308"), "the shares are too large (their sum overflows)"),
    (("nan", "1", "1"), "a share is not a number"),
    (("0.5", "-1", "0.5"), "a share is negative"),
    (("0", "0", "0"), "all shares are 0"),
])
def test_split_refuses_hostile_fractions_without_a_traceback(drawn_tree, tmp_path, fractions, reason):
    """Non-finite, negative, all-zero or overflowing --fractions: exit 1, a message naming
    --fractions and the reason, the fix, no traceback, no file (inf and 1e308 x3 used to end
    in ``max() arg is an empty sequence``)."""
    out = tmp_path / "s.json"
    res = _run("split", "--data", str(drawn_tree), "--out", str(out), "--by", "class", "--fractions", *fractions)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert f"error: invalid --fractions ({' '.join(str(float(f)) for f in fractions)}): {reason}" in res.output
    assert "fix: give three finite, non-negative shares" in res.output and "--fractions 0.5 0.15 0.35" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_split_takes_extreme_but_valid_values(drawn_tree, tmp_path):
    """Tiny equal shares are the same as equal shares, and a 100-digit --seed is kept exactly."""
    root = _brand_tree(drawn_tree, tmp_path / "PHOTOS", per_brand=6)
    seed = "9" * 100
    for name, fractions in (("tiny.json", ("1e-300", "1e-300", "1e-300")), ("equal.json", ("1", "1", "1"))):
        res = _run("split", "--data", str(root), "--out", str(tmp_path / name), "--by", "class",
                   "--fractions", *fractions, "--seed", seed)
        assert res.exit_code == 0, res.output
    tiny, equal = ClassSplit.load(tmp_path / "tiny.json"), ClassSplit.load(tmp_path / "equal.json")
    assert tiny.seed == equal.seed == int(seed) and tiny.fractions == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert (tiny.train, tiny.val, tiny.test) == (equal.train, equal.val, equal.test)
    assert list(map(len, (tiny.train, tiny.val, tiny.test))) == [8, 8, 8]


def test_split_of_a_brand_tree_then_overwrite(drawn_tree, tmp_path):
    """A Brand/Article/photo tree with 4 brands of 3 articles: whole brands per part; a second
    run needs --overwrite, which replaces only the split file it wrote."""
    root = _brand_tree(drawn_tree, tmp_path / "PHOTOS")
    out = tmp_path / "brands.json"
    res = _run("split", "--data", str(root), "--out", str(out), "--fractions", "0.25", "0.5", "0.25")
    assert res.exit_code == 0, res.output
    s = ClassSplit.load(out)
    for part in ("train", "val", "test"):
        brands = {c.split("-")[0] for c in s.classes_of(part)}  # labels are B<n>-<article>
        assert all(len([c for c in s.classes_of(part) if c.startswith(b + "-")]) == 3 for b in brands)
    assert (len(s.train), len(s.val), len(s.test)) == (3, 6, 3)
    again = _run("split", "--data", str(root), "--out", str(out), "--fractions", "0.25", "0.5", "0.25")
    assert again.exit_code == 1 and "--overwrite" in again.output
    again = _run("split", "--data", str(root), "--out", str(out), "--fractions", "0.25", "0.5", "0.25",
                 "--overwrite", "--seed", "1")
    assert again.exit_code == 0, again.output


def test_version_and_backbones_listing():
    res = _run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"fewshot {__version__}"
    res = _run("backbones")
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert lines["efficientnet_lite0"].split()[1:4] == ["1280", "224", "ready"]
    assert lines["conv4"].split()[1:4] == ["64", "28", "ready"] and "from scratch" in lines["conv4"]
    for family, extra in (("timm:NAME", "timm"), ("torchvision:NAME", "torchvision"),
                          ("open_clip:ARCH/PRETRAINED", "open_clip")):
        assert "needs internet" in lines[family]
        assert "ready" in lines[family] or f"pip install 'fewshot[{extra}]'" in res.output


def test_hints_name_only_commands_that_exist():
    """No message points at the options an earlier version suggested but never had."""
    text = "\n".join(p.read_text() for p in (REPO / "src" / "fewshot").rglob("*.py"))
    assert "--make-split" not in text and "--no-keep-groups" not in text
