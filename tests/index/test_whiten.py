"""Catalogue whitening (fewshot.index.whiten): a ranking it must fix, the whitening property
against scikit-learn's Ledoit-Wolf estimate, refusals; wired into evaluate and the open-set
protocol."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from fewshot.errors import DataError, InputError
from fewshot.index.whiten import fit_whitening
from fewshot.metrics import retrieval_metrics


def _nuisance_catalogue():
    """Two articles, A and B, told apart by direction 2 (+-0.5 around a large direction 0); their
    photos vary along direction 1 (A's from -3 to 0, B's from 0 to 3), far more than they differ.
    Unit vectors of ``(10, nuisance, identity)``."""
    rows, labels = [], []
    for label, identity, nuisance in (("A", 0.5, (-3.0, -2.0, -1.0, 0.0)), ("B", -0.5, (0.0, 1.0, 2.0, 3.0))):
        for i, n in enumerate(nuisance):
            rows.append((10.0, n, identity + 0.05 * (-1) ** i))
            labels.append(label)
    g = np.array(rows, np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True), labels


def test_whitening_fixes_a_ranking_the_nuisance_direction_breaks():
    g, labels = _nuisance_catalogue()
    q = np.array([[10.0, 2.5, 0.4]], np.float32)  # a photo of A, its nuisance among B's photos'
    raw = retrieval_metrics(q, ["A"], g, labels)
    assert raw.precision_at_1 == 0.0  # nearest image: B's (10, 2, -0.45)
    w = fit_whitening(g, labels)
    white = retrieval_metrics(w.apply(q), ["A"], w.apply(g), labels)
    assert white.precision_at_1 == 1.0 and white.map > raw.map + 0.05
    assert w.photos == 8 and w.articles == 2 and 0.0 <= w.shrinkage <= 1.0
    assert w.describe()["articles"] == 2


def test_the_matrix_whitens_scikit_learns_shrunk_within_article_covariance():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 5))
    labels = np.repeat(np.arange(6), 4)
    x = centres[labels] + rng.normal(scale=[2.0, 1.0, 0.5, 0.2, 0.1], size=(24, 5))
    names = [f"a{i}" for i in labels]
    w = fit_whitening(x.astype(np.float32), names)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([unit[labels == i].mean(0) for i in range(6)])
    reference = LedoitWolf(assume_centered=True).fit(unit - means[labels])
    np.testing.assert_allclose(w.matrix.T @ reference.covariance_ @ w.matrix, np.eye(5), atol=1e-6)
    np.testing.assert_allclose(w.mean, unit.mean(0), atol=1e-6)
    assert w.shrinkage == pytest.approx(reference.shrinkage_)
    y = w.apply(x.astype(np.float32))
    assert y.dtype == np.float32 and y.shape == (24, 5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_single_photo_articles_photos_count_for_the_mean_only():
    g, labels = _nuisance_catalogue()
    extra = np.array([[1.0, 0.0, 0.0]], np.float32)
    with_single = fit_whitening(np.vstack([g, extra]), labels + ["C"])
    assert with_single.articles == 3 and with_single.photos == 9
    with pytest.raises(DataError, match="2 photos of 2 articles, and only 0 of them") as exc:
        fit_whitening(g[[0, 4]], ["A", "B"])
    assert "second, different photo" in exc.value.hint and exc.value.options == ("whiten",)
    with pytest.raises(DataError, match="only 1 of them"):  # one article of two photos is not enough
        fit_whitening(g[[0, 1, 4]], ["A", "A", "B"])
    same = np.repeat(g[:1], 6, axis=0)  # every photo alike: whitened, each would be the zero vector
    with pytest.raises(DataError, match="identical") as exc:
        fit_whitening(same, ["A", "A", "A", "B", "B", "B"])
    assert exc.value.options == ("whiten",)
    with pytest.raises(ValueError, match="dimension"):
        with_single.apply(np.ones((1, 4), np.float32))
    with pytest.raises(ValueError):
        fit_whitening(g, labels[:3])


def test_open_set_draws_fit_each_catalogue_on_its_own(monkeypatch):
    from fewshot.evaluation.openset import evaluate_open_set

    rng = np.random.default_rng(1)
    classes = [f"c{i:02d}" for i in range(12)]
    centres = rng.normal(size=(12, 8))
    nuisance = np.zeros(8)
    nuisance[0] = 1.0

    def photos(n):
        lab = np.repeat(np.arange(12), n)
        return (centres[lab] + rng.normal(scale=3.0, size=(len(lab), 1)) * nuisance
                + rng.normal(scale=0.3, size=(len(lab), 8))).astype(np.float32), [classes[i] for i in lab]

    g, gl = photos(6)
    q, ql = photos(4)
    plain = evaluate_open_set(q, ql, [None] * len(q), g, gl, [None] * len(g), classes, draws=3)
    white = evaluate_open_set(q, ql, [None] * len(q), g, gl, [None] * len(g), classes, draws=3, whiten=True)
    assert white["protocol"]["whiten"] is True and plain["protocol"]["whiten"] is False
    assert white["top1_known"]["mean"] > plain["top1_known"]["mean"]
    assert white["scores"]["relative"]["auroc"]["mean"] > plain["scores"]["relative"]["auroc"]["mean"]
    # with the gallery's digests, as `fewshot evaluate` passes them: distinct photos change nothing, and
    # a byte-identical copy added under its article leaves each draw's fit as it was
    distinct = [f"d{i}" for i in range(len(g))]
    kw = dict(draws=3, whiten=True)
    same = evaluate_open_set(q, ql, [None] * len(q), g, gl, [None] * len(g), classes, gallery_digests=distinct, **kw)
    assert same["scores"]["relative"]["auroc"] == white["scores"]["relative"]["auroc"]
    import fewshot.evaluation.openset as openset

    fitted = []
    monkeypatch.setattr(openset, "fit_whitening", lambda v, labels, digests=None, prior=None: (
        fitted.append((list(labels), digests)), fit_whitening(v, labels, digests, prior))[1])
    evaluate_open_set(q, ql, [None] * len(q), g, gl, [None] * len(g), classes, gallery_digests=distinct, **kw)
    assert len(fitted) == 3 and all(d == [distinct[i] for i in range(len(g)) if gl[i] in set(lab)]
                                    for lab, d in fitted)  # each draw's catalogue: its photos' digests
    with pytest.raises(ValueError, match="gallery_digests"):
        evaluate_open_set(q, ql, [None] * len(q), g, gl, [None] * len(g), classes, gallery_digests=distinct[:3], **kw)


def test_open_set_says_which_draw_cannot_be_whitened():
    from fewshot.catalogue.whitened import check_whitenable
    from fewshot.evaluation.openset import check_open_set_whitening, evaluate_open_set

    rng = np.random.default_rng(2)
    classes = [f"c{i:02d}" for i in range(12)]
    counts = [3] + [1] * 11  # the gallery can be whitened, no draw's 5 folds can
    g = rng.normal(size=(sum(counts), 8)).astype(np.float32)
    gl = [c for c, n in zip(classes, counts) for _ in range(n)]
    q = rng.normal(size=(24, 8)).astype(np.float32)
    ql = [c for c in classes for _ in range(2)]
    fit_whitening(g, gl)
    with pytest.raises(DataError, match="open set with whitening: the catalogue of a draw") as exc:
        evaluate_open_set(q, ql, [None] * 24, g, gl, [None] * len(g), classes, draws=2, whiten=True)
    assert exc.value.options == ("whiten",) and "two or more gallery photos" in exc.value.hint
    with pytest.raises(DataError, match="open set with whitening") as early:  # from the labels alone
        check_open_set_whitening(classes, gl, 2, 0)
    assert early.value.message == exc.value.message
    check_open_set_whitening(classes, [c for c in classes for _ in range(3)], 20, 0)  # 3 photos each: fine
    with pytest.raises(DataError, match="only 1 of them"):
        check_whitenable(["a", "a", "b", "c", "d", "e", "f"])


def test_the_api_takes_only_true_or_false():
    import fewshot

    with pytest.raises(TypeError, match="whiten must be True or False"):
        fewshot.evaluate(fewshot.create_backbone("efficientnet_lite0", image_size=32), fewshot.data.Dataset([]),
                         whiten="false")
    from fewshot.checks import as_bool

    assert as_bool(np.bool_(True), "x") is True and as_bool(False, "x") is False
    for bad in ("false", 1, None, 2.5):
        with pytest.raises(TypeError, match="open_set must be True or False"):
            as_bool(bad, "open_set")


def test_evaluate_refuses_whiten_without_a_gallery():
    from fewshot.evaluation.levers import check_levers

    with pytest.raises(InputError, match="whiten=True fits") as exc:
        check_levers("none", "none", None, gallery=False, model_classifier=False, whiten=True)
    assert exc.value.options == ("whiten", "split_file")
    assert check_levers("none", "none", None, gallery=True, model_classifier=False, whiten=True).kind == "none"


def test_unapply_gives_back_the_models_unit_embeddings():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(12), 5).astype(str)
    x = (rng.normal(size=(12, 16))[labels.astype(int)] + rng.normal(scale=0.3, size=(60, 16))).astype(np.float32)
    w = fit_whitening(x, labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(w.unapply(w.apply(x)), unit, atol=2e-6)
    from fewshot.index.whiten import Whitening

    again = Whitening.from_arrays(w.to_arrays(), w.describe())
    np.testing.assert_array_equal(again.apply(x), w.apply(x))
    with pytest.raises(ValueError, match="dimension 3"):
        w.unapply(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="matrix"):
        Whitening.from_arrays({"mean": w.mean, "matrix": w.matrix[:3]}, w.describe())


@pytest.mark.parametrize("photos,dim", [(3, 4), (2, 40)])  # many dimensions, few photos: shrunk hard
def test_fold_statistics_add_up_to_scikit_learns_fit(photos, dim):
    from fewshot.index.whiten import fit_from_stats, within_stats

    rng = np.random.default_rng(1)
    labels = np.array([f"a{i}" for i in np.repeat(np.arange(9), photos)] + ["single"], dtype=object)
    x = rng.normal(size=(len(labels), dim)).astype(np.float32)
    first = np.isin(labels, ["a0", "a1", "a2", "single"])
    whole = within_stats(x, labels)
    parts = within_stats(x[first], labels[first]).plus(within_stats(x[~first], labels[~first]))
    np.testing.assert_allclose(parts.scatter, whole.scatter, atol=1e-12)
    assert (parts.residuals, parts.photos, parts.articles, parts.spread) == (9 * photos, len(x), 10, 9 * (photos - 1))
    rest = fit_from_stats(whole.minus(within_stats(x[first], labels[first])))
    unit = x[~first] / np.linalg.norm(x[~first], axis=1, keepdims=True)
    lab = labels[~first]
    means = {a: unit[lab == a].mean(0) for a in set(lab)}
    reference = LedoitWolf(assume_centered=True).fit(unit - np.stack([means[a] for a in lab]))
    assert rest.shrinkage == pytest.approx(reference.shrinkage_, rel=1e-6)  # float32 photos: agree to 1e-8
    np.testing.assert_allclose(rest.matrix.T @ reference.covariance_ @ rest.matrix, np.eye(dim), atol=1e-6)
    np.testing.assert_allclose(rest.mean, unit.mean(0), atol=1e-6)


def test_distinct_photos_keeps_the_first_of_each_byte_identical_copy_within_an_article():
    from fewshot.index.whiten import distinct_photos, within_stats

    labels = ["a", "a", "a", "b", "b", "b"]
    digests = ["x", "x", "y", "x", None, None]  # "x" in b is another article's photo; None: not known
    assert distinct_photos(labels, digests).tolist() == [True, False, True, True, True, True]
    assert distinct_photos(labels, None).all()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 4)).astype(np.float32)
    v[1] = v[0]
    keep = distinct_photos(labels, digests)
    by_hand, got = within_stats(v[keep], np.array(labels)[keep]), within_stats(v, labels, digests)
    np.testing.assert_allclose(got.scatter, by_hand.scatter)
    assert (got.photos, got.spread) == (5, 3) and within_stats(v, labels).photos == 6


def test_a_fit_refused_for_lack_of_spread_counts_the_copies_it_left_out():
    g, labels = _nuisance_catalogue()
    two = g[[0, 4]]
    with pytest.raises(DataError, match=r"only 0 of them .* \(2 byte-identical copies of another photo of the same "
                                        r"article left out\)") as exc:  # each article: its photo and a copy
        fit_whitening(np.vstack([two, two]), ["A", "B", "A", "B"], ["a", "b", "a", "b"])
    assert "different photo (not a copy)" in exc.value.hint
    with pytest.raises(DataError, match="2 photos of 2 articles, and only 0 of them") as plain:
        fit_whitening(two, ["A", "B"])
    assert "left out" not in plain.value.message
