"""Fine-tuning the feature extractor: which backbone parameters train, on which images.

``--fine-tune last:N`` trains the backbone's own last ``N`` blocks
(:meth:`~fewshot.backbones.Backbone.trainable_tail`), ``--fine-tune all`` every backbone
parameter. The training images are decoded once into memory (:class:`ImageBank`) and
augmented per batch (:func:`~fewshot.methods.augment.augment`; ``--augment none`` gives the
plain resized image); validation re-embeds the val images through the current backbone each
epoch (no cache: the backbone changes).

BatchNorm (``--bn``): in ``eval`` mode the pretrained running statistics are kept (a batch of a
few articles would corrupt them) while the affine weights still train; in ``train`` mode the
trainable blocks normalise with batch statistics and update the running ones (the choice for a
backbone trained from scratch, e.g. ``conv4``). An eval-mode BatchNorm is folded into the
convolution before it during the training forward (``--no-fold-bn`` keeps them apart;
:mod:`.fold`).

On CUDA the backbone runs under ``torch.autocast`` in bfloat16 (no loss scaling needed); on CPU
in float32.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from torch import nn

from ..errors import FewshotError
from .config import TrainConfig, parse_fine_tune
from .data import RunData
from .fold import folded_batchnorm

log = logging.getLogger("fewshot")

#: images per ONNX Runtime call when validating (the embedding default, measured fastest)
VAL_BATCH = 16


def trainable_modules(backbone, fine_tune: str) -> list[nn.Module]:
    """The backbone modules that ``fine_tune`` (``"last:N"`` / ``"all"``) trains; ``[]`` for ``"none"``."""
    mode, blocks = parse_fine_tune(fine_tune)
    if mode == "none":
        return []
    if mode == "last" and blocks > backbone.tail_block_count():
        n = backbone.tail_block_count()
        raise FewshotError(f"fine_tune={fine_tune}: {backbone.name} has {n} blocks",
                           hint=f"use fine_tune=last:N with N from 1 to {n}, or fine_tune=all", options=("fine_tune",))
    return [backbone.model] if mode == "all" else list(backbone.trainable_tail(blocks))


def select_trainable(backbone, fine_tune: str) -> list[nn.Parameter]:
    """Freeze the backbone except what ``fine_tune`` selects; return those parameters (each once)."""
    backbone.model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for mod in trainable_modules(backbone, fine_tune):
        for p in mod.parameters():
            if not p.requires_grad:
                p.requires_grad_(True)
                params.append(p)
    return params


def micro_batch(cfg: TrainConfig, backbone, device: torch.device) -> int | None:
    """Images per forward slice of a training step: ``cfg.micro_batch`` when given; else, on a
    CPU with BatchNorm in eval mode, as many images of ``cfg.image_size`` as the backbone's
    measured :attr:`~fewshot.backbones.Backbone.train_cpu_pixels` hold (at least 1; 8 for
    EfficientNet-Lite at 224 px); else ``None`` (the whole batch: on a GPU, or with ``bn=train``,
    whose batch statistics slices would change)."""
    if cfg.micro_batch is not None:
        return int(cfg.micro_batch)
    if device.type == "cpu" and cfg.batchnorm_mode() == "eval" and backbone.train_cpu_pixels:
        return max(1, int(backbone.train_cpu_pixels) // int(cfg.image_size) ** 2)
    return None


class FineTune:
    """Trainable backbone parameters + in-memory images + augmentation (``fine_tune != "none"``)."""

    def __init__(self, cfg: TrainConfig, data: RunData, device: torch.device) -> None:
        from ..methods.augment import ImageBank, rotated_copies

        self.cfg = cfg
        self.backbone = data.backbone
        self.modules = trainable_modules(self.backbone, cfg.fine_tune)
        self.params = select_trainable(self.backbone, cfg.fine_tune)
        self.bn_train = cfg.batchnorm_mode() == "train"
        self.backbone.model.to(device).eval()
        self.device = device
        load = int(round(cfg.image_size * 8 / 7)) if cfg.augment == "standard" else cfg.image_size
        rotations = cfg.class_rotations
        self.train_bank = ImageBank(data.train.paths[:len(data.train) // rotations], load, progress=cfg.progress)
        if rotations > 1:  # data.train already has the rotated classes (with_rotated_classes)
            self.train_bank.images = rotated_copies(self.train_bank.images, rotations)
        size = self.backbone.image_size  # the run's test size (training.data._test_size), which validation embeds at
        self.val_q_bank = ImageBank([str(p) for p in data.val_q.dataset.paths], size, cfg.progress)
        self.val_g_bank = ImageBank([str(p) for p in data.val_g.dataset.paths], size, cfg.progress)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        #: images per forward slice of a training step (``None``: the whole batch at once)
        self.micro_batch = micro_batch(cfg, self.backbone, device)
        #: the (convolution, BatchNorm) pairs a training forward folds (``[]``: none; see :mod:`.fold`)
        #: (a BatchNorm in train mode, under --bn train, is never folded)
        self.fold_pairs = self.backbone.conv_bn_pairs() if cfg.fold_bn else []
        #: the forward of the last validation (``"onnx"`` or ``"torch"``), and why not ONNX
        #: (once an export failed, the rest of the run validates on torch)
        self.val_runtime: str | None = None
        self._val_fallback: str | None = None

    def seed_epoch(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def train_mode(self, training: bool) -> None:
        """Eval mode everywhere, except the trainable blocks' BatchNorm layers when
        ``training`` and ``--bn train``."""
        self.backbone.model.eval()
        if training and self.bn_train:
            for mod in self.modules:
                for sub in mod.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.train()

    def autocast(self):
        """bfloat16 autocast on CUDA, nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        """Augmented, normalised ``float32 [B, 3, S, S]`` inputs of training items ``idx`` (on the device)."""
        from ..methods.augment import augment, normalise

        images = self.train_bank.images[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        if self.cfg.augment == "standard":
            x = augment(images, self.cfg.image_size, self.backbone.preprocess, self.generator)
        else:
            x = normalise(images, self.backbone.preprocess)
        return self._on_device(x)

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device, channels-last where the backbone asks for it."""
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.backbone.channels_last else x

    def features(self, idx: np.ndarray) -> torch.Tensor:
        """Backbone features ``float32 [B, D]`` of training items ``idx``, with gradients: the
        forward runs in slices of :attr:`micro_batch` images, concatenated (one backward through
        the loss then reaches every slice: the same gradient as one forward of the batch)."""
        return self.forward(self.inputs(idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features ``float32 [B, D]`` of inputs ``x`` ``[B, 3, S, S]``, with
        gradients, the forward in slices of :attr:`micro_batch` images (see :meth:`features`), each
        BatchNorm of :attr:`fold_pairs` folded into its convolution (:func:`.fold.folded_batchnorm`)."""
        step = self.micro_batch or len(x)
        with self.autocast(), folded_batchnorm(self.fold_pairs):
            parts = [self.backbone.model(x[i:i + step]).float() for i in range(0, len(x), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def embed_bank(self, bank, batch: int = 64, forward=None) -> torch.Tensor:
        """The current backbone's embeddings ``float32 [N, D]`` of a bank's images (eval mode):
        through ``forward`` (normalised CPU batches -> numpy, e.g. an ONNX Runtime session) when
        given, else the torch model on the device."""
        from ..methods.augment import normalise

        self.train_mode(False)
        out = []
        for i in range(0, len(bank), batch):
            x = normalise(bank.images[i:i + batch], self.backbone.preprocess)
            if forward is not None:
                out.append(torch.from_numpy(forward(x)))
                continue
            with self.autocast():
                out.append(self.backbone.model(self._on_device(x)).float())
        return torch.cat(out)

    def embed_banks(self, *banks) -> list[torch.Tensor]:
        """:meth:`embed_bank` of each bank; on a CPU with ``runtime`` ``auto`` or ``onnx``
        through ONNX Runtime on one in-memory export of the current weights
        (:func:`~fewshot.embed.runtime.snapshot_forward`; embeddings agree with torch to cosine
        >= 0.9999), else torch. :attr:`val_runtime` says which ran last."""
        from ..embed.runtime import snapshot_forward

        forward = None
        if self.cfg.runtime != "torch" and self._val_fallback is None:  # a failed export fails again
            self.train_mode(False)
            forward, why = snapshot_forward(self.backbone)
            if forward is None:
                (log.warning if self.cfg.runtime == "onnx" else log.info)(
                    "validation embeds with torch, not ONNX Runtime: %s", why)
                self._val_fallback = why
        self.val_runtime = "torch" if forward is None else "onnx"
        if forward is None:
            return [self.embed_bank(b) for b in banks]
        return [self.embed_bank(b, VAL_BATCH, forward) for b in banks]
