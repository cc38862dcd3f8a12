"""Fine-tuning: the backbone's last blocks train too, on augmented images held in memory."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..methods.base import TrainConfig
from .data import _Data


# --------------------------------------------------------------------------- fine-tuning
class _FineTune:
    """Trainable backbone tail + in-memory images + augmentation for ``fine_tune="last"``."""

    def __init__(self, cfg: TrainConfig, data: _Data, device: torch.device) -> None:
        from ..methods.augment import ImageBank

        self.cfg = cfg
        self.backbone = data.backbone
        model = self.backbone.model
        for p in model.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for mod in self.backbone.trainable_tail(max(1, int(cfg.fine_tune_blocks))):
            for p in mod.parameters():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    params.append(p)
        self.params = params
        model.to(device).eval()
        self.device = device
        load = int(round(cfg.image_size * 8 / 7))
        self.train_bank = ImageBank(data.train.paths, load, progress=cfg.progress)
        self.val_q_bank = ImageBank([str(p) for p in data.val_q.dataset.paths], cfg.image_size, cfg.progress)
        self.val_g_bank = ImageBank([str(p) for p in data.val_g.dataset.paths], cfg.image_size, cfg.progress)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def seed_epoch(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def features(self, idx: np.ndarray) -> torch.Tensor:
        from ..methods.augment import augment

        images = augment(self.train_bank.images[torch.from_numpy(idx)], self.cfg.image_size,
                         self.backbone.preprocess, self.generator)
        return self.backbone.model(images.to(self.device))

    @torch.no_grad()
    def embed_bank(self, bank, batch: int = 64) -> torch.Tensor:
        from ..methods.augment import normalise

        out = [self.backbone.model(normalise(bank.images[i:i + batch], self.backbone.preprocess).to(self.device))
               for i in range(0, len(bank), batch)]
        return torch.cat(out).float()
