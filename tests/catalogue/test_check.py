"""Catalogue checks (fewshot.catalogue.check): by hand on tiny vectors, and on real Grocery
photos with planted defects (tests/check_helpers.py) against the clean catalogue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from check_helpers import COPY, planted_catalogues
from fewshot.catalogue import load_index
from fewshot.catalogue.check import KINDS, CheckLevels, check_article, check_catalogue
from fewshot.errors import DataError
from fewshot.index import CatalogueIndex


@pytest.fixture(scope="module")
def catalogues(grocery_root: Path, tmp_path_factory):
    return planted_catalogues(grocery_root, tmp_path_factory)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- by hand
def test_figures_by_hand_on_tiny_vectors():
    # a: three photos around e1, b: three around e2 plus one photo exactly e1 (labelled b), c: one photo
    x = np.array([[1, 0.3, 0], [1, -0.3, 0], [1, 0, 0.3], [0.3, 1, 0], [-0.3, 1, 0], [0, 1, 0.3], [1, 0, 0],
                  [0, 0, 1]], np.float32)
    labels = ["a"] * 3 + ["b"] * 4 + ["c"]
    index = CatalogueIndex.build(x, labels, [None] * 8, [f"{i}.jpg" for i in range(8)], {})
    report = check_catalogue(index)
    assert report.counts() == {"same_photo": 0, "near_duplicate": 0, "likely_mislabel": 1,
                               "confusable_articles": 0, "single_photo": 1}
    mis = report.of_kind("likely_mislabel")[0]
    assert (mis.articles, mis.images) == (("b", "a"), ("6.jpg",))
    own = float(_unit(sum(_unit(v) for v in x[3:6])) @ x[6])            # b's prototype without the photo
    other = float(_unit(sum(_unit(v) for v in x[0:3])) @ x[6])          # a's prototype
    assert mis.figures == pytest.approx({"own_cosine": own, "other_cosine": other, "margin": other - own}, abs=1e-4)
    assert (own, other) == pytest.approx((0.0, 3 / np.sqrt(9.09)), abs=1e-6)  # b's others have no e1 part
    assert report.of_kind("single_photo")[0].articles == ("c",)
    # photo 6 is 0.958 from each photo of a: near duplicates at a lower level, and then no mislabel
    report = check_catalogue(index, duplicate_cosine=0.95)
    near = report.of_kind("near_duplicate")
    assert sorted(tuple(sorted(f.images)) for f in near) == [("0.jpg", "6.jpg"), ("1.jpg", "6.jpg"), ("2.jpg", "6.jpg")]
    assert [f.figures["cosine"] for f in near] == pytest.approx([1 / np.sqrt(1.09)] * 3, abs=1e-4)
    assert report.of_kind("likely_mislabel") == []
    # the mislabelled photo is no confusion: a and b stay apart (prototype cosine by hand)
    proto_b = _unit(sum(_unit(v) for v in x[3:7]))
    assert float(_unit(sum(_unit(v) for v in x[0:3])) @ proto_b) < 0.95 and report.of_kind("confusable_articles") == []


def test_levels_out_of_range_are_refused_naming_the_option():
    for name, value in (("duplicate_cosine", 1.5), ("confusable_cosine", 0.0), ("mislabel_margin", -0.1),
                        ("confusable_share", 0.0), ("min_confusions", 0)):
        with pytest.raises(DataError) as err:
            CheckLevels(**{name: value})
        assert err.value.options == (name,) and name in err.value.message


def test_an_unknown_article_is_refused():
    index = CatalogueIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], [None] * 3, ["0", "1", "2"], {})
    with pytest.raises(DataError, match="no article 'z'"):
        check_article(index, "z")


# --------------------------------------------------------------------------- real photos
def test_a_clean_catalogue_gives_no_finding(catalogues):
    report = check_catalogue(load_index(catalogues.clean))
    assert report.findings == [] and report.counts() == dict.fromkeys(KINDS, 0)
    assert (report.num_articles, report.num_images) == (6, 24)


def test_every_planted_defect_is_found_with_its_figures(catalogues):
    index = load_index(catalogues.planted)
    x, at = index.image_vectors(), {p: i for i, p in enumerate(index.paths)}
    report = check_catalogue(index)
    assert report.counts() == {"same_photo": 1, "near_duplicate": 4, "likely_mislabel": 1,
                               "confusable_articles": 1, "single_photo": 0}
    banana, copy = map(str, catalogues.duplicate)
    same = report.of_kind("same_photo")[0]
    assert (same.articles, set(same.images), same.figures) == (("Banana", "Lemon"), {banana, copy}, {"copies": 2})

    near = {frozenset(f.images): f for f in report.of_kind("near_duplicate")}
    assert set(near) == {frozenset({str(p), str(c)}) for p, c in catalogues.copies.items()}
    for pair, f in near.items():
        i, j = (at[p] for p in pair)
        assert f.figures["cosine"] == pytest.approx(float(x[i] @ x[j]), abs=1e-4)
        assert f.figures["cosine"] > 0.99 and set(f.articles) == {"Granny-Smith", COPY}

    mis = report.of_kind("likely_mislabel")[0]
    carrot = at[str(catalogues.swapped)]
    rest = [i for i, lab in enumerate(index.labels) if lab == "Aubergine" and i != carrot]
    carrots = [i for i, lab in enumerate(index.labels) if lab == "Carrots"]
    own, other = float(_unit(x[rest].sum(0)) @ x[carrot]), float(_unit(x[carrots].sum(0)) @ x[carrot])
    assert (mis.articles, mis.images) == (("Aubergine", "Carrots"), (str(catalogues.swapped),))
    assert mis.figures == pytest.approx({"own_cosine": own, "other_cosine": other, "margin": other - own}, abs=1e-4)
    assert other - own > 0.3  # twice the level

    twins = report.of_kind("confusable_articles")[0]
    granny = [i for i, lab in enumerate(index.labels) if lab == "Granny-Smith"]
    copies = [i for i, lab in enumerate(index.labels) if lab == COPY]
    cosine = float(_unit(x[granny].sum(0)) @ _unit(x[copies].sum(0)))
    assert twins.articles == ("Granny-Smith", COPY)
    assert twins.figures == pytest.approx({"prototype_cosine": cosine, "confusions": 8, "photos": 8, "share": 1.0},
                                          abs=1e-4)
    assert cosine > 0.99


def _key(f) -> tuple:
    return f.kind, frozenset(f.articles), frozenset(f.images), tuple(sorted((k, round(v, 3)) for k, v in f.figures.items()))


def test_one_article_checked_alone_finds_what_the_whole_check_says_of_it(catalogues):
    index = load_index(catalogues.planted)
    whole = check_catalogue(index)
    for label in index.articles:
        alone = check_article(index, label)
        about = [f for f in whole.findings if (f.articles[0] == label if f.kind == "likely_mislabel" else label in f.articles)]
        assert sorted(map(_key, alone.findings)) == sorted(map(_key, about)), label
        assert all(f.articles[0] == label for f in alone.findings)
    assert check_article(index, "Carrots").findings == []


def test_the_catalogue_api_checks_itself():
    from fewshot.catalogue import Catalogue

    x = np.array([[1, 0.3, 0], [1, -0.3, 0], [0.3, 1, 0], [-0.3, 1, 0], [1, 0, 0]], np.float32)
    index = CatalogueIndex.build(x, ["a", "a", "b", "b", "b"], [None] * 5, [f"{i}.jpg" for i in range(5)], {})
    report = Catalogue(model=None, index=index).check()  # type: ignore[arg-type]
    assert [f.images for f in report.of_kind("likely_mislabel")] == [("4.jpg",)]
    assert Catalogue(model=None, index=index).check(mislabel_margin=1.5).of_kind("likely_mislabel") == []  # type: ignore[arg-type]
