"""Fine-tuning the feature extractor (issue 13): what trains, what is saved, full-network MAML, conv4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from fewshot.backbones import create_backbone
from fewshot.errors import BackboneError, FewshotError
from fewshot.training import make_config
from fewshot.training.config import parse_fine_tune
from fewshot.training.optim import make_optimizer, train_step
from fewshot.methods.maml import inner_adapt
from fewshot.methods.runs import load_run
from fewshot.training import train
from fewshot.training.finetune import select_trainable

from train_helpers import shared_tiny_grocery, toy_conv4_protonet, toy_shapes

SMALL = dict(image_size=64, lr=1e-3, ways=3, shots=2, queries=2, val_episodes=0, eval_episodes=40,
             progress=False, final_eval="none", patience=0)


# ------------------------------------------------------------------ --fine-tune values
@pytest.mark.parametrize("value, expected", [("none", ("none", 0)), ("all", ("all", 0)), ("last", ("last", 2)),
                                             ("last:3", ("last", 3)), ("LAST:1", ("last", 1))])
def test_parse_fine_tune(value, expected):
    assert parse_fine_tune(value) == expected


@pytest.mark.parametrize("value", ["some", "last:0", "last:x", "all:2", ""])
def test_parse_fine_tune_refuses(value):
    with pytest.raises(FewshotError, match="fine_tune") as err:
        parse_fine_tune(value)
    assert err.value.options == ("fine_tune",) and "--" not in str(err.value)


def test_config_canonical_and_backbone_lr():
    cfg = make_config("triplet", fine_tune="last", fine_tune_blocks=3, lr=2e-4)
    assert cfg.fine_tune == "last:3" and cfg.backbone_learning_rate() == pytest.approx(2e-4)
    assert (cfg.epochs, cfg.patience) == (3, 2)  # fine-tuning defaults (FINE_TUNE_LENGTH, triplet's own epochs)
    assert make_config("contrastive").epochs == 3 and make_config("multisimilarity").epochs == 4
    assert make_config("triplet", fine_tune="none").epochs == 30 and make_config("triplet", epochs=5).epochs == 5
    # the backbone's default: Lite0 trains its blocks after the stem and the 1/4-resolution stages
    assert all(make_config(m).fine_tune == "last:13" for m in ("triplet", "contrastive", "protonet", "maml", "fomaml"))
    assert make_config("triplet", backbone="efficientnet_lite2").fine_tune == "last:17"
    assert make_config("protonet", backbone="conv4", pretrained=False).fine_tune == "all"  # from scratch
    assert make_config("triplet", backbone="timm:resnet18").fine_tune == "all"  # declares nothing
    assert make_config("triplet", fine_tune="none").epochs == 30
    assert make_config("protonet").options.episodes == 200 and make_config("maml").options.episodes == 200
    assert make_config("protonet", fine_tune="last:2").options.episodes == 300  # a short tail learns slower
    assert make_config("protonet", fine_tune="last:4").options.episodes == 200
    assert make_config("protonet", fine_tune="all", episodes=50).options.episodes == 50
    assert make_config("protonet", fine_tune="none").options.episodes == 2000
    assert make_config("protonet", fine_tune="last:1", backbone_lr=1e-6).backbone_learning_rate() == 1e-6
    assert make_config("protonet", pretrained=False, fine_tune="all").batchnorm_mode() == "train"
    assert make_config("protonet", fine_tune="all").batchnorm_mode() == "eval"


def test_select_trainable_lite0():
    """last:2 selects exactly the last two MBConv blocks and the head conv + BN; all selects everything."""
    bb = create_backbone("efficientnet_lite0", image_size=64)
    params = select_trainable(bb, "last:2")
    names = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    n_blocks = len(bb.model.net._blocks)
    allowed = (f"net._blocks.{n_blocks - 2}.", f"net._blocks.{n_blocks - 1}.", "net._conv_head.", "net._bn1.")
    assert names and all(n.startswith(allowed) for n in names)
    assert len(params) == len(names)
    select_trainable(bb, "all")
    assert all(p.requires_grad for p in bb.model.parameters())
    select_trainable(bb, "none")
    assert not any(p.requires_grad for p in bb.model.parameters())


# ------------------------------------------------------------------ training on real photos
@pytest.fixture(scope="module")
def tiny(grocery_root, tmp_path_factory):
    return {**shared_tiny_grocery(grocery_root), "folder": tmp_path_factory.mktemp("tiny-ft")}


def _cfg(tiny, out, method="triplet", **kw):
    args = dict(SMALL, data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"], out=str(out))
    if method in ("triplet", "contrastive"):
        args.update(batch_size=16, m_per_class=4)
    else:
        args.update(episodes=6, episodes_per_epoch=3)
    args.update(kw)
    return make_config(method, **args)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("method, bn", [("triplet", "eval"), ("protonet", "train")])
def test_fine_tuning_changes_only_the_selected_weights(tiny, method, bn):
    """last:1 trains the last block and the head conv only; BN running stats move only with --bn train;
    the saved run reloads to the embeddings of the trained weights."""
    out = tiny["folder"] / f"ft-{method}"
    fresh = create_backbone("efficientnet_lite0", image_size=64).model.state_dict()
    result = train(_cfg(tiny, out, method, epochs=1, fine_tune="last:1", bn=bn, warmup_steps=0,
                        backbone_lr=1e-3))
    assert result.best_epoch == 1 or result.history[1]["val_map_at_r"] is not None
    model = load_run(out)
    tuned = model.backbone.model.state_dict()
    changed = _changed(fresh, tuned)
    last = f"net._blocks.{len(model.backbone.model.net._blocks) - 1}."
    if result.best_epoch == 0:
        assert changed == set()
        return
    assert any(k.startswith(last) and k.endswith("weight") for k in changed)
    assert all(k.startswith((last, "net._conv_head.", "net._bn1.")) for k in changed), sorted(changed)[:5]
    stats = {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert (stats != set()) == (bn == "train")
    assert model.backbone.weights_tag == "ft" + _digest(tuned)
    tensors = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in tensors)


def _digest(state):
    from fewshot.model import weights_digest

    return weights_digest(state)


def test_saved_fine_tuned_run_reloads_to_the_same_embeddings(drawn_tree, tmp_path):
    """A run saved with changed backbone weights reloads to the same embeddings, and the
    embedding cache (keyed by a digest of the weights) never hands it the pretrained vectors."""
    from fewshot.data.loaders import load_dataset
    from fewshot.methods.heads import ProjectionHead
    from fewshot.methods.runs import load_embedding_model, save_run
    from fewshot.model import EmbeddingModel

    ds = load_dataset(str(drawn_tree))
    cache = str(tmp_path / "cache")
    frozen = load_embedding_model("efficientnet_lite0", image_size=64)
    frozen_vectors = frozen.embed(ds, cache_dir=cache, progress=False).vectors  # fills the cache
    tuned_bb = create_backbone("efficientnet_lite0", image_size=64)
    torch.manual_seed(0)
    with torch.no_grad():  # stands in for a fine-tuning run: the last block and head conv move
        for p in select_trainable(tuned_bb, "last:1"):
            p.add_(0.05 * torch.randn_like(p))
    head = ProjectionHead(kind="linear", in_dim=1280, out_dim=1280)
    model = EmbeddingModel(backbone=tuned_bb, head=head)
    expected = model.embed(ds, use_cache=False, progress=False).vectors  # weights_tag is still "imagenet" here
    save_run(tmp_path / "run", model, {"method": "triplet", "fine_tune": "last:1"}, complete=True)
    loaded = load_run(tmp_path / "run")
    assert loaded.backbone.weights_tag.startswith("ft") and loaded.backbone.cache_key != frozen.backbone.cache_key
    first = loaded.embed(ds, cache_dir=cache, progress=False).vectors
    again = load_run(tmp_path / "run").embed(ds, cache_dir=cache, progress=False).vectors  # from the cache
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-6)
    assert np.abs(model.transform(frozen_vectors) - first).max() > 1e-2  # the pretrained vectors differ


def test_from_scratch_needs_fine_tune_all_and_conv4_has_no_weights(tiny, tmp_path):
    with pytest.raises(FewshotError, match="fine_tune=all"):
        train(_cfg(tiny, tmp_path / "x", pretrained=False, fine_tune="last:1"))
    with pytest.raises(BackboneError, match="no pretrained weights"):
        create_backbone("conv4", pretrained=True, image_size=28)
    assert not (tmp_path / "x").exists()


def test_maml_inner_params_all_needs_a_trained_backbone(tiny, tmp_path):
    with pytest.raises(FewshotError, match="inner_params=all") as err:
        train(_cfg(tiny, tmp_path / "m", "maml", inner_params="all", fine_tune="none"))
    assert err.value.options == ("inner_params", "fine_tune")  # the CLI names --inner-params and --fine-tune


# ------------------------------------------------------------------ full-network MAML
class _TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


def test_second_order_meta_gradient_matches_finite_differences():
    """d/dtheta of the query loss after 2 inner steps on every parameter (Finn et al. eq. 1-3),
    through create_graph=True, equals central finite differences (float64)."""
    torch.manual_seed(0)
    net = _TinyConv().double()
    xs, ys = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    xq, yq = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    names = [n for n, _ in net.named_parameters()]

    def meta_loss(params, first_order=False):
        fast = inner_adapt(net, params, xs, ys, steps=2, lr=0.3, first_order=first_order)
        return F.cross_entropy(functional_call(net, fast, (xq,)), yq)

    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    grads = torch.autograd.grad(meta_loss(theta), [theta[n] for n in names])
    fo_grads = torch.autograd.grad(meta_loss(theta, first_order=True), [theta[n] for n in names])
    eps = 1e-6
    for name, g, g_fo in zip(names, grads, fo_grads):
        flat = theta[name].detach().reshape(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            plus = {n: t.detach().clone() for n, t in theta.items()}
            minus = {n: t.detach().clone() for n, t in theta.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fd = (meta_loss(plus).item() - meta_loss(minus).item()) / (2 * eps)
            assert g.reshape(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-7), (name, i)
    # the first-order gradient is a different (approximate) quantity: it must not equal the exact one
    assert max((a - b).abs().max().item() for a, b in zip(grads, fo_grads)) > 1e-6


def test_full_network_maml_step_adapts_and_updates_the_backbone():
    """MAML with inner_params=all on conv4: one meta-step moves every conv4 block, and the
    second-order step differs from the first-order one."""
    from fewshot.data.episodes import Episode
    from fewshot.methods.maml import FOMAML, MAML

    steps = {}
    for cls in (MAML, FOMAML):
        torch.manual_seed(0)
        bb = create_backbone("conv4", pretrained=False, image_size=28)
        cfg = make_config(cls.name, fine_tune="all", pretrained=False, ways=2, shots=1, queries=2,
                          inner_params="all", inner_steps=2, inner_lr=0.1, meta_batch=1, lr=1e-2)
        m = cfg.build_method(bb.dim)
        params = select_trainable(bb, "all")
        m.backbone, m.backbone_params = bb.model, params
        images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        m.bind(lambda idx: bb.model(images[idx]), lambda idx: images[idx])
        before = {k: v.clone() for k, v in bb.model.state_dict().items()}
        ep = Episode(support_idx=np.array([0, 1]), support_y=np.array([0, 1]), query_idx=np.array([2, 3, 4, 5]),
                     query_y=np.array([0, 0, 1, 1]), classes=["a", "b"])
        opt = make_optimizer(m, cfg)
        loss = train_step(m, [ep], opt)
        assert np.isfinite(loss)
        after = bb.model.state_dict()
        moved = {k.split(".")[1] for k in _changed(before, after) if k.endswith("weight")}
        assert moved == {"0", "1", "2", "3"}
        steps[cls.name] = torch.cat([(after[k] - before[k]).flatten() for k in before if k.endswith("weight")])
    assert (steps["maml"] - steps["fomaml"]).abs().max() > 1e-7


# ------------------------------------------------------------------ conv4 from scratch
def test_conv4_protonet_from_scratch_learns_a_separable_toy_set(tmp_path):
    from fewshot.data.splits import ClassSplit

    root = toy_shapes(tmp_path / "toy")
    classes = sorted(p.name for p in root.iterdir())
    rng = np.random.default_rng(0)
    rng.shuffle(classes)
    split = ClassSplit(name="toy", seed=0, train=sorted(classes[:14]), val=sorted(classes[14:19]),
                       test=sorted(classes[19:]), dataset="toy")
    split_file = split.save(tmp_path / "toy-split.json")
    cfg = make_config("protonet", data=str(root), split_file=str(split_file), out=str(tmp_path / "run"),
                      backbone="conv4", pretrained=False, fine_tune="all", image_size=28, augment="none",
                      lr=1e-3, ways=3, shots=1, queries=3, episodes=150, episodes_per_epoch=50, patience=0,
                      val_episodes=100, eval_episodes=300, final_eval="test", progress=False,
                      cache_dir=str(tmp_path / "cache"), head={"kind": "linear", "centre": False})
    result = train(cfg)
    acc = result.final_metrics["episodes"]["5way1shot"]["accuracy"]
    assert acc >= 0.9, result.final_metrics["episodes"]
    assert result.history[-1]["train_loss"] < 0.5 * max(r["train_loss"] or 0 for r in result.history)
    # it learned: val MAP@R of the random initialisation (epoch 0) is far below the best epoch's
    assert result.best_metrics["val_map_at_r"] > result.history[0]["val_map_at_r"] + 0.1
    model = load_run(tmp_path / "run")
    assert model.backbone.name == "conv4" and model.backbone.dim == 64


def test_class_rotations_make_each_rotation_a_train_class_of_its_own(tmp_path):
    """--class-rotations 4 (Santoro et al. 2016): the train part has 4x the classes, item
    r*N + i is image i turned r x 90 degrees with class r*C + y[i]; val is untouched."""
    from fewshot.training.setup import build_setup

    common = toy_conv4_protonet(tmp_path)
    plain = build_setup(make_config("protonet", out=str(tmp_path / "a"), **common))
    rot = build_setup(make_config("protonet", out=str(tmp_path / "b"), class_rotations=4, **common))
    n, c = len(plain.data.train), plain.data.train.num_classes
    assert (len(rot.data.train), rot.data.train.num_classes) == (4 * n, 4 * c) and c == 14
    base = plain.ft.train_bank.images
    for r in range(4):
        assert torch.equal(rot.ft.train_bank.images[r * n:(r + 1) * n], torch.rot90(base, r, dims=(2, 3)))
        assert torch.equal(rot.data.train.y[r * n:(r + 1) * n], plain.data.train.y + r * c)
    assert rot.data.train.label_names[c + 2] == plain.data.train.label_names[2] + " @90"
    assert not torch.equal(rot.ft.train_bank.images[n:2 * n], base)  # the shapes are not symmetric
    assert len(rot.ft.val_q_bank) == len(plain.ft.val_q_bank)
    result = train(make_config("protonet", out=str(tmp_path / "run"), class_rotations=4, **common))
    assert result.history[-1]["train_loss"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]["class_rotations"] == 4
    with pytest.raises(FewshotError, match="class_rotations = 5: the training loop needs at most 4"):
        train(make_config("protonet", out=str(tmp_path / "bad"), class_rotations=5, **common))
    assert not (tmp_path / "bad").exists()


def test_from_scratch_head_is_not_centred_and_frozen_runs_refuse_backbone_options(tiny, tmp_path):
    """A random backbone's mean embedding goes stale as it learns, so its head is not centred;
    backbone options with --fine-tune none would be ignored, so they are refused."""
    cfg = make_config("protonet", pretrained=False, fine_tune="all")
    assert cfg.build_method(64).head.use_centre is False
    assert make_config("protonet").build_method(64).head.use_centre is True
    for option in ({"backbone_lr": 1e-3}, {"bn": "train"}, {"augment": "none"}, {"warmup_steps": 5},
                   {"class_rotations": 4}):
        with pytest.raises(FewshotError, match="fine_tune none keeps it frozen"):
            train(_cfg(tiny, tmp_path / "r", fine_tune="none", **option))
    with pytest.raises(FewshotError, match="has 16 blocks"):
        train(_cfg(tiny, tmp_path / "r", fine_tune="last:17"))
    assert not (tmp_path / "r").exists()


def test_full_network_maml_on_efficientnet_with_fine_tune_all(tiny, tmp_path):
    """--inner-params all with --fine-tune all on EfficientNet-Lite0: its ImageNet classifier is
    never read by the forward, so it gets no inner gradient (it used to stop the inner loop with
    'appears to not have been used in the graph'); the meta-update moves the first convolution."""
    from fewshot.methods.runs import load_run

    cfg = _cfg(tiny, tmp_path / "maml-all", "maml", image_size=32, fine_tune="all", inner_params="all",
               ways=3, shots=1, queries=2, episodes=2, episodes_per_epoch=1, meta_batch=1, inner_steps=1)
    train(cfg)
    before = create_backbone("efficientnet_lite0", image_size=32).model.state_dict()
    after = load_run(tmp_path / "maml-all").backbone.model.state_dict()
    changed = _changed(before, after)
    assert any("_conv_stem" in k for k in changed) and not any("_fc" in k for k in changed)


def test_cosine_schedule_is_torch_cosine_annealing_after_the_backbone_warm_up():
    """After the warm-up every group follows torch's CosineAnnealingLR (eta_min 0) down to 0 at
    the last planned step; the backbone ramps first; "constant" keeps every rate."""
    from fewshot.training.optim import lr_scheduler

    def groups():
        w = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        return torch.optim.SGD([{"params": [w[0]], "lr": 1e-3, "name": "head"},
                                {"params": [w[1]], "lr": 5e-5, "name": "backbone"}], lr=1e-3)

    warmup, total = 4, 14
    opt, ref_opt = groups(), groups()
    ours, ref = lr_scheduler(opt, warmup, "cosine", total), None
    for t in range(total):
        if t == warmup:
            ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warmup, eta_min=0.0)
        got = [g["lr"] for g in opt.param_groups]
        if t < warmup:
            assert got == pytest.approx([1e-3, 5e-5 * (t + 1) / warmup])
        else:
            assert got == pytest.approx([g["lr"] for g in ref_opt.param_groups], abs=1e-12)
        opt.step()
        ours.step()
        ref_opt.step()
        if ref is not None:
            ref.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0, 0.0], abs=1e-15)
    const = groups()
    sched = lr_scheduler(const, warmup, "constant", total)
    for _ in range(total):
        const.step()
        sched.step()
    assert [g["lr"] for g in const.param_groups] == pytest.approx([1e-3, 5e-5])


def test_training_with_a_cosine_schedule_plans_every_step_and_records_it(tmp_path):
    """--lr-schedule cosine reaches 0 exactly at the run's last step (epochs x steps of an
    epoch), is written to config.json, and an unknown schedule is refused before any output."""
    from fewshot.training.setup import build_setup

    common = toy_conv4_protonet(tmp_path, warmup_steps=5, lr_schedule="cosine")
    setup = build_setup(make_config("protonet", out=str(tmp_path / "a"), **common))
    rates = []
    for _ in range(20):  # 2 epochs x 10 episodes
        rates.append([g["lr"] for g in setup.optimizer.param_groups])
        setup.optimizer.step()
        setup.scheduler.step()
    assert rates[0][1] == pytest.approx(rates[0][0] / 5) and max(r[0] for r in rates) == rates[0][0]
    assert all(a[0] >= b[0] for a, b in zip(rates[5:], rates[6:])) and rates[-1][0] > 0
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in setup.optimizer.param_groups)
    train(make_config("protonet", out=str(tmp_path / "run"), **common))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_config"]["lr_schedule"] == "cosine"
    with pytest.raises(FewshotError, match="unknown option lr_schedule = 'linear'"):
        train(make_config("protonet", out=str(tmp_path / "bad"), **{**common, "lr_schedule": "linear"}))
    assert not (tmp_path / "bad").exists()


def test_validation_of_a_fine_tuned_backbone_runs_on_onnx_and_agrees_with_torch(tiny):
    """With --runtime auto on a CPU each epoch's validation embeds through an in-memory ONNX
    export of the current weights; the validation metrics equal torch's (the same run with
    --runtime torch) to float rounding, and config.json says which forward validated."""
    runs = {}
    for runtime in ("auto", "torch"):
        out = tiny["folder"] / f"val-{runtime}"
        runs[runtime] = train(_cfg(tiny, out, "triplet", epochs=1, fine_tune="last:1", warmup_steps=0,
                                   backbone_lr=1e-3, runtime=runtime))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["validation_runtime"] == ("onnx" if runtime == "auto" else "torch")
    for a, b in zip(runs["auto"].history, runs["torch"].history):
        for key in ("val_map", "val_map_at_r", "val_precision_at_1"):
            assert a[key] == pytest.approx(b[key], abs=2e-3), (key, a, b)
    assert runs["auto"].history[1]["val_map"] != runs["auto"].history[0]["val_map"]  # the weights did change


def test_train_tta_flip_applies_to_the_final_evaluation_only(tmp_path):
    """`fewshot train --tta flip`: the final evaluation embeds each image with its mirror image
    and records it; an unknown value is refused before the run folder exists."""
    from typer.testing import CliRunner

    from fewshot.cli import app

    kw = toy_conv4_protonet(tmp_path, seed=3)
    kw.update(final_eval="test", eval_episodes=50, episodes=10)
    args = ["train", "--method", "protonet", "--data", kw["data"], "--split-file", kw["split_file"],
            "--backbone", "conv4", "--from-scratch", "--fine-tune", "all", "--image-size", "28", "--augment", "none",
            "--ways", "3", "--shots", "1", "--queries", "3", "--episodes", "10", "--episodes-per-epoch", "10",
            "--eval-episodes", "50", "--cache-dir", kw["cache_dir"], "--no-progress", "--seed", "3"]
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--tta", "rotate"])
    assert bad.exit_code == 1 and "--tta none or --tta flip" in bad.output and not (tmp_path / "bad").exists()
    runs = {}
    for tta in ("none", "flip"):
        res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / tta), "--tta", tta])
        assert res.exit_code == 0, res.output
        assert ("test classes (--tta flip):" in res.output) == (tta == "flip"), res.output
        config = json.loads((tmp_path / tta / "config.json").read_text())
        metrics = json.loads((tmp_path / tta / "eval_test" / "metrics.json").read_text())
        assert config["final_eval"]["tta"] == config["train_config"]["final_tta"] == tta
        assert metrics["config"]["model"]["backbone"]["tta"] == tta
        runs[tta] = (load_file(str(tmp_path / tta / "model.safetensors")), metrics["map"])
    # the same training either way (same seed, same weights); only the evaluation differs
    (w0, map0), (w1, map1) = runs["none"], runs["flip"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert map0 != map1
