"""The data-parallel step is chosen by the method's contract (``data_parallel``, ``items``,
``loss_from``, ``check_parallel``), never by its class, and uses the method as it is: in a
one-process group it is exactly the trainer's one-process step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.errors import FewshotError
from fewshot.methods import TrainData, get_method, list_methods
from fewshot.training import make_config
from fewshot.training.optim import make_optimizer, train_step
from fewshot.training.parallel import check_distributable

from train_helpers import nuisance_toy

CASES = {"triplet": dict(batch_size=16, m_per_class=4, lr=1e-2), "contrastive": dict(batch_size=16, m_per_class=4, lr=1e-2),
         "protonet": dict(ways=3, shots=2, queries=3, episodes_per_epoch=3, lr=1e-2),
         "proxyanchor": dict(batch_size=16, lr=1e-2)}


def test_what_can_be_split_is_the_methods_own_declaration():
    for name in list_methods():
        cls = get_method(name)
        cfg = make_config(name, fine_tune="none", ways=3, shots=2, queries=2)
        if not cls.data_parallel:  # MAML, FOMAML: their loss adapts per task in inner loops
            with pytest.raises(FewshotError, match=f"method {name} cannot train in several processes") as err:
                check_distributable(cfg, 2)
            assert err.value.options == ("method", "nproc") and "--" not in err.value.message
        elif cls.Config().__dict__.get("m_per_class"):  # m-per-class batches: a multiple of nproc
            check_distributable(make_config(name, fine_tune="none", batch_size=16), 2)
            with pytest.raises(FewshotError, match="batch_size=16 does not split over nproc=3") as err:
                check_distributable(make_config(name, fine_tune="none", batch_size=16), 3)
            assert "batch_size=24" in err.value.hint
        elif cls.Config().__dict__.get("batch_size"):  # shuffled batches (proxy methods): unequal slices too
            check_distributable(make_config(name, fine_tune="none", batch_size=16), 3)
        else:
            check_distributable(cfg, 2)
            with pytest.raises(FewshotError, match="too small to split over nproc=13"):
                check_distributable(cfg, 13)  # 3 x (2 + 2) = 12 items
    assert {n for n in list_methods() if get_method(n).data_parallel} == {"contrastive", "triplet", "protonet",
                                                                          "multisimilarity", "proxyanchor", "arcface"}


def _toy(name: str):
    x, y = nuisance_toy(6, 8, seed=3, dim=16)
    cfg = make_config(name, fine_tune="none", head={"kind": "mlp", "hidden_dim": 12, "out_dim": 8}, seed=5, **CASES[name])
    torch.manual_seed(0)
    method = cfg.build_method(16)
    method.bind(lambda idx: x[torch.from_numpy(idx)])
    data = TrainData(x=x, y=y, label_names=[f"c{i}" for i in range(6)])
    method.check_data(data)  # as the trainer does before its optimizer (a proxy method builds its proxies)
    return method, data, make_optimizer(method, cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_one_process_group_steps_exactly_like_the_trainer_and_leaves_the_method_alone(name, tmp_path):
    import torch.distributed as dist

    from fewshot.training.distributed import DataParallelStep, Parallel

    method, data, optimizer = _toy(name)
    before = (type(method).embed, dict(vars(method)))
    ref, _, ref_opt = _toy(name)
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        step = DataParallelStep(method, optimizer, Parallel(0, 1, 0, torch.device("cpu"), "gloo",
                                                            group=dist.new_group(backend="gloo")),
                                None, lambda idx: data.x[torch.from_numpy(idx)])
        batches = list(method.epoch_batches(data, np.random.default_rng(1)))
        got = [step(b) for b in batches]
    finally:
        dist.destroy_process_group()
    want = [train_step(ref, b, ref_opt) for b in batches]
    assert got == want and len(got) >= 2 and got[0] != got[-1]
    assert "embed" not in vars(method) and type(method).embed is before[0]  # nothing patched
    assert {k: type(v) for k, v in vars(method).items()} == {k: type(v) for k, v in before[1].items()}
    for (k, a), b in zip(method.head.state_dict().items(), ref.head.state_dict().values()):
        assert torch.equal(a, b), k
