"""The backbone record and the registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import BackboneError
from ..registry import Registry
from .preprocess import Preprocess


@dataclass
class Backbone:
    """A frozen-or-trainable feature extractor.

    Attributes:
        name: registry name (e.g. ``"efficientnet_lite0"``).
        model: module mapping ``float32 [B, 3, S, S]`` to ``float32 [B, dim]`` embeddings
            (global average pool of the last feature map for CNNs).
        preprocess: PIL image -> ``float32 [3, S, S]`` tensor.
        dim: embedding dimension ``D``.
        pretrained: whether pretrained weights were loaded.
        weights_tag: identifies the weights in cache keys (``"imagenet"``, ``"random"``, or a
            digest of fine-tuned weights).
        channels_last: feed the model channels-last (NHWC) batches when embedding, the faster
            convolution layout of oneDNN on CPU for CNNs (``bench/embed_throughput.py`` measures
            it); the embeddings agree with NCHW batches to float rounding (~1e-6 relative).
        cpu_batch: the most images the torch forward runs at once on a CPU (``None``: no
            limit); a larger inference batch is run in slices of this size, to the same
            embeddings to float rounding. EfficientNet-Lite sets 4: its activations for a few
            images stay in the CPU's caches, so 2 threads of an AMD EPYC embed Lite0 at 84 img/s in
            batches of 4 against 42 img/s at batch 16 in one forward (``bench/embed_throughput.py``,
            batch sweep, 2026-12-03).
        train_cpu_pixels: the most input pixels per forward slice of a fine-tuning step on a
            CPU (``None``: the whole batch in one forward), i.e. ``train_cpu_pixels // S**2``
            images at side ``S``; the slices' features are concatenated and the loss takes one
            backward through all of them, so the gradient is the batch's (with BatchNorm in eval
            mode; :mod:`fewshot.training.finetune`). EfficientNet-Lite sets 8 images of 224 px:
            forward and backward of Lite0 took 36-40 ms per image in slices of 8 against 93-125 ms
            for 64 images in one forward, and 40-43 in slices of 4, on 2 threads of an AMD EPYC
            (``bench/train_step.py``, 2026-12-05); at 64 px, where a whole batch's activations
            fit the caches, one forward of 64 was the faster (slices of 98: the whole batch).
        tta: test-time augmentation of every inference embedding (:data:`TTA_MODES`):
            ``"none"``; ``"flip"``, the mean of the embeddings of the image and of its mirror
            image (:class:`FlipAverage`; twice the forward cost); or ``"scales"``, the mean of
            the unit embeddings of the image at 7/9, 1 and 11/9 of its side
            (:class:`ScaleAverage`; 2.9 times the embedding time at 288 px). Training never uses it;
            the embedding cache and ONNX exports are keyed by it.
    """

    name: str
    model: nn.Module
    preprocess: Preprocess
    dim: int
    pretrained: bool = True
    weights_tag: str = "imagenet"
    channels_last: bool = False
    cpu_batch: int | None = None
    train_cpu_pixels: int | None = None
    tta: str = "none"

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def inference_module(self) -> nn.Module:
        """What embeds at inference (torch forward and ONNX export): :attr:`model`, wrapped in
        :class:`FlipAverage` or :class:`ScaleAverage` (in the model's own train / eval mode)
        when :attr:`tta` is ``"flip"`` or ``"scales"``.

        Raises:
            BackboneError: :attr:`tta` is not one of :data:`TTA_MODES`.
        """
        if check_tta(self.tta) == "none":
            return self.model
        wrapper = (FlipAverage if self.tta == "flip" else ScaleAverage)(self.model)
        wrapper.train(self.model.training)  # a new module starts in train mode
        return wrapper

    @property
    def cache_key(self) -> str:
        """A file-name-safe key: name, weights and every preprocessing choice."""
        p = self.preprocess
        norm = "half" if p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5) else (
            "imnet" if p.mean[0] == 0.485 else "custom")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        tta = "" if self.tta == "none" else f"-tta{self.tta}"
        return f"{safe}-{self.weights_tag}-{p.image_size}px-{p.interpolation}-{norm}{tta}"

    def embeds_at(self, side: int) -> bool:
        """Whether :attr:`model` embeds a ``side``-pixel input to :attr:`dim` values, as at its
        own side: ``False`` for a model without global pooling (``conv4`` flattens its last map)
        or one that cannot take so small an input. One forward of a zero image, in eval mode."""
        was = self.model.training
        self.model.eval()
        p = next(iter(self.model.parameters()), None)
        x = torch.zeros(1, 3, side, side, device=p.device if p is not None else "cpu")
        try:
            with torch.no_grad():
                return int(self.model(x).shape[-1]) == self.dim
        except RuntimeError:
            return False
        finally:
            self.model.train(was)

    def trainable_tail(self, blocks: int) -> list[nn.Module]:
        """The modules to train when fine-tuning the last ``blocks`` blocks (``blocks >= 1``).

        A model that knows its own layout says so with a ``trainable_tail(blocks)`` method
        (EfficientNet-Lite: the last MBConv blocks, the head convolution and its BatchNorm).
        Otherwise: the last ``blocks`` children of the deepest-last ``Sequential`` /
        ``ModuleList`` with at least four children, plus the leaf modules registered after it.
        """
        own = getattr(self.model, "trainable_tail", None)
        if callable(own):
            return list(own(blocks))
        return _generic_tail(self.model, blocks)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The ``(convolution, BatchNorm)`` pairs whose BatchNorm directly and only follows its
        convolution, as the model declares them with a ``conv_bn_pairs()`` method (EfficientNet-Lite
        does); ``[]`` for a model that does not (nothing is folded then). Fine-tuning with
        ``--bn eval`` folds them (:mod:`fewshot.training.fold`)."""
        own = getattr(self.model, "conv_bn_pairs", None)
        return list(own()) if callable(own) else []

    def tail_block_count(self) -> int:
        """How many blocks :meth:`trainable_tail` can offer (the largest sensible ``N`` of
        ``--fine-tune last:N``)."""
        own = getattr(self.model, "tail_block_count", None)
        if callable(own):
            return int(own())
        seqs = [m for m in self.model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 4]
        return len(seqs[-1]) if seqs else 1

    def describe(self) -> dict:
        """A JSON-ready description recorded in every result file."""
        return {"name": self.name, "dim": self.dim, "pretrained": self.pretrained,
                "weights": self.weights_tag, "preprocess": self.preprocess.to_dict(), "tta": self.tta}


#: ``--tta`` values: no test-time augmentation, the mean over the image and its mirror image, or
#: the mean over the image at three sides (:class:`ScaleAverage`)
TTA_MODES = ("none", "flip", "scales")


def check_tta(tta: str) -> str:
    """``tta`` if it is one of :data:`TTA_MODES`.

    Raises:
        BackboneError: any other value (the hint names ``tta`` and its values).
    """
    if tta not in TTA_MODES:
        raise BackboneError(f"unknown test-time augmentation {tta!r}",
                            hint="use " + " or ".join(f"tta={m!r}" for m in TTA_MODES), options=("tta",))
    return tta


class FlipAverage(nn.Module):
    """Horizontal-flip test-time augmentation: ``float32 [B, 3, S, S]`` -> the mean of the
    wrapped model's ``[B, D]`` embeddings of the batch and of its mirror images (flipped along
    the width axis), as Simonyan and Zisserman (2015, VGG, section 3.2) average the class
    scores of an image and its flip; it costs a second forward pass. The
    mean is taken before any head, so a linear head sees the same mean of its two outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[3])))


class ScaleAverage(nn.Module):
    """Multi-scale test-time augmentation: ``float32 [B, 3, S, S]`` -> the mean of the wrapped
    model's unit ``[B, D]`` embeddings of the batch resized (bilinear) to each side of
    :func:`tta_sides` (7/9, 1 and 11/9 of ``S`` to a multiple of 8: 224, 288 and 352 px for 288),
    as Simonyan and Zisserman (2015, VGG, section 3.2) average a network's outputs over test
    scales. An object looks larger or smaller to the network at each side; a fine-tuned
    EfficientNet-Lite0 on Grocery gains 0.016 MAP@R from it (0.620 -> 0.636 over 3 seeds,
    ``docs/measurements.md``), at 3.1 times the forward pixels at 288 px (2.9 times the end-to-end
    embedding time). Resizing the preprocessed batch, not the photo,
    keeps every runtime's input at one side; upsampling adds no detail but scales the object as
    a larger input would (0.632 against 0.635 MAP@R measured with the photo itself at 352 px)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raises :class:`BackboneError` when the model cannot embed every side to one vector of
        one length (a backbone without global pooling, such as ``conv4``, or too small a side)."""
        outs = []
        for side in tta_sides(int(x.shape[-1])):
            xs = x if side == x.shape[-1] else nn.functional.interpolate(
                x, size=(side, side), mode="bilinear", align_corners=False)
            try:
                out = self.model(xs)
            except RuntimeError as exc:
                raise _scales_refused(f"it cannot embed a {side}-pixel input ({str(exc).splitlines()[0]})") from exc
            if outs and out.shape[-1] != outs[0].shape[-1]:
                raise _scales_refused(f"its embedding has {outs[0].shape[-1]} values at one side and "
                                      f"{out.shape[-1]} at {side} px (no global pooling)")
            outs.append(nn.functional.normalize(out, dim=1))
        return sum(outs) / len(outs)


def _scales_refused(why: str) -> BackboneError:
    return BackboneError(f"--tta scales does not suit this backbone: {why}",
                         hint="use --tta flip or --tta none, or a larger --image-size", options=("tta",))


#: the sides of ``--tta scales`` as fractions of the input side
TTA_SCALES = (7 / 9, 1.0, 11 / 9)


def tta_sides(side: int) -> list[int]:
    """The input sides of ``--tta scales`` for a ``side``-pixel input: ``side`` times each of
    :data:`TTA_SCALES`, rounded to a multiple of 8 (at least 8; ``side`` itself kept), distinct:
    ``[224, 288, 352]`` for 288, ``[176, 224, 272]`` for 224, ``[24, 28, 32]`` for 28."""
    sides = [side if f == 1.0 else max(8, int(round(side * f / 8)) * 8) for f in TTA_SCALES]
    return list(dict.fromkeys(sides))


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 content digest (16 hex digits) of a state dict: names and tensor bytes."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _generic_tail(model: nn.Module, blocks: int) -> list[nn.Module]:
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= 4:
            best = mod
    if best is None:
        return [list(model.children())[-1]] if list(model.children()) else [model]
    tail = list(best)[-blocks:]
    names = [n for n, _ in model.named_modules()]
    owner = {id(m): n for n, m in model.named_modules()}
    start = names.index(owner[id(best)])
    after = [m for n, m in list(model.named_modules())[start + 1:]
             if not n.startswith(owner[id(best)] + ".") and not any(True for _ in m.children())]
    return tail + after


#: the input sides ``create_backbone`` accepts, in pixels (28 px is Omniglot's for ``conv4``)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024

BackboneFactory = Callable[[bool, int], Backbone]
#: built-in and plugin backbones by name; ``timm:``, ``torchvision:`` and ``open_clip:`` are
#: prefixes whose factory also takes the model name after the colon
BACKBONES: Registry[BackboneFactory] = Registry(
    "backbone", BackboneError, hint="or timm:NAME / torchvision:NAME / open_clip:ARCH/PRETRAINED with that package installed")


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(pretrained: bool, image_size: int) -> Backbone`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return BACKBONES.register(name)


@dataclass
class BackboneInfo:
    """One line of ``fewshot backbones``.

    Attributes:
        name: what ``--backbone`` takes (``timm:NAME`` for a family).
        dim: embedding dimension ``D`` (``None`` for a family: it depends on the model).
        image_size: the input side commands use by default, in pixels.
        weights: where the weights come from.
        available: whether it can be created now (package and weights installed).
        install: what to install first, when not available.
    """

    name: str
    dim: int | None
    image_size: int | None
    weights: str
    available: bool
    install: str | None = None


def backbone_info() -> list[BackboneInfo]:
    """A :class:`BackboneInfo` for every registered backbone and family, from the ``info``
    function each factory may carry (``factory.info() -> BackboneInfo``); a plugin without one
    is listed by name only."""
    out = []
    for name in list_backbones():
        info = getattr(BACKBONES.get(name), "info", None)
        out.append(info() if callable(info) else BackboneInfo(name, None, None, "(not described)", True))
    return out


def default_fine_tune(name: str, pretrained: bool = True, fallback: str = "all") -> str:
    """What of backbone ``name`` trains when ``fewshot train`` is not told (``--fine-tune``):
    ``"all"`` for a backbone trained from random weights (``pretrained=False``), ``fallback`` for
    one whose factory declares nothing, else the factory's ``fine_tune`` attribute (EfficientNet-Lite:
    every block after the stem and the blocks at 1/2 and 1/4 of the input resolution, e.g.
    ``"last:13"`` of Lite0's 16, measured as good as ``"all"`` and 1.25x faster)."""
    if not pretrained:
        return "all"
    factory = BACKBONES.get(name) if name in BACKBONES else None
    return str(getattr(factory, "fine_tune", fallback))


def list_backbones() -> list[str]:
    """Names registered here; ``timm:``, ``torchvision:`` and ``open_clip:`` prefixes also work."""
    return BACKBONES.names()


def create_backbone(name: str, pretrained: bool = True, image_size: int = 224) -> Backbone:
    """Create a backbone by name, in eval mode.

    Args:
        name: a registered name (``list_backbones()``) or ``timm:NAME``, ``torchvision:NAME``,
            ``open_clip:ARCH/PRETRAINED``.
        pretrained: load pretrained weights (``False`` gives random weights, for tests).
        image_size: input side in pixels.

    Raises:
        BackboneError: unknown name, missing optional package, or weights that cannot be
            loaded (e.g. no internet for a model that downloads its weights).
    """
    if image_size < MIN_IMAGE_SIZE or image_size > MAX_IMAGE_SIZE:
        raise BackboneError(f"image size {image_size} px is out of range",
                            hint=f"use an image_size between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} (224 is the default)",
                            options=("image_size",))
    prefix = name.split(":", 1)[0] + ":" if ":" in name else name
    if prefix == name and name.endswith(":") and name in BACKBONES:
        raise BackboneError(f"backbone '{name}' needs a model name after the colon",
                            hint=f"e.g. backbone='{name}resnet18'" if name != "open_clip:" else
                            "e.g. backbone='open_clip:ViT-B-32/openai'", options=("backbone",))
    if name not in BACKBONES and prefix != name and prefix in BACKBONES:
        backbone = BACKBONES.get(prefix)(pretrained, image_size, name.split(":", 1)[1])  # type: ignore[call-arg]
    else:
        backbone = BACKBONES.get(name)(pretrained, image_size)
    backbone.model.eval()
    if not backbone.pretrained and backbone.weights_tag == "random":
        # random weights differ with the torch seed: the cache key must tell them apart
        backbone.weights_tag = "random" + weights_digest(backbone.model.state_dict())
    return backbone


@torch.no_grad()
def infer_dim(model: nn.Module, image_size: int) -> int:
    """Embedding dimension found by one forward pass on a zero image."""
    model.eval()
    return int(model(torch.zeros(1, 3, image_size, image_size)).shape[-1])
