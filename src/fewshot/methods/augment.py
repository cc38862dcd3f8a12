"""Images in memory and batch augmentation for ``--fine-tune last`` (torch ops, no torchvision).

:class:`ImageBank` decodes each image once (:func:`fewshot.data.images.load_image`, bilinear
resize without crop, as the backbone's preprocessing does) and keeps it as ``uint8 [3, L, L]``.
:func:`augment` turns a ``uint8 [B, 3, L, L]`` batch into normalised ``float32 [B, 3, S, S]``
network inputs with

* random resized crop (area ``scale`` of the image, aspect ratio in ``ratio``, log-uniform;
  Szegedy et al. 2015's "Inception" crop), resized to ``S x S`` bilinearly;
* horizontal flip with probability 0.5;
* colour jitter: brightness, contrast and saturation factors drawn uniformly from
  ``[1 - jitter, 1 + jitter]`` (applied in that order, clamped to ``[0, 1]``);

then the backbone's mean / std normalisation. All randomness comes from one
``torch.Generator``, so a seeded run is repeatable.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..backbones import Preprocess
from ..data.images import load_image

__all__ = ["ImageBank", "augment", "normalise", "rotated_copies"]

_GREY = torch.tensor([0.299, 0.587, 0.114])


class ImageBank:
    """Decoded images kept in memory: ``images`` is ``uint8 [N, 3, L, L]``.

    Args:
        paths: image files (all must be readable: pass the records the embedding step kept).
        size: side ``L`` in pixels.
        progress: show a progress bar while decoding.
    """

    def __init__(self, paths: Sequence[str], size: int, progress: bool = False) -> None:
        self.size = int(size)
        out = torch.empty((len(paths), 3, self.size, self.size), dtype=torch.uint8)
        for i, p in enumerate(tqdm(paths, desc="decoding images", unit="img", disable=not progress,
                                   leave=False)):
            img = load_image(p, target_size=self.size)
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            out[i] = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())
        self.images = out

    def __len__(self) -> int:
        return int(self.images.shape[0])


def rotated_copies(images: torch.Tensor, rotations: int) -> torch.Tensor:
    """``[N, C, H, W]`` (square) -> ``[rotations * N, C, H, W]``: block ``r`` is every image turned
    ``r`` x 90 degrees counter-clockwise (``torch.rot90``), the layout of
    :func:`~fewshot.training.data.with_rotated_classes`."""
    return torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(rotations)])


def normalise(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` (or float in [0, 1]) -> ``float32`` normalised with the backbone's mean / std."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(preprocess.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, out_size: int, preprocess: Preprocess, generator: torch.Generator,
            scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
            jitter: float = 0.3, flip: bool = True) -> torch.Tensor:
    """Random resized crop + horizontal flip + colour jitter + normalisation.

    Args:
        images: ``uint8 [B, 3, L, L]`` (CPU).
        out_size: output side ``S``.
        preprocess: the backbone's preprocessing (mean / std).
        generator: the source of randomness (CPU ``torch.Generator``).

    Returns:
        ``float32 [B, 3, S, S]``, on the device of ``images``.
    """
    b, _, h, w = images.shape
    u = torch.rand((b, 7), generator=generator)
    out = torch.empty((b, 3, out_size, out_size), dtype=torch.float32, device=images.device)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(b):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * float(u[i, 0]))
        r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(u[i, 1]))
        cw = int(round(math.sqrt(area * r)))
        ch = int(round(math.sqrt(area / r)))
        cw, ch = max(1, min(w, cw)), max(1, min(h, ch))
        x0 = int(float(u[i, 2]) * (w - cw + 1))
        y0 = int(float(u[i, 3]) * (h - ch + 1))
        crop = images[i:i + 1, :, y0:y0 + ch, x0:x0 + cw].float() / 255.0
        out[i] = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False)[0]
    if flip:
        flip_mask = torch.rand(b, generator=generator) < 0.5
        out[flip_mask.to(out.device)] = out[flip_mask.to(out.device)].flip(-1)
    if jitter > 0:
        f = 1.0 + jitter * (2.0 * torch.rand((b, 3), generator=generator) - 1.0)
        f = f.to(out.device).view(b, 3, 1, 1)
        out = (out * f[:, 0:1]).clamp(0, 1)  # brightness
        grey = (out * _GREY.to(out.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        out = (mean + (out - mean) * f[:, 1:2]).clamp(0, 1)  # contrast
        grey = (out * _GREY.to(out.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = (grey + (out - grey) * f[:, 2:3]).clamp(0, 1)  # saturation
    return normalise(out, preprocess)
