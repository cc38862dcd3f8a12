"""Conv-4, the few-shot learning reference network, trained from scratch.

Four blocks of [3x3 convolution with 64 filters (padding 1), BatchNorm, ReLU, 2x2 max-pool],
then the feature map flattened: Vinyals et al., "Matching Networks for One Shot Learning",
NeurIPS 2016; Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017
(sec. 3.1); Finn et al., "Model-Agnostic Meta-Learning", ICML 2017 (sec. 5.2). At 28 px
(Omniglot) the embedding is ``64 x 1 x 1 = 64``-d; at ``S`` px it is ``64 * (S // 16) ** 2``.

There are no pretrained weights: ``create_backbone("conv4", pretrained=True)`` raises
:class:`~fewshot.errors.BackboneError`; train it with ``fewshot train --backbone conv4
--from-scratch --fine-tune all`` and use the run through ``--model RUN_DIR``. Its random
initialisation comes from the torch seed (the trainer seeds it with ``--seed``), and its
weights tag records a digest of those weights, so embedding caches never mix two of them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BackboneError
from .base import Backbone, BackboneInfo, register_backbone
from .preprocess import HALF, Preprocess

WIDTH = 64
BLOCKS = 4


def conv_block(in_channels: int, out_channels: int = WIDTH) -> nn.Sequential:
    """3x3 conv (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool: ``[B, C, H, W] -> [B, 64, H//2, W//2]``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class Conv4(nn.Module):
    """``float32 [B, 3, S, S] -> [B, 64 * (S // 16) ** 2]`` (flattened last feature map)."""

    def __init__(self, in_channels: int = 3, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[conv_block(in_channels if i == 0 else width, width) for i in range(BLOCKS)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images).flatten(1)

    def tail_block_count(self) -> int:
        return len(self.blocks)

    def trainable_tail(self, blocks: int) -> list[nn.Module]:
        """The last ``blocks`` conv blocks."""
        return list(self.blocks[-blocks:])


@register_backbone("conv4")
def conv4(pretrained: bool = False, image_size: int = 28) -> Backbone:
    """Conv-4 (113 k parameters at 3 input channels), random weights; 64-d at 28 px.

    Raises:
        BackboneError: ``pretrained=True`` (there are no pretrained Conv-4 weights), or an image
            side below 16 px (four 2x2 poolings need at least 16).
    """
    if pretrained:
        raise BackboneError("backbone conv4 has no pretrained weights: it is trained from scratch",
                            hint="train it from scratch (backbone='conv4', pretrained=False, fine_tune='all', "
                                 "image_size=28), then pass model_dir=RUN_DIR",
                            options=("backbone", "pretrained", "fine_tune", "image_size", "model_dir"))
    if image_size < 16:
        raise BackboneError(f"conv4 needs an image side of at least 16 px, got {image_size}",
                            hint="use image_size=28 (Omniglot) or 84 (miniImageNet)", options=("image_size",))
    model = Conv4()
    dim = WIDTH * (image_size // 2 ** BLOCKS) ** 2
    return Backbone(name="conv4", model=model, preprocess=Preprocess(image_size=image_size, mean=HALF, std=HALF),
                    dim=dim, pretrained=False, weights_tag="random")


conv4.info = lambda: BackboneInfo("conv4", WIDTH * (28 // 2 ** BLOCKS) ** 2, 28,  # type: ignore[attr-defined]
                                  "none: trained from scratch (fewshot train --backbone conv4 --from-scratch "
                                  "--fine-tune all --image-size 28)", True)
