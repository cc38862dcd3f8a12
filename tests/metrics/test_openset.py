"""Open-set metrics (fewshot.metrics.openset): hand-computed values, sklearn as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fewshot.errors import InputError
from fewshot.metrics.openset import openset_metrics, oscr_curve, threshold_for_far


def test_auroc_and_fpr_by_hand():
    # known 0.9 0.8 0.4, unknown 0.7 0.3: pairs known > unknown: 0.9>0.7, 0.9>0.3, 0.8>0.7, 0.8>0.3, 0.4>0.3 = 5 of 6
    report = openset_metrics(np.array([0.9, 0.8, 0.4]), np.array([0.7, 0.3]))
    assert report.auroc == pytest.approx(5 / 6)
    # the 5% quantile of the known scores (linear interpolation): 0.4 + 0.1 * (0.8 - 0.4) = 0.44
    assert report.threshold_at_95tpr == pytest.approx(0.44)
    assert report.fpr_at_95tpr == pytest.approx(0.5)  # 0.7 of the two unknown scores is above 0.44
    assert (report.num_known, report.num_unknown) == (3, 2)
    assert openset_metrics(np.array([0.5]), np.array([0.5])).auroc == pytest.approx(0.5)  # a tie counts half


def test_auroc_and_fpr_match_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(0.6, 0.1, 900), rng.normal(0.45, 0.1, 700)
    report = openset_metrics(known, unknown)
    truth = np.r_[np.ones(900), np.zeros(700)]
    assert report.auroc == pytest.approx(roc_auc_score(truth, np.r_[known, unknown]), abs=1e-12)
    fpr, tpr, _ = roc_curve(truth, np.r_[known, unknown])
    assert report.fpr_at_95tpr == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=2 / 700)
    assert 0.3 < report.fpr_at_95tpr < 0.8 and 0.8 < report.auroc < 0.9


def test_threshold_gives_the_stated_false_accept_rate():
    rng = np.random.default_rng(1)
    unknown = rng.uniform(0, 1, 1000)
    for far in (0.0, 0.01, 0.05, 0.2):
        t = threshold_for_far(unknown, far)
        assert (unknown >= t).mean() == pytest.approx(far, abs=1e-9)  # distinct scores: exactly the target
        lower = unknown[unknown < t].max()  # the next score down would accept too many
        assert (unknown >= lower).mean() > far
    ties = np.array([0.9, 0.9, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1])
    t = threshold_for_far(ties, 0.2)  # two may be accepted, but the three tied 0.9 come together
    assert t > 0.9 and (ties >= t).mean() == 0.0
    assert threshold_for_far(ties, 0.3) == 0.9


def test_oscr_curve_counts_correct_and_accepted():
    fpr, ccr = oscr_curve(np.array([0.9, 0.8, 0.4]), np.array([True, False, True]), np.array([0.7, 0.3]))
    # thresholds from the top: 0.9 0.8 0.7 0.4 0.3
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(ccr, [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_bad_scores_are_refused():
    with pytest.raises(InputError, match="non-empty"):
        openset_metrics(np.array([]), np.array([0.1]))
    with pytest.raises(InputError, match="non-finite"):
        openset_metrics(np.array([0.1, np.nan]), np.array([0.1]))
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        threshold_for_far(np.array([0.1]), 1.0)
    with pytest.raises(InputError, match="known_correct"):
        oscr_curve(np.array([0.1, 0.2]), np.array([True]), np.array([0.1]))
