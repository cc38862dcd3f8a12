"""Each method owns its options (a dataclass): the CLI flags, --opt, `fewshot methods`, old runs,
and adding a method as one file (docs/ARCHITECTURE.md, "How to add a method")."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import FewshotError
from fewshot.methods import METHODS
from fewshot.methods.maml import MAMLOptions
from fewshot.training import TrainConfig, make_config
from fewshot.training import read_history, train

from train_helpers import shared_tiny_grocery

runner = CliRunner()


def test_options_live_with_their_method():
    cfg = make_config("maml", inner_lr=0.3, ways=3)
    assert isinstance(cfg.options, MAMLOptions) and cfg.options.inner_lr == 0.3 and cfg.options.inner_steps == 5
    assert cfg.to_dict()["options"]["inner_lr"] == 0.3 and "inner_lr" not in cfg.to_dict()
    assert make_config("triplet").options.margin == 0.1 and make_config("contrastive").options.margin == 0.3
    with pytest.raises(FewshotError, match="method 'triplet' has no option inner_lr"):
        make_config("triplet", inner_lr=0.3)
    with pytest.raises(FewshotError, match="option inner_steps = -1"):
        make_config("maml", inner_steps=-1)
    with pytest.raises(TypeError, match="unknown TrainConfig field"):
        make_config("triplet", learning_rate=1)


def test_a_train_config_of_fewshot_0_1_0_still_loads():
    flat = {"method": "maml", "ways": 3, "maml_init": "zero", "inner_steps": 7, "inner_lr": 0.5,
            "margin": None, "batch_size": 64, "episodes": 300}
    cfg = TrainConfig.from_dict(flat)
    assert cfg.options == MAMLOptions(episodes=300, inner_steps=7, init="zero") and cfg.ways == 3
    assert TrainConfig.from_dict(cfg.to_dict()).options == cfg.options


def test_fewshot_methods_lists_options_and_defaults():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0
    for name in ("contrastive", "triplet", "protonet", "maml", "fomaml"):
        assert f"\n{name}: " in "\n" + r.output
    r = runner.invoke(app, ["methods", "maml"])
    assert r.exit_code == 0 and "--inner-lr (--opt inner_lr=...)  default 0.5" in r.output
    assert "--miner" not in r.output and "triplet:" not in r.output  # only what applies
    assert runner.invoke(app, ["methods", "nope"]).exit_code == 2


def test_cli_refuses_an_option_of_another_method(tmp_path):
    base = ["train", "--data", "x.csv", "--split-file", "s.json", "--out", str(tmp_path / "r")]
    r = runner.invoke(app, [*base, "--method", "triplet", "--inner-lr", "0.3"])
    assert r.exit_code == 2 and "does not apply to --method triplet" in " ".join(r.output.split())
    r = runner.invoke(app, [*base, "--method", "maml", "--opt", "nope=1"])
    assert r.exit_code == 2 and "inner_lr" in " ".join(r.output.split())
    r = runner.invoke(app, [*base, "--method", "maml", "--opt", "inner_steps=many"])
    assert r.exit_code == 2 and "is not an integer" in " ".join(r.output.split())
    r = runner.invoke(app, [*base, "--method", "maml", "--inner-lr", "0.4", "--opt", "inner_lr=0.3"])
    assert r.exit_code == 2 and "inner_lr is given twice" in " ".join(r.output.split())
    r = runner.invoke(app, [*base, "--method", "triplet", "--opt", "margin=0.2", "--opt", "margin=0.3"])
    assert r.exit_code == 2 and "--opt margin=... twice" in " ".join(r.output.split())
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- adding a method
TOY_METHOD = '''
    """A toy method: pulls each embedding towards its class mean (one file, one registration)."""
    from dataclasses import dataclass

    import numpy as np
    import torch

    from fewshot.methods import IndexBatch, Method, option, register_method


    @dataclass
    class PullOptions:
        batch_size: int = option(32, "Items per batch.", min=2)
        strength: float = option(1.0, "Weight of the pull term.", min=0.0)


    @register_method("toy-pull")
    class Pull(Method):
        name = "toy-pull"
        summary = "Toy: pull embeddings to their class mean"
        Config = PullOptions
        data_parallel = True

        def epoch_batches(self, train, rng):
            order = rng.permutation(len(train))
            size = self.opts.batch_size
            return [IndexBatch(idx=order[i:i + size], y=train.y[torch.from_numpy(order[i:i + size])])
                    for i in range(0, len(order) - size + 1, size)]

        def items(self, batch):
            return batch.idx

        def loss_from(self, z, batch):
            y = batch.y.to(z.device)
            onehot = torch.nn.functional.one_hot(y).float()
            means = (onehot.T @ z) / onehot.sum(0).clamp_min(1).unsqueeze(1)
            return self.opts.strength * (z - means[y]).pow(2).sum(1).mean()
'''


def test_add_a_method_as_one_file_and_train_it(grocery_root, tmp_path):
    path = tmp_path / "toy_pull.py"
    path.write_text(textwrap.dedent(TOY_METHOD))
    spec = importlib.util.spec_from_file_location("toy_pull", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_pull"] = module
    try:
        spec.loader.exec_module(module)
        tiny = shared_tiny_grocery(grocery_root)
        cfg = make_config("toy-pull", fine_tune="none", data=tiny["data"], split_file=tiny["split_file"], out=str(tmp_path / "run"),
                          cache_dir=tiny["cache_dir"], image_size=64, epochs=1, patience=0, lr=1e-3, ways=3,
                          shots=2, queries=2, val_episodes=10, final_eval="none", progress=False, strength=2.0)
        result = train(cfg)
        history = read_history(tmp_path / "run")
        assert [r["epoch"] for r in history] == [0, 1] and history[1]["train_loss"] > 0
        saved = json.loads((tmp_path / "run" / "config.json").read_text())
        assert saved["method"] == "toy-pull" and saved["train_config"]["options"] == {"batch_size": 32, "strength": 2.0}
        assert result.best_epoch in (0, 1)
        r = runner.invoke(app, ["methods", "toy-pull"])
        assert "--strength (--opt strength=...)  default 1.0: Weight of the pull term." in r.output
    finally:
        METHODS.remove("toy-pull")
        sys.modules.pop("toy_pull", None)
