"""The shared trainer on a tiny real Grocery subset at 64 px: history, best run, resume, errors, CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fewshot.errors import CheckpointError
from fewshot.training import config_keys, make_config
from fewshot.methods.runs import load_run
from fewshot.training import CHECKPOINT, HISTORY_FIELDS, read_history, staging_dir, train

from train_helpers import shared_tiny_grocery

SMALL = dict(image_size=64, fine_tune="none", batch_size=16, m_per_class=4, lr=1e-3, ways=3, shots=2, queries=2,
             val_episodes=40, eval_episodes=40, progress=False, final_eval="none")


@pytest.fixture(scope="module")
def tiny(grocery_root, tmp_path_factory):
    return {**shared_tiny_grocery(grocery_root), "folder": tmp_path_factory.mktemp("tiny-train")}


def _cfg(tiny, out, method="triplet", **kw):
    args = dict(SMALL, data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"],
                out=str(out))
    args.update(kw)
    keys = config_keys(method)  # the shared settings hold the siamese batch options too
    return make_config(method, **{k: v for k, v in args.items() if k in keys or k in kw})


@pytest.fixture(scope="module")
def run3(tiny):
    """A 3-epoch triplet run (no early stop), evaluated on the test classes at the end."""
    out = tiny["folder"] / "run3"
    return train(_cfg(tiny, out, epochs=3, patience=0, final_eval="test")), out


def test_history_has_val_metrics_every_epoch(run3):
    result, out = run3
    rows = read_history(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    header = (out / "history.csv").read_text().splitlines()[0]
    assert header == ",".join(HISTORY_FIELDS)
    assert rows[0]["train_loss"] is None  # epoch 0 = the untrained head, before any step
    for r in rows:
        assert 0.0 < r["val_map"] <= 1.0 and 0.0 < r["val_map_at_r"] <= r["val_map"] + 1e-9
        assert 0.0 <= r["val_precision_at_1"] <= 1.0
        assert 0.0 < r["val_episodic_acc"] <= 1.0
        assert r["seconds"] > 0
    for r in rows[1:]:
        assert r["train_loss"] > 0
    # the val metrics of the initial identity head on centred features are not all equal later on
    assert len({round(r["val_map"], 6) for r in rows}) > 1
    assert (out / "curves.png").stat().st_size > 1000
    best = max(rows, key=lambda r: (r["val_map_at_r"], -r["epoch"]))
    assert result.best_epoch == best["epoch"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["best_epoch"] == best["epoch"]
    assert cfg["best_val"]["map_at_r"] == pytest.approx(best["val_map_at_r"], abs=1e-6)
    assert cfg["method"] == "triplet" and cfg["backbone"]["name"] == "efficientnet_lite0"
    assert cfg["backbone"]["image_size"] == 64 and cfg["seed"] == 0
    assert cfg["head"]["kind"] == "linear" and cfg["head"]["centre"] is True
    assert cfg["protocol"]["train_classes"] and cfg["protocol"]["val_classes"]
    assert cfg["epochs_run"] == 3 and cfg["training_seconds"] > 0 and cfg["fewshot_version"]
    # the final evaluation on the test classes wrote the usual report
    metrics = json.loads((out / "eval_test" / "metrics.json").read_text())
    assert metrics["map"] == pytest.approx(result.final_metrics["map"])
    assert metrics["config"]["protocol"]["part"] == "test"
    assert cfg["final_eval"]["map_at_r"] == pytest.approx(metrics["map_at_r"])


def test_saved_run_reloads_to_identical_embeddings(run3, tiny):
    from fewshot.data.loaders import load_dataset
    from fewshot.data.protocol import protocol_sets
    from fewshot.data.splits import ClassSplit
    from fewshot.metrics import retrieval_metrics

    result, out = run3
    a, b = load_run(out), load_run(out)
    q, g = protocol_sets(load_dataset(tiny["data"]), ClassSplit.load(tiny["split_file"]), "val")
    qa = a.embed(q, cache_dir=tiny["cache_dir"], progress=False)
    ga = a.embed(g, cache_dir=tiny["cache_dir"], progress=False)
    qb = b.embed(q, cache_dir=tiny["cache_dir"], progress=False)
    assert qa.vectors.shape == (len(q), 1280)
    assert np.array_equal(qa.vectors, qb.vectors)
    assert np.allclose(np.linalg.norm(qa.vectors, axis=1), 1.0, atol=1e-5)
    # ... and they are the embeddings the trainer validated the best epoch with
    rep = retrieval_metrics(qa.vectors, qa.labels, ga.vectors, ga.labels)
    assert rep.map_at_r == pytest.approx(result.best_metrics["val_map_at_r"], abs=1e-6)
    assert rep.map == pytest.approx(result.best_metrics["val_map"], abs=1e-6)
    # the weights file holds exactly the head's tensors
    tensors = load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == ["head.centre_vector", "head.net.weight"]
    assert torch.equal(tensors["head.net.weight"], a.head.net.weight.detach())
    # the whitening prior: the training photos embedded by these weights, their within-article statistics
    from fewshot.data import dataset_for
    from fewshot.index.prior import load_prior
    from fewshot.index.whiten import within_stats

    prior = load_prior(a)
    split = ClassSplit.load(tiny["split_file"])
    t = a.embed(dataset_for(load_dataset(tiny["data"]), split, "train"), cache_dir=tiny["cache_dir"], progress=False)
    by_hand = within_stats(t.vectors, t.labels, t.digests)
    assert prior.describe() == {**by_hand.describe(), "fourth": pytest.approx(by_hand.fourth, rel=1e-6),
                                "rivals": len(split.train) + len(split.val)}
    np.testing.assert_allclose(prior.scatter, by_hand.scatter, atol=1e-6)
    # the rivals: the mean unit embedding of every training and validation article, by name
    v = a.embed(dataset_for(load_dataset(tiny["data"]), split, "val"), cache_dir=tiny["cache_dir"], progress=False)
    both, names = np.concatenate([t.vectors, v.vectors]), np.array(t.labels + v.labels)
    unit = both / np.linalg.norm(both, axis=1, keepdims=True)
    np.testing.assert_allclose(prior.rivals, [unit[names == n].mean(0) for n in sorted(set(names))], atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["whitening_prior"] == {"file": "whitening-prior.safetensors", "photos": len(t.labels),
                                      "articles": len(split.train), "rivals": len(split.train) + len(split.val)}


def test_resume_continues_exactly(tiny):
    straight = tiny["folder"] / "straight"
    interrupted = tiny["folder"] / "interrupted"
    full = train(_cfg(tiny, straight, method="contrastive", epochs=4, patience=0))

    def stop_after_two(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny, interrupted, method="contrastive", epochs=4, patience=0), on_epoch_end=stop_after_two)
    partial = staging_dir(interrupted)
    assert not interrupted.exists()  # trained beside --out, moved there only when complete
    assert [r["epoch"] for r in read_history(partial)] == [0, 1, 2]
    with pytest.raises(CheckpointError, match="not a completed training run"):
        load_run(partial)  # the interrupted run is no model for evaluate / index / classify
    with pytest.raises(CheckpointError, match="holds an interrupted training run"):
        train(_cfg(tiny, interrupted, method="contrastive", epochs=4, patience=0))
    with pytest.raises(CheckpointError, match="settings differ"):
        train(_cfg(tiny, interrupted, method="contrastive", epochs=4, patience=0, lr=5e-4, resume=True))
    resumed = train(_cfg(tiny, interrupted, method="contrastive", epochs=4, patience=0, resume=True))

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rows]

    assert strip(resumed.history) == strip(full.history)
    assert strip(read_history(interrupted)) == strip(read_history(straight))
    assert not partial.exists()
    assert resumed.best_epoch == full.best_epoch
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(straight / CHECKPOINT, weights_only=True)  # plain values and tensors only
    cb = torch.load(interrupted / CHECKPOINT, weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 4
    assert all(torch.equal(ca["state"]["head"][k], cb["state"]["head"][k]) for k in ca["state"]["head"])
    assert torch.equal(ca["optimizer"]["state"][0]["exp_avg"], cb["optimizer"]["state"][0]["exp_avg"])


def test_early_stopping_and_patience(tiny):
    out = tiny["folder"] / "patience"
    # a learning rate this large wrecks the ranking at once: the best epoch stays 0
    result = train(_cfg(tiny, out, epochs=10, patience=2, lr=0.5))
    assert result.stopped_early
    assert result.best_epoch == 0
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["stopped_early"] is True


def test_train_on_val_trains_the_val_classes_and_keeps_the_last_epoch(tiny, run3, caplog, monkeypatch):
    import fewshot.viz

    out = tiny["folder"] / "on-val"
    titles = []
    drawn = fewshot.viz.training_curves
    monkeypatch.setattr(fewshot.viz, "training_curves",
                        lambda *a, **kw: (titles.append(kw.get("metric_title")), drawn(*a, **kw))[1])
    # the same ruinous rate: the val classes are trained on, so nothing held out picks an epoch or stops the run
    result = train(_cfg(tiny, out, epochs=3, patience=2, lr=0.5, train_on_val=True))
    assert titles == ["val classes, trained on (not held out)"] * 4 and (out / "curves.png").is_file()
    assert not result.stopped_early and result.best_epoch == 3
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    split = json.loads(Path(tiny["split_file"]).read_text())
    protocol, plain = config["protocol"], run3[0].config["protocol"]
    assert protocol["val_trained"] is True and plain["val_trained"] is False
    assert protocol["train_classes"] == sorted(split["train"] + split["val"]) and protocol["val_classes"] == split["val"]
    assert plain["train_classes"] == sorted(split["train"])
    assert config["train_images"] > run3[0].config["train_images"]
    # evaluating the run on the classes it trained on says so; the held-out test classes do not
    from fewshot.evaluation import EmbedOptions, EvalConfig, evaluate

    opts = EmbedOptions(backbone=None, model_dir=str(out), image_size=None, cache_dir=tiny["cache_dir"], progress=False)
    assert config["val_held_out"] is False and run3[0].config["val_held_out"] is True
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        on_val = evaluate(EvalConfig(data=tiny["data"], split_file=tiny["split_file"], part="val", episodes=20, embed=opts),
                          tiny["folder"] / "ev-val")
    assert on_val["config"]["trained_classes_evaluated"] == len(split["val"])
    assert f"{len(split['val'])} of the {len(split['val'])} evaluated classes were trained on by on-val" in caplog.text
    assert "(its val classes too: --train-on-val)" in caplog.text
    assert f"NOT HELD OUT: the run trained on {len(split['val'])} of the evaluated classes" in \
        (tiny["folder"] / "ev-val" / "report.md").read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fewshot"):  # its train classes: no word of the val ones
        on_train = evaluate(EvalConfig(data=tiny["data"], split_file=tiny["split_file"], part="train", episodes=20, embed=opts))
    assert on_train["config"]["trained_classes_evaluated"] == len(split["train"])
    assert "evaluated classes were trained on by on-val" in caplog.text and "--train-on-val" not in caplog.text
    held_out = json.loads((run3[1] / "eval_test" / "metrics.json").read_text())
    assert held_out["config"]["trained_classes_evaluated"] == 0


def test_a_finished_run_trained_on_drops_the_evaluation_of_its_earlier_weights(tiny, caplog):
    out = tiny["folder"] / "longer"
    train(_cfg(tiny, out, epochs=1, patience=0, final_eval="test"))
    assert (out / "eval_test" / "metrics.json").is_file()
    with caplog.at_level(logging.INFO, logger="fewshot"):
        result = train(_cfg(tiny, out, epochs=2, patience=0, final_eval="none", resume=True))
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert not (out / "eval_test").exists() and (out / "model.safetensors").is_file()
    assert "eval_test, whitening-prior.safetensors (made with its earlier weights)" in caplog.text
    from fewshot.index.prior import load_prior  # written again, for the new weights

    assert load_prior(load_run(out)) is not None and "other weights" not in caplog.text


def test_mismatched_backbone_is_refused(run3):
    _, out = run3
    with pytest.raises(CheckpointError, match="trained on backbone 'efficientnet_lite0', not 'efficientnet_lite2'"):
        load_run(out, expected_backbone="efficientnet_lite2")
    assert load_run(out, expected_backbone="efficientnet_lite0").backbone.name == "efficientnet_lite0"


def test_damaged_weights_are_refused(run3, tmp_path):
    _, out = run3
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or not a safetensors file"):
        load_run(truncated)
    flipped = tmp_path / "flipped"
    shutil.copytree(out, flipped)
    w = flipped / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF  # still parses: only the digest in config.json can tell
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged: its tensors do not match the digest"):
        load_run(flipped)
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_run(missing)


def test_mlp_head_option(tiny):
    out = tiny["folder"] / "mlp"
    result = train(_cfg(tiny, out, epochs=1, patience=0, head={"kind": "mlp", "hidden_dim": 64, "out_dim": 32}))
    model = load_run(out)
    assert model.dim == 32 and model.run_config["head"]["kind"] == "mlp"
    assert len(result.history) == 2


def test_fine_tune_last_smoke(tiny):
    """One epoch of --fine-tune last on CPU: the backbone's last blocks change and are saved."""
    from fewshot.backbones import create_backbone

    out = tiny["folder"] / "finetune"
    result = train(_cfg(tiny, out, epochs=1, patience=0, fine_tune="last", lr=1e-3, val_episodes=0))
    assert [r["epoch"] for r in result.history] == [0, 1]
    tensors = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in tensors)
    model = load_run(out)
    assert model.backbone.weights_tag.startswith("ft")
    fresh = create_backbone("efficientnet_lite0", image_size=64).model.state_dict()
    tuned = model.backbone.model.state_dict()
    changed = [k for k in fresh if not torch.equal(fresh[k], tuned[k])]
    if result.best_epoch == 1:
        assert any("_conv_head" in k for k in changed)
        assert not any(k.startswith("net._conv_stem") for k in changed)  # early layers stay frozen
    else:
        assert changed == []


def test_augment_is_seeded_and_normalised():
    from fewshot.backbones import Preprocess
    from fewshot.methods.augment import augment

    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    pre = Preprocess(image_size=32)
    a = augment(images, 32, pre, torch.Generator().manual_seed(1))
    b = augment(images, 32, pre, torch.Generator().manual_seed(1))
    c = augment(images, 32, pre, torch.Generator().manual_seed(2))
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6


def test_cli_train_end_to_end(tiny, tmp_path):
    from fewshot.cli import app

    out = tmp_path / "cli-run"
    runner = CliRunner()
    args = ["train", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"], "--method", "contrastive",
            "--out", str(out), "--image-size", "64", "--epochs", "2", "--batch-size", "16", "--m-per-class", "4",
            "--miner", "hard", "--lr", "0.001", "--ways", "3", "--shots", "2", "--queries", "2",
            "--val-episodes", "20", "--eval-episodes", "20", "--split", "val", "--cache-dir", tiny["cache_dir"],
            "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "best epoch" in res.output and "val classes: mAP" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_config"]["options"]["miner"] == "hard" and cfg["train_config"]["lr"] == 0.001
    assert len(read_history(out)) == 3
    # a second run into the same folder is refused with a hint, not a traceback
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "already holds a training run" in res.output
    # the run works as --model in evaluate; a different --backbone is refused
    ev = runner.invoke(app, ["evaluate", "--data", tiny["data"], "--split-file", tiny["split_file"], "--split", "val",
                             "--model", str(out), "--episodes", "20", "--queries", "2", "--out", str(tmp_path / "ev"),
                             "--cache-dir", tiny["cache_dir"], "--no-progress"])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["map_at_r"] == pytest.approx(cfg["best_val"]["map_at_r"], abs=1e-6)
    assert '"kind": "nearest_prototype"' in (tmp_path / "ev" / "metrics.json").read_text()  # how episodes ran
    bad = runner.invoke(app, ["evaluate", "--data", tiny["data"], "--split-file", tiny["split_file"], "--model",
                              str(out), "--backbone", "efficientnet_lite2", "--out", str(tmp_path / "ev2"),
                              "--no-progress"])
    assert bad.exit_code == 1 and "trained on backbone" in bad.output


def test_cli_train_refuses_unknown_maml_init_before_any_work(tiny, tmp_path):
    from fewshot.cli import app

    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["train", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"],
                                   "--method", "maml", "--out", str(out), "--maml-init", "prototypes",
                                   "--threads", "1", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "--maml-init" in res.output and "proto, zero, learned" in res.output
    assert not out.exists()


def test_cli_epochs_of_an_episodic_method_count_episodes(tiny, tmp_path):
    from fewshot.cli import app

    base = ["train", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"], "--method", "protonet",
            "--image-size", "64", "--ways", "3", "--shots", "2", "--queries", "2", "--val-episodes", "10",
            "--split", "none", "--cache-dir", tiny["cache_dir"], "--no-progress", "--patience", "0"]
    out = tmp_path / "two-epochs"
    res = CliRunner().invoke(app, [*base, "--out", str(out), "--epochs", "2", "--episodes-per-epoch", "5"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["train_config"]["options"]["episodes"] == 10
    assert len(read_history(out)) == 3  # epoch 0 (before training) + 2 epochs
    both = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "both"), "--epochs", "2", "--episodes", "50"])
    assert both.exit_code == 2 and "not both" in both.output


class _Payload:
    """What an attacker pickles: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(folder, write, content) -> None:
    """A folder that passes for a fewshot run (a config.json with the two marker keys) and a
    planted checkpoint.pt written with ``write`` (torch.save or pickle.dump)."""
    import pickle

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"weights_sha256": "0" * 64, "fewshot_version": "0.1.0"}))
    if write == "pickle":
        with open(folder / CHECKPOINT, "wb") as fh:
            pickle.dump(content, fh)
    else:
        torch.save(content, folder / CHECKPOINT)


@pytest.mark.parametrize("where, write, payload", [("staging", "torch", True), ("run", "pickle", True),
                                                   ("staging", "torch", False)])
def test_resume_never_unpickles_a_planted_checkpoint(tiny, tmp_path, where, write, payload):
    """``--resume`` with a checkpoint.pt whose pickle runs a command (planted in RUN_DIR.partial
    or in RUN_DIR): the command never runs (torch.load weights_only), the CLI says the file cannot
    be resumed safely and how to go on, with no traceback; a checkpoint dict without the
    checkpoint's keys is refused as no training checkpoint.
    Nothing is removed."""
    from fewshot.cli import app

    out, marker = tmp_path / "run", tmp_path / "MARKER"
    folder = staging_dir(out) if where == "staging" else out
    _plant(folder, write, {"format": 1, "config": _Payload(marker) if payload else {}, "epoch": 1})
    res = CliRunner().invoke(app, ["train", "--fine-tune", "none", "--data", tiny["data"], "--split-file",
                                   tiny["split_file"], "--out", str(out), "--image-size", "64", "--resume",
                                   "--cache-dir", tiny["cache_dir"], "--no-progress"])
    assert not marker.exists(), "the planted pickle ran"
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    flat = " ".join(res.output.split())
    if payload:
        assert f"{folder / CHECKPOINT} cannot be resumed safely: it holds more than tensors and plain values" in flat
        assert ("(it refers to posix.system)" in flat) == (write == "torch")  # pickle.dump's framing is not parsed at all
    else:
        assert f"{folder / CHECKPOINT} is not a fewshot training checkpoint ('state' is missing or not a dict)" in flat
    assert f"fix: train again without --resume (add --overwrite to discard what {folder} holds)" in flat
    assert "Traceback" not in res.output and sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "config.json"]


def test_resume_refuses_a_checkpoint_that_does_not_fit_before_writing(tiny):
    """A well-formed checkpoint whose head has other shapes (a RuntimeError from load_state_dict
    before) is refused with a CheckpointError before anything is written; the interrupted run's
    checkpoint is kept as it was."""
    out = tiny["folder"] / "misfit"

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny, out, method="contrastive", epochs=2, patience=0), on_epoch_end=stop)
    path = staging_dir(out) / CHECKPOINT
    saved = torch.load(path, weights_only=True)
    saved["state"]["head"] = {k: torch.zeros(3, 3) for k in saved["state"]["head"]}
    torch.save(saved, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="does not fit this run's model") as err:
        train(_cfg(tiny, out, method="contrastive", epochs=2, patience=0, resume=True))
    assert "without resume=True" in err.value.hint and err.value.options == ("resume", "overwrite")
    assert path.read_bytes() == before and read_history(staging_dir(out))[-1]["epoch"] == 0


def test_every_output_gets_the_usual_permissions(run3, tiny, tmp_path):
    """Issue 27 item 10c: every file fewshot writes gets ``0666 & ~umask`` (0644 under umask 022)
    and every folder ``0777 & ~umask``, as any program's output does (model.safetensors was
    0600: safetensors replaced the temporary file the atomic write had prepared)."""
    import stat

    from fewshot.cli import app
    from fewshot.io import _UMASK

    _, run = run3
    runner = CliRunner()
    common = ["--data", tiny["data"], "--cache-dir", tiny["cache_dir"], "--no-progress"]
    outputs = {"index": tmp_path / "idx", "embed": tmp_path / "emb.safetensors", "npz": tmp_path / "emb.npz",
               "split": tmp_path / "split.json"}
    for args in (["index", *common, "--model", str(run), "--split", "train", "--out", str(outputs["index"])],
                 ["embed", *common, "--image-size", "64", "--out", str(outputs["embed"])],
                 ["embed", *common, "--image-size", "64", "--out", str(outputs["npz"])],
                 ["split", "--data", tiny["data"], "--by", "class", "--fractions", "0.3", "0.4", "0.3",
                  "--out", str(outputs["split"])]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    files = {"model.safetensors", "config.json", "history.csv", "curves.png"}
    assert files <= {p.name for p in run.iterdir()} and (run / "eval_test" / "report.md").is_file()
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is not None:  # --runtime auto exported the backbone
        assert any((Path(tiny["cache_dir"]) / "onnx").glob("*.onnx"))
    bad = []
    for top in (run, tiny["cache_dir"], *outputs.values()):  # the cache holds the embeddings and ONNX exports
        top = Path(top)
        for p in [top, *(top.rglob("*") if top.is_dir() else [])]:
            mode = stat.S_IMODE(p.stat().st_mode)
            want = (0o777 if p.is_dir() else 0o666) & ~_UMASK
            if mode != want:
                bad.append(f"{p}: {oct(mode)}, expected {oct(want)}")
    assert not bad, "\n".join(bad)


def test_add_whitening_prior_writes_it_for_an_older_run(run3, tmp_path):
    from fewshot.errors import CheckpointError
    from fewshot.index.prior import PRIOR_FILE, read_prior
    from fewshot.training import add_whitening_prior

    _, out = run3
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / PRIOR_FILE).unlink()  # as a run trained before 0.10.0
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("whitening_prior")
    (old / "config.json").write_text(json.dumps(cfg))
    got = add_whitening_prior(old)
    assert got == json.loads((out / "config.json").read_text())["whitening_prior"]
    assert json.loads((old / "config.json").read_text())["whitening_prior"] == got
    np.testing.assert_allclose(read_prior(old / PRIOR_FILE).stats.scatter, read_prior(out / PRIOR_FILE).stats.scatter,
                               atol=1e-6)
    assert read_prior(old / PRIOR_FILE).digests == read_prior(out / PRIOR_FILE).digests
    with pytest.raises(CheckpointError, match="not a fewshot training run"):
        add_whitening_prior(tmp_path)
    from fewshot.errors import DataError

    moved = json.loads((old / "config.json").read_text())  # its split file gone: refused, not recorded as null
    moved["train_config"]["split_file"] = str(tmp_path / "nowhere.json")
    (old / "config.json").write_text(json.dumps(moved))
    with pytest.raises(DataError):
        add_whitening_prior(old)
    assert json.loads((old / "config.json").read_text())["whitening_prior"] == got
    (old / PRIOR_FILE).unlink()
    (old / PRIOR_FILE).mkdir()  # not a file fewshot wrote: refused, named
    with pytest.raises(CheckpointError, match="whitening-prior.safetensors is not a file fewshot wrote"):
        add_whitening_prior(old)
    cfg["complete"] = False
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unfinished run"):
        add_whitening_prior(old)
