"""Model-agnostic meta-learning (Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", ICML 2017), second order (``maml``) and first order (``fomaml``),
on cached backbone embeddings or, with ``--fine-tune``, through the trainable backbone.

Learner (all ``float32``; ``D`` backbone dim, ``E`` head output dim, ``N`` ways)::

    x  [B, D]  backbone embeddings (cached when frozen; see inner_params for the whole network)
    z = f_theta(x)                       [B, E]  projection head (heads.py), ||z|| = 1
    logits = s * (z @ W.T + b)           [B, N]  N-way output layer, phi = (W [N, E], b [N])

``s = exp(log_scale)`` is a learned logit scale (unit-norm features give tiny logits otherwise).

Per task (support ``(x_s, y_s)`` ``[N*K]``, queries ``(x_q, y_q)`` ``[N*Q]``), the inner loop
adapts the N-way output layer with ``m`` steps of gradient descent (Finn et al. eq. 1)::

    phi_0     = init(f_theta(x_s), y_s)
    phi_{j+1} = phi_j - alpha * grad_phi CE(s * (f_theta(x_s) @ W_j.T + b_j), y_s)

and the outer (meta) loss is the query loss after adaptation, averaged over a meta-batch of
``T`` tasks and minimised with Adam over the meta-parameters ``omega = (theta, log_scale[, W0,
b0])`` (Finn et al. eq. 2-3)::

    L(omega) = 1/T * sum_t CE(s * (f_theta(x_q) @ W_m.T + b_m), y_q)

* **second order** (``maml``): ``phi_{j+1}`` keeps its graph (``torch.autograd.grad(...,
  create_graph=True)``), so ``dL/d theta`` includes the Hessian-vector terms of the inner steps
  (the features ``f_theta(x_s)`` move the inner gradients, and the prototype init depends on
  ``theta``).
* **first order** (``fomaml``, Finn et al. section 5.2): the inner gradients are constants
  (``create_graph=False``), i.e. ``d phi_m / d phi_0 = I``; the outer gradient is the gradient
  of the post-adaptation query loss with respect to the adapted parameters, passed straight to
  their initial values (and through the init to ``theta``).

Output-layer initialisation per task (``init``): N-way layers have no meaningful shared
initial value, because way ``k`` is a different class in every task. Options:

* ``"proto"`` (default): proto-MAML (Triantafillou et al., "Meta-Dataset", ICLR 2020, sec. 3.2):
  ``W_k = 2 c_k``, ``b_k = -||c_k||^2`` with ``c_k`` the support prototypes of ``f_theta``.
  Then ``z @ W_k + b_k = -||z - c_k||^2 + ||z||^2``: before adaptation the learner is exactly a
  prototypical network (same softmax), and the inner steps fine-tune from there. Gradients
  flow through the init into ``theta`` (in both orders, as in Triantafillou et al.).
* ``"zero"``: ``W = 0, b = 0`` at every task start (the "zeroing trick" of Kao et al., "MAML
  is a Noisy Contrastive Learner in Few-Shot Classification", ICLR 2022; see also Ye and Chao,
  "How to Train Your MAML to Excel in Few-Shot Classification", ICLR 2022). One inner step from
  zero gives ``W_k`` proportional to the episode-centred class mean.
* ``"learned"``: a meta-learned ``(W0, b0)`` shared by all tasks, as in the original MAML
  (needs the same ``N`` at test time; other ``N`` fall back to ``"zero"``).

What the inner loop adapts (``inner_params``, ``--inner-params``):

* ``"head"`` (default): only the N-way output layer; the projection head (and a fine-tuned
  backbone) is meta-learned in the outer loop only. This is ANIL (Raghu et al., "Rapid
  Learning or Feature Reuse?", ICLR 2020, which matches full MAML's accuracy), and it is the
  cheapest: the features go through the network once per task.
* ``"tail"``: the output layer and the projection head (everything after the backbone).
* ``"all"``: also every backbone parameter that ``--fine-tune`` trains; with ``--fine-tune
  all`` that is the whole network, the MAML of Finn et al. (2017). The support images go
  through the whole network at every inner step, and the second-order meta-gradient
  differentiates through all of it (:func:`full_adapted_query_loss`, via
  :func:`torch.func.functional_call` and ``torch.autograd.grad(create_graph=True)``): by far the
  most expensive (``bench/maml_cost.py`` measures time and memory per meta-batch).

:func:`inner_adapt` itself is general (any module, any subset of parameters; the tests check
its second-order meta-gradient against finite differences on a small conv net).

At test time the model is an embedding model (every command embeds images once and works on the
embeddings), so whatever ``inner_params`` was trained with, a test episode adapts the N-way
layer on the support embeddings (:meth:`MAML.episode_classifier`; :meth:`~fewshot.methods.base.Method.attach`
sets it on a run loaded by :func:`fewshot.methods.runs.load_run`, so ``fewshot evaluate --model
RUN`` uses it) each episode's support set initialises the output layer and adapts it with
``inner_steps_test`` steps; the adapted layer then classifies the queries. Input: float32
``support_z [N*K, E]``, int64 ``support_y [N*K]``, float32 ``query_z [N*Q, E]``; output: int64
``[N*Q]``.

What to expect (measured, see docs/guides/training.md): with the proto init the inner loop starts from a
good solution, so the second-order terms are small and ``maml`` and ``fomaml`` train almost the
same head. In 1-shot episodes each prototype *is* its support example, the support set is
already classified with confidence and adaptation changes almost nothing; in 5-shot episodes it
adds a few tenths of a point over the un-adapted prototypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from ..data.episodes import Episode
from ..errors import FewshotError
from ..model import EpisodeClassifier
from .adapt import (INITS, INNER_PARAMS, Learner, OutputLayer, adapted_query_loss, full_adapted_query_loss,
                    inner_adapt, make_adapt_classifier, output_init)
from .base import EpisodicOptions, Method, TrainData, option
from .protonet import INIT_SCALE
from .registry import register_method

__all__ = ["OutputLayer", "inner_adapt", "output_init", "adapted_query_loss", "make_adapt_classifier",
           "INITS", "INNER_PARAMS", "Learner", "MAMLOptions", "MAML", "FOMAML"]

# ---------------------------------------------------------------------- training method
@dataclass
class MAMLOptions(EpisodicOptions):
    """Options of ``maml`` and ``fomaml``. Defaults chosen on the Grocery val classes (see
    bench/quality_episodic.py): with the logit scale ``s = 5`` an inner step of 0.5 moves the
    5-shot decision boundaries usefully (+0.5-1 point of val accuracy over the un-adapted
    prototypes) without overfitting the support set."""

    inner_lr: float = option(0.5, "Inner-loop learning rate.", min=0.0)
    inner_steps: int = option(5, "Inner steps when training.", min=0)
    inner_steps_test: int = option(10, "Inner steps when evaluating.", min=0)
    meta_batch: int = option(4, "Tasks per outer step.", min=1)
    init: str = option("proto", "Each task's initial N-way layer: proto (from the support prototypes) | zero | "
                       "learned.", flag="--maml-init", choices=INITS)
    inner_params: str = option("head", "What the inner loop adapts: head (the N-way layer only, ANIL) | tail (also "
                               "the projection head) | all (also every fine-tuned backbone parameter: with "
                               "--fine-tune all, the whole network, Finn et al. 2017).", choices=INNER_PARAMS)
    #: fewshot 0.1.0 called ``init`` ``maml_init`` in its flat train_config
    LEGACY_NAMES: ClassVar[dict[str, str]] = {"maml_init": "init"}


@register_method("maml")
class MAML(Method):
    """MAML training method (``fewshot train --method maml``; :class:`FOMAML` for ``fomaml``).

    One batch is a meta-batch: a list of ``opts.meta_batch`` episodes (tasks). :meth:`loss`
    averages :func:`adapted_query_loss` over them (``opts.inner_steps`` inner steps of size
    ``opts.inner_lr``); the trainer's Adam takes the outer step. Not data-parallel: its loss
    adapts to every task in inner loops (it overrides :meth:`loss`). An epoch holds
    ``ceil(opts.episodes_per_epoch / opts.meta_batch)`` meta-batches.

    Options: :class:`MAMLOptions` (``init``: ``"proto"``, ``"zero"`` or ``"learned"``; default
    ``"proto"``).

    Extra state saved as ``method.*``: ``log_scale`` (float32 scalar), ``init_mode`` (int64 scalar,
    index into :data:`INITS`) and, with ``init="learned"``, ``init_weight [ways, E]`` and
    ``init_bias [ways]`` (float32).
    """

    name = "maml"
    summary = ("MAML (Finn et al. 2017), second order: adapts an N-way layer per task (proto init), or the "
               "whole network with --inner-params all")
    episodic = True
    data_parallel = False
    fused_adam = True
    first_order: bool = False
    Config = MAMLOptions
    defaults: ClassVar[dict] = {"lr": 1e-4}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init = str(self.opts.init or "proto")
        if self.init not in INITS:
            raise ValueError(f"unknown maml_init {self.init!r}: use one of {', '.join(INITS)}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(INIT_SCALE)))
        out_dim = int(self.head(torch.zeros(1, self.in_dim)).shape[-1])
        ways = int(self.episodes.ways)
        self.out = OutputLayer(out_dim, ways)
        self.out.requires_grad_(False)  # placeholders: called functionally with per-task weights
        self.init_weight = nn.Parameter(torch.zeros(ways, out_dim))
        self.init_bias = nn.Parameter(torch.zeros(ways))

    @property
    def scale(self) -> torch.Tensor:
        """Logit scale ``s = exp(log_scale)``."""
        return self.log_scale.exp()

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_scale] + ([self.init_weight, self.init_bias] if self.init == "learned" else [])

    def to(self, device):
        super().to(device)
        self.out.to(self.device)
        for p in (self.init_weight, self.init_bias):
            p.data = p.data.to(self.device)
        return self

    def epoch_batches(self, train: TrainData, rng: np.random.Generator) -> Iterator[list[Episode]]:
        """Meta-batches of ``opts.meta_batch`` seeded episodes (``opts.episodes_per_epoch`` in all)."""
        sampler = self.episode_sampler(train, rng)
        size = max(1, int(self.opts.meta_batch))
        batch: list[Episode] = []
        for ep in sampler:
            batch.append(ep)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _learned(self) -> dict[str, torch.Tensor] | None:
        return {"weight": self.init_weight, "bias": self.init_bias} if self.init == "learned" else None

    def check_data(self, train: TrainData) -> None:
        """As :meth:`Method.check_data`; also refuses ``--inner-params all`` on a frozen backbone.

        Raises:
            FewshotError: ``inner_params="all"`` without fine-tuning (``options`` names both).
        """
        super().check_data(train)
        if self.opts.inner_params == "all" and not self.fine_tuning:
            raise FewshotError("inner_params=all adapts the fine-tuned backbone parameters in the inner loop, "
                               "but fine_tune is none (the backbone is frozen)",
                               hint="set fine_tune=all (or last:N), or use inner_params=tail",
                               options=("inner_params", "fine_tune"))

    def _learner(self) -> Learner:
        """The :class:`Learner` over this method's modules (the backbone only for ``inner_params="all"``)."""
        backbone = self.backbone if self.opts.inner_params == "all" else None
        if getattr(self, "_learner_module", None) is None or self._learner_module.backbone is not backbone:
            self._learner_module = Learner(self.head, self.out, backbone)
        return self._learner_module

    def _adapted_names(self, learner: Learner) -> list[str]:
        keep = ("head.",) + (("backbone.",) if self.opts.inner_params == "all" else ())
        return [n for n, p in learner.named_parameters() if p.requires_grad and n.startswith(keep)]

    def _full_task_loss(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        n_s = len(ep.support_idx)
        idx = np.concatenate([ep.support_idx, ep.query_idx])
        x = self.inputs(idx) if self.opts.inner_params == "all" else self.features(idx)
        ys = torch.as_tensor(ep.support_y, device=x.device)
        yq = torch.as_tensor(ep.query_y, device=x.device)
        learner = self._learner()
        return full_adapted_query_loss(learner, self._adapted_names(learner), self.scale, x[:n_s], ys, x[n_s:], yq,
                                       ep.n_way, init=self.init, steps=int(self.opts.inner_steps),
                                       lr=float(self.opts.inner_lr), first_order=self.first_order,
                                       learned=self._learned())

    def task_loss(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query loss after adaptation, query accuracy)`` of one episode."""
        if self.opts.inner_params != "head":
            return self._full_task_loss(ep)
        n_s = len(ep.support_idx)
        x = self.features(np.concatenate([ep.support_idx, ep.query_idx]))
        ys = torch.as_tensor(ep.support_y, device=x.device)
        yq = torch.as_tensor(ep.query_y, device=x.device)
        return adapted_query_loss(self.embed, self.out, self.scale, x[:n_s], ys, x[n_s:], yq, ep.n_way,
                                  init=self.init, steps=int(self.opts.inner_steps), lr=float(self.opts.inner_lr),
                                  first_order=self.first_order, learned=self._learned())

    def loss(self, batch: list[Episode] | Episode) -> torch.Tensor:
        tasks = batch if isinstance(batch, list) else [batch]
        return torch.stack([self.task_loss(ep)[0] for ep in tasks]).mean()

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        t = {"log_scale": self.log_scale.detach().cpu().reshape(()),
             # the init mode travels with the weights (index into INITS), whatever the config holds
             "init_mode": torch.tensor(INITS.index(self.init), dtype=torch.int64)}
        if self.init == "learned":
            t["init_weight"] = self.init_weight.detach().cpu().contiguous()
            t["init_bias"] = self.init_bias.detach().cpu().contiguous()
        return t

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            if "init_mode" in tensors:
                self.init = INITS[int(tensors["init_mode"])]
            if "log_scale" in tensors:
                self.log_scale.copy_(tensors["log_scale"].reshape(()))
            if "init_weight" in tensors:
                self.init_weight.data = tensors["init_weight"].float().clone()
                self.init_bias.data = tensors["init_bias"].float().clone()

    def episode_classifier(self) -> EpisodeClassifier | None:
        """Adapt-on-support classifier: ``opts.inner_steps_test`` steps from the task's init."""
        return make_adapt_classifier(init=self.init, scale=float(self.scale.detach()),
                                     lr=float(self.opts.inner_lr), steps=int(self.opts.inner_steps_test),
                                     learned=self._learned())


@register_method("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, sec. 5.2): inner gradients without their graph."""

    name = "fomaml"
    summary = "First-order MAML (Finn et al. 2017, sec. 5.2)"
    first_order = True
