"""Reading back a run's rivals (:attr:`fewshot.index.whiten.WithinStats.rivals`): the mean unit
embedding of each of its training and validation articles, and their names, checked to be
what a run can write (:func:`fewshot.training.prior.write_whitening_prior`)."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["MAX_RIVALS", "read_rivals"]

#: the most rival articles a prior may hold (a run trained on more articles than that is not expected)
MAX_RIVALS = 50_000


def read_rivals(arrays: dict[str, np.ndarray], prefix: str, dim: int) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """``(rivals float64 [B, dim], names)`` from ``arrays[prefix + "rivals"]`` and
    ``arrays[prefix + "rival_names"]`` (JSON in ``uint8``), each ``None`` when absent (a prior of
    fewshot 0.10.0, or the statistics of a catalogue).

    Raises:
        ValueError: rivals of another shape, not finite, not means of unit vectors, more than
            :data:`MAX_RIVALS`; names that are not one string per rival.
    """
    rivals = _rivals(arrays[prefix + "rivals"], dim) if prefix + "rivals" in arrays else None
    names = _rival_names(arrays[prefix + "rival_names"], rivals) if prefix + "rival_names" in arrays else None
    return rivals, names


def _rival_names(array: np.ndarray, rivals: np.ndarray | None) -> tuple[str, ...]:
    """The names of the rivals read back (JSON in ``uint8``), one per row.

    Raises:
        ValueError: not a JSON list of strings, one per rival.
    """
    names = json.loads(np.asarray(array, np.uint8).tobytes().decode())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or rivals is None \
            or len(names) != len(rivals):
        raise ValueError("rival names that are not one string per rival")
    return tuple(names)


def _rivals(array: np.ndarray, dim: int) -> np.ndarray:
    """Rival article means read back: ``[B, dim]``, finite, each a mean of unit vectors (norm in ``(0, 1]``).

    Raises:
        ValueError: anything else.
    """
    rivals = np.asarray(array, np.float64)
    if rivals.ndim != 2 or rivals.shape[1] != dim or not len(rivals) or not np.isfinite(rivals).all():
        raise ValueError(f"rival article means of shape {rivals.shape}, not [B, {dim}] and finite")
    if len(rivals) > MAX_RIVALS:
        raise ValueError(f"{len(rivals):,} rival articles, more than the {MAX_RIVALS:,} a prior may hold")
    norms = np.linalg.norm(rivals, axis=1)
    if not ((norms > 1e-6) & (norms <= 1 + 1e-6)).all():
        raise ValueError("rival article means that are not means of unit vectors (norms outside (0, 1])")
    return rivals
