"""Weight averaging of the trained weights (``weight_average``: EMA or SWA, fewshot.training.average):
the average equals the formula on a hand-followed trajectory, every epoch validates it, the best
run saves it, ``resume`` continues it exactly, and settings that make no sense are refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import CheckpointError, FewshotError
from fewshot.training import CHECKPOINT, make_config, read_history, staging_dir, train
from fewshot.training import loop as loop_module
from fewshot.training.average import WeightAverage
from fewshot.training.config import check_config

from train_helpers import toy_conv4_protonet

runner = CliRunner()


# --------------------------------------------------------------------------- the formula
def _tiny(seed: int = 0):
    """A protonet (head 4 -> 4 and its logit scale) behind a small 'backbone' whose BatchNorm
    trains, so that buffers move as well as parameters; and an SGD optimizer over all of it."""
    torch.manual_seed(seed)
    method = make_config("protonet", fine_tune="none").build_method(4)
    backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    params = [*method.head.parameters(), method.log_scale, *backbone.parameters()]
    return method, backbone, torch.optim.SGD(params, lr=0.2)


def _step(method, backbone, opt, g: torch.Generator) -> None:
    x = torch.randn(8, 4, generator=g)
    loss = (method.embed(backbone(x)) * torch.randn(8, 4, generator=g)).sum() * method.scale
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_ema_equals_the_hand_computed_moving_average_of_the_trajectory():
    """After each step e_1 = w_1, e_t = d e_{t-1} + (1 - d) w_t, for the head, the method's own
    parameter (log scale), the backbone's parameters and its BatchNorm running statistics;
    BatchNorm's step counter is copied, not averaged."""
    method, backbone, opt = _tiny()
    decay = 0.8
    avg = WeightAverage("ema", method, backbone, decay=decay)
    g = torch.Generator().manual_seed(1)
    hand: dict[str, torch.Tensor] = {}
    for t in range(6):
        _step(method, backbone, opt, g)
        avg.after_step()
        w = {k: v.detach().clone() for k, v in avg.live.state_dict().items()}
        hand = w if t == 0 else {k: decay * hand[k] + (1 - decay) * w[k] if w[k].is_floating_point() else w[k]
                                 for k in w}
    assert avg.updates == 6
    got = avg.model.module.state_dict()
    assert {"head.net.weight", "extra.0", "backbone.0.weight", "backbone.1.running_mean",
            "backbone.1.num_batches_tracked"} <= set(got)
    for k, v in hand.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    assert int(got["backbone.1.num_batches_tracked"]) == 6
    assert not torch.allclose(got["head.net.weight"], method.head.net.weight)  # an average, not the last weights
    assert avg.info() == {"kind": "ema", "decay": 0.8, "steps": 6}


def test_swa_is_the_equal_average_of_the_epoch_end_weights_from_swa_start_on():
    method, backbone, opt = _tiny(1)
    avg = WeightAverage("swa", method, backbone, start=2)
    g = torch.Generator().manual_seed(2)
    ends = []
    for epoch in range(1, 5):
        for _ in range(3):
            _step(method, backbone, opt, g)
            avg.after_step()  # SWA averages per epoch only
        avg.after_epoch(epoch)
        ends.append({k: v.detach().clone() for k, v in avg.live.state_dict().items()})
    got = avg.model.module.state_dict()
    for k in ends[0]:
        if ends[0][k].is_floating_point():
            torch.testing.assert_close(got[k], sum(e[k] for e in ends[1:]) / 3, rtol=0, atol=1e-6, msg=k)
    assert avg.updates == 3 and avg.info() == {"kind": "swa", "start": 2, "epochs": [2, 3, 4]}


def test_applied_swaps_the_average_in_and_the_raw_weights_back_even_on_an_error():
    method, backbone, opt = _tiny(2)
    avg = WeightAverage("swa", method, backbone, start=1)
    with avg.applied():  # an empty average changes nothing
        pass
    g = torch.Generator().manual_seed(3)
    for epoch in (1, 2):
        _step(method, backbone, opt, g)
        avg.after_epoch(epoch)
    raw = {k: v.clone() for k, v in avg.live.state_dict().items()}
    averaged = avg.model.module.state_dict()
    with pytest.raises(RuntimeError, match="boom"), avg.applied():
        for k, v in avg.live.state_dict().items():
            assert torch.equal(v, averaged[k]), k
        raise RuntimeError("boom")
    for k, v in avg.live.state_dict().items():
        assert torch.equal(v, raw[k]), k
    assert not torch.equal(raw["head.net.weight"], averaged["head.net.weight"])


# --------------------------------------------------------------------------- toy training runs
def _state(method, ft) -> dict[str, torch.Tensor]:
    """The live weights under the names of model.safetensors."""
    out = {f"head.{k}": v.detach().cpu().clone() for k, v in method.head.state_dict().items()}
    out.update({f"method.{k}": v.detach().cpu().clone() for k, v in method.extra_tensors().items()})
    if ft is not None:
        out.update({f"backbone.{k}": v.detach().cpu().clone() for k, v in ft.backbone.model.state_dict().items()})
    return out


def _saved_names(checkpoint: dict) -> tuple[dict, dict, int]:
    """A checkpoint's raw weights and weight average, both under the names of model.safetensors,
    and how many snapshots the average holds."""
    st = checkpoint["state"]
    raw = {**{f"head.{k}": v for k, v in st["head"].items()}, **{f"method.{k}": v for k, v in st["extra"].items()},
           **{f"backbone.{k}": v for k, v in st.get("backbone", {}).items()}}
    tensors = checkpoint["average"]["tensors"]
    prefix = {"module.head.": "head.", "module.backbone.": "backbone.", "module.extra.0": "method.log_scale"}
    avg = {}
    for k, v in tensors.items():
        for old, new in prefix.items():
            if k.startswith(old):
                avg[new + k[len(old):]] = v
    return raw, avg, int(tensors["n_averaged"])


def _same(a: dict, b: dict) -> bool:
    keys = set(a) & set(b)
    assert {k.split(".")[0] for k in keys} >= {"head", "backbone", "method"}
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("method, kind, extra", [("protonet", "ema", {"ema_decay": 0.9}),
                                                 ("protonet", "swa", {"swa_start": 1}),
                                                 ("maml", "ema", {"inner_steps": 1, "meta_batch": 1})])
def test_a_toy_run_validates_and_saves_the_average_and_resumes_exactly(tmp_path, monkeypatch, method, kind, extra):
    """conv4 from scratch (BatchNorm in train mode), 3 epochs of 10 episodes (MAML: one task per
    meta-batch, one inner step, to stay fast; its averaged weights are the head, the logit scale and
    the backbone as for protonet): each epoch validates
    the averaged weights (the raw ones while the average is empty), the best epoch's saved weights
    are that average (not the raw weights beside it in the checkpoint), config.json records it,
    and an interrupted run resumed gives the same history, weights and average."""
    seen: dict[int, dict] = {}
    validate = loop_module.validate_epoch

    def spy(method_, data, cfg, ft, epoch):
        seen[epoch] = _state(method_, ft)
        return validate(method_, data, cfg, ft, epoch)

    monkeypatch.setattr(loop_module, "validate_epoch", spy)
    args = toy_conv4_protonet(tmp_path, episodes=30, patience=0, val_episodes=0, lr=1e-3)
    out = tmp_path / "run"
    cfg = make_config(method, **args, out=str(out), weight_average=kind, **extra)
    checked = []

    def check(epoch, row):
        stage = staging_dir(out)
        raw, avg, n = _saved_names(torch.load(stage / CHECKPOINT, weights_only=True))
        assert _same(seen[epoch], avg if n else raw), epoch  # what was validated
        if json.loads((stage / "config.json").read_text())["best_epoch"] == epoch:
            assert _same(load_file(str(stage / "model.safetensors")), seen[epoch])  # what was saved
        if n >= (2 if kind == "swa" else 1):
            assert not _same(avg, raw), epoch  # the average is no copy of the last weights
            checked.append(epoch)

    full = train(cfg, on_epoch_end=check)
    # so a saved average that differs from the raw weights was checked (val MAP@R 0.46 at epoch 0)
    assert full.best_epoch >= (2 if kind == "swa" else 1)
    assert checked == [1, 2, 3] if kind == "ema" else checked == [2, 3]
    saved = load_file(str(out / "model.safetensors"))
    assert _same(saved, seen[full.best_epoch])
    info = json.loads((out / "config.json").read_text())
    assert info["train_config"]["weight_average"] == kind
    assert info["weight_average"]["kind"] == kind
    if kind == "swa":
        assert info["weight_average"]["epochs"] == list(range(1, full.best_epoch + 1))
    else:
        assert info["weight_average"]["decay"] == extra.get("ema_decay", 0.99)
        assert (info["weight_average"]["steps"] > 0) == (full.best_epoch > 0)

    # interrupted after epoch 2, then resumed: the run an uninterrupted training gives
    again = tmp_path / "again"
    interrupted = make_config(method, **args, out=str(again), weight_average=kind, **extra)

    def stop(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(interrupted, on_epoch_end=stop)
    other = "swa" if kind == "ema" else "ema"
    with pytest.raises(CheckpointError, match="settings differ"):  # the average is part of the run
        train(make_config(method, **args, out=str(again), weight_average=other, resume=True))
    interrupted.resume = True
    resumed = train(interrupted)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rows]

    assert strip(resumed.history) == strip(full.history)
    assert strip(read_history(again)) == strip(read_history(out))
    b = load_file(str(again / "model.safetensors"))
    assert sorted(b) == sorted(saved) and all(torch.equal(saved[k], b[k]) for k in saved)
    ca = torch.load(out / CHECKPOINT, weights_only=True)["average"]
    cb = torch.load(again / CHECKPOINT, weights_only=True)["average"]
    assert ca["epochs"] == cb["epochs"] and all(torch.equal(ca["tensors"][k], cb["tensors"][k]) for k in ca["tensors"])


# --------------------------------------------------------------------------- refusals
BASE = dict(data="x.csv", split_file="s.json", out="run", fine_tune="none")


@pytest.mark.parametrize("given, options, message", [
    ({"weight_average": "polyak"}, ("weight_average",), "unknown option weight_average = 'polyak'"),
    ({"weight_average": "ema", "ema_decay": 1.0}, ("ema_decay",), "option ema_decay = 1.0: the decay must lie"),
    ({"weight_average": "ema", "ema_decay": 0.0}, ("ema_decay",), "option ema_decay = 0.0: the decay must lie"),
    ({"weight_average": "ema", "ema_decay": -0.5}, ("ema_decay",), "strictly between 0 and 1"),
    ({"weight_average": "ema", "ema_decay": float("nan")}, ("ema_decay",), "needs a finite number"),
    ({"ema_decay": 0.9}, ("ema_decay", "weight_average"),
     "ema_decay applies to weight_average=ema only, but weight_average is 'none'"),
    ({"ema_decay": 0.9, "swa_start": 2}, ("ema_decay", "swa_start", "weight_average"),
     "ema_decay applies to weight_average=ema only, swa_start applies to weight_average=swa only"),
    ({"weight_average": "ema", "swa_start": 2}, ("swa_start", "weight_average"), "weight_average is 'ema'"),
    ({"weight_average": "swa", "swa_start": 0}, ("swa_start",), "option swa_start = 0"),
    ({"weight_average": "swa", "swa_start": 4, "epochs": 3}, ("swa_start", "epochs"),
     "option swa_start = 4 is after the run's last epoch (3)"),
])
def test_settings_that_make_no_sense_are_refused_naming_the_options(given, options, message):
    with pytest.raises(FewshotError) as err:
        check_config(make_config("triplet", **{**BASE, **given}))
    assert err.value.options == options and message in err.value.message, err.value.message
    assert "--" not in err.value.message + (err.value.hint or "")  # library terms only


def test_swa_start_counts_the_epochs_of_an_episodic_method():
    ok = make_config("protonet", **BASE, weight_average="swa", swa_start=3, episodes=300, episodes_per_epoch=100)
    check_config(ok)
    with pytest.raises(FewshotError, match=r"swa_start = 4 is after the run's last epoch \(3\)") as err:
        check_config(make_config("protonet", **{**BASE, "weight_average": "swa", "swa_start": 4, "episodes": 300,
                                                "episodes_per_epoch": 100}))
    assert err.value.options == ("swa_start", "episodes", "episodes_per_epoch")
    for method in ("maml", "fomaml", "contrastive"):  # every method: the averaged weights are the head (and backbone)
        check_config(make_config(method, **BASE, weight_average="ema", ema_decay=0.95))


def _flat(text: str) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_the_command_line_names_the_flags_and_writes_nothing(tmp_path):
    out = tmp_path / "r"
    common = ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(out), "--fine-tune", "none"]
    for args, code, text in (
            (["--weight-average", "polyak"], 1, "unknown --weight-average 'polyak'"),
            (["--ema-decay", "0.9"], 1, ("--ema-decay applies to --weight-average ema only, but --weight-average is "
                                        "'none' fix: drop --ema-decay, or pass --weight-average ema")),
            (["--weight-average", "ema", "--ema-decay", "1.5"], 1, "--ema-decay 1.5: the decay must lie strictly"),
            (["--weight-average", "swa", "--swa-start", "5", "--epochs", "3"], 1,
             "--swa-start 5 is after the run's last epoch (3)"),
            (["--weight-average", "swa", "--swa-start", "0"], 2, "--swa-start")):
        r = runner.invoke(app, [*common, *args], env={"COLUMNS": "200"})
        assert r.exit_code == code and text in _flat(r.output), (args, r.output)
    assert not out.exists()
    help_text = _flat(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output)
    assert "--weight-average" in help_text and "--ema-decay" in help_text and "--swa-start" in help_text


def test_the_default_swa_start_stops_at_the_last_epoch():
    """Since 0.4.0 triplet fine-tunes with swa by default: a 1-epoch run averages its one epoch
    (the same as no average) instead of being refused; an explicit swa_start is still checked."""
    cfg = make_config("triplet", data="x.csv", split_file="s.json", out="run", epochs=1)
    assert cfg.weight_average == "swa" and cfg.average_start() == 1
    check_config(cfg)
    assert make_config("triplet", data="x.csv", split_file="s.json", out="run").average_start() == 2
    assert make_config("triplet", data="x.csv", split_file="s.json", out="run", fine_tune="none").weight_average == "none"
    assert make_config("contrastive", data="x.csv", split_file="s.json", out="run").weight_average == "none"
    with pytest.raises(FewshotError, match="swa_start = 2 is after the run's last epoch"):
        check_config(make_config("triplet", data="x.csv", split_file="s.json", out="run", epochs=1, swa_start=2))
