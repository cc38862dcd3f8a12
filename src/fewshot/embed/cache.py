"""On-disk embedding store keyed by backbone, image size and image content hash.

One folder per backbone key (see :attr:`fewshot.backbones.Backbone.cache_key`, which includes
the weights, image size and preprocessing) of append-only shards and a small manifest::

    <cache_dir>/<key>/manifest.json                 {"format", "dim", "shards": [{"name", "rows"}]}
    <cache_dir>/<key>/<shard>.digests.npy           S64  [n]     SHA-256 hex of each image file
    <cache_dir>/<key>/<shard>.vectors.npy           float32 [n, D]

Keying by content, not path, means a renamed or copied photo is not embedded twice and an
edited photo is embedded again. A save writes only the vectors added since (a new shard of at
most :data:`SHARD_ROWS` rows, about 250 MB at 1,280-d) and then the manifest; both writes are
atomic, and the manifest is updated under a file lock, so concurrent processes never lose each
other's shards. Shards are read memory-mapped: opening a store of a million vectors reads
their digests, not their vectors. An embedding run saves as it goes
(:class:`fewshot.embed.PeriodicSave`), so a killed run keeps what it had saved. Many small
shards (one per few classified photos, or per few seconds of a slow run) are merged once there
are more than :data:`MAX_SMALL_SHARDS`; what a save killed part-way left (shard files no
manifest names, temporary files) is removed by the next save. A cache of the earlier one-file
format (``<key>.npz``) is read, and migrated into a shard on the next save. A damaged manifest
or shard is reported and left out (its vectors are embedded again); a crash never leaves a
broken store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..io import atomic_path, atomic_write_json

log = logging.getLogger("fewshot")

STORE_FORMAT = "fewshot.embedding_store"
#: rows per shard at most (50,000 x 1,280 x 4 bytes = 256 MB)
SHARD_ROWS = 50_000
#: shards below this many rows count as small; more than MAX_SMALL_SHARDS of them are merged
SMALL_ROWS = 4_096
MAX_SMALL_SHARDS = 8


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


@dataclass
class _Shard:
    name: str
    digests: np.ndarray  # S64 [n]
    vectors: np.ndarray  # float32 [n, D], memory-mapped


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` (POSIX ``flock``; no lock where there is none)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class EmbeddingCache:
    """Content-addressed store of embeddings for one backbone key.

    Args:
        cache_dir: folder holding one store folder per key (created on first write).
        key: backbone cache key; the store is ``cache_dir / key``.

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
                            hint="pass cache_dir=FOLDER, or set $FEWSHOT_CACHE to a folder (or unset it for "
                                 "~/.cache/fewshot)", options=("cache_dir",))
        self.path = folder / key
        self.legacy_path = folder / f"{key}.npz"
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._legacy: dict[str, np.ndarray] = {}
        self._new: dict[str, np.ndarray] = {}
        self._legacy_damaged = False
        self._load()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        self._shards, self._where = [], {}
        for entry in self._manifest().get("shards", []):
            shard = self._open_shard(entry.get("name", ""))
            if shard is not None:
                self._add_shard(shard)
        if self.legacy_path.exists():
            self._legacy = self._read_legacy()

    def _refresh(self) -> list[str] | None:
        """Catch up with the manifest: open only the shards appended since this view was read
        (a run that saves as it goes re-reads nothing), or read it all again when shards this
        view holds were merged away or the manifest is not what it was.

        Returns:
            the shard names the manifest lists (readable or not), or ``None`` when there is a
            manifest that cannot be read.
        """
        manifest = self._manifest()
        names = [str(e.get("name", "")) for e in manifest.get("shards", [])]
        held = [s.name for s in self._shards]
        if names[:len(held)] != held:
            self._load()
        else:
            for name in names[len(held):]:
                shard = self._open_shard(name)
                if shard is not None:
                    self._add_shard(shard)
        return names if manifest or not (self.path / "manifest.json").exists() else None

    def _manifest(self) -> dict:
        path = self.path / "manifest.json"
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
                raise ValueError("not an embedding store manifest")
            return manifest
        except (OSError, ValueError) as exc:
            log.warning("embedding cache %s is unreadable (%s); it will be rebuilt", path, exc)
            return {}

    def _open_shard(self, name: str) -> _Shard | None:
        try:
            digests = np.load(self.path / f"{name}.digests.npy", allow_pickle=False)
            vectors = np.load(self.path / f"{name}.vectors.npy", mmap_mode="r", allow_pickle=False)
            if len(digests) != len(vectors) or vectors.ndim != 2:
                raise ValueError("digests and vectors differ in length")
        except (OSError, ValueError) as exc:
            log.warning("embedding cache shard %s/%s is unreadable (%s); its images will be embedded again",
                        self.path, name, exc)
            return None
        return _Shard(name, digests, vectors)

    def _add_shard(self, shard: _Shard) -> None:
        i = len(self._shards)
        self._shards.append(shard)
        for row, d in enumerate(shard.digests):
            self._where.setdefault(d.decode(), (i, row))

    def _read_legacy(self) -> dict[str, np.ndarray]:
        """The one-file cache of fewshot 0.1 (``<key>.npz``), read whole."""
        try:
            with np.load(self.legacy_path, allow_pickle=False) as data:
                digests, vectors = data["digests"], data["vectors"]
            if len(digests) != len(vectors):
                raise ValueError("digests and vectors differ in length")
        except Exception as exc:  # damaged file: rebuild rather than fail the run
            log.warning("embedding cache %s is unreadable (%s); it will be rebuilt", self.legacy_path, exc)
            self._legacy_damaged = True
            return {}
        return {d.decode(): v for d, v in zip(digests, vectors)}

    def __len__(self) -> int:
        extra = {d for d in list(self._new) + list(self._legacy) if d not in self._where}
        return len(self._where) + len(extra)

    def __contains__(self, digest: str) -> bool:
        return digest in self._new or digest in self._where or digest in self._legacy

    def get(self, digest: str) -> np.ndarray | None:
        """The cached ``float32 [D]`` vector for a digest, or ``None``."""
        if digest in self._new:
            return self._new[digest]
        where = self._where.get(digest)
        if where is not None:
            shard, row = where
            return np.array(self._shards[shard].vectors[row], dtype=np.float32)
        return self._legacy.get(digest)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    # ------------------------------------------------------------------ writing
    def put(self, digest: str, vector: np.ndarray) -> None:
        """Remember one vector (written by :meth:`save`)."""
        if digest not in self._where:
            self._new[digest] = np.asarray(vector, dtype=np.float32)

    def save(self) -> None:
        """Append what was added as new shard(s), then the manifest; under the store's lock,
        merging what other processes wrote since. Migrates a legacy ``.npz`` cache."""
        pending = {**self._legacy, **self._new}
        if not pending:
            return
        with _locked(self.path):
            listed = self._refresh()  # others may have written since: keep their shards, skip what they have
            todo = {d: v for d, v in pending.items() if d not in self._where}
            names = [s.name for s in self._shards]  # the readable shards of the manifest
            for start in range(0, len(todo), SHARD_ROWS):
                names.append(self._write_shard(dict(list(todo.items())[start:start + SHARD_ROWS])))
            names, retired = self._compact(names)
            self._write_manifest(names)
            self._delete_shards(retired)  # only now that the manifest no longer names them
            if listed is not None:
                self._delete_leftovers(set(listed) | set(names))
            if (self._legacy or self._legacy_damaged) and self.legacy_path.exists():
                self.legacy_path.unlink()  # our own old file: migrated into the store, or damaged
        self._new, self._legacy = {}, {}
        if retired:  # the in-memory view still points into the merged-away shards
            self._load()

    def _write_shard(self, vectors: dict[str, np.ndarray]) -> str:
        name = f"shard-{uuid.uuid4().hex[:12]}"
        digests = np.array([d.encode() for d in vectors], dtype="S64")
        matrix = np.stack(list(vectors.values())).astype(np.float32)
        for suffix, array in ((".vectors.npy", matrix), (".digests.npy", digests)):
            with atomic_path(self.path / f"{name}{suffix}") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, array)
                    fh.flush()
                    os.fsync(fh.fileno())
        self._add_shard(_Shard(name, digests, matrix))
        return name

    def _compact(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Merge the small shards into one when there are more than :data:`MAX_SMALL_SHARDS`:
        ``(the shards to keep, the merged-away shards to delete)``."""
        by_name = {s.name: s for s in self._shards}
        small = [n for n in names if len(by_name[n].digests) < SMALL_ROWS]
        if len(small) <= MAX_SMALL_SHARDS:
            return names, []
        merged: dict[str, np.ndarray] = {}
        for n in small:
            for d, v in zip(by_name[n].digests, by_name[n].vectors):
                merged.setdefault(d.decode(), np.array(v, dtype=np.float32))
        return [n for n in names if n not in small] + [self._write_shard(merged)], small

    def _write_manifest(self, names: list[str]) -> None:
        by_name = {s.name: s for s in self._shards}
        dim = int(by_name[names[0]].vectors.shape[1]) if names else 0
        atomic_write_json(self.path / "manifest.json", {
            "format": STORE_FORMAT, "version": 1, "dim": dim,
            "shards": [{"name": n, "rows": int(len(by_name[n].digests))} for n in names]})

    def _delete_leftovers(self, keep: set[str]) -> None:
        """Remove what a save killed part-way (SIGKILL, power loss) left behind: shard files that
        no manifest named (written before the manifest was) and temporary files. Called under
        the lock, so no other save is in flight; shards in ``keep`` (named by the manifest, even
        unreadable ones) stay."""
        for p in self.path.iterdir():
            name = p.name
            temporary = name.endswith(".tmp") and name.startswith((".shard-", ".manifest.json."))
            unnamed = name.startswith("shard-") and name.endswith(".npy") and name.split(".")[0] not in keep
            if temporary or unnamed:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _delete_shards(self, names: list[str]) -> None:
        for n in names:
            for suffix in (".vectors.npy", ".digests.npy"):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / f"{n}{suffix}").unlink()
