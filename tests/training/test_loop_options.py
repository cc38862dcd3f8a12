"""The training loop's options are declared once (fewshot.training.config): every field has
help and a generated ``fewshot train`` flag, its declared limits are checked by the library
(naming the option) and by the CLI (naming the flag), and errors that name options are shown
with flags on the command line only."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import FewshotError
from fewshot.methods import EpisodeSpec, TrainData, get_method
from fewshot.options import flag_of
from fewshot.training import TrainConfig, make_config
from fewshot.training.config import check_config

runner = CliRunner()
LOOP = [f for f in dataclasses.fields(TrainConfig) if f.name != "options"]
#: a value just outside each declared limit: (field, value)
OUTSIDE = [(f.name, f.metadata["min"] - 1) for f in LOOP if f.metadata.get("min") is not None] + \
          [(f.name, f.metadata["max"] + 1) for f in LOOP if f.metadata.get("max") is not None] + \
          [(f.name, f.metadata["above"]) for f in LOOP if f.metadata.get("above") is not None]
BASE = dict(data="x.csv", split_file="s.json", out="run", fine_tune="none")


def _flat(text: str) -> str:
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_every_loop_field_is_an_option_with_help_and_a_flag():
    cmd = typer.main.get_command(app).commands["train"]
    opts = {o: p for p in cmd.params for o in p.opts}
    for f in LOOP:
        assert len(f.metadata.get("help", "")) > 10, f.name
        assert flag_of(f) in opts, f.name  # generated from the declaration
        assert (opts[flag_of(f)].hidden is True) == bool(f.metadata["cli"].get("hidden")), f.name
    help_text = _flat(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output)
    for f in LOOP:
        if not f.metadata["cli"].get("hidden") and f.name != "layout":  # --layout: the option every command shares
            assert " ".join(f.metadata["help"].split()[:4]) in help_text, f.name
    assert len(OUTSIDE) >= 15  # the limits the old hand-written checks and typer options held


@pytest.mark.parametrize("name, value", OUTSIDE)
def test_a_value_outside_its_declared_limit_is_refused_naming_the_option_then_the_flag(name, value):
    cfg = make_config("triplet", **{**BASE, "fine_tune": "all", name: value})
    with pytest.raises(FewshotError) as err:
        check_config(cfg)
    assert err.value.options == (name,) and f"option {name} = {value}" in err.value.message
    assert "--" not in err.value.message + (err.value.hint or "")  # library terms only
    flag = flag_of(next(f for f in LOOP if f.name == name))
    r = runner.invoke(app, ["train", "--data", "x.csv", "--split-file", "s.json", "--out", "run", flag, str(value)])
    assert r.exit_code == 2 and flag in _flat(r.output), r.output


@pytest.mark.parametrize("name, value, kind", [("image_size", "224", "a whole number"), ("test_image_size", 288.5, "a whole number"),
                                              ("epochs", 2.0, "a whole number"), ("micro_batch", True, "a whole number"),
                                              ("lr", "1e-4", "a number"), ("lr", True, "a number")])
def test_a_value_of_the_wrong_kind_is_refused_naming_the_option(name, value, kind):
    """From the Python API (the command line parses the flags): a string, a bool or a fraction where
    a (whole) number belongs is a clear error, not a TypeError from a comparison."""
    with pytest.raises(FewshotError) as err:
        check_config(make_config("triplet", **{**BASE, name: value}))
    assert err.value.options == (name,) and f"option {name} = {value!r}" in err.value.message and kind in err.value.message
    import numpy as np

    check_config(make_config("triplet", **{**BASE, "image_size": np.int64(224)}))  # numpy integers are whole numbers


def test_rules_between_fields_name_options_and_the_cli_shows_flags(tmp_path):
    with pytest.raises(FewshotError) as err:
        check_config(make_config("triplet", **{**BASE, "bn": "train", "warmup_steps": 3}))
    assert err.value.options == ("bn", "warmup_steps", "fine_tune")
    assert err.value.message == "bn, warmup_steps set(s) how the backbone trains, but fine_tune none keeps it frozen"
    r = runner.invoke(app, ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r"),
                            "--fine-tune", "none", "--bn", "train", "--warmup-steps", "3"])
    assert r.exit_code == 1
    assert ("error: --bn, --warmup-steps set(s) how the backbone trains, but --fine-tune none keeps it frozen"
            in _flat(r.output))
    assert "fix: drop --bn, --warmup-steps, or pass --fine-tune last:N or all" in _flat(r.output)
    with pytest.raises(FewshotError, match="pretrained=False trains conv4") as err:
        check_config(make_config("protonet", **{**BASE, "backbone": "conv4", "pretrained": False, "fine_tune": "last:1"}))
    r = runner.invoke(app, ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r"),
                            "--backbone", "conv4", "--from-scratch", "--fine-tune", "last:1"])
    assert r.exit_code == 1 and "--from-scratch trains conv4" in _flat(r.output) and "fix: set --fine-tune all" in r.output
    for bad, flag in ((["--bn", "sometimes"], "--bn 'sometimes'"), (["--split", "holdout"], "--split 'holdout'"),
                      (["--device", "tpu"], "unknown --device 'tpu'"), (["--head", "{bad"], "--head is not valid JSON")):
        r = runner.invoke(app, ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r"),
                                "--fine-tune", "all", *bad])
        assert r.exit_code == 1 and flag in _flat(r.output), r.output
    r = runner.invoke(app, ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r"),
                            "--train-on-val", "--split", "val"])
    assert r.exit_code == 1 and "--train-on-val trains on the val classes" in _flat(r.output)
    assert "fix: use --split test (or none)" in _flat(r.output), r.output
    r = runner.invoke(app, ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r"),
                            "--train-on-val", "--epochs", "0"])
    assert r.exit_code == 1 and "--train-on-val with --epochs 0 trains nothing" in _flat(r.output), r.output
    assert not (tmp_path / "r").exists()


def test_a_method_check_names_its_options():
    """Method.check_data (the library) names ``ways``; the trainer's declared minimum catches it first."""
    opts = make_config("protonet", fine_tune="none").options
    m = get_method("protonet")(opts, 8, episodes=EpisodeSpec(ways=1, shots=2, queries=2))
    data = TrainData(x=torch.zeros(12, 8), y=torch.arange(3).repeat_interleave(4), label_names=["a", "b", "c"])
    with pytest.raises(FewshotError, match="ways=1: an episode needs at least 2 classes") as err:
        m.check_data(data)
    assert err.value.options == ("ways",)


def test_config_json_keeps_its_fields_in_their_order():
    """``train_config`` in config.json: the same keys, in the same order, as before the options
    were declared with loop_option (runs written before load, runs written now load in them);
    later fields come last (weight averaging, train_on_val), or beside their kin (micro_batch and fold_bn by workers)."""
    keys = list(make_config("triplet").to_dict())
    assert keys == ["method", "data", "split_file", "out", "backbone", "image_size", "test_image_size", "seed", "epochs", "patience",
                    "lr", "weight_decay", "fine_tune", "fine_tune_blocks", "backbone_lr", "warmup_steps",
                    "lr_schedule", "bn", "pretrained", "augment", "class_rotations", "head", "ways", "shots",
                    "queries", "val_episodes", "resume", "overwrite", "group_from", "layout", "progress", "device",
                    "cache_dir", "workers", "micro_batch", "fold_bn", "embed_batch_size", "runtime", "final_eval", "eval_episodes",
                    "final_tta", "weight_average", "ema_decay", "swa_start", "train_on_val", "options"]
    cfg = make_config("protonet", lr=3e-4, fine_tune="last:2", ways=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_fewshot_methods_shows_loop_defaults_as_flags():
    r = runner.invoke(app, ["methods", "protonet"])
    assert r.exit_code == 0 and "loop defaults: --lr 0.0001" in r.output
