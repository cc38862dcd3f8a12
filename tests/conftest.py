"""Shared test fixtures: where the real data lives.

The shared data folder is found through ``FEWSHOT_SHARED`` (default: ``../shared`` beside the
repository root). Nothing from it is copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("FEWSHOT_SHARED", REPO_ROOT.parent / "shared")).resolve()


#: fixtures that read ../shared; a test that uses any of them (directly or through another
#: fixture) is marked ``shared_data``, so ``-m "not shared_data"`` runs the rest without it
SHARED_FIXTURES = {"shared", "grocery_root", "omniglot_root"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "data").is_dir():
        pytest.fail(f"shared data folder not found at {path}: set FEWSHOT_SHARED")
    return path


@pytest.fixture(scope="session")
def grocery_root(shared: Path) -> Path:
    return shared / "data" / "grocery-store-dataset"


@pytest.fixture(scope="session")
def omniglot_root(shared: Path) -> Path:
    return shared / "data" / "omniglot" / "images_background_small1"


# --------------------------------------------------------------------------- small real subsets
SMALL_CLASSES = ["Granny-Smith", "Pink-Lady", "Banana", "Carrots", "Oatly-Natural-Oatghurt", "Arla-Standard-Milk"]


def _grocery_lines(root: Path, split: str) -> list[tuple[str, int]]:
    out = []
    for line in (root / "dataset" / f"{split}.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2:
            out.append((parts[0], int(parts[1])))
    return out


@pytest.fixture(scope="session")
def small_manifest(grocery_root: Path, tmp_path_factory) -> Path:
    """A CSV manifest (path,label,group,split) over real Grocery photos: 6 articles,
    6 train + 4 test photos each, paths relative to the CSV (files copied into a tmp folder)."""
    import csv
    import shutil

    import fewshot.data.loaders as loaders

    full = loaders.load_dataset(grocery_root)
    out = tmp_path_factory.mktemp("small_grocery")
    rows = []
    for label in SMALL_CLASSES:
        for split, n in (("train", 6), ("test", 4)):
            recs = [r for r in full.records if r.label == label and r.split == split][:n]
            assert len(recs) == n, (label, split)
            for r in recs:
                rel = Path(split) / r.group / label / r.path.name
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(r.path, out / rel)
                rows.append((rel.as_posix(), label, r.group, split))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        w.writerows(rows)
    return manifest


@pytest.fixture(scope="session")
def lite0_64():
    """EfficientNet-Lite0 with its shipped ImageNet weights at 64 px (fast on CPU)."""
    from fewshot.backbones import create_backbone

    return create_backbone("efficientnet_lite0", pretrained=True, image_size=64)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- drawn data (no ../shared)
DRAWN_CLASSES = {"Round": ["Red-Ball", "Blue-Ball", "Green-Ball"], "Box": ["Red-Box", "Blue-Box", "Green-Box"]}
_COLOURS = {"Red": (200, 40, 40), "Blue": (40, 60, 200), "Green": (40, 170, 60)}


def draw_tree(root: Path, per_class: int = 6, size: int = 72, seed: int = 0) -> Path:
    """Write ``root/<article>/<nn>.jpg``: drawn products (a ball or a box in one of three
    colours) at random positions and sizes on a noisy background; 6 articles in 2 shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for shape, articles in DRAWN_CLASSES.items():
        for article in articles:
            folder = root / article
            folder.mkdir(parents=True, exist_ok=True)
            colour = _COLOURS[article.split("-")[0]]
            for i in range(per_class):
                noise = rng.integers(150, 255, size=(size, size, 3), dtype=np.uint8)
                img = Image.fromarray(noise)
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
                box = (cx - r, cy - r, cx + r, cy + r)
                draw = ImageDraw.Draw(img)
                (draw.ellipse if shape == "Round" else draw.rectangle)(box, fill=colour)
                img.save(folder / f"{article}_{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def drawn_tree(tmp_path_factory) -> Path:
    """A plain folder tree of 36 drawn photos (6 articles x 6), made at test time."""
    return draw_tree(tmp_path_factory.mktemp("drawn") / "PHOTOS")


def make_brand_tree(grocery_root: Path, out: Path, per_class: int = 4) -> Path:
    """``out/<Brand>/<Article>/*.jpg``: the first ``per_class`` train photos of each of Grocery's
    81 articles, under its coarse class as the brand (43 brands): a user's plain folder tree."""
    import shutil

    import fewshot.data.loaders as loaders

    full = loaders.load_dataset(grocery_root)
    taken: dict[str, int] = {}
    for r in full.records:
        if r.split != "train" or taken.get(r.label, 0) >= per_class:
            continue
        taken[r.label] = taken.get(r.label, 0) + 1
        dst = out / r.group / r.label / r.path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.path, dst)
    return out


@pytest.fixture(scope="session")
def brand_tree(grocery_root: Path, tmp_path_factory) -> Path:
    """324 real Grocery photos as ``Brand/Article/photo.jpg`` (81 articles x 4, 43 brands)."""
    return make_brand_tree(grocery_root, tmp_path_factory.mktemp("own") / "my-photos")
