"""The calibration of a whitened catalogue (fewshot.catalogue.whitened): every photo scored in a
whitening fitted without its article's fold, against a computation by hand."""

from __future__ import annotations

import numpy as np

from fewshot.catalogue.whitened import whitened_calibration_scores
from fewshot.index.whiten import fit_whitening


def _catalogue(seed: int = 0, articles: int = 8, photos: int = 4, dim: int = 6):
    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(articles), photos)
    x = rng.normal(size=(articles, dim))[lab] + rng.normal(scale=np.r_[1.5, np.full(dim - 1, 0.2)], size=(len(lab), dim))
    return x.astype(np.float32), np.array([f"a{i}" for i in lab], dtype=object)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_each_fold_is_scored_in_a_fit_without_its_articles():
    x, labels = _catalogue()
    got = whitened_calibration_scores(x, labels, [None] * len(x), ["cosine"], folds=4, seed=0)["cosine"]
    articles = np.unique(labels)
    order = articles[np.random.default_rng(0).permutation(len(articles))]
    fold_of = {a: i % 4 for i, a in enumerate(order)}
    fold = np.array([fold_of[a] for a in labels])
    want = []
    for k in range(4):
        y = fit_whitening(x[fold != k], labels[fold != k]).apply(x)
        protos = _unit(np.stack([y[labels == a].mean(0) for a in articles]))
        for i in np.flatnonzero(fold == k):
            s = y[i] @ protos.T
            s[list(articles).index(labels[i])] = -np.inf
            want.append(s.max())
    assert len(got.absent) == len(x) and len(got.present) == len(x)
    np.testing.assert_allclose(got.absent, want, atol=1e-5)
