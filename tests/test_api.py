"""The Python API's edges on drawn photos (no ../shared): bad images, refused outputs, a
catalogue that survives save/load and gives the same answers."""

from __future__ import annotations

import numpy as np
import pytest

import fewshot
from fewshot.errors import DataError, FewshotError, ImageReadError, InputError


@pytest.fixture(scope="module")
def catalogue(drawn_tree):
    model = fewshot.create_backbone("efficientnet_lite0", image_size=64)
    return fewshot.Catalogue.build(model, fewshot.load_dataset(drawn_tree), runtime="torch")


def test_bad_images_are_clear_errors(catalogue, tmp_path):
    with pytest.raises(DataError, match="dtype float64"):
        catalogue.classify([np.zeros((8, 8, 3))])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        catalogue.classify([bad])
    with pytest.raises(ImageReadError):
        catalogue.add("New", [bad])
    assert "New" not in catalogue.articles
    with pytest.raises(DataError, match="no images given"):
        catalogue.add("New", [])


def test_grey_arrays_paths_and_save_load_agree(catalogue, drawn_tree, tmp_path):
    from PIL import Image

    photo = sorted(drawn_tree.rglob("*.jpg"))[0]
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    by_path = catalogue.classify([photo], top_k=2)[0]
    by_array = catalogue.classify([rgb], top_k=2)[0]
    assert by_path.in_catalogue and not by_array.in_catalogue  # a path is recognised as a catalogue image
    assert catalogue.classify([rgb[..., 0]], top_k=1)[0].predictions  # grey [H, W] works
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FewshotError):
        catalogue.save(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    folder = catalogue.save(tmp_path / "idx")
    with pytest.raises(FewshotError) as err:  # the hint names the Python argument, not the CLI flag
        catalogue.save(folder)
    assert "pass overwrite=True to replace it" in str(err.value) and "--" not in str(err.value)
    again = fewshot.Catalogue.load(folder, runtime="torch")
    a = catalogue.classify([rgb], top_k=3)[0].predictions
    b = again.classify([rgb], top_k=3)[0].predictions
    assert [p.label for p in a] == [p.label for p in b]
    assert [p.score for p in a] == pytest.approx([p.score for p in b], abs=1e-5)


def test_search_re_ranks_the_shortlist(catalogue, drawn_tree):
    photos = sorted(drawn_tree.rglob("*.jpg"))[:3]
    plain = catalogue.search(photos, k=4)
    for rerank in ("qe", "dba", "dba-qe", {"kind": "dba-qe", "k": 2, "alpha": 0.0}):
        hits = catalogue.search(photos, k=4, rerank=rerank)
        assert [len(h) for h in hits] == [4, 4, 4]
        assert all(h[0].score >= h[-1].score for h in hits)
    assert catalogue.search(photos, k=4, rerank="none") == plain
    # a catalogue photo finds itself first; re-ranked, a photo of its article (DBA moves every image
    # toward its neighbours, so its own image need not stay first)
    assert [h[0].path for h in plain] == [str(p) for p in photos]
    assert [h[0].label for h in catalogue.search(photos, k=4, rerank="dba-qe")] == [p.parent.name for p in photos]


# --------------------------------------------------------------------------- issue 27, items 8 and 10a
BAD_LABELS = [  # (label, exception, the InputError code or a message fragment)
    (None, ValueError, "empty_enrolment"), ("", ValueError, "empty_enrolment"), ("  ", ValueError, "empty_enrolment"),
    (123, TypeError, "must be a str"), (b"x", TypeError, "must be a str"),
    ("\u200b", ValueError, "invalid_label"), ("\ufeff \u200b", ValueError, "invalid_label"),
    ("\u202e", ValueError, "invalid_label"), ("Oat\u202eMilk", ValueError, "invalid_label"),
    ("Oat\u2066Milk", ValueError, "invalid_label"), ("a\nb", ValueError, "invalid_label"),
    ("a\u2028b", ValueError, "invalid_label"), ("x" * 201, ValueError, "invalid_label"),
]


@pytest.fixture
def own(catalogue, tmp_path):
    """A private copy of the module's catalogue, for tests that change it."""
    return fewshot.Catalogue.load(catalogue.save(tmp_path / "base"), runtime="torch")


@pytest.mark.parametrize("label, exc, what", BAD_LABELS)
def test_add_refuses_what_the_service_refuses(own, label, exc, what):
    image = np.full((16, 16, 3), 90, np.uint8)
    before = own.articles
    with pytest.raises(exc) as err:
        own.add(label, [image])
    assert getattr(err.value, "code", None) == what if exc is ValueError else what in str(err.value)
    if exc is ValueError:
        assert isinstance(err.value, DataError) and err.value.hint  # the CLI / service print it
    group = label if what != "empty_enrolment" else "\u200b"  # an empty group is no group, which is fine
    with pytest.raises(TypeError if exc is TypeError else InputError, match="group"):
        own.add("Fine", [image], group=group)
    assert own.articles == before and len(own) == 36


def test_labels_are_stored_clean_and_groups_cannot_conflict(own, tmp_path):
    image = np.full((16, 16, 3), 90, np.uint8)
    assert own.add(" Cafe\u0301 ", [image], group="Drinks ") == 1  # NFC, surrounding spaces dropped
    assert "Caf\u00e9" in own.articles and own.index.article_group("Caf\u00e9") == "Drinks"
    with pytest.raises(InputError) as err:
        own.add("Caf\u00e9", [image], group="Food")
    assert err.value.code == "group_conflict" and "Drinks" in str(err.value)
    with pytest.raises(InputError, match="without a group"):
        own.add("Red-Ball", [image], group="Balls")  # an article without a group is not moved into one
    assert own.add("Caf\u00e9", [image]) == 1 and own.add("Caf\u00e9", [image], group="Drinks") == 1
    assert len(own) == 39 and own.index.num_images("Caf\u00e9") == 3
    again = fewshot.Catalogue.load(own.save(tmp_path / "saved"), runtime="torch")  # what was saved loads
    rows = [g for lab, g in zip(again.index.labels, again.index.groups) if lab == "Caf\u00e9"]
    assert rows == ["Drinks"] * 3 and again.articles == own.articles


def test_the_last_article_cannot_be_removed(own, tmp_path):
    for label in own.articles[1:]:
        own.remove(label)
    with pytest.raises(InputError, match="only article left"):
        own.remove(own.articles[0])
    assert len(fewshot.Catalogue.load(own.save(tmp_path / "one"), runtime="torch").articles) == 1
    with pytest.raises(TypeError, match="label must be a str"):
        own.remove(None)


def test_misuse_is_a_type_or_value_error_naming_the_argument(catalogue, drawn_tree):
    model = catalogue.model
    photo = sorted(drawn_tree.rglob("*.jpg"))[0]
    grey = np.full((16, 16), 90, np.uint8)
    ds = fewshot.load_dataset(drawn_tree)
    calls = [
        (lambda: catalogue.classify(str(photo)), TypeError, "pass [image]"),
        (lambda: catalogue.classify(photo), TypeError, "pass [image]"),
        (lambda: catalogue.classify(grey), TypeError, "pass [image]"),  # would be read row by row
        (lambda: catalogue.classify(None), TypeError, "images must be a list"),
        (lambda: catalogue.classify([None]), TypeError, "images[0] is of type NoneType"),
        (lambda: catalogue.classify([grey], top_k="3"), TypeError, "top_k must be an integer"),
        (lambda: catalogue.classify([grey], top_k=0), ValueError, "top_k"),
        (lambda: catalogue.classify([grey], top_k=2.5), ValueError, "top_k"),
        (lambda: catalogue.classify([grey], mode="best"), ValueError, "unknown mode"),
        (lambda: catalogue.classify([np.zeros((0, 0, 3), np.uint8)]), ValueError, "empty image"),
        (lambda: catalogue.classify([np.zeros((5, 0), np.uint8)]), ValueError, "empty image"),
        (lambda: catalogue.search([grey], k=0), ValueError, "k must"),
        (lambda: catalogue.search([grey], k="2"), TypeError, "k must be an integer"),
        (lambda: catalogue.search(str(photo)), TypeError, "pass [image]"),
        (lambda: catalogue.search([grey], rerank="k-reciprocal"), ValueError, "whole gallery"),
        (lambda: catalogue.search([grey], rerank="magic"), ValueError, "unknown option kind"),
        (lambda: catalogue.add("New", str(photo)), TypeError, "pass [image]"),
        (lambda: catalogue.save(None), TypeError, "path must be a path"),
        (lambda: catalogue.save(""), ValueError, "path is an empty path"),
        (lambda: fewshot.Catalogue.load(None), TypeError, "path must be a path"),
        (lambda: fewshot.Catalogue.build(model, str(drawn_tree)), TypeError, "fewshot.load_dataset("),
        (lambda: fewshot.Catalogue.build(None, ds), TypeError, "fewshot.create_backbone"),
        (lambda: fewshot.evaluate(model, str(drawn_tree)), TypeError, "fewshot.load_dataset("),
        (lambda: fewshot.evaluate(model, ds, episodes=0), ValueError, "episodes"),
        (lambda: fewshot.evaluate(model, ds, episodes="5"), TypeError, "episodes must be an integer"),
        (lambda: fewshot.evaluate(model, ds, seed=-1), ValueError, "seed"),
        (lambda: fewshot.train({}), TypeError, "make_config"),
        (lambda: fewshot.load_dataset(None), TypeError, "path must be a path"),
        (lambda: fewshot.load_model(None), TypeError, "run_dir must be a path"),  # was: the default backbone
        (lambda: fewshot.create_backbone(1), TypeError, "backbone name"),
        (lambda: fewshot.create_backbone(image_size="64"), TypeError, "image_size must be an integer"),
    ]
    for call, exc, fragment in calls:
        with pytest.raises(exc) as err:
            call()
        assert fragment in str(err.value), (fragment, str(err.value))
    assert catalogue.classify([], top_k=1) == [] and len(catalogue) == 36
    with pytest.raises(FewshotError, match="unknown runtime 'gpu'"):  # at once, not at the first classify
        fewshot.Catalogue.load(drawn_tree, runtime="gpu")
