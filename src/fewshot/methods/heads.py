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

import torch
import torch.nn.functional as F
from torch import nn


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
