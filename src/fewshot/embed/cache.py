"""On-disk embedding cache keyed by backbone, image size and image content hash.

One ``.npz`` file per backbone key (see :attr:`fewshot.backbones.Backbone.cache_key`, which
includes the weights, image size and preprocessing) holding ``digests`` (``S64``: SHA-256 hex of
the image file's bytes) and ``vectors`` (``float32 [N, D]``). Keying by content, not path, means
a renamed or copied photo is not embedded twice and an edited photo is embedded again.

Writes are atomic (temporary file + rename): a crash never leaves a broken cache. A cache
file that cannot be read is reported, ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ..io import atomic_path

log = logging.getLogger("fewshot")


def default_cache_dir() -> Path:
    """``$FEWSHOT_CACHE`` or ``$XDG_CACHE_HOME/fewshot`` (``~/.cache/fewshot``), plus ``embeddings``."""
    base = os.environ.get("FEWSHOT_CACHE")
    if base:
        return Path(base) / "embeddings"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fewshot" / "embeddings"


def file_digest(data: bytes) -> str:
    """SHA-256 hex digest of an image file's bytes."""
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """Content-addressed store of embeddings for one backbone key.

    Args:
        cache_dir: folder holding the cache files (created on first write).
        key: backbone cache key; the file is ``cache_dir / f"{key}.npz"``.

    Raises:
        DataError: ``cache_dir`` is (or lies under) a file.
    """

    def __init__(self, cache_dir: str | Path, key: str) -> None:
        folder = Path(cache_dir)
        parent = folder
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            from ..errors import DataError

            raise DataError(f"embedding cache folder {folder} cannot be made: {parent} is a file",
                            hint="pass --cache-dir a folder, or set $FEWSHOT_CACHE to a folder (or unset it for "
                                 "~/.cache/fewshot)")
        self.path = folder / f"{key}.npz"
        self._vectors: dict[str, np.ndarray] = {}
        self._dirty = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                digests = data["digests"]
                vectors = data["vectors"]
            if len(digests) != len(vectors):
                raise ValueError("digests and vectors differ in length")
        except Exception as exc:  # damaged file: rebuild rather than fail the run
            log.warning("embedding cache %s is unreadable (%s); it will be rebuilt", self.path, exc)
            return
        self._vectors = {d.decode(): v for d, v in zip(digests, vectors)}

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, digest: str) -> bool:
        return digest in self._vectors

    def get(self, digest: str) -> np.ndarray | None:
        """The cached ``float32 [D]`` vector for a digest, or ``None``."""
        return self._vectors.get(digest)

    def put(self, digest: str, vector: np.ndarray) -> None:
        """Remember one vector (written by :meth:`save`)."""
        self._vectors[digest] = np.asarray(vector, dtype=np.float32)
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically if anything was added (merging what others wrote since)."""
        if not self._dirty or not self._vectors:
            return
        # Another process may have added vectors since we loaded: keep theirs too.
        mine = self._vectors
        self._vectors = {}
        self._load()
        self._vectors.update(mine)
        digests = np.array([d.encode() for d in self._vectors], dtype="S64")
        vectors = np.stack(list(self._vectors.values())).astype(np.float32)
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, digests=digests, vectors=vectors)
        self._dirty = False
