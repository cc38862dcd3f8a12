"""The files of an index folder: how a :class:`~fewshot.index.CatalogueIndex` is written and read.

On disk (format 2; :func:`fewshot.catalogue.store.save_index` writes the folder atomically as a
whole)::

    INDEX_DIR/meta.json            labels, groups, paths and content digests (SHA-256) per image;
                                   config (backbone, run, model weights digest); index type; version
    INDEX_DIR/vectors.npy          float32 [N, D] exact normalised image vectors (rows read on demand)
    INDEX_DIR/ids.npy              int64 [N] each image's id in images.faiss (sorted)
    INDEX_DIR/prototype_sums.npy   float32 [C, D] per article, the sum of its image vectors
                                   (read on demand for ivfpq / hnsw)
    INDEX_DIR/images.faiss         the ivfpq / hnsw index (a flat index is rebuilt from vectors.npy)
    INDEX_DIR/whitening.safetensors a whitened catalogue's whitening (float64 mean [D], matrix
                                   [D, D]; meta.json records its fit and the SHA-256 of its arrays)
    INDEX_DIR/journal/             changes since the base files (:mod:`fewshot.catalogue.journal`)
    INDEX_DIR/enrolled/            photos enrolled through the service (:mod:`fewshot.catalogue.store`)
    INDEX_DIR/audit.jsonl          the service's log of changes

Format 1 folders (``images.faiss`` flat, ``prototypes.faiss``, ``meta.json``) still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from ..version import __version__
from ..errors import CheckpointError
from ..index import CatalogueIndex, ann
from ..index.ann import AnnConfig
from ..index.vectors import RowFile
from ..index.whiten import Whitening

__all__ = ["FORMAT_VERSION", "INDEX_FILES", "check_folder", "is_index_dir", "open_meta", "read_base", "read_meta",
           "read_whitening", "write_arrays", "write_meta", "WHITENING_FILE"]

FORMAT_VERSION = 2
#: the format of a whitened index: format 2 plus ``whitening.safetensors``, which a reader of
#: format 2 only (fewshot before 0.7.0) would ignore, answering with unwhitened queries
WHITENED_FORMAT = 3
#: the whitening of a whitened catalogue (:mod:`fewshot.index.whiten`)
WHITENING_FILE = "whitening.safetensors"
#: what an index folder holds at its top level (the service adds ``enrolled/``)
INDEX_FILES = frozenset({"meta.json", "images.faiss", "prototypes.faiss", "vectors.npy", "ids.npy",
                         "prototype_sums.npy", "journal", "enrolled", "audit.jsonl", "calibration.json",
                         WHITENING_FILE})


def read_meta(path: Path) -> dict | None:
    """The folder's ``meta.json`` as a dict (``None``: missing or unreadable)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def is_index_dir(path: str | Path) -> bool:
    """Whether ``path`` is an index folder written by :func:`fewshot.catalogue.store.save_index` (its
    ``meta.json`` records a format and a fewshot version, and its vectors are there)."""
    meta = read_meta(Path(path))
    return (meta is not None and "format_version" in meta and "fewshot_version" in meta
            and any((Path(path) / f).is_file() for f in ("vectors.npy", "images.faiss")))


def check_folder(path: Path) -> None:
    """Refuse a path that is not an index folder (missing, a file, no or an incomplete ``meta.json``).

    Raises:
        CheckpointError: naming what is wrong.
    """
    if not path.is_dir():
        raise CheckpointError(f"index folder {path} " + ("is a file, not a folder" if path.exists() else "does not exist"),
                              hint="build one with Catalogue.build(...).save(DIR) or `fewshot index --data ... --out DIR`")
    if not (path / "meta.json").is_file() and not (path / "images.faiss").is_file():
        raise CheckpointError(f"{path} is not a fewshot index (no meta.json or images.faiss)",
                              hint="give the folder written by Catalogue.save or `fewshot index --out DIR`")
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"index folder {path} is incomplete: meta.json is missing",
                              hint="rebuild it with `fewshot index`")


def open_meta(path: Path) -> dict:
    """The ``meta.json`` of an index folder, of a format this version reads.

    Raises:
        CheckpointError: it cannot be read, or it has another format.
    """
    meta = read_meta(path)
    if meta is None:
        raise CheckpointError(f"index folder {path} is damaged: meta.json cannot be read",
                              hint="rebuild it with `fewshot index`")
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION, WHITENED_FORMAT):
        raise CheckpointError(f"index {path} has format {version}, expected {FORMAT_VERSION} or {WHITENED_FORMAT}",
                              hint="rebuild it with this version of fewshot")
    return meta


def read_base(path: Path, meta: dict) -> CatalogueIndex:
    """The index the base files of ``path`` hold (the journal not replayed).

    Raises:
        CheckpointError: a missing file or an inconsistent folder; other exceptions for
        damaged files (the caller names the folder damaged).
    """
    return _load_v1(path, meta) if meta.get("format_version") == 1 else _load_v2(path, meta)


def write_arrays(index: CatalogueIndex, tmp: Path) -> None:
    """Write the vectors, ids, prototype sums and (a kind that saves it) the FAISS index into the new
    folder ``tmp`` (tombstones purged first by the caller: :meth:`CatalogueIndex.purge_tombstones`)."""
    _write_rows(tmp / "vectors.npy", len(index.ids), index.dim, index.vector_rows)
    np.save(tmp / "ids.npy", index.ids)
    _write_rows(tmp / "prototype_sums.npy", len(index.articles), index.dim, index.prototype_sums)
    if index.ann.index_kind.saves_index:
        faiss.write_index(index.image_index, str(tmp / "images.faiss"))
    if index.whitening is not None:
        from safetensors.numpy import save_file

        save_file(index.whitening.to_arrays(), str(tmp / WHITENING_FILE))


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def _whitening_record(index: CatalogueIndex) -> dict | None:
    w = index.whitening
    return None if w is None else {**w.describe(), "sha256": _arrays_digest(w.to_arrays())}


def read_whitening(path: Path, meta: dict) -> Whitening | None:
    """The whitening that ``meta.json`` (``meta``) records in ``"whitening"`` (``None``: none, in
    a format-2 folder without the file).

    Raises:
        CheckpointError: the file is missing, unreadable, not the one the record names, of
            another dimension than the index, or unusable (:meth:`Whitening.from_arrays`); a
            whitened format without a record, or a file without one.
    """
    record = meta.get("whitening")
    whitened = meta.get("format_version") == WHITENED_FORMAT
    if record is None and not whitened and not (path / WHITENING_FILE).exists():
        return None
    from safetensors.numpy import load_file

    try:
        if record is None:
            raise ValueError(f"meta.json has no whitening record for it (format {meta.get('format_version')})")
        arrays = load_file(str(path / WHITENING_FILE))
        if not isinstance(record, dict) or _arrays_digest(arrays) != record.get("sha256"):
            raise ValueError("its arrays are not those meta.json records")
        whitening = Whitening.from_arrays(arrays, record)
        if whitening.dim != meta.get("dim"):
            raise ValueError(f"it is {whitening.dim}-dimensional, the index {meta.get('dim')}-dimensional")
        return whitening
    except Exception as exc:  # safetensors raises its own errors, an OSError for a missing file
        raise CheckpointError(f"index folder {path} is damaged: its whitening ({WHITENING_FILE}) cannot be used "
                              f"({exc})", hint="rebuild it with `fewshot index ... --whiten --overwrite`") from None


def write_meta(index: CatalogueIndex, tmp: Path) -> None:
    """Write ``meta.json`` into the new folder ``tmp`` (last: its paths are final then)."""
    (tmp / "meta.json").write_text(json.dumps(_meta(index), indent=1, default=str), encoding="utf-8")


def _meta(index: CatalogueIndex) -> dict:
    return {"format_version": FORMAT_VERSION if index.whitening is None else WHITENED_FORMAT,
            "fewshot_version": __version__, "dim": index.dim,
            "num_images": len(index.labels), "num_articles": len(index.articles),
            "index_type": index.ann.kind, "index": index.ann.to_dict(), "config": index.config,
            "articles": index.articles, "whitening": _whitening_record(index),
            "labels": index.labels, "groups": index.groups, "paths": index.paths, "digests": index.digests}


def _write_rows(path: Path, n: int, dim: int, rows: Callable[[int, int], np.ndarray]) -> None:
    """A ``float32 [n, D]`` ``.npy`` written block by block (``rows(start, stop)``) with plain
    file writes: a memory map would keep every written page resident in this process."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                  "shape": (n, dim)})
        for start in range(0, n, ann.SHARD_ROWS):
            fh.write(np.ascontiguousarray(rows(start, min(n, start + ann.SHARD_ROWS)), np.float32).tobytes())


def _metadata(path: Path, meta: dict, n: int) -> tuple[list, list, list, list]:
    labels, groups, paths = meta["labels"], meta["groups"], meta["paths"]
    digests = meta.get("digests") or [None] * len(labels)
    if not (n == len(labels) == len(groups) == len(paths) == len(digests)):
        raise CheckpointError(f"index {path} is inconsistent: {n} vectors for {len(labels)} labels "
                              f"and {len(digests)} digests", hint="rebuild it with `fewshot index`")
    return labels, groups, paths, digests


def _load_v1(path: Path, meta: dict) -> CatalogueIndex:
    """A format-1 folder: a flat ``images.faiss`` holding the vectors."""
    if not (path / "images.faiss").is_file():
        raise CheckpointError(f"index folder {path} is incomplete: images.faiss is missing",
                              hint="rebuild it with `fewshot index`")
    flat = faiss.read_index(str(path / "images.faiss"))
    if flat.d != meta["dim"]:
        raise CheckpointError(f"index {path} is inconsistent: {flat.d}-d vectors, meta says {meta['dim']}",
                              hint="rebuild it with `fewshot index`")
    labels, groups, paths, digests = _metadata(path, meta, flat.ntotal)
    vectors = np.asarray(flat.reconstruct_n(0, flat.ntotal), np.float32) if flat.ntotal else np.zeros((0, flat.d), np.float32)
    ids = np.arange(flat.ntotal, dtype=np.int64)
    return CatalogueIndex.restore(dim=meta["dim"], labels=labels, groups=groups, paths=paths,
                                  config=meta.get("config", {}), image_index=flat, digests=digests, ids=ids,
                                  vectors=vectors, first_new=len(ids))


def _load_v2(path: Path, meta: dict) -> CatalogueIndex:
    """A format-2 folder: ``vectors.npy`` (rows read on demand, :class:`RowFile`), ``ids.npy``,
    prototype sums and, for an approximate index, ``images.faiss``."""
    for name in ("vectors.npy", "ids.npy", "prototype_sums.npy"):
        if not (path / name).is_file():
            raise CheckpointError(f"index folder {path} is incomplete: {name} is missing",
                                  hint="rebuild it with `fewshot index`")
    config = AnnConfig.from_dict(meta.get("index"))
    vectors = RowFile(path / "vectors.npy")
    ids = np.load(path / "ids.npy")
    kind = config.index_kind
    sums = np.load(path / "prototype_sums.npy") if kind.prototypes_in_memory else RowFile(path / "prototype_sums.npy")
    labels, groups, paths, digests = _metadata(path, meta, len(vectors))
    if vectors.ndim != 2 or vectors.shape[1] != meta["dim"] or len(ids) != len(vectors):
        raise CheckpointError(f"index {path} is inconsistent: vectors {vectors.shape}, {len(ids)} ids",
                              hint="rebuild it with `fewshot index`")
    if not kind.saves_index:  # rebuilt from the file (a memory map, dropped afterwards)
        image_index = ann.build(config, np.load(path / "vectors.npy", mmap_mode="r"))
        ids = np.arange(len(vectors), dtype=np.int64)
    else:
        if not (path / "images.faiss").is_file():
            raise CheckpointError(f"index folder {path} is incomplete: images.faiss is missing",
                                  hint="rebuild it with `fewshot index`")
        image_index = faiss.read_index(str(path / "images.faiss"))
    first_new = kind.first_new_id(image_index, ids)
    articles = meta.get("articles")
    if (articles is None or sorted(articles) != sorted(dict.fromkeys(labels)) or len(sums) != len(articles)
            or sums.shape[1:] != (meta["dim"],)):
        raise CheckpointError(f"index {path} is inconsistent: its article list does not match its images",
                              hint="rebuild it with `fewshot index`")
    return CatalogueIndex.restore(dim=meta["dim"], labels=labels, groups=groups, paths=paths,
                                  config=meta.get("config", {}), ann_config=config, image_index=image_index,
                                  digests=digests, ids=ids, vectors=vectors, first_new=first_new, sums=sums,
                                  articles=list(articles), whitening=read_whitening(path, meta))
