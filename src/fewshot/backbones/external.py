"""Optional backbones from timm, torchvision and open_clip (installed as extras).

These libraries download weights on first use; without internet the download fails and
:class:`~fewshot.errors.BackboneError` says so. The names are ``timm:NAME`` (e.g.
``timm:resnet50``), ``torchvision:NAME`` (e.g. ``torchvision:resnet18``) and
``open_clip:ARCH/PRETRAINED`` (e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import BackboneError
from .base import Backbone, BackboneInfo, infer_dim, register_backbone
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackboneError(f"backbone needs the optional package '{module}'",
                            hint=f"pip install 'fewshot[{extra}]' (pulls a newer torch)") from exc


def _load(what: str, fn):
    try:
        return fn()
    except BackboneError:
        raise
    except Exception as exc:  # network errors, unknown model names, hub failures
        raise BackboneError(f"cannot create {what}: {type(exc).__name__}: {exc}",
                            hint="check the model name and that its weights can be downloaded "
                            "(internet access, or a populated torch/hf cache)") from exc


@register_backbone("timm:")
def timm_backbone(pretrained: bool, image_size: int, model_name: str) -> Backbone:  # type: ignore[misc]
    """Any timm model with its classifier removed (``num_classes=0`` gives pooled features)."""
    timm = _require("timm", "timm")
    model = _load(f"timm model '{model_name}'",
                  lambda: timm.create_model(model_name, pretrained=pretrained, num_classes=0))
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    pre = Preprocess(image_size=image_size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                     std=tuple(cfg.get("std", IMAGENET_STD)), interpolation="bicubic"
                     if cfg.get("interpolation") == "bicubic" else "bilinear")
    return Backbone(f"timm:{model_name}", model, pre, infer_dim(model, image_size), pretrained,
                    "pretrained" if pretrained else "random")


class _StripHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(images), 1)


@register_backbone("torchvision:")
def torchvision_backbone(pretrained: bool, image_size: int, model_name: str) -> Backbone:  # type: ignore[misc]
    """A torchvision classification model with its last classifier layer replaced by identity."""
    tvm = _require("torchvision.models", "torchvision")
    net = _load(f"torchvision model '{model_name}'",
                lambda: tvm.get_model(model_name, weights="DEFAULT" if pretrained else None))
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(net, attr):
            setattr(net, attr, nn.Identity())
            break
    model = _StripHead(net)
    return Backbone(f"torchvision:{model_name}", model,
                    Preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD),
                    infer_dim(model, image_size), pretrained, "pretrained" if pretrained else "random")


class _ClipImage(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


@register_backbone("open_clip:")
def open_clip_backbone(pretrained: bool, image_size: int, spec: str) -> Backbone:  # type: ignore[misc]
    """An open_clip image tower; ``spec`` is ``ARCH/PRETRAINED`` (e.g. ``ViT-B-32/openai``)."""
    open_clip = _require("open_clip", "open_clip")
    arch, _, tag = spec.partition("/")
    clip = _load(f"open_clip model '{spec}'",
                 lambda: open_clip.create_model(arch, pretrained=(tag or None) if pretrained else None))
    mean = tuple(getattr(clip.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(clip.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    model = _ClipImage(clip)
    return Backbone(f"open_clip:{spec}", model, Preprocess(image_size, mean, std, "bicubic"),
                    infer_dim(model, image_size), pretrained, tag or "random")


def _family_info(prefix: str, example: str, module: str, extra: str, source: str):
    def info() -> BackboneInfo:
        import importlib.util

        ok = importlib.util.find_spec(module) is not None
        return BackboneInfo(f"{prefix}{example}", None, 224, f"pretrained, downloaded from {source} on first use "
                            "(needs internet; then cached)", ok,
                            None if ok else f"pip install 'fewshot[{extra}]' (pulls a newer, multi-GB torch)")
    return info


timm_backbone.info = _family_info("timm:", "NAME", "timm", "timm", "the Hugging Face hub")  # type: ignore[attr-defined]
torchvision_backbone.info = _family_info("torchvision:", "NAME", "torchvision", "torchvision",  # type: ignore[attr-defined]
                                         "download.pytorch.org")
open_clip_backbone.info = _family_info("open_clip:", "ARCH/PRETRAINED", "open_clip", "open_clip",  # type: ignore[attr-defined]
                                       "the Hugging Face hub or its authors' site")
