"""Training throughput (issue 31): a fine-tuning step's forward in slices (``micro_batch``) gives
the gradient of one forward of the whole batch; where it applies; the images per second a run
records and prints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewshot.backbones import create_backbone
from fewshot.errors import FewshotError
from fewshot.training import make_config, read_history
from fewshot.training.config import check_config
from fewshot.training.finetune import micro_batch
from fewshot.training.setup import build_setup

from train_helpers import shared_tiny_grocery

SMALL = dict(image_size=64, lr=1e-3, val_episodes=0, progress=False, final_eval="none", patience=0,
             batch_size=16, m_per_class=4, warmup_steps=0)


@pytest.fixture(scope="module")
def tiny(grocery_root, tmp_path_factory):
    return {**shared_tiny_grocery(grocery_root), "folder": tmp_path_factory.mktemp("tiny-mb")}


def _cfg(tiny, out, **kw):
    return make_config("triplet", **{**SMALL, "data": tiny["data"], "split_file": tiny["split_file"],
                                     "cache_dir": tiny["cache_dir"], "out": str(out), **kw})


def test_micro_batch_resolution():
    """Given: that; on a CPU with BatchNorm in eval: as many images as the backbone's measured
    pixel budget holds (8 of 224 px for EfficientNet-Lite, 5 of 260, 98 of 64); on a GPU, with
    bn=train, or for a backbone without a budget: the whole batch (None)."""
    lite = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    conv4 = create_backbone("conv4", pretrained=False, image_size=28)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert lite.train_cpu_pixels == 8 * 224 * 224 and conv4.train_cpu_pixels is None
    assert micro_batch(make_config("triplet"), lite, cpu) == 8
    assert micro_batch(make_config("triplet", image_size=260), lite, cpu) == 5
    assert micro_batch(make_config("triplet", image_size=64), lite, cpu) == 98
    assert micro_batch(make_config("triplet", image_size=1024), lite, cpu) == 1
    assert micro_batch(make_config("triplet", micro_batch=3), lite, cpu) == 3
    assert micro_batch(make_config("triplet", micro_batch=3), lite, gpu) == 3
    assert micro_batch(make_config("triplet"), lite, gpu) is None
    assert micro_batch(make_config("triplet", bn="train"), lite, cpu) is None
    assert micro_batch(make_config("protonet", pretrained=False, backbone="conv4"), conv4, cpu) is None
    assert micro_batch(make_config("protonet"), lite, cpu) == 8


@pytest.mark.parametrize("kw, names", [(dict(micro_batch=4, fine_tune="none"), {"micro_batch", "fine_tune"}),
                                       (dict(micro_batch=4, bn="train"), {"micro_batch", "bn"}),
                                       (dict(micro_batch=0), {"micro_batch"})])
def test_micro_batch_refused_where_it_does_not_apply(kw, names, tmp_path):
    with pytest.raises(FewshotError) as err:
        check_config(make_config("triplet", out=str(tmp_path / "run"), **kw))
    assert set(err.value.options) == names


def test_sliced_forward_gives_the_whole_batch_features_and_gradient(tiny):
    """The same 11 training images through the fine-tuned Lite0 (eval BatchNorm): one forward,
    or slices of 4 concatenated, give the same features and, after one backward of a loss of all
    of them, the same gradient of every backbone parameter (to float rounding)."""
    setup = build_setup(_cfg(tiny, tiny["folder"] / "unused", micro_batch=4))
    ft = setup.ft
    assert ft.micro_batch == 4
    idx = np.arange(11)
    grads, feats = {}, {}
    for name, step in (("sliced", 4), ("whole", None)):
        ft.micro_batch = step
        ft.seed_epoch(7)  # the same augmentation both times
        ft.train_mode(True)
        setup.optimizer.zero_grad(set_to_none=True)
        z = ft.features(idx)
        (z.sin().sum() + z.pow(2).mean()).backward()
        feats[name] = z.detach().clone()
        grads[name] = {n: p.grad.clone() for n, p in ft.backbone.model.named_parameters() if p.grad is not None}
    assert feats["sliced"].shape == (11, ft.backbone.dim)
    torch.testing.assert_close(feats["sliced"], feats["whole"], rtol=1e-4, atol=1e-5)
    assert grads["sliced"].keys() == grads["whole"].keys() and len(grads["whole"]) > 100
    worst = max(float((grads["sliced"][n] - grads["whole"][n]).abs().max() / (grads["whole"][n].abs().max() + 1e-12))
                for n in grads["whole"])
    assert worst < 1e-3, worst


def test_a_run_records_and_prints_its_images_per_second(tiny, tmp_path):
    """history.csv has each trained epoch's training images per second (epoch 0, validation only,
    has none); config.json their median and the micro_batch given; `fewshot train` prints it."""
    from typer.testing import CliRunner

    from fewshot.cli import app

    out = tmp_path / "cli-run"
    args = ["train", "--method", "triplet", "--data", tiny["data"], "--split-file", tiny["split_file"], "--out", str(out),
            "--cache-dir", tiny["cache_dir"], "--image-size", "64", "--fine-tune", "last:1",
            "--epochs", "2", "--val-episodes", "0", "--split", "none", "--no-progress", "--opt", "batch_size=16",
            "--opt", "m_per_class=4", "--micro-batch", "5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    prior = json.loads((out / "config.json").read_text())["whitening_prior"]  # its last line names the prior and rivals
    assert (f"whitening-prior.safetensors (the whitening prior: {prior['photos']:,} training photos of "
            f"{prior['articles']} articles, {prior['rivals']} articles as rivals)") in " ".join(res.output.split())
    rows = read_history(out)
    assert rows[0]["images_per_second"] is None
    rates = [r["images_per_second"] for r in rows[1:]]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    config = json.loads((out / "config.json").read_text())
    assert config["images_per_second"] == pytest.approx(float(np.median(rates)), abs=0.01)
    assert config["train_config"]["micro_batch"] == 5 and config["micro_batch"] == 5
    line = next(x for x in res.output.splitlines() if x.startswith("training steps:"))
    assert float(line.split()[2]) == pytest.approx(config["images_per_second"], abs=0.06)
    assert "images/s" in line and "slices of 5" in line


@pytest.mark.parametrize("method", ["maml", "protonet"])
def test_images_per_second_of_episodic_and_head_only_runs(method, tiny, tmp_path):
    """Every method's epochs count the images they embed, MAML's episodes too (it has no
    ``items``), on cached embeddings as well."""
    from fewshot.training import train

    out = tmp_path / method
    cfg = make_config(method, data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"],
                      out=str(out), image_size=64, fine_tune="none", epochs=1, ways=3, shots=2, queries=2,
                      episodes=3, episodes_per_epoch=3, val_episodes=0, final_eval="none", progress=False)
    result = train(cfg)
    rate = result.history[1]["images_per_second"]
    assert rate is not None and rate > 0
    assert result.config["images_per_second"] == pytest.approx(rate, abs=0.01)
    assert "micro_batch" not in result.config  # nothing is sliced on cached embeddings


def _graph_convolutions(t: torch.Tensor) -> int:
    """Convolution nodes in the autograd graph behind ``t``."""
    seen, stack, convs = set(), [t.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        convs += "Convolution" in type(node).__name__
        stack += [n for n, _ in node.next_functions]
    return convs


@pytest.mark.parametrize("fine_tune", ["last:1", "last:2", "all"])
def test_backward_never_reaches_the_frozen_blocks(fine_tune):
    """With --fine-tune last:N the frozen stem and blocks run without recording a graph: the
    features' autograd graph holds exactly the convolutions of the trainable blocks (its
    backward computes nothing for the frozen part)."""
    from fewshot.training.finetune import select_trainable, trainable_modules

    bb = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    select_trainable(bb, fine_tune)
    bb.model.eval()
    trainable = sum(isinstance(m, torch.nn.Conv2d) for mod in trainable_modules(bb, fine_tune) for m in mod.modules())
    z = bb.model(torch.randn(2, 3, 64, 64))
    assert _graph_convolutions(z) == trainable
    total = sum(isinstance(m, torch.nn.Conv2d) for m in bb.model.modules())
    assert (trainable == total) == (fine_tune == "all") and trainable > 0
