"""Tree digests and the verified-copy marker (see the package docstring for the digest)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path, PurePosixPath
from typing import Iterator


from .common import _CHUNK, MARKER_NAME, _bar
from .registry import DatasetInfo

# --------------------------------------------------------------------------------------------
# tree digest and marker


def _is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _iter_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """Yield (relative posix path, absolute path) for every non-hidden regular file."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("."):
                continue
            full = Path(dirpath) / fn
            if not full.is_file():
                continue
            yield full.relative_to(folder).as_posix(), full


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def count_files(folder: str | Path) -> int:
    """Number of files :func:`tree_digest` covers in ``folder``."""
    return sum(1 for _ in _iter_files(Path(folder)))


def tree_digest(folder: str | Path, progress: bool = False, desc: str | None = None) -> str:
    """SHA-256 over the sorted ``"<file sha256>  <relative posix path>\\n"`` lines of ``folder``.

    Hidden files and folders (a path part starting with ``.``, e.g. the verification marker)
    are left out; symbolic links to files are followed. ``desc`` labels the progress bar.
    """
    folder = Path(folder)
    files = sorted(_iter_files(folder))
    outer = hashlib.sha256()
    with _bar(len(files), desc or f"verifying {folder.name}", progress, unit="file") as bar:
        for rel, full in files:
            outer.update(f"{_file_sha256(full)}  {rel}\n".encode("utf-8"))
            bar.update(1)
    return outer.hexdigest()


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_verified(folder: str | Path, info: DatasetInfo, full: bool = False) -> bool:
    """Whether ``folder`` holds ``info``'s dataset.

    The cheap check (default) needs the marker file with the pinned digest and the same number
    of files as when it was verified; ``full=True`` recomputes the tree digest.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    marker = _read_marker(folder)
    if marker is None or marker.get("tree_sha256") != info.tree_sha256:
        return False
    if full:
        return tree_digest(folder) == info.tree_sha256
    return marker.get("file_count") == count_files(folder)


def _write_marker(folder: Path, info: DatasetInfo, n_files: int, source: str) -> None:
    marker = {
        "name": info.name,
        "tree_sha256": info.tree_sha256,
        "file_count": n_files,
        "source": source,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
