"""Weight averaging (``weight_average``): each epoch validates, and the best run saves, an average
of the trained weights instead of the last ones.

- ``"ema"``: an exponential moving average of the weights, updated after every optimizer step,
  ``w_avg <- d * w_avg + (1 - d) * w`` with ``d = ema_decay``, starting from the weights after
  the first step. It is Polyak averaging of the iterates (Polyak and Juditsky, "Acceleration of
  Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992) with exponential weights,
  as in Tarvainen and Valpola's mean teacher (NeurIPS 2017) and timm's ``ModelEma``.
- ``"swa"``: stochastic weight averaging (Izmailov, Podoprikhin, Garipov, Vetrov and Wilson,
  "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018, Algorithm 1
  with one average per epoch): the equal average of the weights at the end of each epoch from
  ``swa_start`` on. Before ``swa_start`` there is no average, and the raw weights are validated.

Both are :class:`torch.optim.swa_utils.AveragedModel` (``get_ema_multi_avg_fn(d)`` for EMA; its
running equal average for SWA). What is averaged is everything the run trains and saves: the
projection head, the method's own parameters (protonet's and MAML's logit scale, MAML's learned
output-layer initialisation; so it applies to every method, the MAML family included) and, when
fine-tuning, the whole backbone (its frozen parameters are constants: their average is
themselves).

BatchNorm: buffers are averaged together with the parameters (``use_buffers=True``; integer
ones, the ``num_batches_tracked`` counters, are copied, not averaged). With
``bn="eval"`` (the default for a pretrained backbone: :class:`~fewshot.training.finetune.FineTune`
keeps every BatchNorm layer in eval mode) and without fine-tuning, the running statistics never
change during training, so the averaged buffers are those statistics and the averaged model is
exactly the average of the weights. With ``bn="train"`` (a backbone trained from scratch) the
running statistics are averaged like the weights, as timm's ``ModelEmaV2`` does: an
approximation of the statistics of the averaged weights. Izmailov et al. recompute them with one
more pass over the training data (:func:`torch.optim.swa_utils.update_bn`); that is not done
here, because under ``fine_tune="last:N"`` it would re-estimate the frozen blocks' statistics too
(it resets every BatchNorm layer of the model) and because it costs a forward pass over every
training image each epoch.

The loop validates and saves with the averaged weights in place (:meth:`WeightAverage.applied`:
the raw ones are set aside and put back afterwards, also on an error or Ctrl-C), so validation,
the ONNX export of a fine-tuned backbone, ``save_run`` and a method's episode classifier need
nothing new. The checkpoint holds both: the raw weights to train on and the average to continue
(:meth:`WeightAverage.state_dict`), so ``resume`` gives the uninterrupted run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from ..methods import Method
from .config import TrainConfig

__all__ = ["WeightAverage", "make_average"]


class Averaged(nn.Module):
    """What is averaged: the method's head (``head``), its own parameters (``extra``) and, when
    fine-tuning, the backbone (``backbone``); the very modules and parameters the run trains."""

    def __init__(self, method: Method, backbone: nn.Module | None) -> None:
        super().__init__()
        self.head = method.head
        self.extra = nn.ParameterList(method.extra_parameters())
        if backbone is not None:
            self.backbone = backbone


def _floats_only(average: Callable[..., None]) -> Callable[..., None]:
    """``average`` (a ``multi_avg_fn`` of :mod:`torch.optim.swa_utils`) for floating-point
    tensors; integer ones (BatchNorm's ``num_batches_tracked`` counters) take the current value:
    a mean of counters means nothing, and the SWA update refuses integer division.
    :class:`AveragedModel` calls it once per device and dtype."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: Any) -> None:
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            average(averaged, current, n_averaged)
        else:
            _copy(averaged, current)

    return update


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters then buffers, in the order :class:`AveragedModel` averages them."""
    return [*module.parameters(), *module.buffers()]


@torch.no_grad()
def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy ``src`` into ``dst`` in place, tensor by tensor."""
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


class WeightAverage:
    """The running average of a run's weights (see the module docstring).

    Args:
        kind: ``"ema"`` or ``"swa"``.
        method: the run's method (its head and :meth:`~fewshot.methods.base.Method.extra_parameters`).
        backbone: the fine-tuned backbone module, or ``None`` (a frozen backbone is not averaged).
        decay: the EMA decay per step (``"ema"``).
        start: the first epoch averaged (``"swa"``).
    """

    def __init__(self, kind: str, method: Method, backbone: nn.Module | None = None, *, decay: float = 0.99,
                 start: int = 1) -> None:
        if kind not in ("ema", "swa"):
            raise ValueError(f"unknown weight average {kind!r}")
        self.kind, self.decay, self.start = kind, float(decay), int(start)
        self.live = Averaged(method, backbone)
        avg = get_ema_multi_avg_fn(self.decay) if kind == "ema" else get_swa_multi_avg_fn()
        self.model = AveragedModel(self.live, multi_avg_fn=_floats_only(avg), use_buffers=True)
        self.model.requires_grad_(False)
        #: the epochs whose end weights are in a ``"swa"`` average
        self.epochs: list[int] = []

    @property
    def updates(self) -> int:
        """How many weight snapshots the average holds (0: none yet, the raw weights stand)."""
        return int(self.model.n_averaged)

    def after_step(self) -> None:
        """After each optimizer step: ``"ema"`` takes the new weights into its average."""
        if self.kind == "ema":
            self.model.update_parameters(self.live)

    def after_epoch(self, epoch: int) -> None:
        """After each training epoch: ``"swa"`` takes the epoch's weights into its average from
        epoch ``start`` on."""
        if self.kind == "swa" and epoch >= self.start:
            self.model.update_parameters(self.live)
            self.epochs.append(int(epoch))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the trained modules for the ``with`` block (nothing changes
        while the average is empty); the raw weights come back afterwards, also on an error."""
        if self.updates == 0:
            yield
            return
        live = _tensors(self.live)
        raw = [t.detach().clone() for t in live]
        try:
            _copy(live, _tensors(self.model.module))
            yield
        finally:
            _copy(live, raw)

    def state_dict(self) -> dict[str, Any]:
        """The average for a checkpoint: CPU tensors (``n_averaged``, ``module.*``) and the
        averaged epochs."""
        tensors = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {"tensors": tensors, "epochs": list(self.epochs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (raises ``KeyError`` / ``RuntimeError`` when it does
        not fit this run's modules)."""
        self.model.load_state_dict(state["tensors"])
        self.epochs = [int(e) for e in state["epochs"]]

    def info(self) -> dict[str, Any]:
        """What ``config.json`` records of the average behind the saved weights."""
        if self.kind == "ema":
            return {"kind": "ema", "decay": self.decay, "steps": self.updates}
        return {"kind": "swa", "start": self.start, "epochs": list(self.epochs)}


def make_average(cfg: TrainConfig, method: Method, backbone: nn.Module | None) -> WeightAverage | None:
    """The run's :class:`WeightAverage` (``None`` for ``weight_average="none"``), built once the
    method sits on its device (and, when fine-tuning, holds its backbone)."""
    if cfg.weight_average == "none":
        return None
    return WeightAverage(cfg.weight_average, method, backbone, decay=cfg.average_decay(), start=cfg.average_start())
