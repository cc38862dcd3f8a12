"""Prototypical networks (fewshot.methods.protonet): equations, toy problem, real-data training.

The episode sampler's guarantees (exact N/K/Q, disjoint support and query, seeding) are tested
in tests/data/test_episodes.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.methods import TrainData
from fewshot.training import make_config
from fewshot.training.optim import make_optimizer, train_step
from fewshot.methods.protonet import (ProtoNet, protonet_logits, protonet_loss, prototypes,
                                      sqeuclidean_prototype_classifier, squared_euclidean)
from fewshot.metrics import episodic_accuracy
from train_helpers import nuisance_toy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prototypes_and_distances_match_definitions():
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(12, 5, generator=g), torch.tensor([0, 1, 2] * 4)
    q = torch.randn(7, 5, generator=g)
    c = prototypes(s, y, 3)
    for k in range(3):
        assert torch.allclose(c[k], s[y == k].mean(0), atol=1e-6)
    d = squared_euclidean(q, c)
    brute = ((q[:, None, :] - c[None]) ** 2).sum(-1)
    assert torch.allclose(d, brute, atol=1e-5)
    # batched form agrees with the single-episode form
    cb = prototypes(torch.stack([s, s]), torch.stack([y, y]), 3)
    assert torch.allclose(cb[1], c) and torch.allclose(squared_euclidean(torch.stack([q, q]), cb)[0], d)
    # eq. 2: softmax over negative (scaled) squared distances, cross-entropy on the queries
    yq = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss, acc = protonet_loss(s, y, q, yq, 3, scale=2.0)
    manual = -(torch.log_softmax(-2.0 * brute, dim=1)[torch.arange(7), yq]).mean()
    assert torch.allclose(loss, manual, atol=1e-5)
    assert acc == (brute.argmin(1) == yq).float().mean()
    assert torch.equal(sqeuclidean_prototype_classifier(s, y, q, 3), brute.argmin(1))
    assert torch.allclose(protonet_logits(s, y, q, 3, 2.0), -2.0 * brute, atol=1e-5)


def test_protonet_reaches_100_percent_on_separable_toy_problem():
    torch.manual_seed(0)
    x, y = nuisance_toy(12, 30, seed=0)
    cfg = make_config("protonet", ways=5, shots=5, queries=5, episodes_per_epoch=100, lr=1e-2,
                      head={"kind": "linear", "centre": True})
    method = cfg.build_method(x.shape[1])
    assert isinstance(method, ProtoNet)
    method.head.set_centre(x)
    method.bind(lambda idx: x[torch.as_tensor(idx)])
    data = TrainData(x, y, [str(i) for i in range(12)])

    # unseen classes of the same kind (different angles), 1-shot, cross-visit-style pools
    xt, yt = nuisance_toy(10, 20, seed=1)

    def accuracy(k_shot: int) -> float:
        with torch.no_grad():
            z = method.embed(xt).numpy()
        return episodic_accuracy(z, yt.tolist(), n_way=5, k_shot=k_shot, n_query=5, episodes=200, seed=0,
                                 classifier=method.episode_classifier()).accuracy

    before = accuracy(1)
    opt = make_optimizer(method, cfg)
    rng = np.random.default_rng(0)
    for _ in range(6):
        for ep in method.epoch_batches(data, rng):
            train_step(method, ep, opt)
    assert before < 0.8
    assert accuracy(1) == 1.0
    assert accuracy(5) == 1.0
    assert method.scale.item() > 0


def test_saved_protonet_run_restores_scale(tmp_path):
    from fewshot.backbones import create_backbone
    from fewshot.methods import runs
    from fewshot.model import EmbeddingModel

    backbone = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    cfg = make_config("protonet")
    m = cfg.build_method(backbone.dim)
    with torch.no_grad():
        m.log_scale.fill_(1.234)
        m.head.net.weight.mul_(0.5)
    runs.save_run(tmp_path / "run", EmbeddingModel(backbone=backbone, head=m.head),
                  {"method": "protonet", "train_config": cfg.to_dict()}, extra_tensors=m.extra_tensors(),
                  complete=True)
    loaded = runs.load_run(tmp_path / "run")
    assert loaded.episode_classifier is sqeuclidean_prototype_classifier
    m2 = cfg.build_method(backbone.dim)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "run" / runs.WEIGHTS))
    m2.load_extra_tensors({k[len("method."):]: v for k, v in t.items() if k.startswith("method.")})
    assert abs(m2.log_scale.item() - 1.234) < 1e-6
    v = np.random.default_rng(0).standard_normal((3, backbone.dim)).astype(np.float32)
    with torch.no_grad():
        assert np.allclose(loaded.transform(v), m.head(torch.from_numpy(v)).numpy(), atol=1e-6)


@pytest.mark.slow
def test_protonet_loss_decreases_on_small_real_grocery_subset(grocery_root):
    """Cached lite0 embeddings of 12 Grocery classes x 10 photos; 150 episodes lower the loss."""
    from fewshot.backbones import create_backbone
    from fewshot.data.loaders import load_dataset
    from fewshot.embed import embed_dataset

    ds = load_dataset(grocery_root, split="train")
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(ds.records):
        by_class.setdefault(r.label, []).append(i)
    classes = sorted(by_class)[::6][:12]
    idx = [i for c in classes for i in by_class[c][:10]]
    emb = embed_dataset(ds.subset(idx), create_backbone("efficientnet_lite0", image_size=224), progress=False)
    names = sorted(set(emb.labels))
    x = torch.from_numpy(emb.vectors)
    y = torch.tensor([names.index(l) for l in emb.labels])
    data = TrainData(x, y, names)

    torch.manual_seed(0)
    cfg = make_config("protonet", ways=5, shots=3, queries=5, episodes_per_epoch=50, lr=1e-4)
    method = cfg.build_method(x.shape[1])
    method.head.set_centre(x)
    method.bind(lambda i: x[torch.as_tensor(i)])
    fixed = list(method.epoch_batches(data, np.random.default_rng(123)))

    def mean_loss() -> float:
        with torch.no_grad():
            return float(np.mean([method.loss(ep).item() for ep in fixed]))

    before = mean_loss()
    opt = make_optimizer(method, cfg)
    rng = np.random.default_rng(0)
    for _ in range(3):
        for ep in method.epoch_batches(data, rng):
            train_step(method, ep, opt)
    after = mean_loss()
    assert np.isfinite(after) and after < 0.8 * before, (before, after)
