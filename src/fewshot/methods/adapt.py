"""The maths of MAML's inner loop (:mod:`.maml`): the N-way output layer, its per-task
initialisation, the inner loop itself and the adapted query loss, for the N-way layer alone
(:func:`adapted_query_loss`) or for any parameters of the whole learner
(:func:`full_adapted_query_loss`), and the adapt-on-support episode classifier of a loaded run
(:func:`make_adapt_classifier`). Shapes and the algorithm: see :mod:`.maml`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .functional import prototypes

__all__ = ["OutputLayer", "inner_adapt", "output_init", "adapted_query_loss", "full_adapted_query_loss",
           "make_adapt_classifier", "Learner", "INITS", "INNER_PARAMS"]

INITS = ("proto", "zero", "learned")
#: what the inner loop adapts (``--inner-params``)
INNER_PARAMS = ("head", "tail", "all")


class OutputLayer(nn.Module):
    """The N-way layer: ``z [B, E] -> scale * (z @ weight.T + bias)  [B, N]``.

    Its own parameters are placeholders: the learner always calls it through
    :func:`torch.func.functional_call` with per-task ``{"weight": [N, E], "bias": [N]}``.
    """

    def __init__(self, in_dim: int, n_way: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_way, in_dim))
        self.bias = nn.Parameter(torch.zeros(n_way))

    def forward(self, z: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return scale * F.linear(z, self.weight, self.bias)


def inner_adapt(
    module: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    first_order: bool,
    adapt: Sequence[str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    kwargs: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """MAML's inner loop: ``steps`` plain gradient-descent steps on ``loss_fn(module(x), y)``.

    ``module`` is evaluated with :func:`torch.func.functional_call` on the current fast weights;
    the gradient is taken with :func:`torch.autograd.grad` with ``create_graph=not first_order``.

    Args:
        module: the network (its own parameters are used for names missing from ``params``).
        params: ``{name: tensor}``, the starting values theta (may carry a graph to
            meta-parameters; tensors that do not require grad are made to).
        x, y: the support inputs and targets.
        steps: number of inner steps (0 returns ``params`` unchanged).
        lr: inner learning rate alpha.
        first_order: drop second-order terms (FOMAML): inner gradients are constants.
        adapt: the names to adapt (default: all of ``params``).
        loss_fn: ``loss_fn(output, y) -> scalar``.
        kwargs: extra keyword arguments for ``module.forward``.

    Returns:
        ``{name: theta'}``: ``params`` with the adapted entries replaced.
    """
    fast = dict(params)
    names = list(adapt) if adapt is not None else list(fast)
    for n in names:
        if not fast[n].requires_grad:
            fast[n] = fast[n].detach().requires_grad_()
    for _ in range(int(steps)):
        loss = loss_fn(functional_call(module, fast, (x,), dict(kwargs or {})), y)
        # retain_graph: the loss graph also holds the path to meta-parameters (e.g. through the
        # prototype init), which the outer backward still needs in the first-order case.
        # allow_unused: a parameter the forward never reads (EfficientNet's ImageNet classifier
        # under --fine-tune all) has gradient zero and stays as it is
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order,
                                    retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fast[n] = fast[n] - lr * g
    return fast


def output_init(mode: str, support_z: torch.Tensor, support_y: torch.Tensor, n_way: int,
                learned: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Initial ``{"weight": [N, E], "bias": [N]}`` of the N-way layer for one task.

    Args:
        mode: ``"proto"`` (``W_k = 2 c_k``, ``b_k = -||c_k||^2``), ``"zero"``, or ``"learned"``
            (``learned["weight"] [N, E]``, ``learned["bias"] [N]``; falls back to zero when their
            ``N`` differs from ``n_way``).
        support_z: head embeddings of the support set ``[N*K, E]``.
        support_y: int64 ``[N*K]``.
    """
    e = support_z.shape[-1]
    if mode == "proto":
        c = prototypes(support_z, support_y, n_way)
        return {"weight": 2.0 * c, "bias": -c.pow(2).sum(-1)}
    if mode == "learned" and learned is not None and learned["weight"].shape[0] == n_way:
        return {"weight": learned["weight"], "bias": learned["bias"]}
    if mode not in INITS:
        raise ValueError(f"unknown MAML output init {mode!r}: use one of {', '.join(INITS)}")
    z = support_z.new_zeros
    return {"weight": z(n_way, e), "bias": z(n_way)}


def adapted_query_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    out: OutputLayer,
    scale: torch.Tensor,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    n_way: int,
    *,
    init: str,
    steps: int,
    lr: float,
    first_order: bool,
    learned: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's meta-loss: adapt the N-way layer on the support set, score the queries.

    Args:
        head: ``[B, D] -> [B, E]`` (the projection head, meta-parameters theta).
        out: the :class:`OutputLayer` module (called functionally).
        scale: logit scale ``s`` (scalar tensor).
        support_x, query_x: backbone embeddings ``[N*K, D]``, ``[N*Q, D]``.
        support_y, query_y: int64 way indices.

    Returns:
        ``(query cross-entropy after adaptation, query accuracy (detached))``.
    """
    z = head(torch.cat([support_x, query_x]))
    zs, zq = z[: len(support_x)], z[len(support_x):]
    params = output_init(init, zs, support_y, n_way, learned)
    fast = inner_adapt(out, params, zs, support_y, steps=steps, lr=lr, first_order=first_order,
                       kwargs={"scale": scale})
    logits = functional_call(out, fast, (zq,), {"scale": scale})
    loss = F.cross_entropy(logits, query_y)
    return loss, (logits.detach().argmax(-1) == query_y).float().mean()


class Learner(nn.Module):
    """The whole learner as one module, for an inner loop over any of its parameters:
    ``images or features [B, ...] -> backbone (optional) -> head -> N-way layer -> [B, N]``.

    Its parameter names are ``backbone.*``, ``head.*`` and ``out.weight`` / ``out.bias``;
    :func:`inner_adapt` calls it through :func:`torch.func.functional_call`.
    """

    def __init__(self, head: nn.Module, out: OutputLayer, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.head, self.out = head, out
        self.backbone = backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [B, E]``: backbone (when set) and head."""
        return self.head(self.backbone(x) if self.backbone is not None else x)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return self.out(self.embed(x), scale)


def full_adapted_query_loss(learner: Learner, adapt: Sequence[str], scale: torch.Tensor,
                            support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                            query_y: torch.Tensor, n_way: int, *, init: str, steps: int, lr: float,
                            first_order: bool, learned: Mapping[str, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's meta-loss when the inner loop adapts more than the N-way layer (Finn et al.
    2017, eq. 1-3): the N-way layer starts from ``init`` on the support embeddings, then
    ``steps`` inner steps adapt it *and* the learner parameters named in ``adapt``; the query
    loss is taken through the adapted parameters. Second order unless ``first_order``.

    Args:
        learner: the :class:`Learner` (its parameters are the meta-parameters).
        adapt: learner parameter names besides ``out.*`` to adapt, e.g. ``head.net.weight``.
        support_x, query_x: learner inputs (images ``[B, 3, S, S]`` with a backbone, else
            backbone features ``[B, D]``).

    Returns:
        ``(query cross-entropy after adaptation, query accuracy (detached))``.
    """
    named = dict(learner.named_parameters())
    init_params = output_init(init, learner.embed(support_x), support_y, n_way, learned)
    params = {n: named[n] for n in adapt}
    params.update({"out.weight": init_params["weight"], "out.bias": init_params["bias"]})
    fast = inner_adapt(learner, params, support_x, support_y, steps=steps, lr=lr, first_order=first_order,
                       kwargs={"scale": scale})
    logits = functional_call(learner, fast, (query_x,), {"scale": scale})
    return F.cross_entropy(logits, query_y), (logits.detach().argmax(-1) == query_y).float().mean()


def make_adapt_classifier(*, init: str, scale: float, lr: float, steps: int,
                          learned: Mapping[str, torch.Tensor] | None = None):
    """An episodic classifier that adapts the N-way layer on each support set.

    Returns ``classifier(support_z [N*K, E], support_y [N*K] int64, query_z [N*Q, E], n_way) ->
    [N*Q] int64`` for :func:`fewshot.metrics.episodic_accuracy` (``support_z`` / ``query_z`` are
    the model's embeddings, i.e. the head's output). Works under ``torch.inference_mode``.
    """
    learned = None if learned is None else {k: v.detach().float().clone() for k, v in learned.items()}
    scale_t = torch.tensor(float(scale))
    out_dims: dict[int, OutputLayer] = {}

    def classify(support_z, support_y, query_z, n_way: int) -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            zs = torch.as_tensor(support_z).detach().float().clone()
            zq = torch.as_tensor(query_z).detach().float().clone()
            ys = torch.as_tensor(support_y).detach().long().clone()
            out = out_dims.setdefault(n_way, OutputLayer(zs.shape[-1], n_way))
            params = output_init(init, zs, ys, n_way, learned)
            fast = inner_adapt(out, params, zs, ys, steps=steps, lr=lr, first_order=True,
                               kwargs={"scale": scale_t})
            with torch.no_grad():
                logits = functional_call(out, fast, (zq,), {"scale": scale_t})
        return logits.argmax(-1)

    classify.describe = {"kind": "maml_adapt", "init": init, "scale": float(scale), "inner_lr": lr,  # type: ignore[attr-defined]
                         "inner_steps": steps}
    classify.adapts = True  # type: ignore[attr-defined]  # it adapts to each task: transductive levers refuse it
    return classify
