"""Prototypical networks (Snell, Swersky and Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017), trained episodically on cached backbone embeddings.

Model: frozen pretrained backbone (embeddings cached on disk) followed by a projection head
``f_phi`` from :mod:`fewshot.methods.heads` whose output is L2-normalised.

One episode (N ways, K shots, Q queries per class), all tensors ``float32`` unless noted::

    support_x  [N*K, D]   backbone embeddings of the support set      support_y [N*K] int64
    query_x    [N*Q, D]   backbone embeddings of the queries          query_y   [N*Q] int64
    z = f_phi(x)          [*, E]  head output, ||z|| = 1

    c_k = 1/K * sum_{i: y_i = k} f_phi(x_i)                 (eq. 1; prototypes [N, E])
    d(z, c_k) = ||z - c_k||^2 = ||z||^2 - 2 z.c_k + ||c_k||^2   (squared Euclidean, [N*Q, N])
    p(y = k | x) = softmax_k( -s * d(f_phi(x), c_k) )        (eq. 2; s > 0 a learned scale)
    J(phi, s) = -1/(N*Q) * sum_q log p(y_q | x_q)            (cross-entropy over the queries)

The paper uses ``s = 1`` on unnormalised features. Here the head's output is L2-normalised, so
``d = 1 - 2 z.c + ||c||^2`` lies in ``[0, 4]`` and a fixed ``s = 1`` gives nearly uniform
softmaxes; the scale (a temperature, as in TADAM, Oreshkin et al. 2018) is therefore learned,
parameterised as ``s = exp(log_scale)`` (saved in the run as ``method.log_scale``).

Defaults chosen for few training classes (measured on Grocery: a free MLP head overfits the
~34 training classes and hurts unseen articles): a *linear* head initialised to the
identity, on features centred by the mean training embedding (SimpleShot's CL2N, Wang et al.
2019), a small learning rate, so training starts from the frozen backbone's geometry and
moves it only as far as the validation MAP@R improves (best-epoch selection by the trainer).

At test time a loaded run classifies episodes as it was trained: nearest prototype under
squared Euclidean distance (:func:`sqeuclidean_prototype_classifier`, the argmax of eq. 2; it
differs from the cosine prototype classifier only through the prototype norms ``||c_k||``, and
measured the same within 0.1 point on Grocery). Retrieval uses the head's embeddings with
cosine similarity, like every other model.

Speed: one 5-way 5-shot 5-query episode is one head forward and backward on ``[50, 1280]`` plus
an Adam step on the ``1280 x 1280`` head; the method asks the trainer for PyTorch's fused Adam
kernel (:attr:`~fewshot.methods.base.Method.fused_adam`), which makes the optimizer step ~10x
cheaper than the default per-tensor loop on CPU. See ``bench/train_speed_protonet.py``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.episodes import Episode
from ..model import EpisodeClassifier
from .functional import prototypes, sqeuclidean_prototype_classifier, squared_euclidean
from .base import EpisodicOptions, Method, TrainData
from .registry import register_method

__all__ = ["prototypes", "squared_euclidean", "protonet_logits", "protonet_loss", "sqeuclidean_prototype_classifier",
           "ProtoNet", "INIT_SCALE"]


def protonet_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int,
                    scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Logits ``-scale * ||z_q - c_k||^2`` (eq. 2 before the softmax): float ``[N*Q, N]``."""
    return -scale * squared_euclidean(query, prototypes(support, support_y, n_way))


def protonet_loss(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor,
                  query_y: torch.Tensor, n_way: int,
                  scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Episode loss: cross-entropy of the queries under eq. 2.

    Args:
        support, query: embeddings (already through the head) ``[N*K, E]``, ``[N*Q, E]``.
        support_y, query_y: int64 way indices.
        scale: ``s`` (tensor to learn it).

    Returns:
        ``(loss, accuracy)``: scalar tensors; ``accuracy`` is detached.
    """
    logits = protonet_logits(support, support_y, query, n_way, scale)
    loss = F.cross_entropy(logits, query_y.long())
    acc = (logits.detach().argmax(-1) == query_y).float().mean()
    return loss, acc


# ---------------------------------------------------------------------- training method
#: initial logit scale ``s`` (on unit vectors: logit gaps up to ``4 s``). Chosen on the Grocery
#: val classes: 5 beat 2, 3, 10, 20 and 40 (larger scales fit the training classes harder and
#: transfer worse); it is learned but moves little at the default learning rate.
INIT_SCALE = 5.0


@register_method("protonet")
class ProtoNet(Method):
    """Prototypical network training method (``fewshot train --method protonet``).

    One batch is one :class:`~fewshot.data.episodes.Episode` of ``ways`` x ``shots``
    support and ``ways`` x ``queries`` query items (:attr:`episodes`) drawn from the training
    classes; :meth:`loss_from` is :func:`protonet_loss` on the head's embeddings of the support
    and query items (:meth:`items`) with the learned scale. Data-parallel.
    Extra state: ``log_scale`` (scalar float32), saved as ``method.log_scale``.
    """

    name = "protonet"
    summary = "Prototypical networks (Snell et al. 2017), trained on N-way K-shot episodes"
    episodic = True
    data_parallel = True
    fused_adam = True
    Config = EpisodicOptions
    #: a small learning rate keeps the identity-initialised head near the frozen geometry
    #: (chosen on the Grocery val classes; best epoch by val MAP@R guards the rest)
    defaults: ClassVar[dict] = {"lr": 1e-4}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_scale = nn.Parameter(torch.tensor(math.log(INIT_SCALE)))

    @property
    def scale(self) -> torch.Tensor:
        """``s = exp(log_scale)`` (scalar tensor)."""
        return self.log_scale.exp()

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_scale]

    def epoch_batches(self, train: TrainData, rng: np.random.Generator) -> Iterator[Episode]:
        """``opts.episodes_per_epoch`` seeded episodes over the training classes."""
        return iter(self.episode_sampler(train, rng))

    def items(self, batch: Episode) -> np.ndarray:
        """The support items, then the query items: int64 ``[N*K + N*Q]``."""
        return np.concatenate([batch.support_idx, batch.query_idx])

    def loss_from(self, embeddings: torch.Tensor, batch: Episode) -> torch.Tensor:
        """Eq. 2's cross-entropy of the queries from the embeddings ``[N*K + N*Q, E]`` of :meth:`items`."""
        z, n_s = embeddings, len(batch.support_idx)
        ys = torch.as_tensor(batch.support_y, device=z.device)
        yq = torch.as_tensor(batch.query_y, device=z.device)
        loss, _ = protonet_loss(z[:n_s], ys, z[n_s:], yq, batch.n_way, self.scale)
        return loss

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"log_scale": self.log_scale.detach().cpu().reshape(())}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "log_scale" in tensors:
            with torch.no_grad():
                self.log_scale.copy_(tensors["log_scale"].reshape(()))

    def episode_classifier(self) -> EpisodeClassifier | None:
        """Nearest prototype under squared Euclidean distance, as trained (eq. 2)."""
        return sqeuclidean_prototype_classifier
