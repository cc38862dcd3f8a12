"""Multi-similarity loss with its miner (Wang, Han, Huang, Dong and Scott, "Multi-Similarity
Loss with General Pair Weighting for Deep Metric Learning", CVPR 2019).

For an anchor ``i`` with positives ``P_i`` and negatives ``N_i`` in the batch and cosine
similarities ``S_ik`` of L2-normalised embeddings, the loss is::

    1/alpha * log(1 + sum_{k in P_i} exp(-alpha (S_ik - base)))
      + 1/beta * log(1 + sum_{k in N_i} exp(beta (S_ik - base)))

averaged over the anchors: each pair is weighted by its own similarity and by its relation to
the anchor's other pairs (the paper's self-similarity and relative similarity).
``pytorch_metric_learning.losses.MultiSimilarityLoss(alpha, beta, base)`` computes it.

The pairs first go through the paper's pair mining,
``pytorch_metric_learning.miners.MultiSimilarityMiner(epsilon)``: a negative is kept when it is
more similar to the anchor than the anchor's least similar positive minus ``epsilon``, a
positive when it is less similar than the anchor's most similar negative plus ``epsilon``.

Batches are the m-per-class batches of the siamese methods (:class:`SiameseMethod`): every
anchor has positives. Tensor shapes: a batch is ``idx`` int64 ``[B]`` and ``y`` int64 ``[B]``;
features ``[B, D]``, head embeddings ``[B, E]`` L2-normalised, the loss a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pytorch_metric_learning import losses, miners

from ..options import check_above
from .base import option
from .registry import register_method
from .siamese import SiameseMethod, SiameseOptions

__all__ = ["MultiSimilarityMethod", "MultiSimilarityOptions"]


@dataclass
class MultiSimilarityOptions(SiameseOptions):
    """Options of ``multisimilarity`` (pytorch-metric-learning's defaults, which are the
    paper's: alpha 2, beta 50, lambda 0.5 (``base``), epsilon 0.1)."""

    alpha: float = option(2.0, "Weight of the positive pairs' exponent (the paper's alpha).")
    beta: float = option(50.0, "Weight of the negative pairs' exponent (the paper's beta).")
    base: float = option(0.5, "Cosine similarity at which a pair's exponent is 0 (the paper's "
                         "lambda).", min=-1.0)
    epsilon: float = option(0.1, "Margin of the miner: which pairs enter the loss (the paper's epsilon).", min=0.0)

    def __post_init__(self) -> None:
        check_above(self, alpha=0.0, beta=0.0)


@register_method("multisimilarity")
class MultiSimilarityMethod(SiameseMethod):
    """Multi-similarity loss (Wang et al., CVPR 2019) on cosine similarity, with its miner.

    ``pytorch_metric_learning.losses.MultiSimilarityLoss(alpha, beta, base)`` on the pairs that
    ``pytorch_metric_learning.miners.MultiSimilarityMiner(epsilon)`` keeps, on m-per-class batches
    (:class:`~fewshot.methods.siamese.SiameseMethod`).

    Options (:class:`MultiSimilarityOptions`): ``alpha`` (default 2) and ``beta`` (default 50),
    how sharply positive and negative pairs are weighted, both greater than 0; ``base``
    (default 0.5) the similarity where a pair's weight turns; ``epsilon`` (default 0.1) the
    miner's margin; ``batch_size`` (64) and ``m_per_class`` (4) as for ``triplet``.

    Shapes: a batch's embeddings ``[B, E]`` and labels ``[B]``; the loss is a scalar.
    """

    name = "multisimilarity"
    summary = "Multi-similarity loss with its pair miner (Wang et al. 2019), m-per-class batches"
    Config = MultiSimilarityOptions

    def make_loss(self) -> torch.nn.Module:
        o = self.opts
        return losses.MultiSimilarityLoss(alpha=float(o.alpha), beta=float(o.beta), base=float(o.base),
                                          distance=self.distance)

    def make_miner(self) -> Any:
        return miners.MultiSimilarityMiner(epsilon=float(self.opts.epsilon), distance=self.distance)
