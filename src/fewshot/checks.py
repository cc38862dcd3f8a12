"""Input checks shared by the metrics, the episode sampler, the index and the Python API (one
implementation, one set of messages): embeddings must be finite float32 ``[N, D]``, label lists
must match them, counts must be whole numbers in range."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["as_bool", "as_embeddings", "as_list", "positive_int"]


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` (an ``int``, a NumPy integer, or a float with a whole value) as an ``int`` of at
    least ``minimum``.

    Raises:
        TypeError: not a number (a ``str``, ``None``, a ``bool``); the message names ``name``.
        ValueError: not a finite whole number, or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__} ({value!r})")
    if not math.isfinite(value) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}")
    return int(value)


def as_bool(value: Any, name: str) -> bool:
    """``value`` (``True`` / ``False``, or a NumPy bool) as a ``bool``.

    Raises:
        TypeError: anything else (``"false"``, ``1``, ``None``): the message names ``name``.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} ({value!r})")
    return bool(value)


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
