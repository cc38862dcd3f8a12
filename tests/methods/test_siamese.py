"""Siamese methods: loss values by hand, m-per-class batches, and a loss that decreases on real data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot.errors import FewshotError
from fewshot.methods import IndexBatch, TrainData, get_method
from fewshot.training import make_config
from fewshot.training.optim import make_optimizer, train_step
from fewshot.methods.siamese import ContrastiveMethod, TripletMethod

from train_helpers import shared_tiny_grocery


def _toy_method(name: str, **cfg) -> tuple:
    """A method with an identity head (no centring) on 2-D toy vectors."""
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    method = make_config(name, head={"kind": "linear", "centre": False}, **cfg).build_method(2)
    method.bind(lambda idx: x[torch.from_numpy(idx)])
    return method, x, y


def _cos(x: torch.Tensor) -> np.ndarray:
    z = torch.nn.functional.normalize(x, dim=1)
    return (z @ z.T).numpy().astype(np.float64)


def test_contrastive_loss_matches_hand_computation():
    method, x, y = _toy_method("contrastive", miner="all", margin=0.5, pos_margin=0.9)
    s = _cos(x)
    pos = [s[i, j] for i in range(4) for j in range(4) if i != j and y[i] == y[j]]
    neg = [s[i, j] for i in range(4) for j in range(4) if y[i] != y[j]]
    pos_l = [max(0.0, 0.9 - v) for v in pos]
    neg_l = [max(0.0, v - 0.5) for v in neg]
    # pytorch-metric-learning's AvgNonZeroReducer: mean over the pairs with a non-zero loss, per part
    expected = np.mean([v for v in pos_l if v > 0]) + np.mean([v for v in neg_l if v > 0])
    got = float(method.loss(IndexBatch(idx=np.arange(4), y=y)).detach())
    assert got == pytest.approx(expected, abs=1e-6)
    # similarities: s(0,1)=0.8, s(2,3)=0.8 -> positives cost 0.1 each; s(1,3)=0.96, s(0,3)=0.6, s(1,2)=0.6
    assert expected == pytest.approx(0.1 + np.mean([0.46, 0.1, 0.1]), abs=1e-6)


def test_triplet_loss_matches_hand_computation():
    method, x, y = _toy_method("triplet", miner="all", margin=0.1)
    s = _cos(x)
    losses = []
    for a in range(4):
        for p in range(4):
            if p == a or y[p] != y[a]:
                continue
            for n in range(4):
                if y[n] != y[a]:
                    losses.append(max(0.0, s[a, n] - s[a, p] + 0.1))
    expected = np.mean([v for v in losses if v > 0])
    got = float(method.loss(IndexBatch(idx=np.arange(4), y=y)).detach())
    assert got == pytest.approx(expected, abs=1e-6)
    assert got > 0.1  # anchor 1's negative 3 (0.96) is more similar than its positive 0 (0.8)


def test_miners_and_margin_defaults():
    c = make_config("contrastive").build_method(8)
    t = make_config("triplet").build_method(8)
    assert isinstance(c, ContrastiveMethod) and isinstance(t, TripletMethod)
    assert type(c.miner).__name__ == "BatchHardMiner"
    assert (c.margin, c.pos_margin) == (0.3, 0.8)
    ms = make_config("contrastive", miner="semihard").build_method(8).miner
    assert type(ms).__name__ == "MultiSimilarityMiner"
    assert type(t.miner).__name__ == "TripletMarginMiner" and t.miner.type_of_triplets == "semihard"
    assert t.margin == 0.1
    assert make_config("contrastive", miner="all").build_method(8).miner is None
    with pytest.raises(FewshotError, match="unknown option miner = 'hardest' for method 'triplet'"):
        make_config("triplet", miner="hardest").build_method(8)
    with pytest.raises(FewshotError, match="unknown method"):
        get_method("siamese-net")


def _train_data(n_classes: int = 10, per_class: int = 7, dim: int = 16, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.randn(len(y), dim, generator=g)
    return TrainData(x=x, y=y, label_names=[f"c{i}" for i in range(n_classes)])


def test_m_per_class_batches_are_seeded_and_balanced():
    data = _train_data()
    method = make_config("triplet", batch_size=12, m_per_class=3).build_method(data.dim)
    a = method.epoch_batches(data, np.random.default_rng(1))
    b = method.epoch_batches(data, np.random.default_rng(1))
    c = method.epoch_batches(data, np.random.default_rng(2))
    assert len(a) == len(data) // 12 == 5
    for batch in a:
        assert batch.idx.shape == (12,)
        counts = np.bincount(batch.y.numpy(), minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [3, 3, 3, 3]
        assert torch.equal(batch.y, data.y[torch.from_numpy(batch.idx)])
    assert all(np.array_equal(p.idx, q.idx) for p, q in zip(a, b))
    assert not all(np.array_equal(p.idx, q.idx) for p, q in zip(a, c))


def test_impossible_batch_sizes_are_refused():
    data = _train_data(n_classes=3)
    with pytest.raises(FewshotError, match="needs 4 classes"):
        make_config("triplet", batch_size=16, m_per_class=4).build_method(16).epoch_batches(
            data, np.random.default_rng(0))
    with pytest.raises(FewshotError, match="do not fit"):
        make_config("triplet", batch_size=10, m_per_class=4).build_method(16).epoch_batches(
            data, np.random.default_rng(0))


@pytest.fixture(scope="module")
def tiny_features(grocery_root):
    """64-px backbone features of the tiny real Grocery training subset (cached in a tmp folder)."""
    from fewshot.backbones import create_backbone
    from fewshot.data.loaders import load_dataset
    from fewshot.data.protocol import dataset_for
    from fewshot.data.splits import ClassSplit
    from fewshot.embed import embed_dataset

    tiny = shared_tiny_grocery(grocery_root)
    ds = dataset_for(load_dataset(tiny["data"]), ClassSplit.load(tiny["split_file"]), "train")
    emb = embed_dataset(ds, create_backbone("efficientnet_lite0", image_size=64), cache_dir=tiny["cache_dir"],
                        progress=False)
    names = sorted(set(emb.labels))
    y = torch.tensor([names.index(lab) for lab in emb.labels])
    return TrainData(x=torch.from_numpy(emb.vectors), y=y, label_names=names)


@pytest.mark.parametrize("name,miner", [("contrastive", "semihard"), ("contrastive", "hard"),
                                        ("triplet", "semihard"), ("triplet", "all")])
def test_loss_decreases_on_real_subset(tiny_features, name, miner):
    data = tiny_features
    assert data.num_classes == 6 and len(data) == 6 * 12
    torch.manual_seed(0)
    cfg = make_config(name, miner=miner, lr=1e-3, batch_size=24, m_per_class=4)
    method = cfg.build_method(data.dim)
    method.head.set_centre(data.x)
    method.bind(lambda idx: data.x[torch.from_numpy(idx)])
    # the fixed objective: the same loss with every pair / triplet of the whole subset
    full = IndexBatch(idx=np.arange(len(data)), y=data.y)
    reference = make_config(name, miner="all").build_method(data.dim)
    reference.head = method.head
    reference.bind(method._features)
    with torch.no_grad():
        before = float(reference.loss(full))
    opt = make_optimizer(method, cfg)
    rng = np.random.default_rng(0)
    for _ in range(8):
        for batch in method.epoch_batches(data, rng):
            train_step(method, batch, opt)
    with torch.no_grad():
        after = float(reference.loss(full))
    assert math.isfinite(before) and before > 0
    assert after < 0.8 * before, (before, after)
