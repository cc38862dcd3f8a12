"""Projection heads mapping backbone embeddings ``[B, D]`` to L2-normalised ``[B, E]``.

Two kinds, chosen by a JSON-serialisable spec (saved in a run's ``config.json``):

* ``{"kind": "mlp", "in_dim": D, "hidden_dim": H, "out_dim": E}``: Linear-ReLU-Linear
  (the projection head of SimCLR, Chen et al. 2020), L2-normalised output.
* ``{"kind": "linear", "in_dim": D, "out_dim": D}``: one linear map initialised to the
  identity (so training starts from the frozen backbone's ranking), L2-normalised output.

Both subtract a fixed centre first when ``"centre": true`` (the mean training embedding,
SimpleShot's CL2N: Wang et al. 2019), stored as a buffer so it travels with the weights.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FewshotError

#: The default head: an identity-initialised linear map on centred features (1280 -> 1280 for
#: EfficientNet-Lite), L2-normalised. Training starts exactly at the frozen (centred) ranking and
#: moves from there; see docs/guides/training.md for why this beats an MLP on unseen classes.
DEFAULT_HEAD: dict[str, Any] = {"kind": "linear", "centre": True}

#: head presets by name (``in_dim`` is filled in from the backbone).
HEAD_PRESETS: dict[str, dict[str, Any]] = {
    "linear": {"kind": "linear", "centre": True},
    "mlp": {"kind": "mlp", "hidden_dim": 512, "out_dim": 256, "centre": False, "dropout": 0.0},
}


class ProjectionHead(nn.Module):
    """``x [B, D] float32 -> normalize(f(l2n(x) - centre)) [B, E] float32``.

    Raises:
        ValueError: an unknown ``kind``, a dimension that is not a positive integer, or a
            ``dropout`` outside ``[0, 1)``.
    """

    def __init__(self, kind: str = "mlp", in_dim: int = 1280, out_dim: int = 256,
                 hidden_dim: int = 512, centre: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"unknown head kind '{kind}': use 'mlp' or 'linear'")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"head {name} must be a positive integer, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"head dropout must be in [0, 1), got {dropout!r}")
        self.spec = {"kind": kind, "in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim,
                     "centre": centre, "dropout": dropout}
        self.register_buffer("centre_vector", torch.zeros(in_dim))
        self.use_centre = centre
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                     nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim, bias=False)
            with torch.no_grad():
                self.net.weight.copy_(torch.eye(out_dim, in_dim))
        else:
            raise ValueError(f"unknown head kind '{kind}': use 'mlp' or 'linear'")

    def set_centre(self, vectors: torch.Tensor) -> None:
        """Set the centre to the mean of L2-normalised ``vectors [N, D]``."""
        with torch.no_grad():
            self.centre_vector.copy_(F.normalize(vectors.float(), dim=-1).mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        if self.use_centre:
            x = x - self.centre_vector
        return F.normalize(self.net(x), dim=-1)


def build_head(spec: dict) -> ProjectionHead:
    """Recreate a head from its saved spec (see module docstring)."""
    return ProjectionHead(**spec)


def resolve_head_spec(head: dict | str | None, in_dim: int) -> dict[str, Any]:
    """A full :class:`ProjectionHead` spec: preset name or partial dict, ``in_dim`` filled in.

    ``"linear"`` keeps the dimension (``out_dim = in_dim``) unless the spec gives ``out_dim``.

    Raises:
        FewshotError: an unknown preset name (``options``: ``head``).
    """
    if head is None:
        spec = dict(DEFAULT_HEAD)
    elif isinstance(head, str):
        if head not in HEAD_PRESETS:
            raise FewshotError(f"unknown head '{head}'", hint=f"use one of: {', '.join(HEAD_PRESETS)}",
                               options=("head",))
        spec = dict(HEAD_PRESETS[head])
    else:
        spec = dict(head)
    spec["in_dim"] = int(in_dim)
    if spec.get("kind", "mlp") == "linear":
        spec.setdefault("out_dim", int(in_dim))
    return spec


def parse_head(text: str | None) -> dict[str, Any] | None:
    """A head given as text: a preset name (:data:`HEAD_PRESETS`) or a JSON object (a partial
    :class:`ProjectionHead` spec); ``None`` stays ``None`` (the default head).

    Raises:
        FewshotError: not valid JSON, JSON that is not an object, or an unknown preset
            (``options``: ``head``).
    """
    if text is None:
        return None
    value = text.strip()
    if value.startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FewshotError(f"head is not valid JSON ({exc.msg})",
                               hint='e.g. head=\'{"kind": "mlp", "out_dim": 256}\'', options=("head",)) from None
        if not isinstance(spec, dict):
            raise FewshotError("head JSON must be an object", hint='e.g. head=\'{"kind": "linear"}\'',
                               options=("head",))
        return spec
    if value not in HEAD_PRESETS:
        raise FewshotError(f"unknown head '{value}'",
                           hint=f"use {' | '.join(HEAD_PRESETS)} or a JSON ProjectionHead spec",
                           options=("head",))
    return dict(HEAD_PRESETS[value])
