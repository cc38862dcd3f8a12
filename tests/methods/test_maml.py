"""MAML / first-order MAML (fewshot.methods.maml): meta-gradients, training, saved runs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fewshot.methods.heads import ProjectionHead
from fewshot.methods.maml import (FOMAML, MAML, OutputLayer, adapted_query_loss, inner_adapt,
                                  make_adapt_classifier, output_init)
from fewshot.methods import TrainData, get_method
from fewshot.training import make_config
from fewshot.training.optim import make_optimizer, train_step
from train_helpers import nuisance_toy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _central_fd(fn, params: dict[str, torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of the scalar ``fn(params)`` w.r.t. every element (float64)."""
    out = []
    for name, p in params.items():
        for i in range(p.numel()):
            plus = {k: v.detach().clone() for k, v in params.items()}
            minus = {k: v.detach().clone() for k, v in params.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            out.append(((fn(plus) - fn(minus)) / (2 * eps)).detach())
    return torch.stack(out)


@pytest.fixture()
def task():
    """A tiny 2-layer network, one 2-way task, every parameter adapted (float64)."""
    torch.manual_seed(0)
    t = SimpleNamespace()
    t.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    t.xs, t.ys = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1])
    t.xq, t.yq = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    t.params = {n: p.detach().clone().requires_grad_() for n, p in t.net.named_parameters()}

    def meta_loss(p, first_order=False, steps=2):
        fast = inner_adapt(t.net, p, t.xs, t.ys, steps=steps, lr=0.5, first_order=first_order)
        return F.cross_entropy(functional_call(t.net, fast, (t.xq,)), t.yq), fast

    t.meta_loss = meta_loss
    return t


def test_second_order_meta_gradient_matches_finite_differences(task):
    loss, _ = task.meta_loss(task.params)
    grad = _flat(torch.autograd.grad(loss, list(task.params.values())))
    fd = _central_fd(lambda p: task.meta_loss(p)[0], task.params)
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-6), (grad - fd).abs().max()


def test_first_order_is_gradient_at_adapted_params_and_differs_from_second_order(task):
    second = _flat(torch.autograd.grad(task.meta_loss(task.params)[0], list(task.params.values())))
    loss, fast = task.meta_loss(task.params, first_order=True)
    first = _flat(torch.autograd.grad(loss, list(task.params.values())))
    # FOMAML's meta-gradient = gradient of the post-adaptation query loss w.r.t. the adapted params
    leaf = {k: v.detach().clone().requires_grad_() for k, v in fast.items()}
    post = F.cross_entropy(functional_call(task.net, leaf, (task.xq,)), task.yq)
    assert torch.allclose(first, _flat(torch.autograd.grad(post, list(leaf.values()))), atol=1e-12)
    # here the second-order (Hessian) terms are sizeable: the two estimates really differ
    assert (first - second).norm() > 0.1 * second.norm()
    # the first-order gradient is NOT a finite-difference estimate of the meta-loss
    fd = _central_fd(lambda p: task.meta_loss(p)[0], task.params)
    assert not torch.allclose(first, fd, atol=1e-3)


def test_zero_inner_steps_orders_coincide(task):
    g2 = _flat(torch.autograd.grad(task.meta_loss(task.params, steps=0)[0], list(task.params.values())))
    g1 = _flat(torch.autograd.grad(task.meta_loss(task.params, True, steps=0)[0], list(task.params.values())))
    assert torch.allclose(g1, g2)


def _head_task(dtype=torch.float64):
    """Projection head (meta-learned) + N-way layer adapted from the proto init: the real learner."""
    torch.manual_seed(1)
    head = ProjectionHead("linear", in_dim=4, out_dim=4, centre=True).to(dtype)
    with torch.no_grad():
        head.net.weight.add_(0.3 * torch.randn(4, 4, dtype=dtype))
        head.centre_vector.copy_(0.1 * torch.randn(4, dtype=dtype))
    out = OutputLayer(4, 3).to(dtype)
    xs = torch.randn(6, 4, dtype=dtype)
    ys = torch.tensor([0, 0, 1, 1, 2, 2])
    xq = torch.randn(6, 4, dtype=dtype)
    yq = torch.tensor([0, 1, 2, 0, 1, 2])
    return head, out, xs, ys, xq, yq


@pytest.mark.parametrize("init", ["proto", "zero"])
def test_head_meta_gradient_matches_finite_differences(init):
    """The full learner: dL/d(theta, log_scale) through inner steps on the N-way layer."""
    head, out, xs, ys, xq, yq = _head_task()
    log_scale = torch.tensor(np.log(3.0), dtype=torch.float64)
    params = {"net.weight": head.net.weight.detach().clone(), "log_scale": log_scale}

    def loss_of(p, first_order=False):
        h = lambda x: functional_call(head, {"net.weight": p["net.weight"]}, (x,))
        return adapted_query_loss(h, out, p["log_scale"].exp(), xs, ys, xq, yq, 3, init=init, steps=3,
                                  lr=0.4, first_order=first_order)[0]

    leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
    grad = _flat(torch.autograd.grad(loss_of(leaf), [leaf[k] for k in ["net.weight", "log_scale"]]))
    fd = _central_fd(loss_of, params)
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-6), (grad - fd).abs().max()
    first = _flat(torch.autograd.grad(loss_of(leaf, True), [leaf[k] for k in ["net.weight", "log_scale"]]))
    assert (first - grad).norm() > 1e-3 * grad.norm()


def test_proto_init_equals_protonet_before_adaptation():
    from fewshot.methods.protonet import protonet_logits

    head, out, xs, ys, xq, _ = _head_task(torch.float32)
    zs, zq = head(xs), head(xq)
    p = output_init("proto", zs, ys, 3)
    logits = functional_call(out, p, (zq,), {"scale": 2.0})
    proto = protonet_logits(zs, ys, zq, 3, 2.0)
    # identical up to the per-query constant 2 * ||z||^2
    assert torch.allclose(logits - proto, (2.0 * zq.pow(2).sum(1, keepdim=True)).expand_as(proto), atol=1e-5)


@pytest.mark.parametrize("cls", [MAML, FOMAML])
def test_training_steps_reduce_meta_loss(cls):
    x, y = nuisance_toy(12, 20, seed=0, noise=0.8, evenly_spaced=False)
    cfg = make_config(cls.name, ways=3, shots=2, queries=3, episodes_per_epoch=8, meta_batch=4,
                      inner_lr=0.5, inner_steps=2, lr=1e-2, head={"kind": "linear", "centre": True})
    m = cfg.build_method(x.shape[1])
    m.head.set_centre(x)
    m.bind(lambda idx: x[torch.as_tensor(idx)])
    data = TrainData(x, y, [str(i) for i in range(12)])
    fixed = [b for b in m.epoch_batches(data, np.random.default_rng(0))]
    assert [len(b) for b in fixed] == [4, 4]
    before = float(sum(m.loss(b).detach() for b in fixed))
    opt = make_optimizer(m, cfg)
    rng = np.random.default_rng(1)
    for _ in range(15):
        for b in m.epoch_batches(data, rng):
            train_step(m, b, opt)
    after = float(sum(m.loss(b).detach() for b in fixed))
    assert after < 0.8 * before
    assert get_method(cls.name) is cls


def _toy_adaptation_task(seed=0):
    """5-way 5-shot episode where the nearest prototype is confused by strong noise along one
    of the two class-separating directions, but a linear classifier adapted on the support set
    learns to rely on the clean one."""
    g = torch.Generator().manual_seed(seed)
    dim, n, k, q = 8, 5, 5, 20
    means = torch.zeros(n, dim)
    means[:, 0] = torch.linspace(-1, 1, n)  # classes differ along dim 0 (noisy) ...
    means[:, 1] = torch.linspace(-1, 1, n)  # ... and dim 1 (clean)

    def draw(m):
        x = means.repeat_interleave(m, 0) + 0.03 * torch.randn(n * m, dim, generator=g)
        x[:, 0] += torch.randn(n * m, generator=g)
        return x

    return draw(k), torch.arange(n).repeat_interleave(k), draw(q), torch.arange(n).repeat_interleave(q), n


def test_adapt_classifier_improves_on_prototypes():
    xs, ys, xq, yq, n = _toy_adaptation_task()
    before = make_adapt_classifier(init="proto", scale=10.0, lr=0.5, steps=0)
    after = make_adapt_classifier(init="proto", scale=10.0, lr=0.5, steps=100)
    acc0 = (before(xs, ys, xq, n) == yq).float().mean()
    acc1 = (after(xs, ys, xq, n) == yq).float().mean()
    assert acc1 > acc0 + 0.1, (acc0, acc1)
    with torch.inference_mode():  # evaluation code may run under inference mode
        assert (after(xs, ys, xq, n) == yq).float().mean() == acc1


def test_saved_maml_run_reloads_and_adapts(tmp_path):
    from fewshot.backbones import create_backbone
    from fewshot.methods import runs
    from fewshot.model import EmbeddingModel

    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    d = backbone.dim
    cfg = make_config("maml", ways=5, shots=5, queries=5, inner_lr=0.5, inner_steps=2,
                      inner_steps_test=100)
    method = cfg.build_method(d)
    with torch.no_grad():
        method.log_scale.fill_(np.log(10.0))
    model = EmbeddingModel(backbone=backbone, head=method.head)
    runs.save_run(tmp_path / "run", model, {"method": "maml", "train_config": cfg.to_dict()}, complete=True,
                  extra_tensors=method.extra_tensors())
    loaded = runs.load_run(tmp_path / "run")
    clf = loaded.episode_classifier
    assert clf is not None and clf.describe["inner_steps"] == 100
    assert loaded.describe()["episode_classifier"]["kind"] == "maml_adapt"  # in result files
    assert abs(clf.describe["scale"] - 10.0) < 1e-4
    # toy task in the head's output space
    g = torch.Generator().manual_seed(0)
    xs, ys, xq, yq, n = _toy_adaptation_task()
    proj = torch.linalg.qr(torch.randn(d, xs.shape[1], generator=g))[0]  # isometric embedding into R^d
    zs, zq = xs @ proj.T, xq @ proj.T
    no_adapt = make_adapt_classifier(init="proto", scale=10.0, lr=0.5, steps=0)
    acc0 = (no_adapt(zs, ys, zq, n) == yq).float().mean()
    acc1 = (clf(zs, ys, zq, n) == yq).float().mean()
    assert acc1 > acc0 + 0.1, (acc0, acc1)


@pytest.mark.parametrize("init", ["zero", "learned"])
def test_init_mode_and_learned_init_travel_with_the_run(tmp_path, init):
    from fewshot.backbones import create_backbone
    from fewshot.methods import runs
    from fewshot.model import EmbeddingModel

    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    cfg = make_config("fomaml", ways=3, init=init)
    method = cfg.build_method(backbone.dim)
    with torch.no_grad():
        method.init_weight.normal_()
    runs.save_run(tmp_path / "run", EmbeddingModel(backbone=backbone, head=method.head),
                  {"method": "fomaml", "train_config": make_config("fomaml", ways=3).to_dict()},  # mode from the tensors
                  extra_tensors=method.extra_tensors(), complete=True)
    clf = runs.load_run(tmp_path / "run").episode_classifier
    assert clf.describe["init"] == init
    assert (init == "learned") == (len(method.extra_parameters()) == 3)
