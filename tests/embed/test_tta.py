"""Test-time augmentation: ``--tta flip`` (:class:`fewshot.backbones.FlipAverage`, the mean over
an image and its mirror image) and ``--tta scales`` (:class:`fewshot.backbones.ScaleAverage`, the
mean of the unit embeddings at three sides), on torch and ONNX alike; caches and exports are keyed
by it; an index remembers it, so classify embeds queries the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from typer.testing import CliRunner

from fewshot.api import create_backbone as create_model
from fewshot.backbones import check_tta, create_backbone, tta_sides
from fewshot.cli import app
from fewshot.embed import embed_paths, make_forward
from fewshot.errors import BackboneError
from fewshot.catalogue import load_index, model_for_index


def _conv4():
    torch.manual_seed(0)
    return create_backbone("conv4", pretrained=False, image_size=28)


def test_flip_average_is_the_mean_over_the_image_and_its_mirror(one_torch_thread):
    backbone = _conv4()
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, mirrored = backbone.model(x), backbone.model(x.flip(3))
        want = (0.5 * (plain + mirrored)).numpy()
        backbone.tta = "flip"
        got = make_forward(backbone, "torch").forward(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - plain.numpy()).max() > 1e-3  # it really changed the embedding
    # and is the same for an image and its mirror image
    np.testing.assert_allclose(make_forward(backbone, "torch").forward(x.flip(3)), got, rtol=1e-5, atol=1e-6)


def _lite0():
    torch.manual_seed(0)
    return create_backbone("efficientnet_lite0", pretrained=False, image_size=64)


def test_scales_refused_where_the_backbone_cannot_pool_every_side(one_torch_thread, tmp_path):
    """conv4 flattens its last map (no global pooling): its embedding's length depends on the side.
    The ONNX path refuses it the same way, without falling back to torch or marking the export failed."""
    backbone = _conv4()
    backbone.tta = "scales"
    with pytest.raises(BackboneError, match="--tta scales does not suit this backbone: its embedding has "
                                            "64 values at one side and 256 at 32 px") as err:
        make_forward(backbone, "torch").forward(torch.zeros(2, 3, 28, 28))
    assert "--tta flip" in err.value.hint and err.value.options == ("tta",)
    with pytest.raises(BackboneError, match="does not suit this backbone"):
        make_forward(backbone, "auto", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.failed.json"))


def test_scale_average_is_the_mean_of_unit_embeddings_at_three_sides(one_torch_thread):
    """By hand: the batch resized (bilinear) to 48, 64 and 80 px, each embedding made unit length,
    then averaged; the sides are 7/9, 1 and 11/9 of the input's, to a multiple of 8."""
    assert tta_sides(288) == [224, 288, 352] and tta_sides(224) == [176, 224, 272] and tta_sides(28) == [24, 28, 32]
    assert tta_sides(8) == [8]  # nothing smaller than 8 px: one side left
    backbone = _lite0()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        views = [torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
                 for s in (48, 80)]
        units = [torch.nn.functional.normalize(backbone.model(v), dim=1) for v in (views[0], x, views[1])]
        want = ((units[0] + units[1] + units[2]) / 3).numpy()
        backbone.tta = "scales"
        got = make_forward(backbone, "torch").forward(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - units[1].numpy()).max() > 1e-3  # not the plain unit embedding


@pytest.mark.parametrize("tta", ["flip", "scales"])
def test_tta_keys_caches_and_exports_and_onnx_agrees(tmp_path, drawn_tree, one_torch_thread, tta):
    """ONNX and torch give the same averaged vectors; the cache and the export of a
    TTA model are their own, and a plain model's keys are unchanged."""
    backbone = _conv4() if tta == "flip" else _lite0()
    plain_key = backbone.cache_key
    assert "tta" not in plain_key
    paths = sorted(drawn_tree.rglob("*.jpg"))[:8]
    plain, *_ = embed_paths(paths, backbone, cache_dir=tmp_path / "c", progress=False, runtime="torch")
    backbone.tta = tta
    assert backbone.cache_key == plain_key + f"-tta{tta}"
    flip_torch, *_ = embed_paths(paths, backbone, use_cache=False, progress=False, runtime="torch")
    choice = make_forward(backbone, "onnx", cache_dir=tmp_path / "c")
    assert choice.runtime == "onnx" and choice.notice is None
    flip_onnx, ok, fail, cached = embed_paths(paths, backbone, cache_dir=tmp_path / "c", progress=False,
                                              forward=choice.forward)
    assert cached == 0 and not fail  # nothing came from the plain model's cache
    cos = (flip_onnx * flip_torch).sum(1) / np.linalg.norm(flip_onnx, axis=1) / np.linalg.norm(flip_torch, axis=1)
    assert cos.min() >= 0.9999
    assert np.abs(flip_torch - plain).max() > 1e-3
    assert len(list((tmp_path / "c" / "onnx").glob(f"*tta{tta}*.onnx"))) == 1
    assert backbone.describe()["tta"] == tta


def test_mirrored_photo_gets_the_same_flip_embedding(drawn_tree, tmp_path, one_torch_thread):
    """A real file and its mirror image (written by PIL) embed alike with --tta flip and not
    without it (resizing commutes with mirroring up to rounding)."""
    src = sorted(drawn_tree.rglob("*.jpg"))[0]
    mirror = tmp_path / "mirror.png"
    ImageOps.mirror(Image.open(src).convert("RGB")).save(mirror)
    original = tmp_path / "original.png"
    Image.open(src).convert("RGB").save(original)
    model = create_model("efficientnet_lite0", image_size=64, tta="flip")
    v, *_ = model.embed_paths([original, mirror], use_cache=False, progress=False, runtime="torch")
    plain = create_model("efficientnet_lite0", image_size=64)
    p, *_ = plain.embed_paths([original, mirror], use_cache=False, progress=False, runtime="torch")

    def cos(a):
        return float(a[0] @ a[1] / np.linalg.norm(a[0]) / np.linalg.norm(a[1]))

    assert cos(v) > 0.999 and cos(v) > cos(p)


def test_index_remembers_tta_and_classify_uses_it(drawn_tree, tmp_path):
    out, cache = tmp_path / "idx", tmp_path / "cache"
    common = ["--image-size", "32", "--cache-dir", str(cache), "--no-progress", "--runtime", "torch"]
    res = CliRunner().invoke(app, ["index", "--data", str(drawn_tree), "--out", str(out), "--tta", "flip", *common])
    assert res.exit_code == 0, res.output
    index = load_index(out)
    assert index.config["model"]["backbone"]["tta"] == "flip"
    model = model_for_index(index, out)
    assert model.backbone.tta == "flip"
    photo = sorted(drawn_tree.rglob("*.jpg"))[0]
    mirror = tmp_path / "mirror.png"  # not a catalogue file, so nothing is left out
    ImageOps.mirror(Image.open(photo).convert("RGB")).save(mirror)
    res = CliRunner().invoke(app, ["classify", str(mirror), "--index", str(out), "--json", "--mode", "nearest",
                                   "--cache-dir", str(cache), "--no-progress", "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    top = json.loads(res.stdout.strip().splitlines()[0])["predictions"][0]
    # embedded with the index's flip, the mirror image meets its original far closer than
    # the plain model's embeddings of the two do
    plain = create_model("efficientnet_lite0", image_size=32)
    v, *_ = plain.embed_paths([photo, mirror], use_cache=False, progress=False, runtime="torch")
    plain_cos = float(v[0] @ v[1] / np.linalg.norm(v[0]) / np.linalg.norm(v[1]))
    assert top["label"] == photo.parent.name and top["score"] > 0.99 and 1 - top["score"] < (1 - plain_cos) / 3, top


def test_unknown_tta_is_refused_before_any_output(drawn_tree, tmp_path):
    with pytest.raises(BackboneError, match="unknown test-time augmentation 'rotate'"):
        check_tta("rotate")
    out = tmp_path / "e.npz"
    res = CliRunner().invoke(app, ["embed", "--data", str(drawn_tree), "--out", str(out), "--tta", "rotate"])
    assert res.exit_code == 1 and "unknown test-time augmentation 'rotate'" in res.output
    assert "--tta none or --tta flip or --tta scales" in res.output and not out.exists()


def test_evaluate_with_tta_records_it(drawn_tree, tmp_path):
    out = tmp_path / "ev"
    args = ["evaluate", "--data", str(drawn_tree), "--image-size", "32", "--cache-dir", str(tmp_path / "c"),
            "--no-progress", "--runtime", "torch", "--episodes", "30"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--tta", "flip"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"]["backbone"]["tta"] == "flip"
    assert "mirror image (`--tta flip`)" in (out / "report.md").read_text()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "small"), "--tta", "scales"])
    assert res.exit_code == 1 and "cannot embed a 24-pixel input" in res.output  # Lite0 at 25 px and less
    assert "a larger --image-size" in res.output and not (tmp_path / "small").exists()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "scales"), "--tta", "scales", "--image-size", "64"])
    assert res.exit_code == 0, res.output
    scales = json.loads((tmp_path / "scales" / "metrics.json").read_text())
    assert scales["config"]["model"]["backbone"]["tta"] == "scales" and scales["map"] != metrics["map"]
    assert "7/9, 1 and 11/9 of its side (`--tta scales`)" in (tmp_path / "scales" / "report.md").read_text()
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain")])
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["config"]["model"]["backbone"]["tta"] == "none" and plain["map"] != metrics["map"]
    assert "--tta" not in (tmp_path / "plain" / "report.md").read_text()


def test_flip_export_leaves_the_backbone_in_eval_mode_and_the_fallback_exact(tmp_path, monkeypatch,
                                                                               one_torch_thread):
    """The flip wrapper is new on every call: exporting it (or failing to) must not switch the
    backbone's BatchNorm to train mode, or the torch fallback would embed per batch."""
    backbone = _conv4()
    backbone.tta = "flip"
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    want = make_forward(backbone, "torch").forward(x)
    make_forward(backbone, "onnx", cache_dir=tmp_path / "ok")
    assert not backbone.model.training

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter today")

    monkeypatch.setattr(torch.onnx, "export", broken)
    choice = make_forward(backbone, "auto", cache_dir=tmp_path / "broken")
    assert choice.runtime == "torch" and "no exporter today" in choice.notice
    assert not backbone.model.training
    np.testing.assert_allclose(choice.forward(x), want, rtol=1e-5, atol=1e-6)
    assert not backbone.inference_module().training


def test_index_tta_mismatches_are_refused_with_the_fix(drawn_tree, tmp_path):
    from fewshot.errors import CheckpointError
    from fewshot.serve.app import create_app

    out = tmp_path / "idx"
    res = CliRunner().invoke(app, ["index", "--data", str(drawn_tree), "--out", str(out), "--tta", "flip",
                                   "--image-size", "32", "--cache-dir", str(tmp_path / "c"), "--no-progress",
                                   "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    with pytest.raises(CheckpointError, match="test-time augmentation 'none' but index"):
        create_app(out, model=create_model("efficientnet_lite0", image_size=32), runtime="torch")
    index = load_index(out)
    index.config["model"]["backbone"]["tta"] = "rotate"
    with pytest.raises(CheckpointError, match="does not know") as err:
        model_for_index(index, out)
    assert "fewshot index --data" in err.value.hint
