"""Re-ranking (fewshot.index.rerank): query expansion and DBA on cases computed by hand,
k-reciprocal re-ranking against a literal transcription of the authors' reference code,
ranking_metrics against retrieval_metrics, and the options' checks."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.errors import FewshotError, InputError
from fewshot.index.rerank import (MAX_K_RECIPROCAL, RerankOptions, alpha_query_expansion, database_augmentation,
                                  k_reciprocal_distance, rerank_scores, rerank_vectors)
from fewshot.metrics import ranking_metrics, retrieval_metrics

# query q; gallery: a (relevant, nearest), d (a distractor), r (relevant, far from q but next to a)
Q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
A, D, R = [0.8, 0.6, 0.0], [0.5, 0.0, 0.866025], [0.3, 0.953939, 0.0]
G = np.array([A, D, R], dtype=np.float32)
LABELS_G, LABELS_Q = ["x", "y", "x"], ["x"]


def test_query_expansion_fixes_a_ranking_by_hand():
    before = (Q @ G.T)[0]
    assert list(np.argsort(-before)) == [0, 1, 2]  # a, d, r: the distractor ranks above r
    qe = alpha_query_expansion(Q, G, k=1, alpha=1.0)
    # q + 0.8 * a = (1.64, 0.48, 0), length 1.70880
    np.testing.assert_allclose(qe[0], [1.64 / 1.708801, 0.48 / 1.708801, 0.0], atol=1e-5)
    after = (qe @ G.T)[0]
    np.testing.assert_allclose(after[2], (1.64 * 0.3 + 0.48 * 0.953939) / 1.708801, atol=1e-5)  # 0.5560
    assert list(np.argsort(-after)) == [0, 2, 1]  # r now ranks above the distractor
    assert ranking_metrics(after[None], LABELS_Q, LABELS_G).map == 1.0
    assert ranking_metrics(before[None], LABELS_Q, LABELS_G).map == pytest.approx((1 + 2 / 3) / 2)
    # alpha weighs the neighbour by its cosine**alpha: alpha 0 adds a with weight 1
    np.testing.assert_allclose(alpha_query_expansion(Q, G, k=1, alpha=0.0)[0], np.array([1.8, 0.6, 0]) / np.hypot(1.8, 0.6),
                               atol=1e-5)


def test_database_augmentation_by_hand():
    out = database_augmentation(G, k=2, alpha=1.0)
    # each item plus its nearest other item weighted by their cosine
    s_ad, s_ar, s_dr = 0.4, 0.8 * 0.3 + 0.6 * 0.953939, 0.15
    expect = np.array([np.array(A) + s_ar * np.array(R), np.array(D) + s_ad * np.array(A),
                       np.array(R) + s_ar * np.array(A)])
    assert s_dr < s_ad
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expect, atol=1e-5)
    np.testing.assert_allclose(database_augmentation(G, k=1), G / np.linalg.norm(G, axis=1, keepdims=True), atol=1e-6)
    q, g = rerank_vectors(Q, G, RerankOptions(kind="dba-qe", k=2))
    np.testing.assert_allclose(g, out, atol=1e-6)
    np.testing.assert_allclose(q, alpha_query_expansion(Q, out, k=2), atol=1e-6)


def _reference_k_reciprocal(q, g, k1, k2, lam):
    """Zhong et al.'s published re_ranking function, transcribed literally (loops, inverted index)."""
    x = np.concatenate([q, g]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nq, n = len(q), len(q) + len(g)
    original = np.maximum(2 - 2 * x @ x.T, 0)
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original)
    initial_rank = np.argsort(original, kind="stable").astype(np.int32)
    for i in range(n):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            cf = initial_rank[cand, :int(np.around(k1 / 2)) + 1]
            cb = initial_rank[cf, :int(np.around(k1 / 2)) + 1]
            crecip = cf[np.where(cb == cand)[0]]
            if len(np.intersect1d(crecip, recip)) > 2 / 3 * len(crecip):
                expansion = np.append(expansion, crecip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    original = original[:nq]
    if k2 != 1:
        v = np.array([np.mean(v[initial_rank[i, :k2], :], axis=0) for i in range(n)])
    inv = [np.where(v[:, i] != 0)[0] for i in range(n)]
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        temp_min = np.zeros(n)
        nonzero = np.where(v[i, :] != 0)[0]
        for j in nonzero:
            temp_min[inv[j]] += np.minimum(v[i, j], v[inv[j], j])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    return (jaccard * (1 - lam) + original * lam)[:, nq:]


def _clusters(seed=0, classes=6, per=8, queries=3, dim=16, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    g = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    q = np.concatenate([c + spread * rng.normal(size=(queries, dim)) for c in centres]).astype(np.float32)
    return q, np.repeat(np.arange(classes), queries), g, np.repeat(np.arange(classes), per)


def test_k_reciprocal_matches_the_reference_code():
    q, _, g, _ = _clusters()
    for k1, k2, lam in ((6, 3, 0.3), (4, 1, 0.0), (10, 2, 1.0)):
        np.testing.assert_allclose(k_reciprocal_distance(q, g, k1, k2, lam),
                                   _reference_k_reciprocal(q, g, k1, k2, lam), atol=1e-5)
    # lambda 1 is the original (column-normalised) distance: the same ranking as cosine
    d = k_reciprocal_distance(q, g, 6, 3, 1.0)
    assert (np.argsort(d, axis=1, kind="stable") == np.argsort(-(q @ g.T / np.linalg.norm(g, axis=1)), axis=1,
                                                             kind="stable")).mean() > 0.99


def test_each_re_ranking_helps_on_noisy_clusters():
    q, ql, g, gl = _clusters(spread=1.1)
    base = retrieval_metrics(q, ql, g, gl).map_at_r
    for kind in ("qe", "dba", "dba-qe", "k-reciprocal"):
        opts = RerankOptions(kind=kind, k1=8, k2=3) if kind == "k-reciprocal" else RerankOptions(kind=kind, k=4)
        assert ranking_metrics(rerank_scores(q, g, opts), ql, gl).map_at_r > base + 0.02, kind


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return round(d, 6) if isinstance(d, float) else d


def test_ranking_metrics_equal_retrieval_metrics_on_cosine_scores():
    q, ql, g, gl = _clusters(seed=1, spread=1.5)
    q[1] = q[0]  # ties between queries do not matter; ties in a row follow the stable rule
    g[5] = g[4]
    a = retrieval_metrics(q, ql, g, gl, query_groups=[str(v % 2) for v in ql])
    qn, gn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, g))
    b = ranking_metrics(qn @ gn.T, ql, gl, query_groups=[str(v % 2) for v in ql])
    assert _rounded(a.to_dict()) == _rounded(b.to_dict())
    assert rerank_scores(q, g, RerankOptions()) == pytest.approx(qn @ gn.T, abs=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(np.full((2, 3), np.nan), [0, 1], [0, 1, 1])


def test_options_are_checked_and_recorded():
    assert RerankOptions.from_value("dba-qe").to_dict() == {"kind": "dba-qe", "k": 5, "alpha": 1.0}
    assert RerankOptions.from_value({"kind": "k-reciprocal", "k1": 10}).to_dict() == {
        "kind": "k-reciprocal", "k1": 10, "k2": 6, "lam": 0.3}
    assert RerankOptions.from_value(None).kind == "none"
    for bad, name in (({"kind": "magic"}, "kind"), ({"kind": "qe", "k": 0}, "k"), ({"kind": "qe", "k": 2.5}, "k"),
                      ({"kind": "k-reciprocal", "lam": 1.5}, "lam"), ({"kind": "dba", "alpha": float("nan")}, "alpha"),
                      ({"nope": 1}, "rerank"), (5, "rerank"), ({"k": 10}, "k"),
                      ({"kind": "qe", "lam": 0.9}, "lam"), ({"kind": "k-reciprocal", "k": 3}, "k")):
        with pytest.raises(InputError) as exc:  # a ValueError
            RerankOptions.from_value(bad)
        assert exc.value.options[0] == name, bad
    with pytest.raises(InputError, match="does not apply to re-ranking kind = 'qe'") as exc:
        RerankOptions(kind="qe", k2=3)
    assert "k-reciprocal" in exc.value.hint
    with pytest.raises(FewshotError, match="distances, not vectors"):
        rerank_vectors(Q, G, RerankOptions(kind="k-reciprocal"))


def test_k_reciprocal_refuses_what_would_not_fit(monkeypatch):
    import fewshot.index.rerank as rr

    monkeypatch.setattr(rr, "MAX_K_RECIPROCAL", 3)
    with pytest.raises(InputError, match="six 4 x 4 float32 matrices") as exc:
        rr.k_reciprocal_distance(Q, G)
    assert "dba-qe" in exc.value.hint and exc.value.options == ("rerank",)
    rr.check_size(RerankOptions(kind="dba-qe"), 10, 10)  # only k-reciprocal is limited
    assert MAX_K_RECIPROCAL == 10_000


def test_the_cli_flags_are_the_options_flags():
    from dataclasses import fields

    from fewshot.cli import RERANK_FLAGS
    from fewshot.options import flag_of

    assert RERANK_FLAGS == {f.name: flag_of(f) for f in fields(RerankOptions)}


def test_the_catalogue_shortlist_clips_k_and_weighs_padding_zero():
    from fewshot.index import CatalogueIndex

    g = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    index = CatalogueIndex.build(g, list("abc"), [None] * 3, list("012"))
    q = g[:1] + 0.01
    for alpha in (0.0, 1.0):  # k 5 > 3 images: padding must not count, not even as 0 ** 0 = 1
        opts = RerankOptions(kind="dba", k=5, alpha=alpha)
        hits = index.search(q, k=3, rerank=opts)[0]
        full = rerank_scores(q, g, opts)[0]
        np.testing.assert_allclose(sorted(h.score for h in hits), sorted(full), atol=1e-5)
    assert len(index.search(q, k=3, rerank={"kind": "dba-qe", "k": 10 ** 9})[0]) == 3  # clipped, not 186 GiB


def test_the_catalogue_shortlist_equals_the_full_re_ranking():
    from fewshot.index import CatalogueIndex

    q, _, g, gl = _clusters(seed=2, spread=1.0)
    index = CatalogueIndex.build(g, [str(v) for v in gl], [None] * len(g), [f"{i}.jpg" for i in range(len(g))])
    qn, gn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, g))
    for kind in ("qe", "dba", "dba-qe"):
        opts = RerankOptions(kind=kind, k=4)
        full = rerank_scores(q, g, opts)
        hits = index.search(q, k=10, rerank=opts if kind != "dba-qe" else {"kind": kind, "k": 4})
        for row, hit in zip(full, hits):
            order = np.lexsort((np.arange(len(row)), -row))[:10]
            assert [h.path for h in hit] == [f"{j}.jpg" for j in order], kind
            np.testing.assert_allclose([h.score for h in hit], row[order], atol=1e-5)
    # a short shortlist still answers k results, all from it
    from fewshot.index.rerank import rerank_shortlist

    s, p = rerank_shortlist(qn, 3, RerankOptions(kind="dba-qe", k=4), index.search_positions, index.vectors_at,
                            len(index), shortlist=5)
    plain = np.argsort(-(qn @ gn.T), axis=1)[:, :5]
    assert p.shape == (len(q), 3) and all(set(r) <= set(c) for r, c in zip(p, plain))
    assert [h.path for h in index.search(q[:1], k=3)[0]] == [f"{j}.jpg" for j in plain[0, :3]]
    with pytest.raises(FewshotError, match="whole gallery"):
        index.search(q, k=3, rerank="k-reciprocal")
