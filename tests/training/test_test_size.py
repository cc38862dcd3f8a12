"""The test size of a fine-tuned run (train at --image-size, embed at --test-image-size; FixRes)."""

from __future__ import annotations

import json

import pytest

from fewshot.training import make_config, train
from fewshot.training.config import TrainConfig, default_test_size
from fewshot.methods.runs import load_run

from train_helpers import shared_tiny_grocery


@pytest.mark.parametrize("train_size, test_size", [(224, 288), (260, 320), (64, 96), (32, 32)])
def test_default_test_size(train_size, test_size):
    """image_size x 9/7 rounded to a multiple of 32: 224 x 9/7 = 288 exactly; 260 x 9/7 = 334 -> 320."""
    assert default_test_size(train_size) == test_size


def test_embed_size_of_configs():
    assert make_config("triplet").embed_size() == 288  # fine-tunes last:13 on random resized crops
    assert make_config("triplet", image_size=260).embed_size() == 320
    assert make_config("triplet", fine_tune="none").embed_size() == 224  # head only: the frozen embeddings' size
    assert make_config("triplet", augment="none").embed_size() == 224  # no crops, no discrepancy
    assert make_config("protonet", test_image_size=256).embed_size() == 256
    assert make_config("triplet", fine_tune="none", test_image_size=256).embed_size() == 256


def test_a_run_before_0_4_embeds_at_its_training_size():
    """A config.json of fewshot 0.3.0 has no test_image_size: its run keeps embedding at image_size
    (and resuming it with 0.4.0's default is refused by the settings check, naming the option)."""
    old = make_config("triplet").to_dict()
    del old["test_image_size"]
    assert TrainConfig.from_dict(old).embed_size() == 224
    assert TrainConfig.from_dict(make_config("triplet").to_dict()).embed_size() == 288


def test_a_fine_tuned_run_embeds_and_validates_at_its_test_size(grocery_root, tmp_path):
    """Training inputs stay 64 px; validation, the saved run and the final evaluation are 96 px."""
    tiny = shared_tiny_grocery(grocery_root)
    cfg = make_config("triplet", data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"],
                      out=str(tmp_path / "run"), image_size=64, epochs=1, fine_tune="last:1", batch_size=16,
                      m_per_class=4, eval_episodes=20, progress=False, patience=0)
    assert cfg.embed_size() == 96
    train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["backbone"]["image_size"] == 96 and saved["train_config"]["image_size"] == 64
    assert load_run(tmp_path / "run").backbone.image_size == 96
    metrics = json.loads((tmp_path / "run" / "eval_test" / "metrics.json").read_text())
    assert metrics["config"]["image_size"] == 96


def test_embeds_at_tells_a_pooled_backbone_from_a_flattening_one():
    from fewshot.backbones import create_backbone

    conv4 = create_backbone("conv4", pretrained=False, image_size=28)
    assert conv4.embeds_at(28) and not conv4.embeds_at(36)  # 64 values at 28 px, 256 at 36
    lite0 = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    assert lite0.embeds_at(96) and lite0.embeds_at(48) and not lite0.embeds_at(16)
    for mode in (True, False):  # the probe runs in eval mode and restores the model's own
        conv4.model.train(mode)
        assert conv4.embeds_at(28) and conv4.model.training is mode


def test_conv4_on_crops_keeps_its_training_size_and_refuses_another(grocery_root, tmp_path):
    """conv4 flattens its last map, so the 9/7 default would change its embedding's length: a
    default falls back to --image-size; an explicit other size is refused before anything is written."""
    from fewshot.errors import FewshotError

    tiny = shared_tiny_grocery(grocery_root)
    common = dict(data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"], backbone="conv4",
                  pretrained=False, fine_tune="all", image_size=28, epochs=1, batch_size=16, m_per_class=4,
                  eval_episodes=20, progress=False, patience=0)
    cfg = make_config("triplet", out=str(tmp_path / "run"), **common)
    assert cfg.augment == "standard" and cfg.embed_size() == 32  # 28 x 9/7 to a multiple of 32
    train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["backbone"]["image_size"] == 28 and load_run(tmp_path / "run").backbone.image_size == 28
    with pytest.raises(FewshotError, match="conv4 cannot embed a 36-px photo") as err:
        train(make_config("triplet", out=str(tmp_path / "run36"), test_image_size=36, **common))
    assert err.value.options == ("test_image_size",) and "--test-image-size 28" in err.value.hint
    assert not list(tmp_path.glob("run36*"))
