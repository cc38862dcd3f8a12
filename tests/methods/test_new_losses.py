"""The metric-learning losses of issue 30 (part 3): ``multisimilarity``, ``proxyanchor``, ``arcface``.

Each trains a linear head on toy features to near-perfect retrieval of unseen classes; the
proxies of ``proxyanchor`` / ``arcface`` are built on the train classes, train at their own
rate, travel with a checkpoint, and a run trained with them loads and embeds without them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import FewshotError
from fewshot.methods import TrainData, list_methods, load_embedding_model
from fewshot.methods.arcface import ArcFaceMethod
from fewshot.methods.multisimilarity import MultiSimilarityMethod
from fewshot.methods.proxyanchor import ProxyAnchorMethod
from fewshot.metrics import retrieval_metrics
from fewshot.model import weights_digest
from fewshot.training import make_config, train
from fewshot.training.checkpoint import method_state, restore_method_state
from fewshot.training.optim import make_optimizer, train_step

from train_helpers import nuisance_toy, shared_tiny_grocery

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW = ("multisimilarity", "proxyanchor", "arcface")
PROXY = ("proxyanchor", "arcface")
#: the toy: class means in an 8-d subspace of 16-d features, strong noise in the other 8
TOY = {"dim": 16, "signal": 8, "noise": 1.5}
runner = CliRunner()


def _toy_method(name: str, n_classes: int = 12, **opts):
    """``name`` with an identity-initialised linear head (no centring) on toy features, its data checked."""
    x, y = nuisance_toy(n_classes, 16, seed=0, **TOY)
    cfg = make_config(name, lr=1e-2, head={"kind": "linear", "centre": False}, batch_size=32, **opts)
    method = cfg.build_method(x.shape[1])
    data = TrainData(x, y, [f"c{i}" for i in range(n_classes)])
    method.bind(lambda idx: x[torch.as_tensor(idx)])
    method.check_data(data)
    return method, cfg, data


def _retrieval(method, x: torch.Tensor, y: torch.Tensor):
    with torch.no_grad():
        return retrieval_metrics(method.embed(x).numpy(), y.tolist())


@pytest.mark.parametrize("name", NEW)
def test_each_loss_learns_a_toy_metric_that_holds_for_unseen_classes(name):
    torch.manual_seed(0)
    method, cfg, data = _toy_method(name)
    xt, yt = nuisance_toy(10, 16, seed=1, **TOY)  # other classes (other means), the same nuisance
    before = _retrieval(method, xt, yt)
    proxies = [p.detach().clone() for p in method.extra_parameters()]
    opt = make_optimizer(method, cfg)
    rng = np.random.default_rng(0)
    losses = [train_step(method, batch, opt) for _ in range(30) for batch in method.epoch_batches(data, rng)]
    after = _retrieval(method, xt, yt)
    assert before.precision_at_1 < 0.3 and before.map_at_r < 0.1, before  # the noise hides the classes
    assert after.precision_at_1 >= 0.95 and after.map_at_r >= 0.7, after
    assert np.mean(losses[-7:]) < 0.5 * np.mean(losses[:7])
    # the proxies are learned: they moved, and they stay what the optimizer trains
    assert len(proxies) == (name in PROXY)
    for p0, p in zip(proxies, method.extra_parameters()):
        assert (p.detach() - p0).abs().max() > 1e-2


def test_proxies_are_built_on_the_train_classes_and_train_at_their_own_rate():
    x, y = nuisance_toy(5, 4, seed=0, **TOY)
    data = TrainData(x, y, [f"c{i}" for i in range(5)])
    cfg = make_config("proxyanchor", lr=1e-3, head="mlp", proxy_lr_factor=50)
    method = cfg.build_method(16)
    assert method.extra_parameters() == [] and len(method.param_groups()) == 1  # no class known yet
    method.check_data(data)
    (proxies,) = method.extra_parameters()
    assert proxies.shape == (5, 256) and proxies is method.loss_fn.proxies  # [C, E]: E of the mlp head
    groups = make_optimizer(method, cfg).param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(5e-2)]
    assert groups[1]["params"] == [proxies] and all(p is not proxies for p in groups[0]["params"])
    assert any(p is proxies for p in method.trainable())
    method.check_data(data)  # checked again: the same (possibly trained) proxies
    assert method.extra_parameters()[0] is proxies

    arcface = make_config("arcface", head={"kind": "linear", "centre": False}, sub_centers=2).build_method(16)
    arcface.check_data(data)
    assert arcface.extra_parameters()[0].shape == (16, 5 * 2)  # [E, C * sub_centers]
    with pytest.raises(FewshotError, match="at least 2 train classes"):
        arcface.check_data(TrainData(x[:4], torch.zeros(4, dtype=torch.long), ["only"]))


def test_proxy_batches_are_shuffled_seeded_and_cover_the_items():
    method, _, data = _toy_method("arcface", n_classes=5)  # 80 items in batches of 32
    a = method.epoch_batches(data, np.random.default_rng(1))
    b = method.epoch_batches(data, np.random.default_rng(1))
    c = method.epoch_batches(data, np.random.default_rng(2))
    assert [len(batch.idx) for batch in a] == [32, 32] and len(set(np.concatenate([p.idx for p in a]))) == 64
    assert all(np.array_equal(p.idx, q.idx) for p, q in zip(a, b))
    assert not all(np.array_equal(p.idx, q.idx) for p, q in zip(a, c))
    assert all(torch.equal(batch.y, data.y[torch.from_numpy(batch.idx)]) for batch in a)
    small = TrainData(data.x[:20], data.y[:20], data.label_names)  # fewer items than a batch: one batch of all
    assert [len(batch.idx) for batch in method.epoch_batches(small, np.random.default_rng(0))] == [20]


def test_multisimilarity_is_a_siamese_method_with_its_miner():
    method, _, _ = _toy_method("multisimilarity")
    assert isinstance(method, MultiSimilarityMethod)
    assert type(method.loss_fn).__name__ == "MultiSimilarityLoss"
    assert type(method.miner).__name__ == "MultiSimilarityMiner"
    assert (method.loss_fn.alpha, method.loss_fn.beta, method.loss_fn.base, method.miner.epsilon) == (2, 50, 0.5, 0.1)
    assert (method.opts.batch_size, method.opts.m_per_class) == (32, 4)
    one_each = TrainData(torch.randn(8, 16), torch.arange(8), [f"c{i}" for i in range(8)])
    with pytest.raises(FewshotError, match="positive pairs"):
        method.check_data(one_each)


@pytest.mark.parametrize("name,option,value", [
    ("multisimilarity", "alpha", 0.0), ("multisimilarity", "beta", -1.0), ("multisimilarity", "epsilon", -0.1),
    ("multisimilarity", "base", -2.0), ("multisimilarity", "m_per_class", 1),
    ("proxyanchor", "alpha", 0.0), ("proxyanchor", "margin", -0.1), ("proxyanchor", "proxy_lr_factor", 0.0),
    ("proxyanchor", "batch_size", 1), ("arcface", "scale", 0.0), ("arcface", "sub_centers", 0),
    ("arcface", "margin", -1.0), ("arcface", "proxy_lr_factor", float("nan")),
])
def test_bad_option_values_are_refused_naming_the_option(name, option, value):
    with pytest.raises(FewshotError, match=f"option {option} = ") as err:
        make_config(name, **{option: value})
    assert err.value.options == (option,)


def test_the_cli_lists_the_new_methods_and_refuses_bad_values_by_flag(tmp_path):
    assert set(NEW) <= set(list_methods())
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and all(f"\n{name}: " in "\n" + r.output for name in NEW)
    r = runner.invoke(app, ["methods", "arcface"])
    assert "--sub-centers (--opt sub_centers=...)  default 3" in r.output
    assert "--proxy-lr-factor (--opt proxy_lr_factor=...)  default 100.0" in r.output
    r = runner.invoke(app, ["methods", "multisimilarity"])
    assert "--beta (--opt beta=...)  default 50.0" in r.output and "--m-per-class" in r.output
    base = ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r")]
    r = runner.invoke(app, [*base, "--method", "proxyanchor", "--alpha", "0"])
    assert r.exit_code == 2 and "--alpha" in r.output and "greater than 0" in " ".join(r.output.split())
    r = runner.invoke(app, [*base, "--method", "proxyanchor", "--sub-centers", "2"])
    assert r.exit_code == 2 and "does not apply to --method proxyanchor" in " ".join(r.output.split())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", PROXY)
def test_the_proxies_travel_with_a_checkpoint_and_are_optional(name):
    torch.manual_seed(0)
    trained, cfg, data = _toy_method(name)
    opt = make_optimizer(trained, cfg)
    for batch in trained.epoch_batches(data, np.random.default_rng(0)):
        train_step(trained, batch, opt)
    state = method_state(trained, None)
    assert set(state["extra"]) == {"num_classes", "loss." + ("proxies" if name == "proxyanchor" else "W")}

    torch.manual_seed(1)
    resumed, _, _ = _toy_method(name)  # as a resumed run: data checked, then the checkpoint restored
    restore_method_state(resumed, None, state)
    assert torch.equal(resumed.extra_parameters()[0], trained.extra_parameters()[0])
    fresh = cfg.build_method(data.dim)  # a loaded run: no train data, the proxies rebuilt from the tensors
    fresh.load_extra_tensors(state["extra"])
    assert torch.equal(fresh.extra_parameters()[0], trained.extra_parameters()[0])
    bare = cfg.build_method(data.dim)
    bare.load_extra_tensors({})  # no proxies saved: nothing to restore, nothing needed to embed
    assert bare.extra_parameters() == [] and bare.embed(data.x[:3]).shape == (3, 16)


def test_a_proxy_run_saves_and_loads_as_an_embedding_model(grocery_root, tmp_path):
    tiny = shared_tiny_grocery(grocery_root)
    out = tmp_path / "run"
    cfg = make_config("proxyanchor", data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"],
                      out=str(out), image_size=64, fine_tune="none", epochs=2, patience=0, lr=1e-3, val_episodes=0,
                      final_eval="none", progress=False, batch_size=16)
    result = train(cfg)
    assert result.best_epoch in (0, 1, 2)
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "proxyanchor" and saved["train_config"]["options"]["proxy_lr_factor"] == 100.0
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["method.loss.proxies"].shape == (6, 1280) and int(tensors["method.num_classes"]) == 6

    x = torch.randn(4, 1280, generator=torch.Generator().manual_seed(0))
    reference = cfg.build_method(1280)  # the saved head, loaded by hand
    reference.head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    reference.train_mode(False)
    with torch.no_grad():
        expected = reference.embed(x)
    assert isinstance(reference, ProxyAnchorMethod) and not isinstance(reference, ArcFaceMethod)

    # the same run without its proxies: they are not needed to embed
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    kept = {k: v for k, v in tensors.items() if not k.startswith("method.")}
    save_file(kept, str(bare / "model.safetensors"))
    saved["weights_sha256"] = weights_digest(kept)
    (bare / "config.json").write_text(json.dumps(saved))
    for run_dir in (out, bare):
        model = load_embedding_model(model_dir=run_dir)
        assert model.episode_classifier is None
        with torch.no_grad():
            assert torch.allclose(model.head(x), expected, atol=1e-6)
