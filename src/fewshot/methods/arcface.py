"""Sub-center ArcFace loss (Deng, Guo, Liu, Gong and Zafeiriou, "Sub-center ArcFace: Boosting Face
Recognition by Large-Scale Noisy Web Faces", ECCV 2020), after ArcFace (Deng, Guo, Xue and
Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019).

Each training class ``c`` has ``K`` learnable sub-centres (the weights ``W``, ``[E, C * K]``). An
embedding's angle ``theta_c`` to class ``c`` is its angle to the nearest of the class's
sub-centres; the loss is the cross-entropy of the logits ``scale * cos(theta_c)``, the true
class's angle first widened by the additive angular margin: ``scale * cos(theta_y + margin)``.
Classes are pushed apart by a margin on the hypersphere, and with ``K > 1`` the odd photos of a
class may gather around a sub-centre of their own instead of pulling the class apart
(``sub_centers=1`` is plain ArcFace).
``pytorch_metric_learning.losses.SubCenterArcFaceLoss(num_classes, embedding_size, margin,
scale, sub_centers)`` computes it (``margin`` in degrees: 28.6 is the paper's 0.5 rad); its
weights start from ``normal_`` and train at ``proxy_lr_factor`` x the head's rate
(:mod:`.proxies`).

Tensor shapes: a batch is ``idx`` int64 ``[B]`` and ``y`` int64 ``[B]``; features ``[B, D]``,
head embeddings ``[B, E]`` L2-normalised, the sub-centres ``[E, C * K]`` (``C`` train classes),
the logits ``[B, C]``, the loss a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytorch_metric_learning import losses
from torch import nn

from ..options import check_above
from .base import option
from .proxies import ProxyMethod, ProxyOptions
from .registry import register_method

__all__ = ["ArcFaceMethod", "ArcFaceOptions"]


@dataclass
class ArcFaceOptions(ProxyOptions):
    """Options of ``arcface`` (pytorch-metric-learning's defaults, which are the papers': margin
    0.5 rad, scale 64, 3 sub-centres)."""

    margin: float = option(28.6, "Additive angular margin in degrees (28.6 = the paper's 0.5 rad).",
                           min=0.0)
    scale: float = option(64.0, "Scale of the logits (the paper's s).")
    sub_centers: int = option(3, "Sub-centres per class (the paper's K; 1 = plain ArcFace).", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_above(self, scale=0.0)


@register_method("arcface")
class ArcFaceMethod(ProxyMethod):
    """Sub-center ArcFace (Deng et al., ECCV 2020): additive angular margin softmax over
    ``sub_centers`` learned centres per train class:
    ``pytorch_metric_learning.losses.SubCenterArcFaceLoss``.

    Options (:class:`ArcFaceOptions`): ``margin`` (default 28.6 degrees = 0.5 rad);
    ``scale`` (default 64), the logits' scale, greater than 0; ``sub_centers`` (default 3);
    ``batch_size`` (default 64) shuffled items; ``proxy_lr_factor`` (default 100), the
    sub-centres' learning rate as a multiple of the head's.

    Shapes: a batch's embeddings ``[B, E]`` and labels ``[B]``, the sub-centres
    ``[E, C * sub_centers]``; the loss is a scalar.
    """

    name = "arcface"
    summary = "Sub-center ArcFace loss (Deng et al. 2020): angular margin over learned class centres"
    Config = ArcFaceOptions
    #: the default recipe since 0.11.0 (docs/measurements.md, "ArcFace by default"): 4 epochs, the
    #: average of epochs 2-4; against triplet's 3 epochs with swa, Grocery's unseen articles over
    #: 3 seeds: P@1 0.887 against 0.878, shelf photo -> studio image 0.669 against 0.642, and a
    #: whitened catalogue's open set 62.8-65.6% of known photos accepted and right against
    #: 63.8-67.6% at a realised false-accept rate of 6.2-6.8% against 7.7-8.2% (target 5%);
    #: MAP@R 0.609 against 0.620
    fine_tune_defaults = {"weight_average": "swa"}

    def make_loss(self, num_classes: int, embedding_size: int) -> nn.Module:
        o = self.opts
        return losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=embedding_size,
                                           margin=float(o.margin), scale=float(o.scale),
                                           sub_centers=int(o.sub_centers))
