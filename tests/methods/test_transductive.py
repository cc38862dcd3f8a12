"""Transductive episode classifiers (fewshot.methods.transductive): a rectified prototype computed
by hand, TIM fixing an episode the nearest prototype gets wrong, centring, and imbalanced query
sets in episodic_accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot.errors import FewshotError
from fewshot.methods.transductive import (PaddleOptions, TimOptions, bd_cspn, centre, paddle, rectified_prototypes,
                                          tim, transductive_classifier)
from fewshot.metrics import episodic_accuracy


def test_rectified_prototypes_by_hand():
    sx = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sy = torch.tensor([0, 1])
    qx = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    protos, queries = rectified_prototypes(sx, sy, qx, 2, temperature=10.0)
    # shift by mean(support) - mean(query) = (-0.2, -0.2): (0.6, 0.4) and (0.4, 0.6), unit length
    a = np.array([0.6, 0.4]) / math.hypot(0.6, 0.4)
    np.testing.assert_allclose(queries.numpy(), [a, a[::-1]], atol=1e-6)
    # class 0: its support (1, 0) weighs exp(10 * 1), its pseudo-labelled query exp(10 * cos) = exp(10 * a[0])
    p0 = math.exp(10) * np.array([1.0, 0.0]) + math.exp(10 * a[0]) * a
    p0 /= np.linalg.norm(p0)
    np.testing.assert_allclose(protos[0].numpy(), p0, atol=1e-6)
    np.testing.assert_allclose(protos[1].numpy(), p0[::-1], atol=1e-6)
    assert bd_cspn(sx, sy, qx, 2).tolist() == [0, 1]


def _shifted_episode(seed=0):
    """2-way 1-shot on the unit circle: class 0's queries around 0 degrees, class 1's around 60;
    the support photos sit at 30 and 100 degrees, so the nearest prototype puts class 1 in class 0."""
    rng = np.random.default_rng(seed)
    at = lambda deg: np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], axis=-1)  # noqa: E731
    queries = np.concatenate([at(0 + 3 * rng.normal(size=10)), at(60 + 3 * rng.normal(size=10))])
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return t(at(np.array([30.0, 100.0]))), torch.tensor([0, 1]), t(queries), torch.tensor([0] * 10 + [1] * 10)


def test_tim_fixes_an_episode_the_prototype_gets_wrong():
    sx, sy, qx, qy = _shifted_episode()
    protos = torch.nn.functional.normalize(sx, dim=1)
    inductive = (qx @ protos.T).argmax(1)
    assert (inductive == qy).float().mean() == 0.5
    accuracy = [float((tim(sx, sy, qx, 2, TimOptions(steps=n)) == qy).float().mean()) for n in (50, 300)]
    assert 0.5 < accuracy[0] < accuracy[1] == 1.0  # each step moves the class weights toward the query clusters
    assert (tim(sx, sy, qx, 2, TimOptions(steps=1, lr=1e-6)) == inductive).all()  # barely moved: the prototypes


def _at(degrees) -> torch.Tensor:
    d = np.radians(np.asarray(degrees, dtype=np.float64))
    return torch.tensor(np.stack([np.cos(d), np.sin(d)], axis=-1), dtype=torch.float32)


def _paddle_reference(sx, sy, qx, n_way, t, prior_weight, steps, support_weight=None, max_weight=2.0):
    """PADDLE written out in numpy, loop by loop (float64), for the cross-check below."""
    sx, q = sx.numpy().astype(np.float64), qx.numpy().astype(np.float64)
    sw = np.ones(len(sx)) if support_weight is None else np.asarray(support_weight, dtype=np.float64)
    w = np.stack([sx[sy.numpy() == k].mean(0) for k in range(n_way)])
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    weight = min(prior_weight * n_way / len(q), max_weight)
    log_share = np.zeros(n_way)
    for _ in range(steps):
        scores = np.array([[-t / 2 * np.sum((qi - wk) ** 2) + weight * log_share[k] for k, wk in enumerate(w)]
                           for qi in q])
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        log_share = np.log(p.mean(0) + 1e-6)
        for k in range(n_way):
            mine = sy.numpy() == k
            w[k] = ((sw[mine, None] * sx[mine]).sum(0) + (p[:, k:k + 1] * q).sum(0)) / (sw[mine].sum() + p[:, k].sum())
            w[k] /= np.linalg.norm(w[k])
    scores = np.array([[-t / 2 * np.sum((qi - wk) ** 2) + weight * log_share[k] for k, wk in enumerate(w)] for qi in q])
    return scores.argmax(1).tolist()


def test_paddle_matches_a_numpy_reference():
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(3, 6))
    unit = lambda a: torch.nn.functional.normalize(torch.tensor(a, dtype=torch.float32), dim=1)  # noqa: E731
    sx, sy = unit(centres + 0.6 * rng.normal(size=(3, 6))), torch.arange(3)
    qx = unit(np.repeat(centres, [9, 2, 1], axis=0) + 0.6 * rng.normal(size=(12, 6)))  # imbalanced: 9 / 2 / 1
    answers = {}
    for prior_weight in (0.0, 4.0):
        for steps in (1, 5):
            opts = PaddleOptions(temperature=20.0, prior_weight=prior_weight, steps=steps)
            answers[prior_weight, steps] = paddle(sx, sy, qx, 3, opts).tolist()
            assert answers[prior_weight, steps] == _paddle_reference(sx, sy, qx, 3, 20.0, prior_weight, steps)
    assert answers[0.0, 5] != answers[4.0, 5]  # the class-share prior changes answers in this case
    # support vectors that stand for several photos each (a catalogue's prototypes and image counts)
    heavy = torch.tensor([30.0, 1.0, 1.0])
    weighted = paddle(sx, sy, qx, 3, PaddleOptions(temperature=20.0, prior_weight=4.0, steps=5), support_weight=heavy)
    assert weighted.tolist() == _paddle_reference(sx, sy, qx, 3, 20.0, 4.0, 5, support_weight=heavy.numpy())
    assert weighted.tolist() != answers[4.0, 5]  # a heavy support vector moves less


def test_paddle_lets_a_class_that_draws_no_queries_fade():
    """Four articles on the unit circle; the queries show two of them (0 and 2, around 20 and 200
    degrees). The nearest prototype gives the queries past 25 degrees to article 1 (at 50);
    PADDLE's class-share prior takes them back, and without the prior its soft k-means does worse
    than the nearest prototype. A batch of one article's photos: BD-CSPN moves them all to the
    support mean, PADDLE does not."""
    rng = np.random.default_rng(0)
    sx, sy = _at([0.0, 50.0, 180.0, 230.0]), torch.arange(4)
    around = 20 + 6 * rng.normal(size=12)
    qx, qy = _at(np.concatenate([around, around + 180])), torch.tensor([0] * 12 + [2] * 12)
    right = lambda pred: float((pred == qy).float().mean())  # noqa: E731
    assert right((qx @ sx.T).argmax(1)) == pytest.approx(20 / 24)
    assert right(paddle(sx, sy, qx, 4)) == 1.0
    assert right(paddle(sx, sy, qx, 4, PaddleOptions(prior_weight=0.0))) == pytest.approx(16 / 24)
    one = qx[:12]  # the photos of article 0 alone
    assert paddle(sx, sy, one, 4).tolist() == [0] * 12
    assert float((bd_cspn(sx, sy, one, 4) == 0).float().mean()) < 0.5
    with pytest.raises(FewshotError):
        PaddleOptions(steps=0)


def test_paddle_does_not_merge_a_small_batch_of_many_articles():
    """Ten photos of ten different articles among twenty (18 degrees apart): the prior's weight,
    20 x 20 / 10 = 40 uncapped, merges them onto a few articles; capped at 2 it does not."""
    rng = np.random.default_rng(0)
    sx, sy = _at(np.arange(20) * 18.0), torch.arange(20)
    shown = rng.choice(20, 10, replace=False)
    qx = _at(shown * 18.0 + 3 * rng.normal(size=10))
    capped = paddle(sx, sy, qx, 20).numpy()
    uncapped = paddle(sx, sy, qx, 20, PaddleOptions(max_weight=1e9)).numpy()
    assert (capped == shown).mean() >= 0.9 and len(set(capped)) >= 9
    assert (uncapped == shown).mean() <= 0.5 and len(set(uncapped)) <= 5


def test_classifier_names_options_and_centring():
    assert transductive_classifier("none") is None
    assert transductive_classifier("tim") is tim and transductive_classifier("bdcspn") is bd_cspn
    assert transductive_classifier("paddle") is paddle
    with pytest.raises(FewshotError) as exc:
        transductive_classifier("magic")
    assert exc.value.options == ("transductive",)
    with pytest.raises(FewshotError):
        TimOptions(steps=0)
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    mean = np.array([0.3, 0.9], dtype=np.float32)
    expect = np.array([[0.6 - 0.3, 0.8 - 0.9], [0.0 - 0.3, 1.0 - 0.9]])
    np.testing.assert_allclose(centre(x, mean), expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-6)


def _pool(classes=8, per=20, dim=12, seed=0, spread=0.2):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(classes), per)


def test_imbalanced_query_sets():
    x, y = _pool()
    counts = []

    def recording(sx, sy, qx, n):  # a perfect classifier on these clusters: its answers are the true ways
        protos = torch.nn.functional.normalize(torch.stack([sx[sy == c].mean(0) for c in range(n)]), dim=1)
        pred = (qx @ protos.T).argmax(1)
        counts.append(np.bincount(pred.numpy(), minlength=n))
        return pred

    kwargs = dict(n_way=5, k_shot=1, n_query=4, episodes=40, seed=3)
    r = episodic_accuracy(x, y, classifier=recording, query_imbalance=0.5, **kwargs)
    counts = np.array(counts)
    assert r.accuracy == 1.0 and r.n_query == 4 and len(counts) == 40
    assert set(counts.sum(1)) <= {19, 20}  # 5 x 4 queries; a class has 19 beside its support to give
    assert (counts.max(1) >= 8).mean() > 0.5 and (counts == 0).any()  # balanced would be 4 each
    again = episodic_accuracy(x, y, query_imbalance=0.5, **kwargs)  # the default classifier: same episodes, same result
    assert again.accuracy == 1.0
    np.testing.assert_array_equal(episodic_accuracy(x, y, query_imbalance=0.5, **kwargs).per_episode, again.per_episode)
    with pytest.raises(ValueError, match="query_imbalance"):
        episodic_accuracy(x, y, query_imbalance=0.0, **kwargs)
    # cross-visit: the balanced protocol's classes (6 query photos each are enough for 4 queries), and an
    # imbalanced episode takes at most a class's own 6
    q, qy = _pool(per=6, seed=0)
    sizes = []
    kw = dict(n_way=5, k_shot=1, n_query=4, episodes=30, seed=0, query_embeddings=q, query_labels=qy)
    episodic_accuracy(x, y, classifier=lambda sx, sy, qx, n: sizes.append(len(qx)) or torch.zeros(len(qx)),
                      query_imbalance=0.5, **kw)
    assert len(sizes) == 30 and max(sizes) <= 20 and min(sizes) >= 6 and len(set(sizes)) > 2


def test_transductive_loses_on_imbalanced_queries_and_gains_on_balanced_ones():
    """Veilleux et al. 2021's finding, on a noisy synthetic pool: TIM's class-balance prior
    helps when queries are spread over the classes and hurts when they are not."""
    x, y = _pool(classes=10, per=40, dim=16, spread=1.0, seed=1)
    kwargs = dict(n_way=5, k_shot=1, n_query=5, episodes=30, seed=0)
    base = episodic_accuracy(x, y, **kwargs).accuracy
    assert episodic_accuracy(x, y, classifier=tim, **kwargs).accuracy > base + 0.03
    base_imb = episodic_accuracy(x, y, query_imbalance=0.5, **kwargs).accuracy
    assert episodic_accuracy(x, y, classifier=tim, query_imbalance=0.5, **kwargs).accuracy < base_imb - 0.03
