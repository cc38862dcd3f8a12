"""EpisodeSampler: exact N/K/Q, disjoint support and query, seeding, warnings, errors."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from fewshot.data.episodes import Episode, EpisodeSampler
from fewshot.errors import DataError


def pool_labels() -> list[str]:
    # 8 classes with 6..13 items each, interleaved
    labels = [f"c{i}" for i in range(8) for _ in range(6 + i)]
    return list(np.random.default_rng(0).permutation(labels))


def test_exact_counts_and_disjoint_support_query():
    labels = pool_labels()
    sampler = EpisodeSampler(labels, n_way=5, k_shot=2, n_query=3, episodes=50, seed=1)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 50
    for ep in episodes:
        assert isinstance(ep, Episode)
        assert len(ep.classes) == len(set(ep.classes)) == 5
        assert ep.support_idx.shape == (10,) and ep.query_idx.shape == (15,)
        for arr in (ep.support_idx, ep.support_y, ep.query_idx, ep.query_y):
            assert arr.dtype == np.int64
        assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert ep.query_y.tolist() == [w for w in range(5) for _ in range(3)]
        assert not set(ep.support_idx.tolist()) & set(ep.query_idx.tolist())
        assert len(set(ep.support_idx.tolist())) == 10 and len(set(ep.query_idx.tolist())) == 15
        for idx, y in [(ep.support_idx, ep.support_y), (ep.query_idx, ep.query_y)]:
            assert [labels[i] for i in idx] == [ep.classes[w] for w in y]


def test_same_seed_same_episodes_and_reiterable():
    labels = pool_labels()
    a = list(EpisodeSampler(labels, 4, 1, 5, episodes=20, seed=7))
    sampler = EpisodeSampler(labels, 4, 1, 5, episodes=20, seed=7)
    b, c = list(sampler), list(sampler)
    d = list(EpisodeSampler(labels, 4, 1, 5, episodes=20, seed=8))

    def key(eps):
        return [(e.classes, e.support_idx.tolist(), e.query_idx.tolist()) for e in eps]

    assert key(a) == key(b) == key(c)
    assert key(a) != key(d)


def test_cross_visit_protocol_indices_point_into_each_pool(caplog):
    support_labels = ["a"] * 3 + ["b"] * 3 + ["c"] * 1 + ["d"] * 4
    query_labels = ["a"] * 2 + ["b"] * 5 + ["c"] * 5 + ["e"] * 5 + ["d"] * 1
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        sampler = EpisodeSampler(
            support_labels, n_way=2, k_shot=2, n_query=2, episodes=30, seed=0,
            query_labels=query_labels,
        )
    assert sorted(sampler.classes) == ["a", "b"]
    assert sorted(sampler.dropped) == ["c", "d", "e"]
    records = [r for r in caplog.records if r.name == "fewshot"]
    assert len(records) == 1
    assert records[0].getMessage().endswith(": c, d, e")
    for ep in sampler:
        assert [support_labels[i] for i in ep.support_idx] == [ep.classes[w] for w in ep.support_y]
        assert [query_labels[i] for i in ep.query_idx] == [ep.classes[w] for w in ep.query_y]


def test_small_classes_dropped_with_one_warning(caplog):
    labels = ["big1"] * 6 + ["big2"] * 6 + ["tiny"] * 2 + ["big3"] * 6 + ["small"] * 3
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler = EpisodeSampler(labels, n_way=3, k_shot=1, n_query=3, episodes=5, seed=0)
            list(sampler)
            list(sampler)
    assert sampler.classes == ["big1", "big2", "big3"]
    assert sampler.dropped == ["tiny", "small"]
    assert caught == []  # logged once, not also a Python UserWarning (it printed twice)
    records = [r for r in caplog.records if r.name == "fewshot"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "tiny, small" in message and "big1" not in message


def test_dropped_classes_are_named_by_their_labels_and_warn_can_be_silenced(caplog):
    ids = [0] * 6 + [1] * 6 + [2] * 2 + [3] * 6
    names = ["Granny-Smith", "Pink-Lady", "Banana", "Carrots"]
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        EpisodeSampler(ids, n_way=3, k_shot=1, n_query=3, episodes=5, seed=0, names=names)
        EpisodeSampler(ids, n_way=3, k_shot=1, n_query=3, episodes=5, seed=0, names=names, warn=False)
    records = [r.getMessage() for r in caplog.records if r.name == "fewshot"]
    assert len(records) == 1 and records[0].endswith(": Banana")


def test_no_warning_when_every_class_qualifies():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EpisodeSampler(["a", "b"] * 5, n_way=2, k_shot=2, n_query=3, episodes=1, seed=0)


def test_too_few_classes_raises_data_error():
    labels = ["a"] * 5 + ["b"] * 5 + ["c"] * 1
    with pytest.raises(DataError) as err:
        EpisodeSampler(labels, n_way=5, k_shot=1, n_query=2, episodes=10, seed=0)
    assert "5 classes" in err.value.message and "only 2 of 3" in err.value.message
    assert err.value.hint


def test_works_on_any_indexable():
    records = [{"label": lab, "path": f"{i}.jpg"} for i, lab in enumerate(pool_labels())]
    sampler = EpisodeSampler([r["label"] for r in records], 3, 1, 1, episodes=3, seed=0)
    for ep in sampler:
        assert [records[i]["label"] for i in ep.query_idx] == ep.classes


@pytest.mark.parametrize(
    "kwargs", [{"n_way": 0}, {"k_shot": -1}, {"n_query": 1.5}, {"episodes": 0}]
)
def test_bad_counts(kwargs):
    args = {"n_way": 2, "k_shot": 1, "n_query": 1, "episodes": 1, **kwargs}
    with pytest.raises(ValueError):
        EpisodeSampler(["a", "b"] * 4, seed=0, **args)
