"""A whitened catalogue (``fewshot index --whiten``, ``Catalogue.build(whiten=True)``): the fit is
kept in the index folder; every query and every photo added later, from memory, through the
journal or a rebuild, is whitened by it; the reject threshold is calibrated fold by fold; the
catalogue check reads the model's own embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fewshot
from fewshot.catalogue import Catalogue, load_index
from fewshot.catalogue.formats import WHITENING_FILE
from fewshot.catalogue.whitened import whitened_calibration_scores
from fewshot.errors import CheckpointError, DataError
from fewshot.metrics.openset import threshold_for_far


@pytest.fixture(scope="module")
def model():
    return fewshot.create_backbone("efficientnet_lite0", image_size=32)


@pytest.fixture(scope="module")
def built(model, drawn_tree: Path, tmp_path_factory) -> tuple[Catalogue, Catalogue]:
    """The drawn photos as a plain and as a whitened catalogue."""
    dataset = fewshot.load_dataset(drawn_tree)
    cache = str(tmp_path_factory.mktemp("cache"))
    return (Catalogue.build(model, dataset, runtime="torch", cache_dir=cache),
            Catalogue.build(model, dataset, runtime="torch", cache_dir=cache, whiten=True))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_queries_and_the_catalogue_are_whitened_by_one_fit(built, drawn_tree: Path) -> None:
    plain, white = built
    w = white.index.whitening
    assert white.whitened and not plain.whitened and w.photos == 36 and w.articles == 6
    raw = plain.index.image_vectors()  # the model's unit embeddings
    np.testing.assert_allclose(white.index.image_vectors(), w.apply(raw), atol=1e-6)
    np.testing.assert_allclose(white.index.embedding_rows(0, 36), raw, atol=1e-5)
    # a query's scores by hand: its whitened vector against the whitened photos' normalised means
    photo = drawn_tree / "Red-Ball" / "Red-Ball_00.jpg"
    q = raw[[i for i, p in enumerate(plain.index.paths) if Path(p) == photo]]
    y = w.apply(raw)
    labels = np.array(plain.index.labels)
    protos = _unit(np.stack([y[labels == a].sum(0) for a in white.articles]))
    by_hand = sorted(zip((w.apply(q) @ protos.T)[0].round(4), white.articles), reverse=True)[:3]
    got = white.index.classify(q, top_k=3)[0]
    assert [(p.label, round(p.score, 4)) for p in got] == [(a, s) for s, a in by_hand]


def test_saved_loaded_added_and_replayed_alike(built, tmp_path: Path) -> None:
    _, white = built
    folder = white.save(tmp_path / "idx")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["whitening"]["photos"] == 36 and len(meta["whitening"]["sha256"]) == 64
    again = Catalogue.load(folder, runtime="torch")
    np.testing.assert_array_equal(again.index.whitening.matrix, white.index.whitening.matrix)
    # the threshold the save calibrated is read back, not computed again (5 fits of the folds)
    assert ("calibration", "relative", 0.05) in again.index.derived
    assert again.rejector().threshold == white.rejector().threshold
    purple = [np.full((40, 40, 3), (120, 30, 160), np.uint8), np.full((40, 40, 3), (100, 40, 150), np.uint8)]
    assert again.add("Purple-Thing", purple) == 2  # from memory: whitened by the kept fit
    from fewshot.catalogue.inputs import embed_images

    raw, _, _ = embed_images(again.model, purple, runtime="torch")
    added = again.index.vector_rows(36, 38)
    np.testing.assert_allclose(added, again.index.whitening.apply(raw), atol=1e-6)
    assert again.classify([purple[0]], top_k=1, reject="none")[0].predictions[0].label == "Purple-Thing"

    # through the journal (the service's way): the entry holds the model's embeddings, replayed whitened
    writer = Catalogue.open(folder, model=again.model)
    try:
        vectors = raw
        files = [(tmp_path / f"p{i}.png", ".png") for i in range(2)]
        from PIL import Image

        for (f, _), arr in zip(files, purple):
            Image.fromarray(arr).save(f)
        with writer.lock:
            writer.enrol("Purple-Thing", None, vectors, files)
        live = writer.index.vector_rows(36, 38)
    finally:
        writer.close()
    replayed = load_index(folder)
    assert replayed.whitening is not None and len(replayed) == 38
    np.testing.assert_allclose(replayed.vector_rows(36, 38), live, atol=1e-6)
    np.testing.assert_allclose(live, added, atol=1e-5)


def test_a_changed_whitening_file_is_refused(built, tmp_path: Path) -> None:
    _, white = built
    folder = white.save(tmp_path / "idx")
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(folder / WHITENING_FILE))
    arrays["matrix"] = arrays["matrix"] * 2
    save_file(arrays, str(folder / WHITENING_FILE))
    with pytest.raises(CheckpointError, match="whitening"):
        load_index(folder)
    (folder / WHITENING_FILE).unlink()
    with pytest.raises(CheckpointError, match="whitening.safetensors") as err:
        Catalogue.load(folder)
    assert "--whiten --overwrite" in err.value.hint and str(tmp_path) not in err.value.hint


def test_the_threshold_is_calibrated_fold_by_fold(built) -> None:
    _, white = built
    index = white.index
    by_hand = whitened_calibration_scores(index.embedding_rows(0, len(index)), index.labels, index.groups,
                                          ["relative"])["relative"]
    rejector = white.rejector("auto", 0.2, "relative")
    assert rejector.threshold == pytest.approx(threshold_for_far(by_hand.absent, 0.2))
    # not the threshold of the index's own whitening, which has seen every article
    from fewshot.catalogue.calibrate import calibration_scores

    own = calibration_scores(index, score="relative")
    assert threshold_for_far(own.absent, 0.2) != pytest.approx(rejector.threshold)


def test_the_check_reads_the_models_embeddings(built) -> None:
    plain, white = built
    assert white.check().as_dict() == plain.check().as_dict()


def test_whiten_is_refused_before_anything_is_embedded(model, drawn_tree: Path, tmp_path: Path, monkeypatch) -> None:
    from fewshot.data.records import Dataset
    from fewshot.embed.options import EmbedOptions

    dataset = fewshot.load_dataset(drawn_tree)
    singles = Dataset([r for r in dataset.records if r.path.name.endswith("_00.jpg")], name="singles")
    monkeypatch.setattr(EmbedOptions, "embed", lambda *a, **k: pytest.fail("embedded"))
    with pytest.raises(DataError, match="second or later photo") as err:
        Catalogue.build(model, singles, whiten=True)
    assert err.value.options == ("whiten",)
    with pytest.raises(TypeError, match="whiten must be True or False"):
        Catalogue.build(model, dataset, whiten="yes")


def _craft(folder: Path, **change) -> None:
    """Rewrite the folder's whitening with ``change`` applied, its SHA-256 in meta.json to match."""
    from safetensors.numpy import load_file, save_file

    from fewshot.catalogue.formats import _arrays_digest

    arrays = {**load_file(str(folder / WHITENING_FILE)), **change}
    save_file(arrays, str(folder / WHITENING_FILE))
    meta = json.loads((folder / "meta.json").read_text())
    meta["whitening"]["sha256"] = _arrays_digest(arrays)
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change,fragment", [
    ("dim", "4-dimensional, the index"), ("nan", "not finite"), ("far", "not below 1"), ("zero", "singular"),
    ("no record", "no whitening record"),
])
def test_a_whitening_that_cannot_be_right_is_refused(built, tmp_path: Path, change: str, fragment: str) -> None:
    _, white = built
    folder = white.save(tmp_path / "idx")
    assert json.loads((folder / "meta.json").read_text())["format_version"] == 3  # fewshot < 0.7.0 refuses it
    w = white.index.whitening
    if change == "dim":
        _craft(folder, mean=w.mean[:4].copy() * 0, matrix=np.eye(4))
    elif change == "nan":
        _craft(folder, mean=np.where(np.arange(w.dim) == 0, np.nan, w.mean))
    elif change == "far":
        _craft(folder, mean=w.mean / np.linalg.norm(w.mean) * 1.5)
    elif change == "zero":
        _craft(folder, matrix=np.zeros_like(w.matrix))
    else:  # the record dropped, the file still there: read as plain, it would answer unwhitened
        meta = json.loads((folder / "meta.json").read_text())
        meta["whitening"] = None
        (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=fragment):
        load_index(folder)


def test_a_plain_index_keeps_format_2(built, tmp_path: Path) -> None:
    plain, _ = built
    folder = plain.save(tmp_path / "idx")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["whitening"] is None and not (folder / WHITENING_FILE).exists()


def test_too_few_articles_say_so_once(model, drawn_tree: Path, caplog) -> None:
    from fewshot.data.records import Dataset

    dataset = fewshot.load_dataset(drawn_tree)
    five = Dataset([r for r in dataset.records if r.label != "Red-Ball"], name="five")
    cat = Catalogue.build(model, five, runtime="torch", whiten=True)
    with caplog.at_level("WARNING", logger="fewshot"):
        assert cat.rejector().threshold is None
    said = [r.getMessage() for r in caplog.records]
    assert any("5 articles: too few to calibrate" in m for m in said) and not any("fold by fold" in m for m in said)


def test_the_fold_that_cannot_be_fitted_is_named() -> None:
    from fewshot.catalogue.whitened import check_whitenable

    # 6 articles, so 6 folds of one: without 'a' (or 'b'), one photo beyond the first is left
    with pytest.raises(DataError, match=r"without fold \d+ \(1 article\(s\): '[ab]'\), the rest has 6 photos of 5 articles"):
        check_whitenable(["a", "a", "b", "b", "c", "d", "e", "f"])


def test_a_threshold_that_accepts_almost_nothing_warns(caplog) -> None:
    from fewshot.catalogue.reject import cached_calibration
    from fewshot.index import CatalogueIndex

    x = np.random.default_rng(0).normal(size=(200, 32)).astype(np.float32)  # no article looks like itself
    index = CatalogueIndex.build(x, [f"a{i % 20}" for i in range(200)], [None] * 200, [f"p{i}" for i in range(200)])
    with caplog.at_level("WARNING", logger="fewshot"):
        cal = cached_calibration(index, 0.05, "relative")
    assert cal.present_accepted < 0.10
    assert any("almost every photo will be answered 'unknown'" in r.getMessage() for r in caplog.records)


def test_byte_identical_copies_count_once_in_the_fit(model, built, drawn_tree: Path, tmp_path: Path) -> None:
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(drawn_tree, tree)
    for i in range(3):  # three copies of one photo: no spread, the same fit as without them
        shutil.copyfile(tree / "Red-Ball" / "Red-Ball_00.jpg", tree / "Red-Ball" / f"Red-Ball_copy{i}.jpg")
    copied = Catalogue.build(model, fewshot.load_dataset(tree), runtime="torch", cache_dir=str(tmp_path / "c"),
                             whiten=True)
    w, original = copied.index.whitening, built[1].index.whitening
    assert len(copied.index) == 39 and w.photos == 36 and w.articles == 6
    np.testing.assert_allclose(w.matrix, original.matrix, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w.mean, original.mean, atol=1e-6)
    # the calibration's fold fits leave the copies out too; every photo is still scored
    index = copied.index
    scores = whitened_calibration_scores(index.embedding_rows(0, len(index)), index.labels, index.groups,
                                         ["relative"], digests=index.digests)["relative"]
    assert len(scores.present) == 39


def test_copies_that_alone_made_a_fold_fittable_are_refused_before_anything_is_written(model, drawn_tree: Path,
                                                                                      tmp_path: Path) -> None:
    import shutil

    tree = tmp_path / "tree"
    for article in sorted(p.name for p in drawn_tree.iterdir() if p.is_dir()):
        photos = sorted((drawn_tree / article).iterdir())
        (tree / article).mkdir(parents=True)
        for i in range(3):  # Red-Ball: three different photos; every other article: one photo and two copies
            shutil.copyfile(photos[i if article == "Red-Ball" else 0], tree / article / f"{article}_{i}.jpg")
    with pytest.raises(DataError, match=r"without fold \d+ \(1 article\(s\): 'Red-Ball'\).*byte-identical copy counts once"):
        Catalogue.build(model, fewshot.load_dataset(tree), runtime="torch", cache_dir=str(tmp_path / "c"), whiten=True)


def test_a_runs_whitening_prior_is_pooled_kept_and_calibrated_with(model, drawn_tree: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import fewshot.catalogue.build as build
    import fewshot.catalogue.whitened as whitened
    from fewshot.index.whiten import fit_whitening, within_stats

    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, model.dim)).astype(np.float32)
    prior = within_stats(train, [f"t{i // 5}" for i in range(30)])
    monkeypatch.setattr(build, "load_prior", lambda m, labels=None, digests=None: prior)  # as a run's file gives it (tests/index/test_prior.py)
    dataset = fewshot.load_dataset(drawn_tree)
    cat = Catalogue.build(model, dataset, runtime="torch", cache_dir=str(tmp_path / "cache"), whiten=True)
    w = cat.index.whitening
    assert w.prior is prior and (w.photos, w.articles) == (36, 6)
    raw = cat.index.embedding_rows(0, 36)
    by_hand = fit_whitening(raw, cat.index.labels, prior=prior)  # the same up to a rotation of the eigenvectors
    y, y_hand = w.apply(raw), by_hand.apply(raw)
    np.testing.assert_allclose(y @ y.T, y_hand @ y_hand.T, atol=1e-5)
    assert np.abs(y @ y.T - (lambda z: z @ z.T)(fit_whitening(raw, cat.index.labels).apply(raw))).max() > 0.01
    seen = []
    real = whitened.whitened_calibration_scores
    monkeypatch.setattr(whitened, "whitened_calibration_scores",
                        lambda *a, **k: seen.append(k.get("prior")) or real(*a, **k))
    folder = cat.save(tmp_path / "idx")  # calibrates: its folds pool the prior
    assert seen and seen[0] is prior
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["whitening"]["prior"] == {**prior.describe(), "fourth": pytest.approx(prior.fourth)}
    again = load_index(folder)
    np.testing.assert_array_equal(again.whitening.prior.scatter, prior.scatter)
    np.testing.assert_array_equal(again.whitening.matrix, w.matrix)
    # the record in meta.json is for reading: the arrays, under their SHA-256, hold the prior
    meta["whitening"]["prior"] = None
    (folder / "meta.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_index(folder).whitening.prior.scatter, prior.scatter)
