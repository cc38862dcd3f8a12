"""Shared by the service tests: a small real catalogue index built from Grocery photos.

Six articles x four train photos at 96 px (a few seconds on two cores), plus photos of a
seventh article (train photos to enrol, a test photo to classify) that is not in the index.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from fewshot.data import load_dataset

#: The catalogue's articles (distinct looking, from several groups).
ARTICLES = ("Banana", "Granny-Smith", "Oatly-Oat-Milk", "Carrots", "Lemon", "Aubergine")
#: The article enrolled by the tests (not in the initial index).
NEW_ARTICLE = "Watermelon"
PHOTOS_PER_ARTICLE = 4
IMAGE_SIZE = 96


@dataclass
class SmallCatalogue:
    index_dir: Path
    model: object
    groups: dict[str, str]
    train: dict[str, list[Path]]   # label -> train photos (the first PHOTOS_PER_ARTICLE are indexed)
    test: dict[str, list[Path]]    # label -> test photos (never indexed)


_BUILT: dict[Path, SmallCatalogue] = {}


def small_catalogue(grocery_root: Path, tmp_path_factory) -> SmallCatalogue:
    """The catalogue built once per test session (copy ``index_dir`` before changing it)."""
    key = Path(grocery_root).resolve()
    if key not in _BUILT:
        _BUILT[key] = build_small_catalogue(grocery_root, tmp_path_factory.mktemp("serve-catalogue"))
    return _BUILT[key]


def build_small_catalogue(grocery_root: Path, out: Path) -> SmallCatalogue:
    """Write a CSV manifest of the chosen photos and build an index folder from it."""
    from fewshot.catalogue import build_index
    from fewshot.embed.options import EmbedOptions
    from fewshot.methods.from_options import model_from_options

    wanted = set(ARTICLES) | {NEW_ARTICLE}
    train = load_dataset(grocery_root, split="train")
    test = load_dataset(grocery_root, split="test")
    by_label: dict[str, list[Path]] = {}
    test_by_label: dict[str, list[Path]] = {}
    groups: dict[str, str] = {}
    for r in train:
        if r.label in wanted:
            by_label.setdefault(r.label, []).append(r.path)
            groups[r.label] = r.group
    for r in test:
        if r.label in wanted:
            test_by_label.setdefault(r.label, []).append(r.path)
    for d in (by_label, test_by_label):
        for v in d.values():
            v.sort()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "catalogue.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for label in ARTICLES:
            for p in by_label[label][:PHOTOS_PER_ARTICLE]:
                w.writerow([str(p), label, groups[label]])
    opts = EmbedOptions(image_size=IMAGE_SIZE, cache_dir=str(out / "cache"), progress=False)
    model = model_from_options(opts)
    index_dir = out / "index"
    build_index(str(manifest), index_dir, split=None, embed=opts, model=model)
    return SmallCatalogue(index_dir, model, groups, by_label, test_by_label)


def authed(app, **kwargs):
    """A test client of ``app`` that sends the app's write token with every request."""
    from fastapi.testclient import TestClient

    return TestClient(app, headers={"Authorization": f"Bearer {app.state.access.write_token}"}, **kwargs)
