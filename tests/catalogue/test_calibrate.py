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
    present, absent = calibration_scores(index, folds=6)
    assert len(present) == 12 and len(absent) == 12
    assert present[0] == pytest.approx(0.8) and present[1] == pytest.approx(0.8)  # each other's cosine
    assert present[2:] == pytest.approx(np.ones(10))
    assert absent == pytest.approx(np.zeros(12), abs=1e-6)  # no other article is near


def test_the_threshold_accepts_the_target_share_of_absent_scores():
    index = _catalogue(articles=30, photos=5)
    cal = calibrate(index, 0.05, folds=5)
    present, absent = calibration_scores(index, folds=5)
    assert (cal.num_present, cal.num_absent) == (150, 150)
    assert (absent >= cal.threshold).mean() <= 0.05 and (absent >= cal.threshold).mean() > 0.03
    assert cal.present_accepted == pytest.approx((present >= cal.threshold).mean())
    assert cal.present_accepted > 0.9  # well-separated clusters: nearly every own photo is accepted


def test_whole_groups_are_held_out_together():
    index = _catalogue(articles=24, photos=3)
    present, absent = calibration_scores(index, by="group", folds=4)
    assert len(absent) == 72 and len(present) == 72


def test_a_catalogue_too_small_to_calibrate_says_so():
    with pytest.raises(DataError, match="too few to calibrate"):
        calibrate(_catalogue(articles=4))
    with pytest.raises(DataError, match="too few to calibrate"):
        calibrate(_catalogue(articles=12), by="group")  # 4 groups
    with pytest.raises(DataError, match="two photos"):
        calibrate(_catalogue(articles=8, photos=1))
