"""One index folder on disk: the only module that reads or writes one.

It writes the index files (:mod:`fewshot.catalogue.formats`) as one atomic folder, appends
changes to the folder's journal (:mod:`fewshot.catalogue.journal`) and replays them on load,
keeps the photos enrolled through the service (``INDEX_DIR/enrolled/``) and the audit log with
the folder when it is rewritten, writes enrolled photos durably (fsync'ed, rolled back when the
journal entry cannot be written), removes what an interrupted change left, and holds the
folder's writer lock (:func:`fewshot.io.writer_lock`) while it writes.

* :func:`load_index` / :func:`save_index`: the whole folder (a save compacts the journal). A
  save onto the folder an index came from is refused when another process changed it since.
* :func:`append_change`: one journal entry (an enrolment writes only its own vectors).
* :func:`enrolled_files`, :func:`enrolled_articles`, :func:`enrolled_name`: the enrolled photos.
* :func:`write_durably`, :func:`remove_written`, :func:`drop_leftovers`: the service's writes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, DataError, FewshotError, FolderBusyError
from ..index import CatalogueIndex
from ..io import atomic_dir, recover_dir, writer_lock
from .formats import check_folder, open_meta, read_base, write_arrays, write_meta
from .journal import JOURNAL_DIR, Change, Journal, apply
from .reject import read_calibration, write_calibration

__all__ = ["AUDIT_FILE", "ENROLLED_DIR", "UPLOAD_DIR", "EnrolledArticle", "append_change", "drop_leftovers",
           "enrolled_articles", "enrolled_dir", "enrolled_files", "enrolled_name", "journal_length", "load_index",
           "remove_written", "save_index", "slug", "write_durably"]

#: sub-folder of an index folder with the photos ``fewshot serve`` enrolled (kept by :func:`save_index`)
ENROLLED_DIR = "enrolled"
#: the service's append-only log of changes (:class:`fewshot.serve.security.AuditLog`), kept by every save
AUDIT_FILE = "audit.jsonl"
#: hidden sub-folder of an index folder for the uploads of changes in progress (a service's)
UPLOAD_DIR = ".uploads"
log = logging.getLogger("fewshot")


# --------------------------------------------------------------------------- the whole folder
def load_index(path: str | Path) -> CatalogueIndex:
    """Read an index folder written by :func:`save_index` and replay its journal.

    Raises:
        CheckpointError: the folder is missing, incomplete, damaged or inconsistent.
    """
    path = Path(path)
    if not path.exists():
        _recover_or_wait(path)
    check_folder(path)
    seen = _folder_state(path)  # before reading: a change made meanwhile makes a later save refuse
    meta = open_meta(path)
    try:
        index = read_base(path, meta)
        read_calibration(index, path)  # dropped by the first change the journal replays
        for change in Journal(path).read():
            apply(index, change)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"index folder {path} is damaged: {exc}",
                              hint="rebuild it with `fewshot index`") from exc
    index.folder = path
    index.folder_state = seen
    return index


def save_index(index: CatalogueIndex, path: str | Path, *, owner: object | None = None) -> Path:
    """Write the index folder atomically (the old folder survives a crash): the base files
    with every change so far, and no journal (compaction). An ``ivfpq`` index drops its
    tombstones here; an ``hnsw`` graph keeps them masked (FAISS cannot remove from it).

    Holds the folder's writer lock (:func:`fewshot.io.writer_lock`) while it writes;
    ``owner``: its holder when the caller holds it already (a service, ``fewshot index``).

    Raises:
        DataError: the catalogue has no images (such a folder could not be loaded again).
        FolderBusyError: another writer holds the folder.
        CheckpointError: ``path`` is the folder this index was loaded from and another
            process changed it since (a service enrolled or deleted, a rebuild): saving
            would undo those changes and drop their enrolled photos.
    """
    if not index.labels:
        raise DataError(f"the catalogue has no images: an empty index cannot be saved to {path}",
                        hint="add an article first")
    with writer_lock(path, "saving a catalogue index", owner=owner or index):
        check_unchanged(index, Path(path))
        out = _save(index, Path(path))
        index.folder_state = _folder_state(out)
        return out


def _tracks(index: CatalogueIndex, path: Path) -> bool:
    """Whether ``path`` is the folder ``index`` came from, with its state recorded."""
    return (index.folder is not None and index.folder_state is not None
            and Path(index.folder).resolve() == path.resolve())


def check_unchanged(index: CatalogueIndex, path: Path) -> None:
    """Refuse to save over the folder ``index`` came from when it changed since."""
    if _tracks(index, path) and _folder_state(path) != index.folder_state:
        raise CheckpointError(
            f"{path} has changed since this catalogue was loaded from it (another process enrolled or "
            "removed articles, or rebuilt it): saving now would undo those changes",
            hint="load the folder again and repeat your changes, or save to another folder")


def _save(index: CatalogueIndex, path: Path) -> Path:
    index.purge_tombstones()
    origin = index.folder or path
    with atomic_dir(path) as tmp:
        write_arrays(index, tmp)
        index.paths = _carry_enrolled(index, origin, tmp, path)
        _carry_file(AUDIT_FILE, [Path(origin), path], tmp)
        write_calibration(index, tmp)
        write_meta(index, tmp)
    index.folder = path
    return path


def append_change(index: CatalogueIndex, path: str | Path, change: Change, *, owner: object | None = None) -> Path:
    """Persist ``change`` as one journal entry of the index folder ``path`` (durable when
    this returns), then apply it in memory. Writes only the change's own vectors.

    ``owner``: the holder of the folder's writer lock (:func:`fewshot.io.writer_lock`), when
    the caller holds it (a service); otherwise the lock is taken for this write.

    Raises:
        FolderBusyError: another writer holds the folder.
    """
    with writer_lock(path, "a catalogue change", owner=owner or index):
        in_step = _tracks(index, Path(path)) and _folder_state(path) == index.folder_state
        entry = Journal(path).append(change)
        if in_step:  # the folder is as this index last saw it, plus this entry
            assert index.folder_state is not None
            index.folder_state = (*index.folder_state[:3], index.folder_state[3] + (entry.name,))
    apply(index, change)
    return entry


def journal_length(path: str | Path) -> int:
    """How many changes the journal of index folder ``path`` holds (0: none, or no folder)."""
    return len(Journal(path))


def _folder_state(path: Path) -> tuple | None:
    """What tells whether an index folder changed: its ``meta.json`` (a save writes a new one)
    and the names of its journal entries (each change adds one)."""
    try:
        st = (path / "meta.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, tuple(p.name for _, p in Journal(path).sequence())


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst`` (a copy where the file system has no hard links)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_file(name: str, folders: list[Path], new: Path) -> None:
    """Hard-link (or copy) ``name`` from the first of ``folders`` that has it into ``new``."""
    for folder in folders:
        src = folder / name
        if src.is_file():
            _link_or_copy(src, new / name)
            return


def _recover_or_wait(path: Path, wait_s: float = 10.0) -> None:
    """A missing index folder: a writer may be between the two renames of its save (then wait
    for it, up to ``wait_s``), or one was killed there (then put its old folder back, under
    the writer lock, so that no live writer's rename is undone)."""
    if not path.parent.is_dir() or not any(path.parent.glob(f".{path.name}.*")):
        return  # no save was ever under way here (and no folder is made for a mistyped path)
    deadline = time.monotonic() + wait_s
    while not path.exists():
        try:
            with writer_lock(path, "recovering an interrupted save"):
                if recover_dir(path):
                    log.warning("recovered index %s from an interrupted save", path)
                return
        except FolderBusyError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        except FewshotError:  # no lock file can be made (a read-only parent): nothing to recover here
            return


# --------------------------------------------------------------------------- enrolled photos
def enrolled_files(index: CatalogueIndex, folder: str | Path) -> list[Path]:
    """The distinct photos under ``folder/enrolled/`` that the index references: the
    service's enrolments, stored relative to the folder (``enrolled/...``) or, by fewshot
    before 2026-12, as absolute paths. String prefixes only, no file-system call per image."""
    root = Path(folder).resolve() / ENROLLED_DIR
    relative, absolute = ENROLLED_DIR + "/", str(root) + os.sep
    return [root.parent / p if p.startswith(relative) else Path(p)
            for p in dict.fromkeys(index.paths) if p.startswith(relative) or p.startswith(absolute)]


def _carry_enrolled(index: CatalogueIndex, old: Path, new: Path, fallback: Path) -> list[str]:
    """Hard-link (or copy) into the new folder the enrolled photos the index references
    (:func:`enrolled_files` of ``old``, the folder the index came from, which may be another
    folder than the one being written); photos of removed articles are left behind with the
    old folder. Returns ``index.paths`` with each enrolled photo as ``enrolled/...``, relative
    to the new folder (an absolute path of before 2026-12 included). A photo missing from
    ``old`` is taken from ``fallback``, the folder being replaced (whose enrolled articles a
    rebuild keeps, :func:`fewshot.catalogue.build.build_index`)."""
    base, fallback = Path(old).resolve(), Path(fallback).resolve()
    moved: dict[str, str] = {}  # absolute path of before 2026-12 -> enrolled/...
    for src in enrolled_files(index, old):
        rel = src.relative_to(base)
        moved[str(src)] = rel.as_posix()
        if not src.is_file() and (fallback / rel).is_file():  # carried from the folder being replaced
            src = fallback / rel
        if not src.is_file():  # pragma: no cover - the folder was edited by hand
            log.warning("enrolled image %s is missing from the index folder", src)
            continue
        dst = new / rel
        _link_or_copy(src, dst)
    return [moved.get(p, p) for p in index.paths]  # an ``enrolled/...`` path is already relative


@dataclass
class EnrolledArticle:
    """The enrolled photos of one article (``files``: absolute; ``paths``: as the index keeps them)."""

    label: str
    group: str | None
    files: list[Path] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def enrolled_articles(index: CatalogueIndex, folder: str | Path) -> list[EnrolledArticle]:
    """The photos under ``folder/enrolled/`` that ``index`` (loaded from ``folder``, journal
    replayed) references, grouped by article in the index's order."""
    wanted = {str(p) for p in enrolled_files(index, folder)}
    root = Path(folder).resolve()
    out: dict[str, EnrolledArticle] = {}
    for label, group, path in zip(index.labels, index.groups, index.paths):
        file = Path(path) if Path(path).is_absolute() else root / path
        if str(file) not in wanted:
            continue
        art = out.setdefault(label, EnrolledArticle(label, index.article_group(label)))
        art.files.append(file)
        art.paths.append(file.relative_to(root).as_posix())
    return list(out.values())


def slug(text: str) -> str:
    """A file-name-safe folder name for an article label, unique per label (ASCII letters,
    digits, ``._-``, then 8 hex digits of the label's SHA-1): where the service stores an
    article's enrolled photos, and the export's folder for a label that cannot be one as it is."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode())
    return f"{plain.strip('-.')[:60] or 'article'}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def enrolled_dir(folder: str | Path) -> Path:
    """Where index folder ``folder`` keeps the photos enrolled through the service."""
    return Path(folder) / ENROLLED_DIR


def enrolled_name(label: str, suffix: str) -> str:
    """A new, unique path for an enrolled photo of article ``label``, relative to the index
    folder: ``enrolled/<slug(label)>/<12 hex digits><suffix>`` (relative, so the folder can move)."""
    return f"{ENROLLED_DIR}/{slug(label)}/{uuid.uuid4().hex[:12]}{suffix}"


# --------------------------------------------------------------------------- durable writes
def write_durably(folder: Path, new_files: list[tuple[Path, Path]], append: Callable[[], object]) -> None:
    """Store the photos ``(source, destination inside folder)`` (fsync'ed), then ``append`` the
    journal entry; on any failure the photos written here are removed again and nothing changed."""
    written: list[Path] = []
    try:
        for src, dst in new_files:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dst)
            written.append(dst)
        append()
    except BaseException:
        for path in written + [dst.with_name(f".{dst.name}.tmp") for _, dst in new_files]:
            remove_written(folder, path)
        raise


def remove_written(folder: Path, path: Path) -> None:
    """Delete a file written into index folder ``folder``, and the folders above it (below
    ``folder``) that this leaves empty."""
    path.unlink(missing_ok=True)
    for parent in path.parents:
        if parent == folder or not parent.is_relative_to(folder):
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def drop_leftovers(index: CatalogueIndex, folder: Path) -> int:
    """Remove what a crash mid-change left in ``folder`` (``index`` loaded from it): temporary
    journal entries and photos, enrolled photos no acknowledged change references, the uploads
    of changes in progress (:data:`UPLOAD_DIR`). Returns how many files were removed."""
    journal = folder / JOURNAL_DIR
    stale = list(journal.glob(".*.tmp")) if journal.is_dir() else []
    enrolled_root = folder / ENROLLED_DIR
    if enrolled_root.is_dir():
        referenced = set(enrolled_files(index, folder))
        stale += [f for f in enrolled_root.rglob("*") if f.is_file() and f not in referenced]
    for f in stale:
        remove_written(folder, f)
    uploads = folder / UPLOAD_DIR
    in_progress = sum(f.is_file() for f in uploads.rglob("*")) if uploads.is_dir() else 0
    shutil.rmtree(uploads, ignore_errors=True)
    return len(stale) + in_progress
