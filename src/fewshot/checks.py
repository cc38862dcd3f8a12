"""Input checks shared by the metrics and the episode sampler (one implementation, one set of
messages): embeddings must be finite float32 ``[N, D]``, label lists must match them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_embeddings", "as_list"]


def as_embeddings(x: Any, name: str) -> np.ndarray:
    """``x`` (numpy array or CPU/GPU tensor) as a C-contiguous ``float32 [N, D]`` array.

    Raises:
        ValueError: ``None``, not 2-D, empty, or with NaN / infinite values (the message names
            ``name`` and what is wrong).
    """
    if x is None:
        raise ValueError(f"{name} is None: expected a float32 array [N, D]")
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to evaluate")
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values")
    return x


def as_list(values: Any, n: int | None, name: str, what: str = "labels") -> list:
    """``values`` (list, tuple, numpy array, tensor) as a list of Python scalars, of length ``n``
    (any length when ``n`` is ``None``).

    Raises:
        ValueError: ``None``, or a length other than ``n``.
    """
    if values is None:
        raise ValueError(f"{name} is None: expected {n if n is not None else 'a list of'} {what}")
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()  # numpy arrays / tensors -> hashable Python scalars
    values = list(values)
    if n is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} embeddings")
    return values
