"""The maths shared by the methods and the metrics: prototypes, distances, nearest prototype.

Prototypical networks (Snell, Swersky and Zemel, NeurIPS 2017): a class's prototype is the mean
of its support embeddings (eq. 1), and a query is classified by its distance to the prototypes
(eq. 2). One implementation serves training (:mod:`.protonet`, :mod:`.maml`'s proto init) and
evaluation (:func:`fewshot.metrics.episodic_accuracy`).

Shapes: ``support [S, E]`` (or batched ``[B, S, E]``), ``support_y`` int64 ``[S]`` (``[B, S]``)
way indices in ``0..N-1``, ``query [Q, E]`` (``[B, Q, E]``); all float32 unless noted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prototypes", "squared_euclidean", "prototype_classifier", "sqeuclidean_prototype_classifier"]


def prototypes(support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means (eq. 1 of Snell et al.).

    Args:
        support: float ``[S, E]`` (or batched ``[B, S, E]``) embeddings.
        support_y: int64 ``[S]`` (or ``[B, S]``) way indices in ``0..n_way-1``.
        n_way: N.

    Returns:
        float ``[N, E]`` (or ``[B, N, E]``); a way without support items gets a zero vector.
        Differentiable (training uses it).
    """
    batched = support.ndim == 3
    if not batched:
        support, support_y = support[None], support_y[None]
    onehot = F.one_hot(support_y.long(), n_way).to(support.dtype)  # [B, S, N]
    sums = onehot.transpose(1, 2) @ support  # [B, N, E]
    protos = sums / onehot.sum(1).clamp_min(1.0).unsqueeze(2)
    return protos if batched else protos[0]


def squared_euclidean(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """``||q - c||^2`` for every query / prototype pair: ``[Q, E] x [N, E] -> [Q, N]``
    (also batched ``[B, Q, E] x [B, N, E] -> [B, Q, N]``), via the expansion
    ``||q||^2 - 2 q.c + ||c||^2`` (one matmul), clamped at 0."""
    qq = query.pow(2).sum(-1, keepdim=True)
    cc = protos.pow(2).sum(-1).unsqueeze(-2)
    return (qq - 2.0 * query @ protos.transpose(-1, -2) + cc).clamp_min(0.0)


def _episode_prototypes(support_x: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """:func:`prototypes` of batched episodes, with a fast path for the class-major layout that
    :class:`~fewshot.data.episodes.EpisodeSampler` yields (``[0]*K + [1]*K + ...``)."""
    e, n_support, d = support_x.shape
    k = n_support // n_way
    class_major = torch.arange(n_way).repeat_interleave(k)
    if k * n_way == n_support and bool((support_y == class_major).all()):
        return support_x.view(e, n_way, k, d).mean(dim=2)
    return prototypes(support_x, support_y, n_way)


@torch.no_grad()
def prototype_classifier(
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    n_way: int,
    *,
    cosine: bool = True,
) -> torch.Tensor:
    """Nearest-prototype prediction (Snell et al. 2017) for one or a batch of episodes.

    Args:
        support_x: float ``[N*K, D]`` or batched ``[E, N*K, D]``.
        support_y: int64 ``[N*K]`` (or ``[E, N*K]``) way indices in ``0..N-1``.
        query_x: float ``[N*Q, D]`` or ``[E, N*Q, D]``.
        n_way: N.
        cosine: cosine similarity to the (re-normalised) prototypes; ``False``: squared
            Euclidean distance (:func:`squared_euclidean`, the argmax of eq. 2).

    Returns:
        int64 ``[N*Q]`` (or ``[E, N*Q]``) predicted way index; ties go to the lower index.
    """
    batched = support_x.ndim == 3
    support_x, support_y, query_x = (torch.as_tensor(t) for t in (support_x, support_y, query_x))
    if not batched:
        support_x, support_y, query_x = support_x[None], support_y[None], query_x[None]
    protos = _episode_prototypes(support_x.float(), support_y, n_way)
    if cosine:
        # the query's own norm does not change its argmax, so only prototypes are normalised
        scores = torch.bmm(query_x.float(), F.normalize(protos, dim=2).transpose(1, 2))
    else:
        scores = -squared_euclidean(query_x.float(), protos)
    pred = scores.argmax(dim=2)
    return pred if batched else pred[0]


def sqeuclidean_prototype_classifier(support_z: torch.Tensor, support_y: torch.Tensor,
                                     query_z: torch.Tensor, n_way: int) -> torch.Tensor:
    """Nearest prototype under squared Euclidean distance (Snell et al. eq. 2 argmax):
    ``[N*K, E], [N*K], [N*Q, E] -> int64 [N*Q]``; how a ProtoNet run classifies episodes."""
    return prototype_classifier(support_z, support_y, query_z, n_way, cosine=False)
