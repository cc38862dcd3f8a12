"""Shared by the catalogue-check tests: a clean catalogue of real Grocery photos, and the same
catalogue with three planted defects (issue 29).

Clean: six articles x four train photos (``serve_helpers.ARTICLES``), embedded by the frozen
efficientnet_lite0 at 224 px (the levels' own model). Planted, on top of it:

* the same photo under two labels: a byte-for-byte copy of Banana's first photo, labelled Lemon;
* a swapped label: Carrots' first photo labelled Aubergine;
* two identical articles: ``Granny-Smith-Copy``, Granny-Smith's four photos re-encoded (JPEG
  quality 80: other files, near-identical photos).
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fewshot.data import load_dataset
from serve_helpers import ARTICLES

PHOTOS = 4
IMAGE_SIZE = 224
COPY = "Granny-Smith-Copy"


@dataclass
class Planted:
    clean: Path             # index folder of the clean catalogue
    planted: Path           # index folder with the defects
    manifest: Path          # the planted catalogue's CSV manifest
    cache: Path             # the embedding cache (built once)
    duplicate: tuple[Path, Path]   # Banana's photo, its copy labelled Lemon
    swapped: Path           # Carrots' photo labelled Aubergine
    copies: dict[Path, Path]       # Granny-Smith photo -> its re-encoded copy


_BUILT: dict[Path, Planted] = {}


def planted_catalogues(grocery_root: Path, tmp_path_factory) -> Planted:
    """Both catalogues, built once per test session (copy a folder before changing it)."""
    key = Path(grocery_root).resolve()
    if key not in _BUILT:
        _BUILT[key] = _build(grocery_root, tmp_path_factory.mktemp("check-catalogues"))
    return _BUILT[key]


def _manifest(path: Path, rows: list[tuple[Path, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows((str(p), label) for p, label in rows)
    return path


def _build(grocery_root: Path, out: Path) -> Planted:
    from fewshot.catalogue import build_index
    from fewshot.embed.options import EmbedOptions

    photos: dict[str, list[Path]] = {}
    for r in load_dataset(grocery_root, split="train"):
        if r.label in ARTICLES:
            photos.setdefault(r.label, []).append(r.path)
    rows = [(p, label) for label in ARTICLES for p in sorted(photos[label])[:PHOTOS]]
    (out / "copies").mkdir()
    banana, carrot = rows[[lab for _, lab in rows].index("Banana")][0], rows[[lab for _, lab in rows].index("Carrots")][0]
    duplicate = out / "copies" / "banana-copy.jpg"
    shutil.copyfile(banana, duplicate)
    copies = {}
    for k, (p, label) in enumerate([r for r in rows if r[1] == "Granny-Smith"]):
        copies[p] = out / "copies" / f"granny-{k}.jpg"
        Image.open(p).convert("RGB").save(copies[p], quality=80)
    planted = [(p, "Aubergine" if p == carrot else label) for p, label in rows]
    planted += [(c, COPY) for c in copies.values()] + [(duplicate, "Lemon")]
    opts = EmbedOptions(image_size=IMAGE_SIZE, cache_dir=str(out / "cache"), progress=False)
    build_index(str(_manifest(out / "clean.csv", rows)), out / "clean", embed=opts)
    manifest = _manifest(out / "planted.csv", planted)
    build_index(str(manifest), out / "planted", embed=opts)
    return Planted(out / "clean", out / "planted", manifest, out / "cache", (banana, duplicate), carrot, copies)
