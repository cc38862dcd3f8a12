"""A run's whitening prior (fewshot.index.prior): pooling it is exactly fitting on both sets of
photos; it travels with the whitening; the calibration's fold fits pool it; it is read only for
the weights it was measured with; its rival articles compete for every place but the first."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fewshot.errors import DataError
from fewshot.index.prior import PRIOR_FILE, load_prior, read_prior, save_prior
from fewshot.index.whiten import PRIOR_PREFIX, Whitening, WithinStats, fit_whitening, within_stats


def _photos(seed: int, articles: int, per: int, dim: int = 12, prefix: str = "a") -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(articles, dim))
    x = np.concatenate([c + 0.3 * rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    return x, [f"{prefix}{i}" for i in range(articles) for _ in range(per)]


def test_pooling_a_prior_is_fitting_on_both_sets_of_photos():
    cat, cat_labels = _photos(0, 4, 5)
    train, train_labels = _photos(1, 6, 7, prefix="t")
    prior = within_stats(train, train_labels)
    pooled = fit_whitening(cat, cat_labels, prior=prior)
    both = fit_whitening(np.concatenate([cat, train]), cat_labels + train_labels)
    np.testing.assert_allclose(pooled.mean, both.mean, atol=1e-12)
    np.testing.assert_allclose(pooled.matrix, both.matrix, atol=1e-9)
    assert pooled.shrinkage == pytest.approx(both.shrinkage, abs=1e-12)
    # it records the catalogue's own photos, and the prior apart
    assert (pooled.photos, pooled.articles) == (20, 4) and pooled.prior is prior
    assert pooled.describe()["prior"] == {"fourth": pytest.approx(prior.fourth), "residuals": 42, "photos": 42,
                                          "articles": 6, "spread": 36}
    alone = fit_whitening(cat, cat_labels)
    assert alone.prior is None and alone.describe()["prior"] is None
    assert np.abs(alone.matrix - pooled.matrix).max() > 0.1  # the prior changes the fit


def test_a_prior_does_not_make_up_for_a_catalogue_without_spread():
    cat = np.eye(12, dtype=np.float32)[:3]
    train, train_labels = _photos(1, 6, 7, prefix="t")
    with pytest.raises(DataError, match="only 0 of them are a second or later photo"):
        fit_whitening(cat, ["a", "b", "c"], prior=within_stats(train, train_labels))
    with pytest.raises(ValueError, match="prior of dimension 8 for embeddings of dimension 12"):
        fit_whitening(*_photos(0, 4, 5), prior=within_stats(*_photos(1, 3, 3, dim=8)))


def test_the_prior_travels_with_the_whitening_arrays():
    w = fit_whitening(*_photos(0, 4, 5), prior=within_stats(*_photos(1, 6, 7, prefix="t")))
    arrays = w.to_arrays()
    assert set(arrays) == {"mean", "matrix", *(f"{PRIOR_PREFIX}{k}" for k in ("scatter", "total", "counts"))}
    back = Whitening.from_arrays(arrays, {**w.describe(), "prior": None})  # the arrays hold it all
    assert back.prior is not None and back.prior.describe() == w.prior.describe()
    np.testing.assert_array_equal(back.prior.scatter, w.prior.scatter)
    x, _ = _photos(5, 2, 3)
    np.testing.assert_array_equal(back.apply(x), w.apply(x))
    with pytest.raises(KeyError):
        Whitening.from_arrays({k: v for k, v in arrays.items() if k != f"{PRIOR_PREFIX}counts"}, w.describe())


@pytest.mark.parametrize("change, why", [
    (lambda a: {**a, "counts": a["counts"] * [1, 1, 1, 1, 10**6]}, "do not fit together"),
    (lambda a: {**a, "counts": a["counts"] * [1, 1, 10**10, 1, 1]}, "do not fit together"),
    (lambda a: {**a, "counts": a["counts"] + [0, 0.5, 0, 0, 0]}, "not whole numbers"),
    (lambda a: {**a, "counts": a["counts"] * [-1, 1, 1, 1, 1]}, "fourth moment"),
    (lambda a: {**a, "scatter": a["scatter"] * 1e6}, "trace"),
    (lambda a: {**a, "scatter": -a["scatter"]}, r"trace -[\d.e+]+ outside \[0, 4 x residuals\]$"),
    (lambda a: {**a, "scatter": a["scatter"] - 0.5 * np.trace(a["scatter"]) * np.outer(*[np.eye(12)[0]] * 2)},
     "positive semi-definite"),
    (lambda a: {**a, "scatter": a["scatter"] + np.triu(np.ones((12, 12)), 1) * 0.1}, "not symmetric"),
    (lambda a: {**a, "total": a["total"] * 1e8}, "sum longer"),
    (lambda a: {**a, "total": np.full(12, np.inf)}, "not finite"),
    (lambda a: {**a, "total": a["total"][:8]}, "not for dimension"),
])
def test_statistics_no_photos_give_are_refused(change, why):
    stats = within_stats(*_photos(1, 6, 7, prefix="t"))
    assert WithinStats.from_arrays(stats.to_arrays()).describe() == stats.describe()
    with pytest.raises(ValueError, match=why):
        WithinStats.from_arrays(change(stats.to_arrays()))


def test_the_calibration_folds_pool_the_prior(monkeypatch):
    import fewshot.catalogue.whitened as whitened

    cat, labels = _photos(0, 10, 4)
    prior = within_stats(*_photos(1, 6, 7, prefix="t"))
    fits: list[Whitening] = []
    real = whitened.fit_from_stats
    monkeypatch.setattr(whitened, "fit_from_stats", lambda stats, p=None: fits.append(real(stats, p)) or fits[-1])
    whitened.whitened_calibration_scores(cat, labels, [None] * len(labels), ["relative"], folds=5, prior=prior)
    assert len(fits) == 5 and all(f.prior is prior for f in fits)
    fold_of = whitened.article_folds(np.unique(labels), 5, 0)
    for k, fit in enumerate(fits):  # each: the other folds' photos and the prior's
        keep = np.array([fold_of[a] != k for a in labels])
        by_hand = fit_whitening(cat[keep], list(np.array(labels)[keep]), prior=prior)
        np.testing.assert_allclose(fit.matrix, by_hand.matrix, atol=1e-9)


class _Model:
    """What load_prior reads of a model: its run folder, weights digest, dimension, image size."""

    def __init__(self, run_dir, digest="d1", dim=12, run_config=None):
        self.run_dir, self._digest, self.dim, self.run_config = run_dir, digest, dim, run_config or {}
        self.backbone = type("B", (), {"image_size": 32})()

    def weights_digest(self):
        return self._digest


def _saved(folder):
    x, labels = _photos(1, 6, 7, prefix="t")
    digests = [f"{i:064x}" for i in range(len(labels) - 1)] + [None]
    stats = within_stats(x, labels)
    return stats, save_prior(folder, stats, _Model(folder), labels, digests)


def test_load_prior_reads_only_its_own_weights_prior(tmp_path, caplog):
    assert load_prior(_Model(None)) is None and load_prior(_Model(tmp_path)) is None  # frozen; no file
    stats, path = _saved(tmp_path)
    assert path == tmp_path / PRIOR_FILE
    got = load_prior(_Model(tmp_path), ["a0", "a1"], ["f" * 64])
    assert got is not None and got.describe() == stats.describe() and np.array_equal(got.total, stats.total)
    prior = read_prior(path)
    assert prior.meta["weights_sha256"] == "d1" and prior.meta["image_size"] == "32" and prior.meta["tta"] == "none"
    assert prior.articles == {f"t{i}" for i in range(6)} and len(prior.digests) == 41 and f"{5:064x}" in prior.digests
    assert not caplog.text
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        assert load_prior(_Model(tmp_path, digest="d2")) is None
        assert "measured with other weights" in caplog.text and "add_whitening_prior" in caplog.text
        assert load_prior(_Model(tmp_path, dim=64)) is None
        assert "is 12-dimensional, the model 64-dimensional" in caplog.text
        path.write_bytes(path.read_bytes()[:100])
        assert load_prior(_Model(tmp_path)) is None
        assert "cannot be used" in caplog.text
        path.unlink()  # silent for a run trained before 0.10.0; said for one that wrote it, or was interrupted
        caplog.clear()
        assert load_prior(_Model(tmp_path, run_config={"fewshot_version": "0.9.0"})) is None and not caplog.text
        assert load_prior(_Model(tmp_path, run_config={"whitening_prior": {"photos": 42}})) is None
        assert "whitening-prior.safetensors is missing" in caplog.text
        caplog.clear()
        assert load_prior(_Model(tmp_path, run_config={"fewshot_version": "0.10.0"})) is None
        assert "is missing" in caplog.text


def test_a_catalogue_sharing_articles_or_photos_with_the_training_photos_does_not_pool_it(tmp_path, caplog):
    _saved(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        assert load_prior(_Model(tmp_path), ["a0", "t3", "t4"], None) is None
        assert "shares 2 article(s) (e.g. t3, t4)" in caplog.text
        assert load_prior(_Model(tmp_path), ["a0"], [f"{7:064x}", None]) is None  # the same photo under a new name
        assert "shares 1 photo(s)" in caplog.text


def test_a_prior_whose_counts_do_not_fit_its_photos_is_not_used(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    _, path = _saved(tmp_path)
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    arrays = load_file(str(path))
    save_file({**arrays, "counts": arrays["counts"] * [1, 1, 1, 2, 1]}, str(path), metadata=meta)  # 12 articles, 6 names
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        assert load_prior(_Model(tmp_path)) is None
    assert "do not fit its 41 photo digests and 6 article names" in caplog.text and str(tmp_path) in caplog.text


def test_within_stats_round_trip_checks_shapes():
    stats = within_stats(*_photos(1, 3, 3))
    back = WithinStats.from_arrays(stats.to_arrays())
    assert back.describe() == stats.describe() and back.dim == 12
    with pytest.raises(ValueError, match="not for dimension 8"):
        WithinStats.from_arrays(stats.to_arrays(), dim=8)


def _with_rivals(stats: WithinStats, x: np.ndarray, labels: list[str]) -> WithinStats:
    from dataclasses import replace

    from fewshot.training.prior import article_means

    names, means = article_means(x, labels)
    return replace(stats, rivals=means, rival_names=names)


def test_rivals_take_every_place_but_the_first():
    from fewshot.catalogue.scores import open_scores, with_rivals

    top = np.array([[0.9, 0.5, 0.2], [0.6, 0.55, 0.1]], np.float32)
    got = with_rivals(top, np.array([0.7, 0.95]))
    np.testing.assert_allclose(got, [[0.9, 0.7, 0.5, 0.2], [0.6, 0.95, 0.55, 0.1]], atol=1e-7)
    np.testing.assert_allclose(open_scores(got, "relative"), [0.9 - 0.35, 0.6 - 0.475], atol=1e-6)
    np.testing.assert_allclose(open_scores(got, "cosine"), [0.9, 0.6], atol=1e-7)  # the answer's own cosine
    assert with_rivals(top, None) is top


def test_rivals_are_the_article_means_and_travel_with_the_whitening():
    x, labels = _photos(1, 6, 7, prefix="t")
    prior = _with_rivals(within_stats(x, labels), x, labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(prior.rivals[2], unit[14:21].mean(0), atol=1e-12)  # t2's photos, by name
    assert prior.describe()["rivals"] == 6 and prior.plus(prior).rivals is None  # not additive
    w = fit_whitening(*_photos(0, 4, 5), prior=prior)
    back = Whitening.from_arrays(w.to_arrays(), w.describe())
    np.testing.assert_array_equal(back.prior.rivals, prior.rivals)
    np.testing.assert_allclose(back.rival_vectors, w.apply(prior.rivals.astype(np.float32)), atol=1e-6)
    assert fit_whitening(*_photos(0, 4, 5), prior=within_stats(x, labels)).rival_vectors is None
    from fewshot.index.whiten import prior_note

    assert prior_note(w.describe()["prior"]).endswith("42 training photos of 6 articles pooled in, 6 of its articles as rivals")


@pytest.mark.parametrize("rivals, why", [
    (lambda r: r * 2.0, "norms outside"), (lambda r: r * 0.0, "norms outside"),
    (lambda r: r[:, :8], r"not \[B, 12\]"), (lambda r: np.full_like(r, np.nan), "finite"), (lambda r: r[:0], "finite"),
])
def test_impossible_rivals_are_refused(rivals, why):
    x, labels = _photos(1, 6, 7, prefix="t")
    arrays = _with_rivals(within_stats(x, labels), x, labels).to_arrays()
    with pytest.raises(ValueError, match=why):
        WithinStats.from_arrays({**arrays, "rivals": rivals(arrays["rivals"])})


def test_a_prior_with_rivals_is_saved_read_and_checked(tmp_path, caplog):
    from dataclasses import replace

    x, labels = _photos(1, 6, 7, prefix="t")
    v, vlabels = _photos(2, 3, 4, prefix="v")  # validation articles: rivals, not in the statistics
    stats = _with_rivals(within_stats(x, labels), np.concatenate([x, v]), labels + vlabels)
    digests = [f"{i:064x}" for i in range(len(labels) + len(vlabels))]
    save_prior(tmp_path, stats, _Model(tmp_path), labels + vlabels, digests)
    prior = read_prior(tmp_path / PRIOR_FILE)
    assert prior.articles == {*labels, *vlabels} and len(prior.digests) == 54 and len(prior.stats.rivals) == 9
    with caplog.at_level(logging.WARNING, logger="fewshot"):  # a catalogue of a validation article leaves it out
        assert load_prior(_Model(tmp_path), ["v1"], None) is None
    assert "shares 1 article(s) (e.g. v1)" in caplog.text
    with pytest.raises(ValueError, match="4 rival means for 9 articles"):
        save_prior(tmp_path, replace(stats, rivals=stats.rivals[:4]), _Model(tmp_path), labels + vlabels, digests)


def _sibling(x: np.ndarray, shift: float) -> np.ndarray:
    """Six photos of an article near the one whose photos are ``x`` (its centre moved by ``shift``)."""
    rng = np.random.default_rng(9)
    return (x.mean(0) + shift * rng.normal(size=x.shape[1]) + 0.3 * rng.normal(size=(6, x.shape[1]))).astype(np.float32)


def test_rivals_lower_the_scores_of_photos_near_them_in_calibration_and_classify():
    from fewshot.catalogue.calibrate import calibration_scores, rival_cosines
    from fewshot.catalogue.classify import classify_embedded
    from fewshot.catalogue.reject import Rejector
    from fewshot.index import CatalogueIndex

    x, labels = _photos(0, 8, 5)
    t, tlabels = _photos(1, 6, 7, prefix="t")
    plain_prior = within_stats(t, tlabels)
    # a rival near article a3 (another article of its kind: whitened cosine about 0.76 to a3's prototype)
    rivals_prior = _with_rivals(plain_prior, np.concatenate([t, _sibling(x[15:20], 0.7)]), tlabels + ["s"] * 6)
    got = {}
    for name, prior in (("plain", plain_prior), ("rivals", rivals_prior)):
        w = fit_whitening(x, labels, prior=prior)
        index = CatalogueIndex.build(x, labels, [None] * len(labels), [f"p{i}" for i in range(40)], {}, whitening=w)
        got[name] = (calibration_scores(index), index)
    (plain, _), (rival, index) = got["plain"], got["rivals"]
    assert rival_cosines(got["plain"][1], x) is None
    cos = rival_cosines(index, x)
    assert cos.shape == (40,) and cos[15:20].mean() > cos[np.r_[0:15, 20:40]].mean() + 0.2  # a3's photos lie near it
    # absent scores (own article left out): a3's photos lose the most
    drop = plain.absent - rival.absent
    assert drop[15:20].min() > 0.1 and drop[15:20].mean() > 2 * drop[np.r_[0:15, 20:40]].mean()
    assert np.all(drop >= -1e-6)  # a rival only ever lowers the relative score
    # classify: the answer's score is the relative score with the rival in second place
    rejector = Rejector("relative", threshold=0.0)
    r = classify_embedded(index, x[15:16] + 0.01, [None], ["q"], rejector=rejector, leave_one_out=False)[0]
    top = np.array([[p.score for p in r.predictions[:2]]], np.float32)
    expected = top[0, 0] - 0.5 * max(top[0, 1], float(rival_cosines(index, x[15:16] + 0.01)[0]))
    assert r.answer.score == pytest.approx(expected, abs=1e-5) and r.answer.article == "a3"


@pytest.mark.parametrize("rival_name, shift", [("a3", 0.7), (" A3 ", 0.7), ("t-renamed", 0.0)])
def test_a_rival_that_is_a_catalogue_article_is_left_out(rival_name, shift, caplog):
    """An article the run trained on, in the catalogue (enrolled, or under another name): were it
    its own rival, every photo of it would be rejected."""
    from fewshot.catalogue.calibrate import kept_rivals, rival_cosines
    from fewshot.index import CatalogueIndex

    x, labels = _photos(0, 8, 5)
    t, tlabels = _photos(1, 6, 7, prefix="t")
    prior = _with_rivals(within_stats(t, tlabels), np.concatenate([t, _sibling(x[15:20], shift)]),
                         tlabels + [rival_name] * 6)
    index = CatalogueIndex.build(x, labels, [None] * 40, [f"p{i}" for i in range(40)], {},
                                 whitening=fit_whitening(x, labels, prior=prior))
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        kept = kept_rivals(index)
        rival_cosines(index, x)  # said once per state of the index
    assert len(kept) == 6 and caplog.text.count("1 of the run's 7 rival articles are left out") == 1
    assert rival_name.strip() in caplog.text
    caplog.clear()
    index.remove_article("a3")  # gone from the catalogue: a rival again
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        assert len(kept_rivals(index)) == 7 and not caplog.text
