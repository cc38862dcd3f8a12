"""BatchNorm folded into its convolution while fine-tuning with ``--bn eval``.

With frozen running statistics an eval-mode BatchNorm after a convolution is an affine map per
channel, ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta``, so the pair is one
convolution with the weight ``W * s`` and the bias ``beta - mean * s`` (``s = gamma /
sqrt(var + eps)``), the folding of Jacob et al. (2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", section 3.2) and of
``torch.nn.utils.fusion.fuse_conv_bn_weights``. That function makes new leaf parameters for
inference; here the folded weight and bias are computed from the live parameters at every
forward, so the gradient still reaches ``W``, ``gamma`` and ``beta``, and the BatchNorm's pass
over the activations (forward and backward: 12% of a Lite0 step on 2 CPU cores) is skipped.

The module tree, the parameter names and what is saved do not change: inside
:func:`folded_batchnorm` each convolution's ``forward`` computes with the folded weight and the
BatchNorm's ``forward`` returns its input; on leaving, both are restored. The output agrees
with the unfolded pair to float rounding (``tests/training/test_fold.py``).
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterable, Iterator

import torch
from torch import nn

Pair = tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]


def folded_weights(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight ``[C_out, C_in/groups, kH, kW]`` and bias ``[C_out]`` of one convolution equal
    to ``bn(conv(x))`` with ``bn`` in eval mode (float32, differentiable in ``conv``'s and
    ``bn``'s parameters)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))), bias


def _folded_forward(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm):
    """``conv``'s own class forward run with the folded weight and bias swapped in (so a
    subclass's padding, e.g. TensorFlow's 'SAME', still applies)."""
    forward = type(conv).forward

    def run(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight, bias = folded_weights(self, bn)
        params = self._parameters
        saved = params["weight"], params["bias"]
        params["weight"], params["bias"] = weight, bias  # plain tensors for this call only
        try:
            return forward(self, x)
        finally:
            params["weight"], params["bias"] = saved
    return types.MethodType(run, conv)


def _identity(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def folded_batchnorm(pairs: Iterable[Pair]) -> Iterator[int]:
    """Within the block, every ``(conv, bn)`` pair of ``pairs`` (a BatchNorm that directly and
    only follows its convolution) runs as one folded convolution; yields how many pairs.

    Only exact while each ``bn`` is in eval mode (running statistics): a BatchNorm in train
    mode is left as it is."""
    patched: list[Pair] = []
    try:
        for conv, bn in pairs:
            if bn.training or not bn.track_running_stats or "forward" in vars(conv) or "forward" in vars(bn):
                continue
            conv.forward = _folded_forward(conv, bn)
            bn.forward = types.MethodType(_identity, bn)
            patched.append((conv, bn))
        yield len(patched)
    finally:
        for conv, bn in patched:
            del conv.forward, bn.forward
