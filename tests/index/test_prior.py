"""A run's whitening prior (fewshot.index.prior): pooling it is exactly fitting on both sets of
photos; it travels with the whitening; the calibration's fold fits pool it; it is read only for
the weights it was measured with."""

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
    assert set(arrays) == {"mean", "matrix", f"{PRIOR_PREFIX}scatter", f"{PRIOR_PREFIX}total"}
    back = Whitening.from_arrays(arrays, w.describe())
    assert back.prior is not None and back.prior.describe() == w.prior.describe()
    np.testing.assert_array_equal(back.prior.scatter, w.prior.scatter)
    x, _ = _photos(5, 2, 3)
    np.testing.assert_array_equal(back.apply(x), w.apply(x))
    # a record whose counts do not fit its arrays is refused
    bad = {**w.describe(), "prior": {**w.describe()["prior"], "spread": 10**6}}
    with pytest.raises(ValueError, match="counts that do not fit together"):
        Whitening.from_arrays(arrays, bad)
    with pytest.raises(ValueError, match="not finite"):
        Whitening.from_arrays({**arrays, f"{PRIOR_PREFIX}total": np.full(12, np.nan)}, w.describe())
    with pytest.raises(KeyError):
        Whitening.from_arrays({"mean": arrays["mean"], "matrix": arrays["matrix"]}, w.describe())


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


def test_load_prior_reads_only_its_own_weights_prior(tmp_path, caplog):
    stats = within_stats(*_photos(1, 6, 7, prefix="t"))
    assert load_prior(_Model(None)) is None and load_prior(_Model(tmp_path)) is None  # frozen; no file
    path = save_prior(tmp_path, stats, _Model(tmp_path))
    assert path == tmp_path / PRIOR_FILE and oct(path.stat().st_mode & 0o777) != "0o600"
    got = load_prior(_Model(tmp_path))
    assert got is not None and got.describe() == stats.describe() and np.array_equal(got.total, stats.total)
    _, meta = read_prior(path)
    assert meta["weights_sha256"] == "d1" and meta["image_size"] == "32" and meta["tta"] == "none"
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        assert load_prior(_Model(tmp_path, digest="d2")) is None
        assert "measured with other weights" in caplog.text
        path.write_bytes(path.read_bytes()[:100])
        assert load_prior(_Model(tmp_path)) is None
        assert "cannot be read" in caplog.text
        path.unlink()  # silent for a run trained before 0.10.0; said for one that wrote it
        assert load_prior(_Model(tmp_path)) is None and "is missing" not in caplog.text
        assert load_prior(_Model(tmp_path, run_config={"whitening_prior": {"photos": 42}})) is None
        assert "whitening-prior.safetensors is missing" in caplog.text


def test_within_stats_round_trip_checks_shapes():
    stats = within_stats(*_photos(1, 3, 3))
    back = WithinStats.from_arrays(stats.to_arrays(), stats.describe())
    assert back.describe() == stats.describe() and back.dim == 12
    with pytest.raises(ValueError, match="not for dimension 8"):
        WithinStats.from_arrays(stats.to_arrays(), stats.describe(), dim=8)
