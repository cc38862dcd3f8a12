"""One Catalogue: build, save, load, enrol into and classify with it, for each index kind.

The catalogue is 36 drawn photos of 6 articles (made at test time) plus 964 filler images of 4
articles far from them (synthetic vectors), so that every kind can be built (ivfpq trains on
1,000 or more). The exact flat catalogue of the same vectors gives the expected answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fewshot
from fewshot.index.kinds import list_kinds
from fewshot.catalogue import Catalogue, EmbedderSpec, load_index
from fewshot.catalogue.journal import Journal
from fewshot.catalogue.store import ENROLLED_DIR
from fewshot.errors import CheckpointError, FewshotError, FolderBusyError, InputError
from fewshot.index import AnnConfig, CatalogueIndex

FILLERS = 964
KINDS = list_kinds()  # every registered index kind


@pytest.fixture(scope="module")
def model():
    return fewshot.create_backbone("efficientnet_lite0", image_size=32)


@pytest.fixture(scope="module")
def flat(model, drawn_tree: Path, tmp_path_factory) -> Catalogue:
    """The drawn photos as a flat catalogue (what Catalogue.build makes)."""
    dataset = fewshot.load_dataset(drawn_tree)
    return Catalogue.build(model, dataset, runtime="torch", cache_dir=str(tmp_path_factory.mktemp("cache")))


def _with_fillers(cat: Catalogue, kind: str) -> Catalogue:
    """``cat``'s images plus the fillers, indexed as ``kind``, with ``cat``'s model and config."""
    rng = np.random.default_rng(0)
    filler = rng.normal(size=(FILLERS, cat.index.dim)).astype(np.float32)
    filler[:, :8] += 40.0  # a direction of their own: never near a photo
    idx = cat.index
    labels = idx.labels + [f"filler-{i % 4}" for i in range(FILLERS)]
    index = CatalogueIndex.build(np.vstack([idx.image_vectors(), filler]), labels,
                                 idx.groups + ["Filler"] * FILLERS, idx.paths + [f"f{i}.jpg" for i in range(FILLERS)],
                                 dict(idx.config), digests=idx.digests + [None] * FILLERS, ann_config=AnnConfig(kind))
    return Catalogue(cat.model, index, runtime="torch", cache_dir=cat.cache_dir)


def _answers(cat: Catalogue, images: list, mode: str = "prototype") -> list[list[tuple[str, float]]]:
    return [[(p.label, round(p.score, 4)) for p in r.predictions] for r in cat.classify(images, top_k=3, mode=mode)]


@pytest.mark.parametrize("kind", KINDS)
def test_build_save_load_enrol_and_classify(kind: str, flat: Catalogue, drawn_tree: Path, tmp_path: Path) -> None:
    exact = _with_fillers(flat, "flat")
    cat = _with_fillers(flat, kind)
    assert cat.index.ann.kind == kind and len(cat) == 36 + FILLERS and len(cat.articles) == 10
    photos = [drawn_tree / "Red-Ball" / "Red-Ball_00.jpg", drawn_tree / "Blue-Box" / "Blue-Box_03.jpg"]
    for mode in ("prototype", "nearest"):
        assert _answers(cat, photos, mode) == _answers(exact, photos, mode)
    first = cat.classify(photos, top_k=3)
    assert [r.in_catalogue for r in first] == [True, True]  # catalogue photos: their own copy left out
    assert [r.left_out for r in first] == [["Red-Ball"], ["Blue-Box"]]
    assert all(-1.0 <= p.score <= 1.0 for r in first for p in r.predictions)

    folder = cat.save(tmp_path / "idx")
    again = Catalogue.load(folder, runtime="torch")
    assert again.index.ann.kind == kind and len(again) == len(cat) and again.articles == cat.articles
    assert _answers(again, photos) == _answers(cat, photos)
    assert EmbedderSpec.of_index(again.index) == EmbedderSpec.of(again.model)

    # enrol two photos from memory: classified as the new article (exactly its own image: score 1)
    purple = [np.full((40, 40, 3), (120, 30, 160), np.uint8), np.full((40, 40, 3), (130, 20, 170), np.uint8)]
    assert again.add("Purple-Thing", purple, group="Plain") == 2
    best = again.classify([purple[0]], top_k=1)[0].predictions[0]
    assert best.label == "Purple-Thing" and best.group == "Plain" and best.score > 0.99
    assert again.remove("Red-Ball") == 6
    again.save(folder, overwrite=True)
    back = Catalogue.load(folder, runtime="torch")
    assert back.index.num_images("Purple-Thing") == 2 and not back.index.has_article("Red-Ball")
    assert len(back) == len(cat) - 6 + 2
    stored = back.index.article_paths("Purple-Thing")
    assert all(p.startswith(f"{ENROLLED_DIR}/") and (folder / p).is_file() for p in stored)
    assert _answers(back, [purple[1]])[0][0][0] == "Purple-Thing"


def test_a_catalogue_opened_by_a_writer_enrols_and_deletes_durably(flat: Catalogue, drawn_tree: Path,
                                                                   tmp_path: Path) -> None:
    """open() holds the folder; enrol and delete each append one journal entry, which a load
    replays; a later open compacts a long journal."""
    folder = flat.save(tmp_path / "idx")
    live = Catalogue.open(folder, runtime="torch")
    try:
        with pytest.raises(FolderBusyError):
            Catalogue.open(folder, runtime="torch")
        src = drawn_tree / "Green-Ball" / "Green-Ball_01.jpg"
        assert live.classify([src])[0].in_catalogue
        vec = flat.index.image_vectors()[:1]
        paths = live.enrol("New-Article", "New", vec, [(src, ".jpg")])
        assert len(paths) == 1 and (folder / paths[0]).read_bytes() == src.read_bytes()
        assert live.is_enrolled(paths[0]) and not live.is_enrolled(flat.index.paths[0])
        assert len(Journal(folder)) == 1 and load_index(folder).num_images("New-Article") == 1
        assert live.delete("New-Article") == paths
        assert not (folder / paths[0]).exists() and not (folder / ENROLLED_DIR).exists()
        assert len(Journal(folder)) == 2 and not load_index(folder).has_article("New-Article")
    finally:
        live.close()
    Catalogue.open(folder, runtime="torch", compact_after=2).close()
    assert len(Journal(folder)) == 0 and len(load_index(folder)) == 36


def test_a_model_given_in_place_of_the_index_own_is_checked(flat: Catalogue, tmp_path: Path) -> None:
    folder = flat.save(tmp_path / "idx")
    flip = fewshot.create_backbone("efficientnet_lite0", image_size=32, tta="flip")
    with pytest.raises(CheckpointError, match="test-time augmentation 'flip' but index"):
        Catalogue.open(folder, model=flip, read_only=True)
    spec = EmbedderSpec.of_index(load_index(folder))
    assert (spec.backbone, spec.image_size, spec.run_dir, spec.tta, spec.dim) == ("efficientnet_lite0", 32, None,
                                                                                   "none", 1280)
    assert spec.weights_digest == flat.model.weights_digest()
    assert EmbedderSpec.of(flip) != spec and EmbedderSpec.of(flip).tta == "flip"


def test_labels_are_checked_before_anything_is_added(flat: Catalogue) -> None:
    cat = Catalogue(flat.model, CatalogueIndex.build(flat.index.image_vectors(), flat.index.labels,
                                                      flat.index.groups, flat.index.paths, dict(flat.index.config)),
                    runtime="torch")
    with pytest.raises(InputError) as err:
        cat.add("Red-Ball", [Image.new("RGB", (8, 8))], group="Other")
    assert err.value.code == "group_conflict" and len(cat) == 36


def test_build_takes_the_index_kind_and_its_options(model, flat: Catalogue, drawn_tree: Path) -> None:
    dataset = fewshot.load_dataset(drawn_tree)
    graph = Catalogue.build(model, dataset, runtime="torch", cache_dir=flat.cache_dir, index_type="hnsw", ef_search=16)
    assert graph.index.ann.kind == "hnsw" and graph.index.ann.options.ef_search == 16
    photos = [drawn_tree / "Red-Ball" / "Red-Ball_00.jpg"]
    assert _answers(graph, photos) == _answers(flat, photos)
    with pytest.raises(InputError, match="nlist"):  # an option of another kind
        Catalogue.build(model, dataset, runtime="torch", cache_dir=flat.cache_dir, index_type="flat", nlist=4)


def test_an_opened_catalogue_persists_what_it_adds_from_memory(flat: Catalogue, tmp_path: Path) -> None:
    """compact() and save() into the folder a writer opened write the photos added from memory
    (they were referenced but never written, and save() was refused by the catalogue's own lock)."""
    folder = flat.save(tmp_path / "idx")
    live = Catalogue.open(folder, runtime="torch")
    try:
        live.add("Grey-Thing", [np.full((20, 20, 3), 90, np.uint8)], group="Plain")
        live.compact()
        live.add("Dark-Thing", [np.full((20, 20, 3), 10, np.uint8)], group="Plain")
        live.save(folder, overwrite=True)
    finally:
        live.close()
    back = Catalogue.load(folder, runtime="torch")
    stored = back.index.article_paths("Grey-Thing") + back.index.article_paths("Dark-Thing")
    assert len(stored) == 2 and all((folder / p).is_file() for p in stored)
    assert _answers(back, [np.full((20, 20, 3), 10, np.uint8)])[0][0] == ("Dark-Thing", 1.0)


def test_a_read_only_catalogue_writes_nothing(flat: Catalogue, drawn_tree: Path, tmp_path: Path) -> None:
    folder = flat.save(tmp_path / "idx")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    viewer = Catalogue.open(folder, runtime="torch", read_only=True)
    photo = drawn_tree / "Green-Ball" / "Green-Ball_01.jpg"
    for change in (lambda: viewer.enrol("Y", None, flat.index.image_vectors()[:1], [(photo, ".jpg")]),
                   lambda: viewer.delete("Red-Ball"), viewer.compact, lambda: viewer.save(folder, overwrite=True)):
        with pytest.raises(FewshotError, match="opened read-only"):
            change()
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before
