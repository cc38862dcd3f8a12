"""BatchNorm folded into its convolution while fine-tuning (issue 31, ``fewshot.training.fold``):
the same outputs and gradients as the pair run apart; nothing of the model changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fewshot.backbones import create_backbone
from fewshot.training import make_config
from fewshot.training.config import check_config
from fewshot.training.fold import folded_batchnorm, folded_weights
from fewshot.training.setup import build_setup

from train_helpers import shared_tiny_grocery


def _pair(groups: int, conv_bias: bool, affine: bool, seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups, bias=conv_bias)
    bn = nn.BatchNorm2d(6, affine=affine, eps=1e-3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    if affine:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return conv, bn.eval()


def test_folded_weights_by_hand():
    """One channel, by hand: w 2, bias 1, mean 3, var 4 - eps, gamma 5, beta 7:
    bn(conv(x)) = 5 * (2x + 1 - 3) / 2 + 7 = 5x + 2, so the folded weight is 5, the bias 2."""
    conv = nn.Conv2d(1, 1, 1, bias=True)
    bn = nn.BatchNorm2d(1, eps=1e-5).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)
        conv.bias.fill_(1.0)
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(4.0 - 1e-5)
        bn.weight.fill_(5.0)
        bn.bias.fill_(7.0)
    w, b = folded_weights(conv, bn)
    assert float(w.detach()) == pytest.approx(5.0) and float(b.detach()) == pytest.approx(2.0)


@pytest.mark.parametrize("groups, conv_bias, affine", [(1, False, True), (6, False, True), (1, True, True),
                                                       (3, True, False)])
def test_folded_pair_gives_the_same_output_and_gradients(groups, conv_bias, affine):
    """A dense, depthwise or grouped convolution, with or without its own bias, and a BatchNorm
    with or without affine weights: the folded pair's output and the gradients of every
    parameter (the convolution's and gamma / beta) equal those of the pair run apart."""
    conv, bn = _pair(groups, conv_bias, affine)
    x = torch.randn(4, 6, 9, 9)
    results = []
    for fold in (False, True):
        conv.zero_grad(set_to_none=True)
        bn.zero_grad(set_to_none=True)
        with folded_batchnorm([(conv, bn)] if fold else []) as n:
            y = bn(conv(x))
        assert n == int(fold)
        (y.sin().sum()).backward()
        grads = [p.grad.clone() for p in (*conv.parameters(), *bn.parameters())]
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert len(g0) == len(g1) == 1 + conv_bias + 2 * affine
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_model_is_unchanged_after_folding():
    """Inside the block the module tree, parameters and state dict are those of the model;
    after it no instance keeps a patched forward, and a BatchNorm in train mode is never folded."""
    bb = create_backbone("efficientnet_lite0", pretrained=False, image_size=64)
    model = bb.model.eval()
    pairs = bb.conv_bn_pairs()
    assert len(pairs) == 49  # stem, head, 15 blocks x 3 and the first block's 2
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with folded_batchnorm(pairs) as n:
            assert n == 49 and list(model.state_dict()) == keys
            assert all(isinstance(conv.weight, nn.Parameter) for conv, _ in pairs)
            out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    model.requires_grad_(True)
    grads = []
    for fold in (False, True):
        model.zero_grad(set_to_none=True)
        with folded_batchnorm(pairs if fold else []):
            model(x.contiguous(memory_format=torch.channels_last)).sin().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    worst = max(float((grads[1][n] - g).abs().max() / g.abs().max()) for n, g in grads[0].items())
    assert worst < 1e-3, worst
    assert not any("forward" in vars(m) for m in model.modules())
    pairs[0][1].train()
    with folded_batchnorm(pairs) as n:
        assert n == 48 and "forward" not in vars(pairs[0][0])
    assert create_backbone("conv4", pretrained=False, image_size=28).conv_bn_pairs() == []


def test_a_fine_tuning_step_folds_by_default_with_the_same_gradient(grocery_root, tmp_path):
    """The trainer folds the Lite0 pairs (--bn eval, the default) and --no-fold-bn does not; one
    forward and backward of the same augmented images gives the same features and the same
    gradient of every backbone parameter either way."""
    tiny = shared_tiny_grocery(grocery_root)
    common = dict(data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"], image_size=64,
                  val_episodes=0, progress=False, final_eval="none", batch_size=16, m_per_class=4, micro_batch=4)
    setup = build_setup(make_config("triplet", out=str(tmp_path / "run"), **common))
    ft = setup.ft
    assert len(ft.fold_pairs) == 49
    assert build_setup(make_config("triplet", out=str(tmp_path / "b"), fold_bn=False, **common)).ft.fold_pairs == []
    pairs, seen = ft.fold_pairs, {}
    for fold in (False, True):
        ft.fold_pairs = pairs if fold else []
        ft.seed_epoch(3)
        ft.train_mode(True)
        setup.optimizer.zero_grad(set_to_none=True)
        z = ft.features(np.arange(6))
        (z.sin().sum()).backward()
        seen[fold] = z.detach(), {n: p.grad.clone() for n, p in ft.backbone.model.named_parameters()
                                  if p.grad is not None}
    assert seen[True][1].keys() == seen[False][1].keys() and len(seen[False][1]) > 100
    torch.testing.assert_close(seen[True][0], seen[False][0], rtol=1e-4, atol=1e-4)
    # Real images have flat regions whose activations sit on ReLU6's edges (0 or 6), where float
    # rounding decides whether a gradient passes: the same model fed the same batch contiguous
    # instead of channels-last differs from itself by as much (8% of the head convolution's
    # largest gradient), so the check here is the direction of each gradient; the exact check is
    # on random inputs (test_the_model_is_unchanged_after_folding and the pair tests).
    cosines = {n: float(torch.nn.functional.cosine_similarity(seen[True][1][n].flatten(), g.flatten(), dim=0))
               for n, g in seen[False][1].items()}
    assert min(cosines.values()) > 0.99, min(cosines.items(), key=lambda kv: kv[1])


def test_no_fold_bn_needs_a_backbone_that_trains(tmp_path):
    from fewshot.errors import FewshotError

    with pytest.raises(FewshotError) as err:
        check_config(make_config("triplet", out=str(tmp_path / "r"), fine_tune="none", fold_bn=False))
    assert set(err.value.options) == {"fold_bn", "fine_tune"}


def test_lighter_layers_compute_the_package_network():
    """EfficientNet-Lite0 as fewshot builds it (symmetric padding inside the convolution, ReLU6 in
    place) gives the outputs and gradients of the package's own network with the same weights."""
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    ours = create_backbone("efficientnet_lite0", pretrained=False, image_size=64).model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        plain = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    plain.load_state_dict(ours.net.state_dict())
    assert sum(isinstance(m, nn.ZeroPad2d) for m in plain.modules()) == 17
    assert sum(isinstance(m, nn.ZeroPad2d) for m in ours.modules()) == 5  # the asymmetric stride-2 ones
    assert all(m.inplace for m in ours.modules() if isinstance(m, nn.ReLU6))
    x = torch.randn(3, 3, 64, 64)
    outs, grads = [], []
    for model, forward in ((plain, lambda t: plain.extract_features(t).mean(dim=(2, 3))), (ours, ours)):
        model.zero_grad(set_to_none=True)
        z = forward(x)
        z.sin().sum().backward()
        outs.append(z.detach())
        grads.append({n.removeprefix("net."): p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_default_fine_tune_freezes_the_stem_and_the_quarter_resolution_blocks(variant):
    """EfficientNet-Lite's default --fine-tune last:N leaves frozen exactly the blocks whose
    output is at 1/2 or 1/4 of the input side (counted from the package's own strides)."""
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    from fewshot.backbones import default_fine_tune

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_name(f"efficientnet-{variant}")
    reduction, early = 2, 0  # the stem halves the side
    for block in net._blocks:
        stride = block._block_args.stride
        reduction *= stride[0] if isinstance(stride, (list, tuple)) else stride
        early += reduction <= 4
    assert default_fine_tune(f"efficientnet_{variant}") == f"last:{len(net._blocks) - early}"
    assert default_fine_tune(f"efficientnet_{variant}", pretrained=False) == "all"
