"""Episodic accuracy: separable clusters, chance level, seeding, cross-visit, custom classifiers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot.errors import DataError
from fewshot.metrics import EpisodicResult, episodic_accuracy, episodic_by_group
from fewshot.metrics.episodic import prototype_classifier


def clusters(n_classes: int, per_class: int, d: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32) * 10
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + spread * rng.standard_normal((len(labels), d)).astype(np.float32)
    return x.astype(np.float32), [f"class{v}" for v in labels]


def test_separable_clusters_give_perfect_accuracy():
    x, y = clusters(12, 20, 32, spread=0.1, seed=0)
    result = episodic_accuracy(x, y, n_way=5, k_shot=1, n_query=15, episodes=200, seed=0)
    assert isinstance(result, EpisodicResult)
    assert result.accuracy == 1.0 and result.ci95 == 0.0
    assert (result.episodes, result.n_way, result.k_shot, result.n_query) == (200, 5, 1, 15)
    assert result.per_episode.shape == (200,)
    assert set(result.to_dict()) == {"accuracy", "ci95", "episodes", "n_way", "k_shot", "n_query"}


def test_random_embeddings_are_at_chance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    y = rng.integers(0, 40, 2000)
    result = episodic_accuracy(x, y, n_way=5, k_shot=5, n_query=15, episodes=1000, seed=3)
    assert abs(result.accuracy - 0.2) < max(2 * result.ci95, 0.01)
    expected_ci = 1.96 * result.per_episode.std(ddof=0) / math.sqrt(1000)
    assert result.ci95 == pytest.approx(expected_ci)
    assert result.accuracy == pytest.approx(result.per_episode.mean())


def test_seeded_repeatability():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = rng.integers(0, 10, 300)
    a = episodic_accuracy(x, y, episodes=50, seed=5)
    b = episodic_accuracy(x, y, episodes=50, seed=5)
    c = episodic_accuracy(x, y, episodes=50, seed=6)
    np.testing.assert_array_equal(a.per_episode, b.per_episode)
    assert not np.array_equal(a.per_episode, c.per_episode)


def test_vectorised_default_equals_per_episode_classifier():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((10, 16)).astype(np.float32)
    y = rng.integers(0, 10, 400)
    x = centres[y] + 1.5 * rng.standard_normal((400, 16)).astype(np.float32)
    for normalize in (True, False):
        fast = episodic_accuracy(x, y, k_shot=3, episodes=60, seed=1, normalize=normalize)
        slow = episodic_accuracy(
            x, y, k_shot=3, episodes=60, seed=1, normalize=normalize,
            classifier=lambda s, sy, q, n: prototype_classifier(s, sy, q, n, cosine=normalize),
        )
        np.testing.assert_array_equal(fast.per_episode, slow.per_episode)
        assert 0.3 < fast.accuracy < 1.0


def test_prototype_classifier_by_hand():
    """Support: way 0 at (1, 0) and (0.8, 0.6) -> prototype along (0.9, 0.3); way 1 at (0, 1).

    Query (1, 0.1) is nearest prototype 0, query (0.1, 1) is nearest prototype 1.
    """
    support = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    pred = prototype_classifier(support, torch.tensor([0, 0, 1, 1]), queries, 2)
    assert pred.tolist() == [0, 1] and pred.dtype == torch.int64
    # any support order (general path) gives the same answer
    pred = prototype_classifier(support[[2, 0, 3, 1]], torch.tensor([1, 0, 1, 0]), queries, 2)
    assert pred.tolist() == [0, 1]
    pred = prototype_classifier(support, torch.tensor([0, 0, 1, 1]), queries, 2, cosine=False)
    assert pred.tolist() == [0, 1]


def test_custom_classifier_receives_episode_tensors():
    x, y = clusters(6, 10, 8, spread=0.1, seed=3)
    seen = []

    def always_zero(support_x, support_y, query_x, n_way):
        seen.append((tuple(support_x.shape), support_y.tolist(), tuple(query_x.shape), n_way))
        return np.zeros(len(query_x), dtype=np.int64)

    result = episodic_accuracy(
        x, y, n_way=3, k_shot=2, n_query=4, episodes=5, classifier=always_zero
    )
    assert result.accuracy == pytest.approx(1 / 3)
    assert seen[0] == ((6, 8), [0, 0, 1, 1, 2, 2], (12, 8), 3)
    assert len(seen) == 5

    with pytest.raises(ValueError, match="classifier returned shape"):
        episodic_accuracy(x, y, episodes=2, n_way=3, n_query=2, classifier=lambda *a: np.zeros(3))


def test_cross_visit_queries_come_from_query_set():
    x, y = clusters(8, 10, 16, spread=0.1, seed=5)
    # a separate query set around the same centres (same seed), with 6 items per class
    rng = np.random.default_rng(0)
    xq, yq = clusters(8, 6, 16, spread=0.1, seed=5)
    good = episodic_accuracy(x, y, query_embeddings=xq, query_labels=yq, episodes=50, n_query=5)
    assert good.accuracy == 1.0
    shuffled = list(rng.permutation(yq))
    bad = episodic_accuracy(
        x, y, query_embeddings=xq, query_labels=shuffled, episodes=200, n_query=5
    )
    assert bad.accuracy < 0.5  # shuffled query labels: queries no longer match their class
    with pytest.raises(ValueError, match="together"):
        episodic_accuracy(x, y, query_embeddings=xq)


def test_too_few_classes_and_bad_input():
    x, y = clusters(3, 10, 4, spread=0.1, seed=6)
    with pytest.raises(DataError, match="only 3"):
        episodic_accuracy(x, y, n_way=5, n_query=5)
    with pytest.raises(ValueError, match="labels has 29"):
        episodic_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match="empty"):
        episodic_accuracy(x[:0], [])


def test_episodic_by_group():
    x, y = clusters(10, 20, 16, spread=0.1, seed=7)
    groups = ["left" if int(lab[5:]) < 6 else "right" for lab in y]
    results = episodic_by_group(x, y, groups, n_way=5, k_shot=1, n_query=5, episodes=20)
    assert list(results) == ["left"]  # "right" has only 4 classes: skipped
    assert results["left"].accuracy == 1.0


def test_1000_episodes_on_random_embeddings_are_chance():
    """Speed lives in bench/; here: 1,000 episodes on random embeddings give 1/N within the CI."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3000, 1280)).astype(np.float32)
    y = rng.integers(0, 100, 3000)
    res = episodic_accuracy(x, y, n_way=5, k_shot=1, n_query=15, episodes=1000)
    assert res.episodes == 1000 and len(res.per_episode) == 1000
    assert abs(res.accuracy - 0.2) < 3 * res.ci95
