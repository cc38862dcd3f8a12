"""One Registry for backbones, methods and datasets: lookups, listing, duplicates refused."""

from __future__ import annotations

import pytest

from fewshot.backbones import create_backbone
from fewshot.backbones.base import BACKBONES, register_backbone
from fewshot.data.fetch import DATASETS, get_dataset_info, register_dataset
from fewshot.errors import BackboneError, DataError, FewshotError
from fewshot.methods import METHODS, get_method, list_methods, register_method
from fewshot.methods import Method
from fewshot.registry import Registry


def test_registry_basics():
    reg: Registry[int] = Registry("thing", DataError, hint="see the docs")
    assert reg.add("b", 2) == 2 and reg.register("a")(1) == 1
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2 and "a" in reg
    assert reg.get("a") == 1 and reg.find("zz") is None
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    assert reg.add("a", 3, replace=True) == 3
    with pytest.raises(DataError) as err:
        reg.get("c")
    assert err.value.message == "unknown thing 'c'" and err.value.hint == "use one of: a, b; see the docs"
    reg.remove("a")
    reg.remove("a")  # absent: no error
    assert reg.names() == ["b"]


def test_the_three_registries_refuse_a_second_registration():
    assert list_methods() == ["arcface", "contrastive", "fomaml", "maml", "multisimilarity", "protonet", "proxyanchor",
                              "triplet"]
    assert {"efficientnet_lite0", "efficientnet_lite2", "timm:"} <= set(BACKBONES.names())
    assert {"grocery", "omniglot"} <= set(DATASETS.names())
    with pytest.raises(ValueError, match="method 'triplet' is already registered"):
        register_method("triplet")(type("Other", (Method,), {}))
    with pytest.raises(ValueError, match="backbone 'efficientnet_lite0' is already registered"):
        register_backbone("efficientnet_lite0")(lambda pretrained, size: None)
    with pytest.raises(ValueError, match="dataset 'grocery' is already registered"):
        register_dataset(get_dataset_info("omniglot").__class__(**{**get_dataset_info("grocery").__dict__}))
    assert METHODS.get("triplet").name == "triplet"  # unchanged


def test_unknown_names_list_the_known_ones():
    with pytest.raises(FewshotError, match="unknown method 'siamese'") as err:
        get_method("siamese")
    assert "arcface, contrastive, fomaml, maml, multisimilarity, protonet, proxyanchor, triplet" in err.value.hint
    with pytest.raises(BackboneError, match="unknown backbone 'resnet-nope'") as err:
        create_backbone("resnet-nope")
    assert "efficientnet_lite0" in err.value.hint and "timm:NAME" in err.value.hint
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        get_dataset_info("nope")


def test_a_backbone_names_its_own_trainable_tail():
    from torch import nn

    from fewshot.backbones.base import Backbone
    from fewshot.backbones.preprocess import Preprocess

    lite = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    net = lite.model.net
    tail = lite.trainable_tail(2)
    assert tail == [net._blocks[-2], net._blocks[-1], net._conv_head, net._bn1]
    blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    toy = nn.Sequential(blocks, nn.ReLU(), nn.Linear(4, 2))  # no trainable_tail of its own
    generic = Backbone("toy", toy, Preprocess(image_size=32), dim=2).trainable_tail(2)
    assert generic[:2] == [blocks[3], blocks[4]] and generic[2:] == [toy[1], toy[2]]
