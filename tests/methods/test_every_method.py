"""Every registered method trains: one short epoch on a tiny real Grocery subset (cached 64 px
embeddings), through the one training loop, and its run loads back (docs/ARCHITECTURE.md,
"How to add a method": this is the contract every method meets)."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from fewshot.methods import Method, get_method, list_methods
from fewshot.methods.runs import load_run
from fewshot.training import read_history, train
from fewshot.training.checkpoint import load_checkpoint
from fewshot.training.defaults import make_config

from train_helpers import shared_tiny_grocery

#: small settings of whichever of these options a method has (its Config decides)
SMALL_OPTIONS = {"batch_size": 16, "m_per_class": 4, "episodes_per_epoch": 4, "episodes": 4, "meta_batch": 2,
                 "inner_steps": 1, "inner_steps_test": 1}


@pytest.fixture(scope="module")
def tiny(grocery_root):
    return shared_tiny_grocery(grocery_root)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_one_epoch_and_loads_back(name, tiny, tmp_path):
    own = {f.name for f in fields(get_method(name).Config)}
    out = tmp_path / "run"
    cfg = make_config(name, data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"],
                      out=str(out), image_size=64, fine_tune="none", epochs=1, patience=0, lr=1e-3, ways=3, shots=2,
                      queries=2, val_episodes=10, final_eval="none", progress=False,
                      **{k: v for k, v in SMALL_OPTIONS.items() if k in own})
    result = train(cfg)

    history = read_history(out)
    assert [r["epoch"] for r in history] == [0, 1] == [r["epoch"] for r in result.history]
    loss = history[1]["train_loss"]
    assert loss is not None and math.isfinite(loss) and loss > 0
    assert 0.0 < history[1]["val_map_at_r"] <= 1.0 and 0.0 < history[1]["val_episodic_acc"] <= 1.0

    # the last epoch's head moved away from its start (an identity map on centred features)
    head = load_checkpoint(out / "checkpoint.pt")["state"]["head"]["net.weight"]
    assert head.shape == (1280, 1280) and torch.isfinite(head).all()
    assert (head - torch.eye(1280)).abs().max() > 1e-6

    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == name and saved["complete"] is True and saved["best_epoch"] in (0, 1)
    assert saved["train_config"]["options"] == {f.name: getattr(cfg.options, f.name) for f in fields(cfg.options)}
    model = load_run(out)
    x = torch.randn(3, 1280, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.head(x).numpy()
    assert z.shape == (3, 1280) and np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # a method with its own episode classifier gets it back on a loaded run (protonet, maml, fomaml)
    has_own = get_method(name).episode_classifier is not Method.episode_classifier
    assert (model.episode_classifier is not None) == has_own
