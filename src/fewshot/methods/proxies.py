"""The shared part of the methods whose loss learns one vector (or a few) per training class,
the *proxies*: ``proxyanchor`` (:mod:`.proxyanchor`) and ``arcface`` (:mod:`.arcface`).

* The proxies' number depends on the training classes, so the loss is built when the train data
  is known: :meth:`ProxyMethod.check_data`, which the trainer calls before it builds the
  optimizer (:func:`fewshot.training.setup.build_setup`).
* They train with the head, at their own rate: :meth:`ProxyMethod.param_groups` gives them a
  ``"head"`` group of their own with ``"lr_factor"`` ``proxy_lr_factor`` (default 100: the
  Proxy Anchor paper's code trains its proxies at 100 x the network's rate).
* They are a training device only: a run embeds with its head, and loading a run
  (:func:`fewshot.methods.runs.load_run`) needs no proxy. They are saved all the same
  (:meth:`ProxyMethod.extra_tensors`, ``method.loss.*`` and ``method.num_classes`` in
  ``model.safetensors``) so that ``resume`` continues with the proxies it stopped with, whose
  Adam state the checkpoint holds.

Batches are shuffled ``batch_size`` items of any classes (the papers' sampling): a proxy loss
needs no positive pair in the batch, the proxies are the other side of every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import FewshotError
from ..options import check_above
from .base import IndexBatch, Method, TrainData, option

__all__ = ["ProxyMethod", "ProxyOptions"]


@dataclass
class ProxyOptions:
    """Options of every proxy method: batches and the proxies' learning rate."""

    batch_size: int = option(64, "Items per batch (shuffled, of any classes).", min=2)
    proxy_lr_factor: float = option(100.0, "Learning rate of the class proxies as a multiple of --lr (the head's).")

    def __post_init__(self) -> None:
        check_above(self, proxy_lr_factor=0.0)


class ProxyMethod(Method):
    """Shared part of the proxy methods: the loss built on the train classes, its proxies trained
    at their own rate and saved, shuffled batches.

    Subclasses set :attr:`Config` (a :class:`ProxyOptions`) and :meth:`make_loss`.
    Data-parallel: the loss sees the embeddings of the whole batch, gathered from every process,
    and the proxies are parameters of the step like the head's (their gradients averaged).

    Attributes:
        loss_fn: the pytorch-metric-learning loss holding the proxies (``None`` until
            :meth:`build_loss`).
        num_classes: ``C``, the classes it was built for (0 until then).
    """

    Config = ProxyOptions
    data_parallel = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn: nn.Module | None = None
        self.num_classes = 0

    def make_loss(self, num_classes: int, embedding_size: int) -> nn.Module:
        """The loss for ``num_classes`` classes of ``embedding_size``-d embeddings, its proxies
        freshly initialised (torch's global generator, which the trainer seeds)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the proxies
    def embedding_size(self) -> int:
        """``E``, the head's output dimension (one forward pass of a zero row)."""
        with torch.no_grad():
            return int(self.embed(torch.zeros(2, self.in_dim, device=self.device)).shape[-1])

    def build_loss(self, num_classes: int) -> None:
        """Build :attr:`loss_fn` for ``num_classes`` classes on :attr:`device`; a loss already
        built for as many classes is kept (its proxies may have trained)."""
        if self.loss_fn is not None and self.num_classes == num_classes:
            return
        self.loss_fn = self.make_loss(int(num_classes), self.embedding_size())
        self.num_classes = int(num_classes)
        for p in self.extra_parameters():
            p.data = p.data.to(self.device)

    def extra_parameters(self) -> list[nn.Parameter]:
        """The proxies (none before :meth:`build_loss`)."""
        return [] if self.loss_fn is None else list(self.loss_fn.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        """:meth:`Method.param_groups` with the proxies in a ``"head"`` group of their own, right
        after the head's, at ``proxy_lr_factor`` x the head's rate."""
        proxies = self.extra_parameters()
        groups = super().param_groups()
        if proxies:
            groups[0]["params"] = [p for p in groups[0]["params"] if all(p is not q for q in proxies)]
            groups.insert(1, {"params": proxies, "name": "head", "lr_factor": float(self.opts.proxy_lr_factor)})
        return groups

    def check_data(self, train: TrainData) -> None:
        """Refuse training data of fewer than two classes, then build the loss with one proxy (or
        ``sub_centers``) per train class (:meth:`build_loss`): the trainer calls this before it
        builds the optimizer, which then trains them.

        Raises:
            FewshotError: fewer than 2 train classes.
        """
        if train.num_classes < 2:
            raise FewshotError(f"{self.name} training needs at least 2 train classes, got {train.num_classes}: "
                               "with one class every item is nearest to its own proxy and nothing is learned",
                               hint="give the split 2 or more train classes")
        self.build_loss(train.num_classes)

    # ------------------------------------------------------------------ the loss
    def epoch_batches(self, train: TrainData, rng: np.random.Generator) -> list[IndexBatch]:
        """One pass over the training items, shuffled, in ``len(train) // batch_size`` batches
        of ``batch_size`` items (the rest waits for another epoch's shuffle); one batch of every
        item when there are fewer than ``batch_size``."""
        order = rng.permutation(len(train)).astype(np.int64)
        size = min(int(self.opts.batch_size), len(order))
        return [IndexBatch(idx=b, y=train.y[torch.from_numpy(b)])
                for b in order[: len(order) // size * size].reshape(-1, size)]

    def items(self, batch: IndexBatch) -> np.ndarray:
        """The batch's items, int64 ``[B]``."""
        return batch.idx

    def loss_from(self, embeddings: torch.Tensor, batch: IndexBatch) -> torch.Tensor:
        """The loss of one batch from its embeddings ``[B, E]`` and the proxies: a scalar.

        Raises:
            RuntimeError: the loss was not built (:meth:`check_data` before training).
        """
        if self.loss_fn is None:
            raise RuntimeError(f"{self.name}: the loss is built from the train data: call check_data(train) first")
        return self.loss_fn(embeddings, batch.y.to(embeddings.device))

    # ------------------------------------------------------------------ state
    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """The proxies (``loss.<name>``) and their number of classes (``num_classes``); none
        before :meth:`build_loss`."""
        if self.loss_fn is None:
            return {}
        state = {f"loss.{k}": v.detach().cpu().contiguous() for k, v in self.loss_fn.state_dict().items()}
        return {"num_classes": torch.tensor(self.num_classes, dtype=torch.int64), **state}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_tensors` saved (nothing: the proxies stay as they are).

        Raises:
            KeyError: proxies without their ``num_classes``.
            RuntimeError: proxies of another shape than the method's loss.
        """
        state = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
        if not state:
            return
        self.build_loss(int(tensors["num_classes"]))
        self.loss_fn.load_state_dict(state)
