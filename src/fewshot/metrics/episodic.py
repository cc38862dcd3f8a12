"""Episodic N-way K-shot accuracy on fixed embeddings.

The default classifier is the nearest prototype of prototypical networks (Snell, Swersky and
Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017): each class's prototype is
the mean of its support embeddings, and a query takes the class of the most similar
prototype. With ``normalize=True`` (the default) the embeddings are L2-normalised first and
the similarity is the cosine (prototype re-normalised); with ``normalize=False`` the raw
embeddings are used with the negative squared Euclidean distance, as in Snell et al.

Reported as the mean accuracy over episodes with a 95% confidence interval
``ci95 = 1.96 * std(per_episode, ddof=0) / sqrt(episodes)`` (the convention of the
prototypical-network and "closer look at few-shot" code bases). That normal approximation
needs many episodes: below :data:`MIN_EPISODES_FOR_CI` episodes no interval is reported
(``ci95`` is ``None``; with one episode the formula would give a false ``+- 0``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from fewshot.checks import as_embeddings, as_list
from fewshot.data.episodes import EpisodeSampler
from fewshot.methods.functional import prototype_classifier
from fewshot.model import EpisodeClassifier
from fewshot.errors import DataError

__all__ = ["EpisodicResult", "episodic_accuracy", "episodic_by_group", "prototype_classifier",
           "MIN_EPISODES_FOR_CI", "format_accuracy"]

#: fewest episodes for which a 95% confidence interval is reported
MIN_EPISODES_FOR_CI = 30

logger = logging.getLogger("fewshot")

#: float32 elements per batch of episodes for the vectorised default classifier
_BATCH_ELEMENTS = 1 << 22


@dataclass
class EpisodicResult:
    """Accuracy over ``episodes`` N-way K-shot episodes.

    Attributes:
        accuracy: mean of the per-episode query accuracies.
        ci95: ``1.96 * std(per_episode, ddof=0) / sqrt(episodes)``; ``None`` below
            :data:`MIN_EPISODES_FOR_CI` episodes.
        episodes, n_way, k_shot, n_query: the protocol.
        per_episode: float64 ``[episodes]`` accuracy of each episode.
    """

    accuracy: float
    ci95: float | None
    episodes: int
    n_way: int
    k_shot: int
    n_query: int
    per_episode: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without ``per_episode``)."""
        d = asdict(self)
        d.pop("per_episode")
        return d


def _as_embeddings(x: Any, name: str) -> torch.Tensor:
    return torch.from_numpy(as_embeddings(x, name))


def episodic_accuracy(
    embeddings: np.ndarray,
    labels: Sequence,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    query_embeddings: np.ndarray | None = None,
    query_labels: Sequence | None = None,
    classifier: EpisodeClassifier | None = None,
    normalize: bool = True,
    warn: bool = True,
    query_imbalance: float | None = None,
) -> EpisodicResult:
    """Mean N-way K-shot accuracy (with a 95% CI) over seeded episodes.

    Args:
        embeddings: float32 ``[N, D]`` (numpy or tensor): the support pool, and the query pool
            unless ``query_embeddings`` is given.
        labels: ``N`` labels.
        n_way, k_shot, n_query: the protocol (see :class:`~fewshot.data.episodes.EpisodeSampler`).
        episodes: number of episodes.
        seed: episode sampling seed (same seed, same episodes, same result).
        query_embeddings: float32 ``[M, D]``: draw queries from here (cross-visit protocol:
            support from the gallery photos, queries from the query photos).
        query_labels: ``M`` labels; required with ``query_embeddings``.
        classifier: ``classifier(support_x [N*K, D] float32 tensor, support_y [N*K] int64,
            query_x [N*Q, D], n_way) -> predicted [N*Q] int64`` (tensor or array), called once
            per episode; it receives L2-normalised embeddings when ``normalize=True``. Default:
            :func:`prototype_classifier`, vectorised over batches of episodes.
        normalize: L2-normalise embeddings and use cosine similarity (default); ``False``:
            raw embeddings, and the default classifier uses squared Euclidean distance.
        warn: log the classes left out for having too few items (``False`` when the same
            data is evaluated again, e.g. every training epoch).
        query_imbalance: ``None`` (balanced: ``n_query`` queries per class) or the concentration
            ``a > 0`` of imbalanced query sets (Veilleux et al., NeurIPS 2021): the episodes'
            classes and support are the balanced protocol's; each episode then draws class shares
            from a symmetric Dirichlet(``a``) and up to ``n_way * n_query`` queries by them from
            each class's own query items (a class gives at most what it has, so an episode may hold
            fewer; smaller ``a`` is more imbalanced, and a class may get no query).

    Returns:
        :class:`EpisodicResult`.

    Raises:
        ValueError: bad shapes, mismatched lengths or dimensions, non-finite values,
            ``query_embeddings`` without ``query_labels`` (or the reverse), a classifier output
            of the wrong shape.
        fewshot.errors.DataError: fewer than ``n_way`` classes have enough items.
    """
    x = _as_embeddings(embeddings, "embeddings")
    y = as_list(labels, x.shape[0], "labels")
    if (query_embeddings is None) != (query_labels is None):
        raise ValueError("query_embeddings and query_labels must be given together")
    if query_embeddings is not None:
        xq = _as_embeddings(query_embeddings, "query_embeddings")
        yq = as_list(query_labels, xq.shape[0], "query_labels")
        if xq.shape[1] != x.shape[1]:
            raise ValueError(
                f"embeddings have dimension {x.shape[1]} but query_embeddings {xq.shape[1]}"
            )
    else:
        xq, yq = x, None
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        xq = x if yq is None else torch.nn.functional.normalize(xq, dim=1)

    sampler = EpisodeSampler(y, n_way, k_shot, n_query, episodes, seed, query_labels=yq, warn=warn)
    classes, support_idx, query_idx = sampler.index_arrays()
    support_idx = torch.from_numpy(support_idx)
    query_idx = torch.from_numpy(query_idx)
    n, k, q = sampler.n_way, sampler.k_shot, sampler.n_query
    support_y = torch.arange(n).repeat_interleave(k)
    query_y = torch.arange(n).repeat_interleave(q)

    if query_imbalance is not None:
        drawn = _imbalanced_queries(yq if yq is not None else y, classes, support_idx if yq is None else None,
                                    n * n_query, float(query_imbalance), seed)
        per_episode = _per_episode(x, xq, support_idx, drawn, support_y, n, classifier or _nearest_prototype(normalize))
    elif classifier is None:
        per_episode = _batched(x, xq, support_idx, query_idx, support_y, query_y, n, k, q, normalize)
    else:
        per_episode = _per_episode(x, xq, support_idx, [(query_idx[e], query_y) for e in range(len(query_idx))],
                                   support_y, n, classifier)
    accuracy = float(per_episode.mean())
    ci95 = (float(1.96 * per_episode.std(ddof=0) / math.sqrt(len(per_episode)))
            if len(per_episode) >= MIN_EPISODES_FOR_CI else None)
    return EpisodicResult(
        accuracy=accuracy,
        ci95=ci95,
        episodes=sampler.episodes,
        n_way=n,
        k_shot=k,
        n_query=q,
        per_episode=per_episode,
    )


def _batched(x: torch.Tensor, xq: torch.Tensor, support_idx: torch.Tensor, query_idx: torch.Tensor,
             support_y: torch.Tensor, query_y: torch.Tensor, n: int, k: int, q: int, normalize: bool) -> np.ndarray:
    """Per-episode accuracy of the nearest prototype, vectorised over batches of episodes."""
    episodes = support_idx.shape[0]
    correct = torch.empty(episodes, dtype=torch.float64)
    per_batch = max(1, _BATCH_ELEMENTS // (n * (k + q) * x.shape[1]))
    # reused buffers: fresh multi-MB allocations (page faults) would dominate the time
    s_buf = torch.empty(per_batch * n * k, x.shape[1])
    q_buf = torch.empty(per_batch * n * q, x.shape[1])
    for a in range(0, episodes, per_batch):
        b = min(episodes, a + per_batch)
        sx = s_buf[: (b - a) * n * k]
        qx = q_buf[: (b - a) * n * q]
        torch.index_select(x, 0, support_idx[a:b].reshape(-1), out=sx)
        torch.index_select(xq, 0, query_idx[a:b].reshape(-1), out=qx)
        sx, qx = sx.view(b - a, n * k, -1), qx.view(b - a, n * q, -1)
        pred = prototype_classifier(sx, support_y.expand(b - a, -1), qx, n, cosine=normalize)
        correct[a:b] = (pred == query_y).double().mean(dim=1)
    return correct.numpy()


def _nearest_prototype(normalize: bool) -> EpisodeClassifier:
    return lambda sx, sy, qx, n: prototype_classifier(sx, sy, qx, n, cosine=normalize)


def _per_episode(x: torch.Tensor, xq: torch.Tensor, support_idx: torch.Tensor,
                 queries: list[tuple[torch.Tensor, torch.Tensor]], support_y: torch.Tensor, n: int,
                 classifier: EpisodeClassifier) -> np.ndarray:
    """Per-episode accuracy of ``classifier``, called once per episode on its ``(query indices,
    way labels)``."""
    correct = np.empty(support_idx.shape[0], dtype=np.float64)
    for e, (qi, qy) in enumerate(queries):
        pred = torch.as_tensor(classifier(x[support_idx[e]], support_y.clone(), xq[qi], n))
        if pred.shape != qy.shape:
            raise ValueError(f"classifier returned shape {tuple(pred.shape)}, expected {tuple(qy.shape)}")
        correct[e] = float((pred.long() == qy).double().mean())
    return correct


def _imbalanced_queries(query_labels: list, classes: list[list], support_idx: torch.Tensor | None, total: int,
                        concentration: float, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per episode, ``(query indices, way labels)`` of an imbalanced query set: ``total`` queries
    split by Dirichlet(``concentration``) shares over the episode's classes, each class's drawn
    without replacement from its own query items (at most what it has; ``support_idx`` given
    when queries and support share one pool: the episode's support is left out) (Veilleux et al. 2021)."""
    if not (math.isfinite(concentration) and concentration > 0):
        raise ValueError(f"query_imbalance must be a positive number, got {concentration!r}")
    by_label: dict = {}
    for i, label in enumerate(query_labels):
        by_label.setdefault(label, []).append(i)
    pools = {label: np.asarray(idx, dtype=np.int64) for label, idx in by_label.items()}
    rng = np.random.default_rng([seed, 30])
    out = []
    for e, names in enumerate(classes):
        counts = rng.multinomial(total, rng.dirichlet([concentration] * len(names)))
        support = support_idx[e].numpy() if support_idx is not None else np.empty(0, np.int64)
        idx, ways = [], []
        for way, (label, m) in enumerate(zip(names, counts)):
            pool = np.setdiff1d(pools[label], support, assume_unique=True)
            pick = rng.choice(pool, size=min(int(m), len(pool)), replace=False)
            idx.append(pick)
            ways.append(np.full(len(pick), way, dtype=np.int64))
        out.append((torch.from_numpy(np.concatenate(idx)), torch.from_numpy(np.concatenate(ways))))
    return out


def format_accuracy(accuracy: float, ci95: float | None, episodes: int) -> str:
    """``"0.8520 +- 0.0070"``, or ``"0.8520 (95% CI n/a: 3 episodes, fewer than 30)"``."""
    if ci95 is None:
        return f"{accuracy:.4f} (95% CI n/a: {episodes} episodes, fewer than {MIN_EPISODES_FOR_CI})"
    return f"{accuracy:.4f} +- {ci95:.4f}"


def episodic_by_group(
    embeddings: np.ndarray,
    labels: Sequence,
    groups: Sequence,
    *,
    query_embeddings: np.ndarray | None = None,
    query_labels: Sequence | None = None,
    query_groups: Sequence | None = None,
    **kwargs: Any,
) -> dict[str, EpisodicResult]:
    """:func:`episodic_accuracy` within each group (brand / coarse class) separately.

    Episodes of a group only use classes of that group, so this measures how well the
    embedding tells apart *similar* articles. Groups with fewer than ``n_way`` eligible
    classes are left out with a log warning. Items whose group is ``None`` are ignored.

    Args:
        embeddings, labels: as in :func:`episodic_accuracy`.
        groups: ``N`` group names, one per embedding.
        query_embeddings, query_labels, query_groups: the cross-visit query pool and its
            groups (all three or none).
        **kwargs: passed on to :func:`episodic_accuracy` (``n_way``, ``k_shot``, ...).

    Returns:
        ``{group: EpisodicResult}`` for the groups that could be evaluated, sorted by name.
    """
    x = _as_embeddings(embeddings, "embeddings").numpy()
    y = as_list(labels, x.shape[0], "labels")
    g = as_list(groups, x.shape[0], "groups")
    cross = query_embeddings is not None
    if cross != (query_labels is not None) or cross != (query_groups is not None):
        raise ValueError("query_embeddings, query_labels and query_groups go together")
    if cross:
        xq = _as_embeddings(query_embeddings, "query_embeddings").numpy()
        yq = as_list(query_labels, xq.shape[0], "query_labels")
        gq = as_list(query_groups, xq.shape[0], "query_groups")
    names = sorted({str(v) for v in g if v is not None})
    out: dict[str, EpisodicResult] = {}
    for name in names:
        idx = [i for i, v in enumerate(g) if v is not None and str(v) == name]
        extra: dict[str, Any] = {}
        if cross:
            qidx = [i for i, v in enumerate(gq) if v is not None and str(v) == name]
            if not qidx:
                logger.warning("episodic_by_group: group %r has no query items; skipped", name)
                continue
            extra = {
                "query_embeddings": xq[qidx],
                "query_labels": [yq[i] for i in qidx],
            }
        try:
            out[name] = episodic_accuracy(x[idx], [y[i] for i in idx], **extra, **kwargs)
        except DataError as err:
            logger.warning("episodic_by_group: group %r skipped: %s", name, err.message)
    return out
