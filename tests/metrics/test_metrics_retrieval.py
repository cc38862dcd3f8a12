"""Retrieval metrics: cross-checked against sklearn and pytorch-metric-learning, and by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fewshot.metrics import RetrievalReport, nearest_neighbors, retrieval_metrics


def unit(degrees: float) -> list[float]:
    rad = math.radians(degrees)
    return [math.cos(rad), math.sin(rad)]


def clustered(n: int, d: int, n_classes: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    x = centres[labels] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), labels


def reference_metrics(query, q_labels, gallery=None, g_labels=None, normalize=True, ks=(1, 5, 10)):
    """Brute force: full similarity matrix, stable descending argsort (ties by gallery index)."""
    q = np.asarray(query, dtype=np.float64)
    loo = gallery is None
    g = q if loo else np.asarray(gallery, dtype=np.float64)
    g_labels = np.asarray(q_labels if loo else g_labels)
    q_labels = np.asarray(q_labels)
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = q @ g.T
    out = {"ap": [], "ap_r": [], "p1": [], "r_prec": [], **{f"recall{k}": [] for k in ks}}
    out.update({f"apk{k}": [] for k in ks})
    for i in range(len(q)):
        cand = np.arange(len(g))
        if loo:
            cand = cand[cand != i]
        order = cand[np.argsort(-sims[i, cand], kind="stable")]
        rel = (g_labels[order] == q_labels[i]).astype(float)
        r = int(rel.sum())
        if r == 0:
            for key in out:
                out[key].append(np.nan)
            continue
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        out["ap"].append((prec * rel).sum() / r)
        out["ap_r"].append((prec * rel)[:r].sum() / r)
        out["r_prec"].append(rel[:r].sum() / r)
        out["p1"].append(rel[0])
        for k in ks:
            out[f"recall{k}"].append(float(rel[:k].any()))
            out[f"apk{k}"].append((prec * rel)[:k].sum() / min(k, r))
    return {key: np.array(v) for key, v in out.items()}


# --------------------------------------------------------------------------- sklearn / PML


def test_average_precision_matches_sklearn_leave_one_out():
    from sklearn.metrics import average_precision_score

    x, y = clustered(120, 16, 8, noise=1.5, seed=1)
    report = retrieval_metrics(x, y)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ xn.T.astype(np.float64)
    expected = []
    for i in range(len(x)):
        others = np.arange(len(x)) != i
        expected.append(average_precision_score(y[others] == y[i], sims[i, others]))
    assert report.num_skipped_queries == 0
    np.testing.assert_allclose(report.average_precisions, expected, atol=1e-9)
    assert report.map == pytest.approx(np.mean(expected), abs=1e-9)


def test_average_precision_matches_sklearn_query_vs_gallery():
    from sklearn.metrics import average_precision_score

    xq, yq = clustered(90, 24, 9, noise=1.2, seed=2)
    xg, yg = clustered(200, 24, 9, noise=1.2, seed=3)
    report = retrieval_metrics(xq, yq, xg, yg)
    qn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    gn = xg / np.linalg.norm(xg, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ gn.T.astype(np.float64)
    expected = [average_precision_score(yg == yq[i], sims[i]) for i in range(len(xq))]
    np.testing.assert_allclose(report.average_precisions, expected, atol=1e-9)
    assert report.num_queries == len(xq)


def test_matches_brute_force_reference_on_random_data():
    xq, yq = clustered(120, 8, 15, noise=1.0, seed=4)
    xg, yg = clustered(150, 8, 15, noise=1.0, seed=5)
    for args in [(xq, yq), (xq, yq, xg, yg)]:
        report = retrieval_metrics(*args, recall_ks=(1, 5, 10), map_at_ks=(1, 5, 10))
        ref = reference_metrics(*args)
        np.testing.assert_allclose(report.average_precisions, ref["ap"], atol=1e-9)
        np.testing.assert_allclose(report.average_precisions_at_r, ref["ap_r"], atol=1e-9)
        assert report.precision_at_1 == pytest.approx(np.nanmean(ref["p1"]))
        assert report.r_precision == pytest.approx(np.nanmean(ref["r_prec"]))
        for k in (1, 5, 10):
            assert report.recall_at_k[str(k)] == pytest.approx(np.nanmean(ref[f"recall{k}"]))
            assert report.map_at_k[str(k)] == pytest.approx(np.nanmean(ref[f"apk{k}"]))


def _pml(query, q_labels, reference=None, r_labels=None):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    full = AccuracyCalculator(
        include=("mean_average_precision",), k=None, device=torch.device("cpu")
    )
    kwargs = {}
    if reference is not None:
        kwargs = dict(reference=reference, reference_labels=r_labels, ref_includes_query=False)
    out = calc.get_accuracy(query, q_labels, **kwargs)
    out.update(full.get_accuracy(query, q_labels, **kwargs))
    return out


def test_matches_pytorch_metric_learning_leave_one_out():
    x, y = clustered(300, 32, 20, noise=1.5, seed=6)
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    pml = _pml(xn, y)  # reference=None: PML's leave-one-out (ref_includes_query=True)
    report = retrieval_metrics(x, y)
    assert report.precision_at_1 == pytest.approx(pml["precision_at_1"], abs=1e-9)
    assert report.map_at_r == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-9)
    assert report.r_precision == pytest.approx(pml["r_precision"], abs=1e-9)
    assert report.map == pytest.approx(pml["mean_average_precision"], abs=1e-9)


def test_matches_pytorch_metric_learning_query_vs_gallery():
    xq, yq = clustered(100, 32, 10, noise=1.5, seed=7)
    xg, yg = clustered(260, 32, 10, noise=1.5, seed=8)
    qn = (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)
    gn = (xg / np.linalg.norm(xg, axis=1, keepdims=True)).astype(np.float32)
    pml = _pml(qn, yq, gn, yg)
    report = retrieval_metrics(xq, yq, xg, yg)
    assert report.precision_at_1 == pytest.approx(pml["precision_at_1"], abs=1e-9)
    assert report.map_at_r == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-9)
    assert report.r_precision == pytest.approx(pml["r_precision"], abs=1e-9)
    assert report.map == pytest.approx(pml["mean_average_precision"], abs=1e-9)


# --------------------------------------------------------------------------- by hand


def test_four_item_leave_one_out_by_hand():
    """Unit vectors at 0, 10, 30, 70 degrees with labels A, A, B, B (cosine = cos(angle gap)).

    item 0 (A): others by similarity 1 (A, 10), 2 (B, 30), 3 (B, 70) -> relevant at rank 1:
                AP 1, MAP@R (R=1) 1, P@1 1.
    item 1 (A): 0 (A, 10), 2 (B, 20), 3 (B, 60) -> rank 1: AP 1, MAP@R 1, P@1 1.
    item 2 (B): 1 (A, 20), 0 (A, 30), 3 (B, 40) -> rank 3: AP 1/3, MAP@R 0, P@1 0.
    item 3 (B): 2 (B, 40), 1 (A, 60), 0 (A, 70) -> rank 1: AP 1, MAP@R 1, P@1 1.
    mAP = (1 + 1 + 1/3 + 1) / 4 = 5/6; MAP@R = P@1 = Recall@1 = 3/4; Recall@5 = 1;
    mAP@10 = AP here (R = 1) = 5/6. Every query has exactly one relevant item.
    """
    x = np.array([unit(0), unit(10), unit(30), unit(70)], dtype=np.float32)
    report = retrieval_metrics(x, ["A", "A", "B", "B"], query_groups=["x", "x", "y", None])
    np.testing.assert_allclose(report.average_precisions, [1, 1, 1 / 3, 1])
    np.testing.assert_array_equal(report.first_relevant_rank, [1, 1, 3, 1])
    np.testing.assert_array_equal(report.num_relevant, [1, 1, 1, 1])
    assert report.map == pytest.approx(5 / 6)
    assert report.map_at_r == pytest.approx(3 / 4)
    assert report.precision_at_1 == pytest.approx(3 / 4)
    assert report.recall_at_k == pytest.approx({"1": 0.75, "5": 1.0, "10": 1.0})
    assert report.map_at_k == pytest.approx({"10": 5 / 6})
    assert report.num_queries == 4 and report.num_skipped_queries == 0
    # per group: x = items 0, 1; y = item 2; item 3 has no group
    assert report.per_group == {
        "x": pytest.approx({"map": 1.0, "map_at_r": 1.0, "precision_at_1": 1.0, "num_queries": 2}),
        "y": pytest.approx(
            {"map": 1 / 3, "map_at_r": 0.0, "precision_at_1": 0.0, "num_queries": 1}
        ),
    }


def _five_item_gallery():
    """One query (label A) against gallery cosines 0.9 B, 0.8 A, 0.7 A, 0.6 B, 0.5 A."""
    cosines = [0.9, 0.8, 0.7, 0.6, 0.5]
    gallery = np.array([[c, math.sqrt(1 - c * c)] for c in cosines], dtype=np.float32)
    return np.array([[1.0, 0.0]], dtype=np.float32), ["A"], gallery, ["B", "A", "A", "B", "A"]


def test_recall_and_map_at_k_by_hand():
    """Relevant ranks 2, 3, 5 (R = 3); P at those ranks: 1/2, 2/3, 3/5.

    AP = (1/2 + 2/3 + 3/5) / 3 = 53/90. MAP@R = (1/2 + 2/3) / 3 = 7/18 (rank 5 > R).
    mAP@1 = 0 / min(1, 3) = 0; mAP@2 = (1/2) / 2 = 1/4; mAP@10 = 53/90 (divisor min(10, 3)).
    Recall@1 = 0, Recall@2 = 1, Recall@5 = 1. R-precision = 2/3.
    """
    report = retrieval_metrics(
        *_five_item_gallery(), recall_ks=(1, 2, 5), map_at_ks=(1, 2, 10)
    )
    assert report.map == pytest.approx(53 / 90)
    assert report.map_at_r == pytest.approx(7 / 18)
    assert report.map_at_k == pytest.approx({"1": 0.0, "2": 0.25, "10": 53 / 90})
    assert report.recall_at_k == pytest.approx({"1": 0.0, "2": 1.0, "5": 1.0})
    assert report.precision_at_1 == 0.0
    assert report.r_precision == pytest.approx(2 / 3)
    assert report.first_relevant_rank.tolist() == [2]


def test_ties_broken_by_gallery_index():
    """Gallery scores [5, 5, 3, 5] (raw dot products) with labels B, A, A, B for query A.

    Stable descending order: 0 (5), 1 (5), 3 (5), 2 (3) -> relevant at ranks 2 and 4:
    AP = (1/2 + 2/4) / 2 = 1/2, P@1 = 0, MAP@R = (1/2) / 2 = 1/4.
    Moving the relevant tied item to index 0 puts it first: P@1 = 1, AP = (1 + 2/4) / 2 = 3/4.
    """
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g = np.array([[5, 0], [5, 1], [3, 0], [5, 2]], dtype=np.float32)
    report = retrieval_metrics(q, ["A"], g, ["B", "A", "A", "B"], normalize=False)
    assert report.map == pytest.approx(0.5)
    assert report.precision_at_1 == 0.0
    assert report.map_at_r == pytest.approx(0.25)
    scores, idx = nearest_neighbors(q, g, k=4, normalize=False)
    assert idx.tolist() == [[0, 1, 3, 2]]
    assert scores.tolist() == [[5, 5, 5, 3]]

    report = retrieval_metrics(q, ["A"], g[[1, 0, 2, 3]], ["A", "B", "A", "B"], normalize=False)
    assert report.precision_at_1 == 1.0
    assert report.map == pytest.approx(0.75)


def test_heavy_ties_match_stable_reference():
    rng = np.random.default_rng(9)
    x = rng.integers(-1, 2, size=(150, 3)).astype(np.float32)  # 27 distinct vectors
    y = rng.integers(0, 6, 150)
    for args in [(x, y), (x[:40], y[:40], x[40:], y[40:])]:
        for chunk in (None, 7):
            report = retrieval_metrics(*args, normalize=False, chunk_size=chunk)
            ref = reference_metrics(*args, normalize=False)
            np.testing.assert_allclose(report.average_precisions, ref["ap"], atol=1e-12)
            np.testing.assert_allclose(report.average_precisions_at_r, ref["ap_r"], atol=1e-12)
            assert report.precision_at_1 == pytest.approx(np.nanmean(ref["p1"]))
    scores, idx = nearest_neighbors(x, k=10, normalize=False)
    sims = x @ x.T
    for i in range(len(x)):
        others = np.delete(np.arange(len(x)), i)
        order = others[np.argsort(-sims[i, others], kind="stable")][:10]
        assert idx[i].tolist() == order.tolist()


def test_query_without_relevant_items_is_skipped():
    q, _, g, g_labels = _five_item_gallery()
    queries = np.concatenate([q, q])
    report = retrieval_metrics(queries, ["A", "Z"], g, g_labels)
    assert report.num_queries == 1 and report.num_skipped_queries == 1
    assert math.isnan(report.average_precisions[1])
    assert report.first_relevant_rank[1] == 0
    assert report.map == pytest.approx(53 / 90)  # the mean leaves the skipped query out

    # leave-one-out: a class with a single image has nothing to retrieve
    x = np.array([unit(0), unit(10), unit(50)], dtype=np.float32)
    report = retrieval_metrics(x, ["A", "A", "lonely"])
    assert report.num_skipped_queries == 1 and report.num_queries == 2
    assert report.map == 1.0


def test_all_queries_skipped_gives_nan_and_json_null():
    x = np.eye(3, dtype=np.float32)
    report = retrieval_metrics(x, ["a", "b", "c"])
    assert report.num_queries == 0 and report.num_skipped_queries == 3
    assert math.isnan(report.map)
    d = report.to_dict()
    assert d["map"] is None
    json.dumps(d, allow_nan=False)


def test_chunked_equals_unchunked():
    x, y = clustered(203, 12, 11, noise=1.0, seed=10)
    groups = [f"g{v % 3}" for v in y]
    for args in [(x, y), (x[:50], y[:50], x[50:], y[50:])]:
        kwargs = {"query_groups": groups[: len(args[0])]}
        a = retrieval_metrics(*args, chunk_size=7, **kwargs)
        b = retrieval_metrics(*args, chunk_size=None, **kwargs)
        np.testing.assert_allclose(a.average_precisions, b.average_precisions, atol=1e-6)
        np.testing.assert_array_equal(a.first_relevant_rank, b.first_relevant_rank)
        da, db = a.to_dict(), b.to_dict()
        for key in ("map", "map_at_r", "precision_at_1", "recall_at_k", "map_at_k"):
            assert da[key] == pytest.approx(db[key], abs=1e-9)
        for group in db["per_group"]:
            assert da["per_group"][group] == pytest.approx(db["per_group"][group], abs=1e-9)
        s1, i1 = nearest_neighbors(args[0], *args[2:3], k=5, chunk_size=7)
        s2, i2 = nearest_neighbors(args[0], *args[2:3], k=5)
        np.testing.assert_array_equal(i1, i2)


def test_per_group_breakdown():
    x, y = clustered(120, 10, 8, noise=1.0, seed=11)
    groups = [None if v == 0 else ("even" if v % 2 == 0 else "odd") for v in y]
    report = retrieval_metrics(x, y, query_groups=groups)
    assert set(report.per_group) == {"even", "odd"}
    for name in ("even", "odd"):
        mask = np.array([g == name for g in groups])
        entry = report.per_group[name]
        assert entry["num_queries"] == int(mask.sum())
        assert entry["map"] == pytest.approx(report.average_precisions[mask].mean())
        assert entry["map_at_r"] == pytest.approx(report.average_precisions_at_r[mask].mean())
        p1 = (report.first_relevant_rank[mask] == 1).mean()
        assert entry["precision_at_1"] == pytest.approx(p1)


def test_report_dict_keys_and_types():
    x, y = clustered(40, 6, 4, noise=1.0, seed=12)
    report = retrieval_metrics(x, [f"c{v}" for v in y], query_groups=["g"] * 40)
    assert isinstance(report, RetrievalReport)
    d = report.to_dict()
    assert list(d) == [
        "map",
        "map_at_r",
        "precision_at_1",
        "recall_at_k",
        "map_at_k",
        "num_queries",
        "num_skipped_queries",
        "per_group",
    ]
    assert list(d["recall_at_k"]) == ["1", "5", "10"] and list(d["map_at_k"]) == ["10"]
    assert set(d["per_group"]["g"]) == {"map", "map_at_r", "precision_at_1", "num_queries"}
    assert report.average_precisions.shape == (40,)
    json.dumps(d, allow_nan=False)


def test_labels_accept_arrays_tensors_and_strings():
    x, y = clustered(50, 6, 5, noise=1.0, seed=13)
    a = retrieval_metrics(x, y)
    b = retrieval_metrics(x, torch.from_numpy(y))
    c = retrieval_metrics(torch.from_numpy(x), [str(v) for v in y])
    assert a.map == b.map == c.map


def test_nearest_neighbors_leave_one_out_and_clipping():
    x = np.array([unit(0), unit(10), unit(30), unit(70)], dtype=np.float32)
    scores, idx = nearest_neighbors(x, k=2)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    expected = [math.cos(math.radians(10)), math.cos(math.radians(30))]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
    scores, idx = nearest_neighbors(x, k=10)  # clipped to the 3 other items
    assert idx.shape == (4, 3) and all(i not in row for i, row in enumerate(idx.tolist()))
    scores, idx = nearest_neighbors(x[:1], x[1:], k=10)
    assert idx.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: retrieval_metrics(x, ["a"] * 9), "query_labels has 9"),
        (lambda x: retrieval_metrics(x, ["a"] * 10, x[:, :3], ["a"] * 10), "dimension"),
        (lambda x: retrieval_metrics(x, ["a"] * 10, x, ["a"] * 3), "gallery_labels has 3"),
        (lambda x: retrieval_metrics(x, ["a"] * 10, x), "gallery_labels is required"),
        (lambda x: retrieval_metrics(x[:0], []), "empty"),
        (lambda x: retrieval_metrics(x[0], ["a"]), "2-D"),
        (lambda x: retrieval_metrics(x, ["a"] * 10, chunk_size=0), "chunk_size"),
        (lambda x: retrieval_metrics(x, ["a"] * 10, recall_ks=(0,)), "recall_ks"),
        (lambda x: retrieval_metrics(np.full((2, 2), np.nan), ["a", "a"]), "NaN"),
        (lambda x: nearest_neighbors(x, x[:, :2]), "dimension"),
        (lambda x: nearest_neighbors(x, k=0), "k must"),
        (lambda x: nearest_neighbors(x[:0]), "empty"),
    ],
)
def test_errors(call, message):
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=message):
        call(x)


def test_automatic_chunk_respects_block_and_pair_budgets(monkeypatch):
    from fewshot.metrics import retrieval

    x, y = clustered(90, 6, 3, noise=1.0, seed=14)  # three large classes
    expected = retrieval_metrics(x, y)
    monkeypatch.setattr(retrieval, "_PAIR_ELEMENTS", 100)  # -> 3 queries per chunk
    assert retrieval._check_chunk(None, 90, 90, 30) == 3
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 90 * 2)  # -> 2 queries per chunk
    assert retrieval._check_chunk(None, 90, 90, 30) == 2
    report = retrieval_metrics(x, y)
    np.testing.assert_allclose(report.average_precisions, expected.average_precisions, atol=1e-6)
