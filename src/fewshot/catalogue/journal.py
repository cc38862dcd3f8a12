"""Append-only journal of catalogue changes: enrolment without rewriting the index folder.

Each change is one file ``INDEX_DIR/journal/<sequence>.npz`` holding only that change (the
article's new vectors and metadata, or the label to remove), written to a temporary name,
fsync'ed and renamed: a crash mid-write leaves a temporary file that is ignored, never a
half entry, and an entry that was acknowledged (``append`` returned) survives a crash.
:func:`fewshot.catalogue.store.load_index` replays the entries after the folder's base files
(:func:`apply`); :func:`~fewshot.catalogue.store.save_index` writes a new base and leaves the
journal behind (compaction). Only :mod:`fewshot.catalogue.store` uses this module.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..index import CatalogueIndex

JOURNAL_DIR = "journal"
#: what ``os.link`` fails with on a file system without hard links (then: check, then rename)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}
_ENTRY = re.compile(r"^(\d{10})\.npz$")


@dataclass(frozen=True)
class Change:
    """One catalogue change.

    Attributes:
        op: ``"add"`` (images of an article, new or existing) or ``"remove"`` (a whole article).
        label, group: the article.
        vectors: ``float32 [n, D]`` embeddings of the added images (empty for ``remove``).
        paths, digests: per added image (digest = file SHA-256, ``None`` when unknown).
    """

    op: str
    label: str
    group: str | None = None
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    paths: list[str] = field(default_factory=list)
    digests: list[str | None] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The journal folder of one index folder (created on the first ``append``)."""

    def __init__(self, index_dir: str | Path) -> None:
        self.dir = Path(index_dir) / JOURNAL_DIR

    def sequence(self) -> list[tuple[int, Path]]:
        """The complete entries, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _ENTRY.match(p.name))]
        return sorted(found)

    def __len__(self) -> int:
        return len(self.sequence())

    def append(self, change: Change) -> Path:
        """Write ``change`` durably; returns the entry's path. Writes ``len(change.paths)``
        vectors and nothing else."""
        self.dir.mkdir(parents=True, exist_ok=True)
        entries = self.sequence()
        seq = entries[-1][0] + 1 if entries else 1
        tmp = self.dir / f".{seq:010d}.{os.getpid()}.tmp"
        meta = {"op": change.op, "label": change.label, "group": change.group,
                "paths": list(change.paths), "digests": list(change.digests)}
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, meta=np.array(json.dumps(meta)), vectors=np.asarray(change.vectors, np.float32))
                fh.flush()
                os.fsync(fh.fileno())
            final = self._link_next(tmp, seq)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.dir)
        return final

    def _link_next(self, tmp: Path, seq: int) -> Path:
        """Hard-link ``tmp`` as the first free entry from ``seq`` on: an existing entry is never
        replaced, even by a writer that ignored the folder's writer lock."""
        while True:
            final = self.dir / f"{seq:010d}.npz"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                seq += 1
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if final.exists():  # no hard links on this file system: check, then rename
                    seq += 1
                    continue
                os.replace(tmp, final)
                return final

    def read(self) -> list[Change]:
        """Every complete entry, oldest first.

        Raises:
            CheckpointError: an entry cannot be read (the folder was edited or the disk is bad).
        """
        out = []
        for _, path in self.sequence():
            try:
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    vectors = np.asarray(z["vectors"], np.float32)
                out.append(Change(meta["op"], meta["label"], meta.get("group"), vectors,
                                  list(meta.get("paths", [])), list(meta.get("digests", []))))
            except Exception as exc:
                why = (f"{type(exc).__name__}: {exc}" if zipfile.is_zipfile(path)
                       else "it is not the .npz archive a journal entry is")
                raise CheckpointError(f"journal entry {path} is damaged: {why}",
                                      hint="move the file away to drop that change, then reload") from exc
        return out


def apply(index: CatalogueIndex, change: Change) -> None:
    """Apply one journal :class:`Change` to ``index`` in memory.

    Raises:
        CheckpointError: an unknown operation (an entry of a newer fewshot, or a damaged one).
    """
    if change.op == "add":
        index.add_article(change.label, change.group, change.vectors, change.paths, change.digests)
    elif change.op == "remove":
        index.remove_article(change.label)
    else:
        raise CheckpointError(f"unknown journal operation '{change.op}'", hint="rebuild the index")
