"""The trainer's optimizer and learning-rate policy, for every method.

A method says which parameters train (:meth:`~fewshot.methods.base.Method.param_groups`:
``"head"`` and, when fine-tuning, ``"backbone"``, optionally with an ``"lr_factor"``); the
trainer gives each group its rate (``lr``, ``backbone_lr``), builds Adam (Kingma and Ba 2015)
with ``weight_decay`` (PyTorch's fused kernel where the method asks for it:
:attr:`~fewshot.methods.base.Method.fused_adam`), warms the backbone up and applies the
schedule (:func:`lr_scheduler`), and takes each step (:func:`train_step`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..methods import Method
from .config import TrainConfig

__all__ = ["param_groups", "make_optimizer", "lr_scheduler", "train_step"]


def param_groups(method: Method, cfg: TrainConfig) -> list[dict[str, Any]]:
    """``method``'s parameter groups with their learning rates: ``"head"`` ``cfg.lr``,
    ``"backbone"`` :meth:`TrainConfig.backbone_learning_rate`, each times the group's
    ``"lr_factor"`` when it has one."""
    rates = {"head": float(cfg.lr), "backbone": cfg.backbone_learning_rate()}
    groups = []
    for group in method.param_groups():
        rate = rates[group["name"]]
        if "lr_factor" in group:
            rate *= float(group["lr_factor"])
        groups.append({"params": group["params"], "lr": rate, "name": group["name"]})
    return groups


def make_optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over :func:`param_groups` with ``cfg.weight_decay``; with PyTorch's fused kernel
    where the method asks for it and the kernel exists (same update rule)."""
    if method.fused_adam:
        try:
            return torch.optim.Adam(param_groups(method, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(param_groups(method, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup: int, schedule: str = "constant",
                 total_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor of each parameter group at optimizer step ``t``:

    - the ``"backbone"`` group warms up linearly: ``min(1, (t + 1) / warmup)``;
    - ``schedule="cosine"``: after the warm-up, every group decays by
      ``(1 + cos(pi * min(1, (t - warmup) / (total_steps - warmup)))) / 2``, down to 0 at
      ``total_steps`` (SGDR, Loshchilov and Hutter 2017, eq. 5, one cycle); ``"constant"``: 1.
    """
    span = max(1, int(total_steps) - warmup)

    def decay(t: int) -> float:
        if schedule != "cosine" or t < warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / span)))

    def ramp(t: int) -> float:
        return (1.0 if warmup <= 0 else min(1.0, (t + 1) / warmup)) * decay(t)

    lambdas = [ramp if g.get("name") == "backbone" else decay for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def train_step(method: Method, batch: Any, optimizer: torch.optim.Optimizer) -> float:
    """One optimisation step in one process: zero the gradients, ``method.loss(batch)``,
    backward, step. Returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss = method.loss(batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
