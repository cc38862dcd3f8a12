"""Reject-threshold calibration from the catalogue alone (fewshot.catalogue.calibrate)."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.catalogue.calibrate import calibrate, calibration_scores
from fewshot.errors import DataError
from fewshot.index import CatalogueIndex


def _catalogue(articles: int = 12, photos: int = 4, spread: float = 0.3, seed: int = 0) -> CatalogueIndex:
    """Articles as clusters around random centres; groups of three articles."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(articles, 32))
    x = np.repeat(centres, photos, 0) + spread * rng.normal(size=(articles * photos, 32))
    labels = [f"a{i}" for i in range(articles) for _ in range(photos)]
    groups = [f"g{i // 3}" for i in range(articles) for _ in range(photos)]
    return CatalogueIndex.build(x.astype(np.float32), labels, groups, [f"{l}-{k}.jpg" for k, l in enumerate(labels)], {})


def test_scores_by_hand_on_a_tiny_catalogue():
    # two photos per article, orthogonal articles: a photo's prototype without it is its twin
    x = np.array([[1, 0, 0, 0, 0, 0, 0], [0.8, 0, 0, 0, 0, 0, 0.6]] + [[0] * 7] * 10, np.float32)
    for a in range(1, 6):
        x[2 * a, a], x[2 * a + 1, a] = 1.0, 1.0
    labels = [f"a{i // 2}" for i in range(12)]
    index = CatalogueIndex.build(x, labels, [None] * 12, [f"{i}.jpg" for i in range(12)], {})
    s = calibration_scores(index, score="cosine")
    present, absent = s.present, s.absent
    assert len(present) == 12 and len(absent) == 12
    assert present[0] == pytest.approx(0.8) and present[1] == pytest.approx(0.8)  # each other's cosine
    assert present[2:] == pytest.approx(np.ones(10))
    assert absent == pytest.approx(np.zeros(12), abs=1e-6)  # no other article is near
    # relative = best - 0.5 x second: photo 1 (0.8, 0.6) meets a0's prototype without it (cos 0.8)
    # and nothing else (0); with its article left out, its best is 0 and its second 0
    rel = calibration_scores(index)
    assert rel.present[1] == pytest.approx(0.8) and rel.absent == pytest.approx(np.zeros(12), abs=1e-6)


def test_leave_one_article_out_meets_every_other_article():
    # photo of a0 is near a1's prototype (cos 0.6) and a2's (0.5): left out, its best is a1's
    x = np.zeros((12, 8), np.float32)
    x[0] = [0.5, 0.6, 0.5, 0, 0, 0, 0, 0.374]
    x[1, 0] = 1
    for a in range(1, 6):
        x[2 * a, a] = x[2 * a + 1, a] = 1
    index = CatalogueIndex.build(x, [f"a{i // 2}" for i in range(12)], [None] * 12, [f"{i}.jpg" for i in range(12)], {})
    s = calibration_scores(index, score="cosine")
    norm0 = x[0] / np.linalg.norm(x[0])
    assert s.absent[0] == pytest.approx(norm0[1], abs=1e-5)
    assert calibration_scores(index, score="margin").absent[0] == pytest.approx(norm0[1] - norm0[2], abs=1e-5)


def test_the_threshold_accepts_the_target_share_of_absent_scores():
    index = _catalogue(articles=30, photos=5)
    cal = calibrate(index, 0.05)
    scores = calibration_scores(index)
    present, absent = scores.present, scores.absent
    assert (cal.num_present, cal.num_absent) == (150, 150)
    assert (absent >= cal.threshold).mean() <= 0.05 and (absent >= cal.threshold).mean() > 0.03
    assert cal.present_accepted == pytest.approx((present >= cal.threshold).mean())
    assert cal.present_accepted > 0.9  # well-separated clusters: nearly every own photo is accepted


def test_whole_groups_are_held_out_together():
    index = _catalogue(articles=24, photos=3)
    by_article = calibration_scores(index, by="article", score="cosine")
    by_group = calibration_scores(index, by="group", score="cosine")
    assert len(by_group.absent) == 72 and len(by_group.present) == 72
    assert (by_group.absent <= by_article.absent + 1e-6).all()  # fewer competitors, never a higher best
    assert by_group.absent.mean() < by_article.absent.mean()


def test_a_catalogue_too_small_to_calibrate_says_so():
    with pytest.raises(DataError, match="too few to calibrate"):
        calibrate(_catalogue(articles=4))
    with pytest.raises(DataError, match="too few to calibrate"):
        calibrate(_catalogue(articles=12), by="group")  # 4 groups
    with pytest.raises(DataError, match="two photos"):
        calibrate(_catalogue(articles=8, photos=1))


def test_brands_are_calibrated_on_left_out_articles_and_brands():
    index = _catalogue(articles=24, photos=4)  # 8 brands of 3 articles, centres at random: brands mean nothing
    s = calibration_scores(index)
    assert len(s.brand_present) == 96 and len(s.brand_absent) == 96 and s.brand_right.dtype == bool
    cal = calibrate(index, 0.05)
    assert (s.brand_absent >= cal.brand_threshold).mean() <= 0.05
    assert cal.brand_accepted == pytest.approx((s.brand_present >= cal.brand_threshold).mean())
    assert cal.histograms["edges"] and sum(cal.histograms["absent"]) == 96


def test_a_catalogue_without_brands_has_no_brand_threshold():
    index = _catalogue(articles=12)
    index = CatalogueIndex.build(index.image_vectors(), index.labels, [None] * len(index), index.paths, {})
    assert calibrate(index).brand_threshold is None


def test_a_large_catalogue_is_sampled():
    cal = calibrate(_catalogue(articles=30, photos=5), max_photos=60)
    assert cal.num_absent == 60
