"""The ONNX Runtime forward pass (fewshot.embed.runtime): same embeddings as torch, a cached
export that is reused, rebuilt when damaged, a torch fallback for what cannot be exported, and
clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fewshot.backbones import Backbone, Preprocess, create_backbone
from fewshot.cli import app
from fewshot.embed import embed_paths, make_forward, runtime as rt
from fewshot.errors import BackboneError
from fewshot.model import EmbeddingModel


def _photos(grocery_root: Path, n: int) -> list[Path]:
    lines = (grocery_root / "dataset" / "test.txt").read_text().splitlines()
    step = max(1, len(lines) // n)
    return [grocery_root / "dataset" / line.split(",")[0].strip() for line in lines[::step][:n]]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnx_matches_torch_on_real_photos(grocery_root, tmp_path):
    """Lite0 at 224 px on 24 real Grocery photos: cosine >= 0.9999 for every image, and the
    ONNX run really used ONNX Runtime (not a silent torch fallback)."""
    backbone = create_backbone("efficientnet_lite0")
    paths = _photos(grocery_root, 24)
    choice = make_forward(backbone, "onnx", cache_dir=tmp_path)
    assert choice.runtime == "onnx" and choice.notice is None
    v_onnx, ok1, fail1, _ = embed_paths(paths, backbone, use_cache=False, forward=choice.forward, progress=False)
    v_torch, ok2, fail2, _ = embed_paths(paths, backbone, use_cache=False, runtime="torch", progress=False)
    assert ok1 == ok2 == list(range(len(paths))) and not fail1 and not fail2
    cos = _cosines(v_onnx, v_torch)
    assert cos.min() >= 0.9999, cos.min()
    assert np.abs(v_onnx - v_torch).max() < 1e-3


def test_cache_made_by_one_runtime_serves_the_other(grocery_root, tmp_path):
    """The embedding cache is keyed by content, not runtime: torch fills it, onnx reads it."""
    backbone = create_backbone("efficientnet_lite0", image_size=64)
    paths = _photos(grocery_root, 6)
    v_torch, _, _, cached = embed_paths(paths, backbone, cache_dir=tmp_path, runtime="torch", progress=False)
    assert cached == 0
    v_again, _, _, cached = embed_paths(paths, backbone, cache_dir=tmp_path, runtime="onnx", progress=False)
    assert cached == len(paths)
    np.testing.assert_array_equal(v_again, v_torch)
    assert not (tmp_path / "onnx").exists()  # nothing to embed: nothing exported


def _tiny_backbone(model: nn.Module, name: str = "tiny") -> Backbone:
    torch.manual_seed(0)
    return Backbone(name=name, model=model.eval(), preprocess=Preprocess(image_size=16), dim=8,
                    pretrained=False, weights_tag="random")


class _Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class _Unexportable(_Pool):
    """singular values have no ONNX operator: the exporter refuses this model"""

    def forward(self, x):
        y = self.conv(x).flatten(2)
        return torch.linalg.svdvals(y @ y.transpose(1, 2))


def test_export_is_cached_reused_and_rebuilt_when_damaged(tmp_path, caplog, monkeypatch):
    backbone = _tiny_backbone(_Pool())
    x = torch.rand(3, 3, 16, 16)
    want = rt.TorchForward(backbone)(x)
    first = make_forward(backbone, "onnx", cache_dir=tmp_path)
    path = first.forward.path
    assert path.parent == tmp_path / "onnx" and path.suffix == ".onnx"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["exporter"] == rt.exporter_version() and meta["bytes"] == path.stat().st_size
    np.testing.assert_allclose(first.forward(x), want, atol=1e-5)

    # reused: a second forward exports nothing
    calls = []
    real_export = rt.export_bytes
    monkeypatch.setattr(rt, "export_bytes", lambda b: calls.append(1) or real_export(b))
    again = make_forward(backbone, "onnx", cache_dir=tmp_path)
    assert calls == [] and again.forward.path == path

    # damaged (bytes changed after the export): rebuilt with a warning, never used
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        rebuilt = make_forward(backbone, "onnx", cache_dir=tmp_path)
    assert calls == [1] and "damaged" in caplog.text
    np.testing.assert_allclose(rebuilt.forward(x), want, atol=1e-5)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == meta["sha256"]

    # truncated file: rebuilt as well
    path.write_bytes(path.read_bytes()[:100])
    np.testing.assert_allclose(make_forward(backbone, "onnx", cache_dir=tmp_path).forward(x), want, atol=1e-5)
    assert calls == [1, 1]


def test_new_weights_get_their_own_export(tmp_path):
    """The key holds the weights digest: a fine-tuned backbone is never run with old weights."""
    backbone = _tiny_backbone(_Pool())
    a = make_forward(backbone, "onnx", cache_dir=tmp_path).forward
    with torch.no_grad():
        backbone.model.conv.weight.mul_(2.0)
    b = make_forward(backbone, "onnx", cache_dir=tmp_path).forward
    assert a.path != b.path
    x = torch.rand(2, 3, 16, 16)
    np.testing.assert_allclose(b(x), rt.TorchForward(backbone)(x), atol=1e-5)
    assert not np.allclose(a(x), b(x))


def test_torch_forward_runs_a_cpu_batch_in_slices_of_cpu_batch():
    """A backbone with ``cpu_batch=4`` embeds a batch of 10 on the CPU in slices of 4, 4, 2, in
    order, to the embeddings of one whole-batch forward; without it, in one call; Lite0 sets 4."""
    import dataclasses

    whole = _tiny_backbone(_Pool())
    sliced = dataclasses.replace(whole, cpu_batch=4)
    sizes: list[int] = []
    hook = sliced.model.register_forward_hook(lambda m, inp, out: sizes.append(len(inp[0])))
    x = torch.rand(10, 3, 16, 16)
    out = rt.TorchForward(sliced)(x)
    assert sizes == [4, 4, 2]
    np.testing.assert_allclose(out, rt.TorchForward(whole)(x), atol=1e-6)
    assert out.shape == (10, 8) and out.dtype == np.float32
    sizes.clear()
    rt.TorchForward(whole)(x)
    assert sizes == [10]
    hook.remove()
    assert create_backbone("efficientnet_lite0", pretrained=False, image_size=32).cpu_batch == 4


def test_unexportable_backbone_falls_back_to_torch_with_one_notice(tmp_path, caplog):
    backbone = _tiny_backbone(_Unexportable(), name="svd")
    model = EmbeddingModel(backbone)
    x = torch.rand(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        for _ in range(3):  # one model embeds several times: one notice
            choice = model.forward("auto", None, tmp_path)
            out = choice.forward(x)
    assert choice.runtime == "torch" and choice.requested == "auto"
    notices = [r for r in caplog.records if "not ONNX Runtime" in r.getMessage()]
    assert len(notices) == 1 and "svd" in notices[0].getMessage()
    np.testing.assert_allclose(out, rt.TorchForward(backbone)(x), atol=1e-6)
    assert model.runtimes_used()[0]["runtime"] == "torch" and model.runtimes_used()[0]["notice"]
    # the failure is remembered: the next command does not try to export again
    markers = list((tmp_path / "onnx").glob("*.failed.json"))
    assert len(markers) == 1 and "export failed" in json.loads(markers[0].read_text())["reason"]
    assert "delete" in make_forward(backbone, "onnx", cache_dir=tmp_path).notice


def test_unknown_runtime_and_missing_onnxruntime_are_clear_errors(monkeypatch, tmp_path):
    backbone = _tiny_backbone(_Pool())
    with pytest.raises(BackboneError) as err:
        make_forward(backbone, "tensorrt")
    assert "runtime='auto', 'torch' or 'onnx'" in err.value.hint and err.value.options == ("runtime",)
    monkeypatch.setattr(rt, "onnx_available", lambda: False)
    with pytest.raises(BackboneError) as err:
        make_forward(backbone, "onnx")
    assert "pip install onnxruntime" in err.value.hint
    auto = make_forward(backbone, "auto", cache_dir=tmp_path)  # auto: torch, with the notice
    assert auto.runtime == "torch" and "onnxruntime is not installed" in auto.notice


def test_cli_runtime_onnx_without_onnxruntime(monkeypatch, tmp_path, drawn_tree):
    monkeypatch.setattr(rt, "onnx_available", lambda: False)
    out = tmp_path / "e.npz"
    res = CliRunner().invoke(app, ["embed", "--data", str(drawn_tree), "--out", str(out), "--runtime", "onnx",
                                   "--image-size", "32", "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "--runtime onnx needs the onnxruntime package" in res.output and "pip install onnxruntime" in res.output
    assert not out.exists()
    res = CliRunner().invoke(app, ["embed", "--data", str(drawn_tree), "--out", str(out), "--runtime", "fast"])
    assert res.exit_code == 1 and "unknown runtime 'fast'" in res.output


def test_cli_embed_onnx_equals_torch(tmp_path, drawn_tree, monkeypatch):
    """`fewshot embed` with each runtime (separate caches) writes the same vectors."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads 1 must not leak into later tests
    vecs = {}
    for runtime in ("onnx", "torch"):
        out = tmp_path / f"{runtime}.npz"
        res = CliRunner().invoke(app, ["embed", "--data", str(drawn_tree), "--out", str(out), "--runtime", runtime,
                                       "--image-size", "64", "--cache-dir", str(tmp_path / runtime),
                                       "--threads", "1", "--no-progress"])
        assert res.exit_code == 0, res.output
        with np.load(out) as data:
            vecs[runtime] = data["embeddings"]
    assert vecs["onnx"].shape == (36, 1280)
    assert _cosines(vecs["onnx"], vecs["torch"]).min() >= 0.9999
    assert list((tmp_path / "onnx" / "onnx").glob("*.onnx")) and not (tmp_path / "torch" / "onnx").exists()


@pytest.mark.parametrize("runtime,threads", [("torch", 1), ("onnx", 1), ("onnx", 2), ("onnx", 3)])
def test_decode_threads_keep_order_and_skip_bad_files(tmp_path, drawn_tree, runtime, threads):
    """The background decode thread (torch, one ONNX thread) and the ONNX lanes (one batch per
    thread, several at once) yield every image once, in order, bad files reported."""
    good = sorted(drawn_tree.rglob("*.jpg"))[:9]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = good[:4] + [bad] + good[4:]
    backbone = create_backbone("efficientnet_lite0", image_size=32)
    forward = make_forward(backbone, runtime, threads=threads, cache_dir=tmp_path).forward
    assert getattr(forward, "lanes", 1) == (threads if runtime == "onnx" else 1)
    v, ok, failures, _ = embed_paths(paths, backbone, use_cache=False, batch_size=2, forward=forward, progress=False)
    ref, _, _, _ = embed_paths(good, backbone, use_cache=False, batch_size=9, runtime="torch", progress=False,
                               num_workers=0)
    assert ok == [0, 1, 2, 3, 5, 6, 7, 8, 9] and list(failures) == [4]
    np.testing.assert_allclose(v, ref, atol=1e-4)  # row i is photo i (another photo's row is far off)
    assert _cosines(v, ref).min() >= 0.9999


def test_evaluate_gives_the_same_metrics_with_either_runtime(small_manifest, tmp_path):
    """`evaluate` on real Grocery photos (6 articles, leave-one-out, 224 px): the same mAP,
    MAP@R and P@1 with ONNX Runtime as with torch, each embedding from an empty cache, and
    metrics.json records the runtime that ran."""
    from fewshot.embed.options import EmbedOptions
    from fewshot.evaluation import EvalConfig, evaluate

    metrics = {}
    for runtime in ("onnx", "torch"):
        opts = EmbedOptions(cache_dir=str(tmp_path / runtime), progress=False, runtime=runtime)
        m = evaluate(EvalConfig(data=str(small_manifest), split="all", episodes=50, embed=opts),
                     tmp_path / f"eval-{runtime}")
        assert [r["runtime"] for r in m["config"]["model"]["runtimes"]] == [runtime]
        metrics[runtime] = m
    for key in ("map", "map_at_r", "precision_at_1"):
        assert metrics["onnx"][key] == pytest.approx(metrics["torch"][key], abs=1e-6), key
    assert 0.3 < metrics["onnx"]["map"] < 1.0


def test_unwritable_cache_folder_runs_from_memory(tmp_path, caplog):
    """A cache folder that cannot be written (here: a file where the folder should be) costs
    a warning, not the run: the export is used from memory."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    backbone = _tiny_backbone(_Pool())
    x = torch.rand(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        choice = make_forward(backbone, "onnx", cache_dir=blocker)
    assert choice.runtime == "onnx" and isinstance(choice.forward.path, bytes)
    assert "cannot cache the ONNX export" in caplog.text
    np.testing.assert_allclose(choice.forward(x), rt.TorchForward(backbone)(x), atol=1e-5)
    np.testing.assert_allclose(choice.forward.lane(x), rt.TorchForward(backbone)(x), atol=1e-5)


def test_odd_cache_states_are_rebuilt_not_tracebacks(tmp_path, caplog, monkeypatch):
    """A sidecar that is JSON but not an object; a transient export failure (no marker, so the
    next command tries again); an embedding cache that cannot be written (a warning)."""
    backbone = _tiny_backbone(_Pool())
    path = make_forward(backbone, "onnx", cache_dir=tmp_path).forward.path
    path.with_suffix(".json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        assert make_forward(backbone, "onnx", cache_dir=tmp_path).runtime == "onnx"
    assert "not a JSON object" in caplog.text

    other = _tiny_backbone(_Pool(), name="flaky")
    with torch.no_grad():
        other.model.conv.bias.add_(1.0)
    real_export = torch.onnx.export

    def out_of_memory(*a, **k):
        raise MemoryError("simulated")

    monkeypatch.setattr(torch.onnx, "export", out_of_memory)
    assert make_forward(other, "onnx", cache_dir=tmp_path).runtime == "torch"
    assert not list((tmp_path / "onnx").glob("*.failed.json"))
    monkeypatch.setattr(torch.onnx, "export", real_export)
    assert make_forward(other, "onnx", cache_dir=tmp_path).runtime == "onnx"

    from fewshot.embed.cache import EmbeddingCache

    def read_only(self):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(EmbeddingCache, "save", read_only)
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 30, 30)).save(photo)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        v, ok, _, _ = embed_paths([photo], backbone, cache_dir=tmp_path / "emb", runtime="torch", progress=False)
    assert ok == [0] and v.shape == (1, 8) and "cannot write the embedding cache" in caplog.text


def test_threads_out_of_range_is_refused(tmp_path, drawn_tree):
    res = CliRunner().invoke(app, ["embed", "--data", str(drawn_tree), "--out", str(tmp_path / "e.npz"),
                                   "--threads", "1000000"])
    assert res.exit_code == 2 and "--threads" in res.output and "256" in res.output
