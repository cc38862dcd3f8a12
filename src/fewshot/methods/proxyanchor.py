"""Proxy Anchor loss (Kim, Kim, Cho and Kwak, "Proxy Anchor Loss for Deep Metric Learning",
CVPR 2020).

Each training class ``c`` has a learnable proxy ``p_c`` (the proxies ``[C, E]``). With the cosine
similarity ``s(x, p)`` of a batch's embeddings ``X`` to the proxies, ``P+`` the proxies of the
classes present in the batch, ``X+_p`` the embeddings of ``p``'s class and ``X-_p`` the others,
the loss (the paper's eq. 4) is::

    1/|P+| sum_{p in P+} log(1 + sum_{x in X+_p} exp(-alpha (s(x, p) - margin)))
      + 1/|P| sum_{p in P} log(1 + sum_{x in X-_p} exp(alpha (s(x, p) + margin)))

Every proxy is an anchor that pulls all its class's embeddings of the batch and pushes all the
others, each weighted by how hard it is (the gradient of the log-sum-exp): the data-to-data
relations of pair losses at the cost of a proxy loss.
``pytorch_metric_learning.losses.ProxyAnchorLoss(num_classes, embedding_size, margin, alpha)``
computes it; its proxies start from ``kaiming_normal_`` and train at ``proxy_lr_factor`` x the
head's rate (:mod:`.proxies`).

Tensor shapes: a batch is ``idx`` int64 ``[B]`` and ``y`` int64 ``[B]``; features ``[B, D]``,
head embeddings ``[B, E]`` L2-normalised, the proxies ``[C, E]`` (``C`` train classes), the
loss a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytorch_metric_learning import losses
from torch import nn

from ..options import check_above
from .base import option
from .proxies import ProxyMethod, ProxyOptions
from .registry import register_method

__all__ = ["ProxyAnchorMethod", "ProxyAnchorOptions"]


@dataclass
class ProxyAnchorOptions(ProxyOptions):
    """Options of ``proxyanchor`` (pytorch-metric-learning's defaults, which are the paper's:
    delta 0.1, alpha 32)."""

    margin: float = option(0.1, "Margin on cosine similarity (the paper's delta).", min=0.0)
    alpha: float = option(32.0, "Scale of the similarities (the paper's alpha).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_above(self, alpha=0.0)


@register_method("proxyanchor")
class ProxyAnchorMethod(ProxyMethod):
    """Proxy Anchor loss (Kim et al., CVPR 2020) on cosine similarity, one learned proxy per
    train class: ``pytorch_metric_learning.losses.ProxyAnchorLoss``.

    Options (:class:`ProxyAnchorOptions`): ``margin`` (default 0.1), the paper's delta;
    ``alpha`` (default 32), the scale of the similarities, greater than 0; ``batch_size``
    (default 64) shuffled items; ``proxy_lr_factor`` (default 100), the proxies' learning rate
    as a multiple of the head's.

    Shapes: a batch's embeddings ``[B, E]`` and labels ``[B]``, the proxies ``[C, E]``; the loss
    is a scalar.
    """

    name = "proxyanchor"
    summary = "Proxy Anchor loss (Kim et al. 2020): one learned proxy per class, shuffled batches"
    Config = ProxyAnchorOptions

    def make_loss(self, num_classes: int, embedding_size: int) -> nn.Module:
        return losses.ProxyAnchorLoss(num_classes, embedding_size, margin=float(self.opts.margin),
                                      alpha=float(self.opts.alpha))
