"""Open-set scores (fewshot.catalogue.scores), computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.catalogue.scores import OPEN_SCORES, brand_scores, open_scores, top_scores
from fewshot.errors import InputError

TOP = np.array([[0.9, 0.5, 0.1], [0.6, 0.55, 0.5], [0.7, -np.inf, -np.inf]])


def test_each_score_by_hand():
    assert open_scores(TOP, "cosine") == pytest.approx([0.9, 0.6, 0.7])
    assert open_scores(TOP, "margin") == pytest.approx([0.4, 0.05, 1.7])  # one article: the floor -1
    assert open_scores(TOP, "relative") == pytest.approx([0.65, 0.325, 1.2])
    e = np.exp
    assert open_scores(TOP, "softmax") == pytest.approx([1 / (1 + e(-4) + e(-8)), 1 / (1 + e(-0.5) + e(-1)), 1.0])
    assert OPEN_SCORES.names() == ["cosine", "margin", "relative", "softmax"]


def test_bad_names_and_shapes_are_refused():
    with pytest.raises(InputError, match="open-set score"):
        open_scores(TOP, "energy")
    with pytest.raises(InputError, match="2 best cosines"):
        open_scores(TOP[:, :1], "cosine")


def test_top_scores_sorts_and_pads():
    sims = np.array([[0.1, 0.7, 0.3, -np.inf]], np.float32)
    assert top_scores(sims, 2).tolist() == [[pytest.approx(0.7), pytest.approx(0.3)]]
    assert top_scores(sims).shape == (1, 4)
    assert top_scores(sims[:, :1]).tolist() == [[pytest.approx(0.1), -np.inf]]


def test_brand_score_reads_the_best_article_of_another_brand():
    groups = np.array([["b1", "b1", "b2"], ["b1", "b2", "b2"], ["b1", "b1", "b1"]], object)
    # row 0: another brand at 0.1; row 1: at 0.55; row 2: none among the three, the last stands for it
    assert brand_scores(TOP[:, :3].copy(), groups)[:2] == pytest.approx([0.9 - 0.05, 0.6 - 0.275])
    assert brand_scores(TOP, groups)[2] == pytest.approx(0.7 + 0.5)  # -inf: the floor -1
