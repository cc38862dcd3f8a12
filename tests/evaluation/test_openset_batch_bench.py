"""bench/openset_batch.py's batch score (a measured lever of issue 29) against a hand computation."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("openset_batch", ROOT / "bench" / "openset_batch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batch_score_by_hand(bench):
    protos = np.array([[1.0, 0.0], [0.0, 1.0]])
    v = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    sims = v @ protos.T
    # relative: 1 - 0, 0.8 - 0.3, 0.8 - 0.3; nearest other query: 0.8, 0.96, 0.96; best prototype 1, 0.8, 0.8
    np.testing.assert_allclose(bench.relative(sims)[0], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(bench.batch_score(sims, v, k=1, weight=3.0), [1.6, 0.02, 0.02], atol=1e-12)
    # k = 2: the mean of both other queries
    np.testing.assert_allclose(bench.batch_score(sims, v, k=2, weight=1.0),
                               [1 - (0.7 - 1), 0.5 - (0.78 - 0.8), 0.5 - (0.88 - 0.8)], atol=1e-12)
    # a batch of one keeps the relative score
    np.testing.assert_allclose(bench.batch_score(sims[:1], v[:1]), [1.0])


def test_catalogue_threshold_leaves_the_article_out(bench):
    """The catalogue threshold against a loop: each photo scored with its own article's prototype removed."""
    rng = np.random.default_rng(0)
    x = bench._norm(rng.normal(size=(12, 5)))
    own = np.repeat(np.arange(4), 3)
    protos = bench._norm(np.stack([x[own == a].sum(0) for a in range(4)]))
    by_loop = []
    for i in range(len(x)):
        cos = sorted((float(x[i] @ protos[a]) for a in range(4) if a != own[i]), reverse=True)
        by_loop.append(cos[0] - 0.5 * cos[1])
    t = bench.catalogue_thresholds(x, own, protos, far=0.0)
    assert t["relative"] == pytest.approx(max(by_loop))  # a 0% target accepts none of them but the top
