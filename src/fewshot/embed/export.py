"""The embeddings file that ``fewshot embed`` writes (``.safetensors`` or ``.npz``).

The safetensors file holds ``embeddings`` (``float32 [N, E]``) and its metadata holds the JSON
lists ``labels``, ``groups``, ``paths`` and ``config``; the ``.npz`` file holds the same as
arrays. The job that loads the data and the model and embeds is
:func:`fewshot.evaluation.export.export_embeddings` (loading a run is a layer above this one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import atomic_path
from . import Embeddings

#: the file names :func:`save_embeddings` writes, by suffix
EMBEDDINGS_SUFFIXES = (".npz", ".safetensors")

__all__ = ["EMBEDDINGS_SUFFIXES", "check_embeddings_name", "is_embeddings_file", "save_embeddings"]


def check_embeddings_name(out: Path) -> None:
    """Raises :class:`DataError` when ``out`` is neither a ``.safetensors`` nor a ``.npz`` name."""
    if out.suffix not in EMBEDDINGS_SUFFIXES:
        raise DataError(f"unknown output format '{out.suffix}' for {out}", hint="use a .safetensors or .npz file name")


def is_embeddings_file(path: Path) -> bool:
    """Whether ``path`` is a file written by :func:`save_embeddings` (it records a config)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if not {"config", "embeddings", "labels", "paths"} <= set(z.files):
                    return False
                config = json.loads(str(z["config"]))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as fh:
                meta = fh.metadata() or {}
            if not {"config", "labels", "paths"} <= set(meta):
                return False
            config = json.loads(meta["config"])
        else:
            return False
        return isinstance(config, dict) and "fewshot_version" in config
    except Exception:  # not readable as ours: treat as somebody else's file
        return False


def save_embeddings(out: Path, emb: Embeddings, config: dict) -> tuple[int, int]:
    """Write ``emb`` (vectors ``float32 [N, E]``, labels, groups, paths) and ``config`` to ``out``
    atomically, in the format its suffix names (:func:`check_embeddings_name` first). Returns
    ``(N, E)``."""
    from safetensors.numpy import save_file

    labels, groups = emb.labels, emb.groups
    paths = [str(p) for p in emb.dataset.paths]
    with atomic_path(out) as tmp:
        if out.suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, embeddings=emb.vectors, labels=np.array(labels),
                         groups=np.array(["" if g is None else g for g in groups]), paths=np.array(paths),
                         config=np.array(json.dumps(config)))
        else:
            save_file({"embeddings": np.ascontiguousarray(emb.vectors)}, str(tmp),
                      metadata={"labels": json.dumps(labels), "groups": json.dumps(groups),
                                "paths": json.dumps(paths), "config": json.dumps(config)})
    return emb.vectors.shape[0], emb.vectors.shape[1]
