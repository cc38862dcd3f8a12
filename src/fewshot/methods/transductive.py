"""Transductive episode classifiers: the query set of an episode helps classify itself (issue 30).

Each classifier has the :class:`~fewshot.model.EpisodeClassifier` signature
``(support_x [N*K, D] float32, support_y [N*K] int64, query_x [M, D], n_way) -> [M] int64``,
on L2-normalised embeddings, and is chosen by name (:data:`TRANSDUCTIVE`):

* ``none``: the nearest prototype (cosine), inductive: each query on its own.
* ``bdcspn``: prototype rectification (Liu, Song and Qin, "Prototype Rectification for Few-Shot
  Learning", ECCV 2020, BD-CSPN): the queries are shifted by the difference of the support and
  query means (cross-class bias), then each prototype becomes the mean of its support and of the
  queries pseudo-labelled to it, weighted by ``exp(temperature * cosine)`` (intra-class bias).
* ``tim``: transductive information maximisation (Boudiaf et al., "Information Maximization for
  Few-Shot Learning", NeurIPS 2020, TIM-GD): class weights, started at the prototypes, are
  trained by gradient descent on ``w_ce * CE(support) - (w_marginal * H(mean query prediction)
  - w_conditional * mean H(query prediction))``, logits ``-temperature/2 * ||x - w||^2``.
* ``paddle``: PADDLE (Martin et al., "Towards Practical Few-Shot Query Sets: Transductive Minimum
  Description Length Inference", NeurIPS 2022), for query sets that show only a few of the
  classes: soft k-means from the prototypes, in which a class's share of the queries is a prior
  (``prior_weight * N / M * log share`` for N classes and M queries, at most ``max_weight``: the
  paper's partition-complexity term, its lambda ``prior_weight * N``), so classes that draw no
  queries fade out instead of taking some; capped, because a large weight on a small batch of
  many classes merges them into one. Unlike ``bdcspn`` it does not shift the queries by the
  support mean minus the query mean: that shift assumes the queries cover the classes, and on a
  batch of one article's photos it moves every query to the catalogue's mean (shelf -> studio
  top-1 0.025-0.054 with BD-CSPN, docs/measurements.md).

``bdcspn`` and ``tim`` assume the query set is spread over the classes: TIM's marginal-entropy term pulls the
predictions toward equal class shares. On imbalanced query sets (Veilleux et al., "Realistic
Evaluation of Transductive Few-Shot Learning", NeurIPS 2021) they can fall below ``none``;
``fewshot evaluate --query-imbalance`` measures that. Centring on the catalogue's mean
(SimpleShot, Wang et al. 2019) is a change of the vectors, not a classifier: :func:`centre`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FewshotError
from ..model import EpisodeClassifier
from ..options import check_options, option

__all__ = ["TRANSDUCTIVE", "TimOptions", "PaddleOptions", "rectified_prototypes", "bd_cspn", "tim", "paddle",
           "transductive_classifier", "centre"]

#: the episode classifiers, by name
TRANSDUCTIVE = ("none", "bdcspn", "tim", "paddle")


def _prototypes(support_x: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Unit-length class means, float32 ``[n_way, D]``."""
    sums = torch.zeros(n_way, support_x.shape[1], dtype=support_x.dtype).index_add_(0, support_y, support_x)
    return F.normalize(sums, dim=1)


def _shifted(support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    """BD-CSPN's cross-class bias removed: the queries moved by the support mean minus the
    query mean, then unit length: ``[M, D]``."""
    return F.normalize(query_x + (support_x.mean(0) - query_x.mean(0)), dim=1)


def rectified_prototypes(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n_way: int,
                         temperature: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-CSPN's rectified prototypes and shifted queries (Liu et al. 2020, eq. 5-8).

    Args:
        support_x: float32 ``[N*K, D]``, support_y: int64 ``[N*K]`` in ``0..n_way-1``,
        query_x: float32 ``[M, D]`` (all unit length); temperature: the weights' ``epsilon``.

    Returns:
        ``(prototypes [n_way, D], queries [M, D])``, both unit length.
    """
    queries = _shifted(support_x, query_x)
    protos = _prototypes(support_x, support_y, n_way)
    pseudo = (queries @ protos.T).argmax(1)
    x = torch.cat([support_x, queries])
    y = torch.cat([support_y, pseudo])
    w = torch.exp(temperature * (x * protos[y]).sum(1))
    sums = torch.zeros_like(protos).index_add_(0, y, w[:, None] * x)
    return F.normalize(sums, dim=1), queries


def bd_cspn(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n_way: int) -> torch.Tensor:
    """The nearest rectified prototype of each query (:func:`rectified_prototypes`): int64 ``[M]``."""
    protos, queries = rectified_prototypes(support_x, support_y, query_x, n_way)
    return (queries @ protos.T).argmax(1)


@dataclass(frozen=True)
class TimOptions:
    """TIM-GD's settings (Boudiaf et al. 2020; the weights are the paper's, the steps fewer)."""

    temperature: float = option(15.0, "Logit scale.", min=0.0)
    steps: int = option(50, "Gradient steps per episode.", min=1)
    lr: float = option(1e-3, "Adam learning rate.", min=0.0)
    w_ce: float = option(0.1, "Weight of the support cross-entropy.", min=0.0)
    w_marginal: float = option(1.0, "Weight of the marginal entropy of the query predictions.", min=0.0)
    w_conditional: float = option(0.1, "Weight of the conditional entropy of the query predictions.", min=0.0)

    def __post_init__(self) -> None:
        check_options("TIM", self)


def _tim_logits(x: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-temperature / 2 * ||x - w||^2`` for unit ``x``: ``[M, n_way]``."""
    return temperature * (x @ w.T - 0.5 * (w * w).sum(1) - 0.5)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread: TIM's steps are tiny matrix products, for which a second
    thread costs more in hand-over than it saves (8x slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tim(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n_way: int,
        opts: TimOptions = TimOptions()) -> torch.Tensor:
    """TIM-GD's prediction for each query, int64 ``[M]`` (see the module docstring); runs on one
    torch thread (restored after)."""
    with _one_thread(), torch.enable_grad():
        w = _prototypes(support_x, support_y, n_way).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=opts.lr)
        for _ in range(opts.steps):
            ce = F.cross_entropy(_tim_logits(support_x, w, opts.temperature), support_y)
            p = _tim_logits(query_x, w, opts.temperature).softmax(1)
            conditional = -(p * torch.log(p + 1e-12)).sum(1).mean()
            marginal_p = p.mean(0)
            marginal = -(marginal_p * torch.log(marginal_p + 1e-12)).sum()
            loss = opts.w_ce * ce - (opts.w_marginal * marginal - opts.w_conditional * conditional)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return _tim_logits(query_x, w, opts.temperature).argmax(1)


@dataclass(frozen=True)
class PaddleOptions:
    """PADDLE's settings (Martin et al. 2022), chosen on the val articles of
    ``splits/grocery-unseen.json`` (docs/measurements.md)."""

    temperature: float = option(100.0, "Scale of the squared distances in the soft assignments.", min=0.0)
    prior_weight: float = option(20.0, "The partition-complexity weight per class: each assignment gets "
                                 "prior_weight * N / M * log(class share) for N classes and M queries (the "
                                 "paper's lambda is prior_weight * N), at most max_weight.", min=0.0)
    max_weight: float = option(2.0, "The largest weight of log(class share): the weight grows as the batch shrinks, "
                               "and uncapped a small batch of many articles collapses onto one (batches of 20 "
                               "photos of 20 articles: 4% right).", min=0.0)
    steps: int = option(30, "Alternating updates (assignments, shares, prototypes).", min=1)

    def __post_init__(self) -> None:
        check_options("PADDLE", self)


def paddle(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n_way: int,
           opts: PaddleOptions = PaddleOptions(), support_weight: torch.Tensor | None = None) -> torch.Tensor:
    """PADDLE's prediction for each query, int64 ``[M]``: ``opts.steps`` rounds of (1) soft
    assignments ``softmax(-temperature/2 * ||x - w_k||^2 + min(prior_weight * N / M, max_weight) * log pi_k)``
    (``N = n_way``, ``M`` queries), (2) class shares ``pi_k`` = the mean assignment, (3) each prototype
    ``w_k`` = the unit-length mean of its support and of the queries weighted by their assignment.
    Inputs as :func:`bd_cspn` (unit length); any number of queries, from one. ``support_weight``
    float32 ``[N*K]`` (default 1 each): how many photos each support vector stands for, e.g. an
    article's image count when the support is the catalogue's prototypes."""
    w = _prototypes(support_x, support_y, n_way)
    onehot = F.one_hot(support_y, n_way).to(support_x.dtype)
    if support_weight is not None:
        onehot = onehot * support_weight.to(support_x.dtype)[:, None]
    support_sum, support_count = onehot.T @ support_x, onehot.sum(0)
    weight = min(opts.prior_weight * n_way / len(query_x), opts.max_weight)
    log_share = torch.zeros(n_way, dtype=support_x.dtype)
    for _ in range(opts.steps):
        p = (_tim_logits(query_x, w, opts.temperature) + weight * log_share).softmax(1)
        log_share = torch.log(p.mean(0) + 1e-6)
        w = F.normalize((support_sum + p.T @ query_x) / (support_count + p.sum(0))[:, None], dim=1)
    return (_tim_logits(query_x, w, opts.temperature) + weight * log_share).argmax(1)


def transductive_classifier(name: str) -> EpisodeClassifier | None:
    """The classifier called ``name`` (:data:`TRANSDUCTIVE`); ``None`` for ``"none"`` (the default
    nearest prototype of :func:`fewshot.metrics.episodic_accuracy`).

    Raises:
        FewshotError: an unknown name, naming ``transductive``.
    """
    if name not in TRANSDUCTIVE:
        raise FewshotError(f"unknown option transductive = {name!r}", hint=f"use one of: {', '.join(TRANSDUCTIVE)}",
                           options=("transductive",))
    return {"none": None, "bdcspn": bd_cspn, "tim": tim, "paddle": paddle}[name]


def centre(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """SimpleShot's centring (Wang et al., "SimpleShot", 2019, CL2N): ``normalise(normalise(x) - mean)``,
    float32 ``[N, D]``; ``mean`` float32 ``[D]`` is the mean of the unit-length catalogue vectors."""
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12) - mean
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
