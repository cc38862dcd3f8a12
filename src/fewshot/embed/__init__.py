"""Batched embedding extraction with an on-disk cache.

:func:`embed_dataset` reads every image once to hash it, takes cached vectors where the
content hash is known, and runs the backbone (``torch.inference_mode``, a DataLoader that
decodes in worker processes, a progress bar) on the rest. Unreadable images are skipped with
a warning that names them and a summary count; ``strict=True`` makes any skip an error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from ..backbones import Backbone, Preprocess
from ..data.images import load_image
from ..data.records import Dataset
from ..errors import DataError, ImageReadError
from .cache import SMALL_ROWS, EmbeddingCache, default_cache_dir, file_digest
from .runtime import RUNTIMES, Forward, ForwardChoice, LazyForward, OnnxForward, TorchForward, check_runtime, make_forward

log = logging.getLogger("fewshot")

#: images per forward pass: 16 measured 1.08x the end-to-end images/s of 32 with ONNX Runtime on
#: 2 cores (bench/embed_throughput.py; each lane's batch stays in cache), and the same with torch
DEFAULT_BATCH_SIZE = 16
#: an embedding run appends its new vectors to the store every SAVE_ROWS vectors (a shard the
#: store does not count as small) or SAVE_SECONDS seconds, whichever comes first, so a run that
#: is killed (SIGKILL, power loss: no ``finally`` runs) loses at most that much work
SAVE_ROWS = SMALL_ROWS
SAVE_SECONDS = 10.0

__all__ = ["Embeddings", "EmbeddingCache", "embed_dataset", "embed_paths", "read_digests", "dataset_embeddings", "apply_head",
           "default_cache_dir", "make_forward", "check_runtime", "RUNTIMES", "Forward", "ForwardChoice",
           "TorchForward", "OnnxForward", "LazyForward", "DEFAULT_BATCH_SIZE", "PeriodicSave", "SAVE_ROWS", "SAVE_SECONDS"]


@dataclass
class Embeddings:
    """Embeddings of the readable images of a dataset.

    Attributes:
        vectors: ``float32 [N, D]``, row ``i`` for ``dataset.records[i]`` (not normalised).
        dataset: the records that were embedded (unreadable ones removed).
        skipped: ``(path, reason)`` for each image that could not be read.
        digests: the SHA-256 hex digest of each embedded file (the cache key; used to spot
            queries that are catalogue images).
        backbone: the backbone's description (name, weights, preprocessing).
        num_cached: how many vectors came from the cache.
    """

    vectors: np.ndarray
    dataset: Dataset
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    backbone: dict = field(default_factory=dict)
    num_cached: int = 0
    #: SHA-256 of each embedded file's bytes, aligned with ``dataset.records``
    digests: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return self.dataset.labels

    @property
    def groups(self) -> list[str | None]:
        return self.dataset.groups


class _ImageFiles(TorchDataset):
    """Decode + preprocess in DataLoader workers; a bad file yields its reason, not an error."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i], target_size=self.preprocess.image_size)
            return i, self.preprocess(image), None
        except ImageReadError as exc:
            return i, None, exc.reason
        except Exception as exc:  # never let one photo end a long run
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(items):
    good = [(i, t) for i, t, r in items if t is not None]
    bad = [(i, r) for i, t, r in items if t is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    batch = torch.stack([t for _, t in good]) if good else None
    return idx, batch, bad


def _read_digest(path: Path) -> tuple[str | None, str | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "is a folder, not an image"
    except OSError as exc:
        return None, f"cannot read file ({exc.strerror or exc})"
    if not data:
        return None, "zero-byte file"
    return file_digest(data), None


def read_digests(paths: Sequence[str | Path]) -> tuple[list[str | None], dict[int, str]]:
    """SHA-256 hex digest of each file's bytes: ``(digests, failures {index: reason})``;
    an unreadable file has digest ``None`` and a reason."""
    digests: list[str | None] = []
    failures: dict[int, str] = {}
    for i, p in enumerate(paths):
        digest, reason = _read_digest(Path(p))
        digests.append(digest)
        if reason:
            failures[i] = reason
    return digests, failures


def _load_batch(files: _ImageFiles, start: int, batch_size: int):
    return _collate([files[i] for i in range(start, min(start + batch_size, len(files)))])


def _ordered(pool: ThreadPoolExecutor, fn: Callable[[int], Any], starts: Iterator[int], ahead: int) -> Iterator:
    """``fn(start)`` for every start, run on ``pool`` with at most ``ahead`` calls pending,
    yielded in order. Pending calls are cancelled when the consumer stops."""
    pending = deque(pool.submit(fn, s) for s in islice(starts, ahead))
    try:
        while pending:
            out = pending.popleft().result()
            pending.extend(pool.submit(fn, s) for s in islice(starts, 1))
            yield out
    finally:
        for fut in pending:
            fut.cancel()


def _embedded_batches(files: _ImageFiles, batch_size: int, num_workers: int, forward: Forward) -> Iterator:
    """``(idx int64 [B], vectors float32 [B, D] or None, bad [(i, reason)])`` per batch, in order.

    - ``num_workers > 0``: worker processes decode (a DataLoader), this thread runs the forward;
    - a forward with ``lanes > 1`` (ONNX Runtime): ``lanes`` threads each decode a batch and run
      it on one thread (:meth:`~fewshot.embed.runtime.OnnxForward.lane`);
    - otherwise one background thread decodes up to three batches ahead of the forward.
    PIL, numpy, torch and ONNX Runtime release the GIL, so the threads overlap."""
    starts = iter(range(0, len(files), batch_size))
    if num_workers > 0:
        loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                            persistent_workers=False)
        for idx, batch, bad in loader:
            yield idx, (forward(batch) if batch is not None else None), bad
        return
    lanes = int(getattr(forward, "lanes", 1))
    if lanes > 1:
        def job(start: int):
            idx, batch, bad = _load_batch(files, start, batch_size)
            return idx, (forward.lane(batch) if batch is not None else None), bad  # type: ignore[attr-defined]

        with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="fewshot-embed") as pool:
            yield from _ordered(pool, job, starts, 2 * lanes)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewshot-decode") as pool:
        for idx, batch, bad in _ordered(pool, lambda s: _load_batch(files, s, batch_size), starts, 3):
            yield idx, (forward(batch) if batch is not None else None), bad


def _run_loader(batches: Iterable, todo: list[int], digests: list[str | None], failures: dict[int, str],
                out: dict[int, np.ndarray], saver: "PeriodicSave | None", progress: bool, desc: str) -> None:
    """Collect every embedded batch into ``out`` (and the cache, saved as it goes), with a progress bar."""
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for idx, vectors, bad in batches:
            for j, reason in bad:
                failures[todo[j]] = reason
            if vectors is not None:
                for j, v in zip(idx.tolist(), vectors):
                    k = todo[j]
                    out[k] = v
                    if saver is not None:
                        saver.cache.put(digests[k], v)  # type: ignore[arg-type]
                if saver is not None:
                    saver.added(len(vectors))
            bar.update(len(idx) + len(bad))


def _save_cache(cache: EmbeddingCache) -> bool:
    """Write the cache; a folder that cannot be written costs a warning, not the run (then
    ``False``: the vectors stay in memory for this run only)."""
    try:
        cache.save()
    except OSError as exc:
        log.warning("cannot write the embedding cache %s (%s): these embeddings are not cached; set "
                    "--cache-dir or $FEWSHOT_CACHE to a writable folder", cache.path, exc.strerror or exc)
        return False
    return True


class PeriodicSave:
    """Appends the vectors put into ``cache`` to its store as a run goes: after ``rows`` new
    vectors or ``seconds`` since the last save, whichever comes first (and at :meth:`flush`).
    A store that cannot be written is warned about once and not tried again in this run.

    Args:
        cache: the store the run puts its vectors into.
        rows: new vectors between two saves (default :data:`SAVE_ROWS`).
        seconds: seconds between two saves (default :data:`SAVE_SECONDS`).
    """

    def __init__(self, cache: EmbeddingCache, rows: int | None = None, seconds: float | None = None) -> None:
        self.cache = cache
        self.rows = SAVE_ROWS if rows is None else rows
        self.seconds = SAVE_SECONDS if seconds is None else seconds
        self.unsaved = 0
        self.writable = True
        self._since = time.monotonic()

    def added(self, n: int) -> None:
        """Count ``n`` vectors just put into the cache; save when a limit is reached."""
        self.unsaved += n
        if self.unsaved >= self.rows or time.monotonic() - self._since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Save what is not saved yet (nothing when the store proved unwritable)."""
        if self.writable and self.unsaved:
            self.writable = _save_cache(self.cache)
        self.unsaved, self._since = 0, time.monotonic()


def embed_paths(
    paths: Sequence[str | Path],
    backbone: Backbone,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    desc: str = "embedding",
    digests: tuple[list[str | None], dict[int, str]] | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    forward: Forward | None = None,
) -> tuple[np.ndarray, list[int], dict[int, str], int]:
    """Embed image files with ``backbone``.

    Args:
        paths: image files.
        backbone: from :func:`fewshot.backbones.create_backbone`.
        batch_size: images per forward pass.
        num_workers: decode worker processes (0 = decode in one background thread of this
            process, overlapping the forward pass).
        cache_dir: cache folder (default :func:`default_cache_dir`); ``use_cache=False`` skips it.
        progress: show a progress bar.
        digests: :func:`read_digests` of ``paths`` when the caller already has them (each file
            is then read once).
        runtime: ``auto`` | ``torch`` | ``onnx``, see :mod:`fewshot.embed.runtime` (made only
            when something is not cached).
        threads: ONNX Runtime threads (default ``torch.get_num_threads()``).
        forward: a forward pass to use instead (e.g. one :func:`make_forward` result reused
            across calls); ``runtime`` and ``threads`` are then ignored.

    The new vectors are appended to the cache as the run goes (:class:`PeriodicSave`: every
    :data:`SAVE_ROWS` vectors or :data:`SAVE_SECONDS` seconds, and at the end or on Ctrl-C), so
    the rerun of a killed run takes them from the cache (``num_cached``) and embeds the rest.

    Raises:
        BackboneError: an unknown ``runtime``, or ``onnx`` without onnxruntime.

    Returns:
        ``(vectors float32 [M, D], ok_indices (M positions into paths), failures {index: reason},
        num_cached)``: ``num_cached`` of the ``M`` vectors came from the cache.
    """
    paths = [Path(p) for p in paths]
    if forward is None:
        check_runtime(runtime)
    cache = EmbeddingCache(cache_dir or default_cache_dir(), backbone.cache_key) if use_cache else None
    digest_list, found = digests if digests is not None else read_digests(paths)
    digests_of = list(digest_list)
    failures = dict(found)
    out: dict[int, np.ndarray] = {}
    todo: list[int] = []
    for i, d in enumerate(digests_of):
        if d is None:
            continue
        hit = cache.get(d) if cache is not None else None
        if hit is not None and hit.shape[-1] == backbone.dim:
            out[i] = hit
        else:
            todo.append(i)
    num_cached = len(out)
    if todo:
        if num_cached:  # e.g. the rerun of an interrupted run
            log.info("%d of %d images already in the embedding cache %s; embedding the other %d", num_cached,
                     num_cached + len(todo), cache.path if cache is not None else "", len(todo))
        backbone.model.eval()
        if forward is None:
            forward = make_forward(backbone, runtime, threads=threads, cache_dir=cache_dir).forward
        batches = _embedded_batches(_ImageFiles([paths[i] for i in todo], backbone.preprocess), batch_size,
                                    num_workers, forward)
        saver = PeriodicSave(cache) if cache is not None else None
        try:
            _run_loader(batches, todo, digests_of, failures, out, saver, progress, desc)
        finally:  # a Ctrl-C keeps what it embedded; a SIGKILL what the periodic saves wrote
            if saver is not None:
                saver.flush()
    ok = sorted(out)
    vectors = np.stack([out[i] for i in ok]).astype(np.float32) if ok else np.zeros(
        (0, backbone.dim), np.float32)
    return vectors, ok, failures, num_cached


def embed_dataset(
    dataset: Dataset,
    backbone: Backbone,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    strict: bool = False,
    progress: bool = True,
    runtime: str = "auto",
    threads: int | None = None,
    forward: Forward | None = None,
) -> Embeddings:
    """Embed every readable image of ``dataset``.

    Unreadable images (missing, zero-byte, truncated, corrupt, not an image) are skipped:
    each is logged with its path and reason, and a summary count follows. ``runtime``,
    ``threads`` and ``forward`` are as in :func:`embed_paths`.

    Returns:
        :class:`Embeddings` with ``vectors float32 [N, D]`` aligned to ``embeddings.dataset``.

    Raises:
        DataError: the dataset is empty, or no image at all could be read.
        ImageReadError: ``strict=True`` and at least one image could not be read.
    """
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name} has no images", hint="check data and split",
                        options=("data", "split"))
    digests = read_digests(dataset.paths)
    vectors, ok, failures, num_cached = embed_paths(
        dataset.paths, backbone, batch_size=batch_size, num_workers=num_workers,
        cache_dir=cache_dir, use_cache=use_cache, progress=progress,
        desc=f"embedding {dataset.name}", digests=digests, runtime=runtime, threads=threads, forward=forward)
    return dataset_embeddings(dataset, backbone, digests[0], (vectors, ok, failures, num_cached), strict=strict)


def dataset_embeddings(dataset: Dataset, backbone: Backbone, digests: Sequence[str | None],
                       result: tuple[np.ndarray, list[int], dict[int, str], int], *, strict: bool = False) -> Embeddings:
    """:class:`Embeddings` of ``dataset`` from an :func:`embed_paths`-shaped ``result``
    (``(vectors float32 [M, D], ok_indices, failures {index: reason}, num_cached)``) and the
    files' ``digests``: unreadable images are logged and dropped (the same rules for every
    way of embedding, local or distributed).

    Raises:
        DataError: no image at all could be read.
        ImageReadError: ``strict=True`` and at least one image could not be read.
    """
    vectors, ok, failures, num_cached = result
    skipped = [(dataset.records[i].path, failures[i]) for i in sorted(failures)]
    if skipped:
        if strict:
            path, reason = skipped[0]
            err = ImageReadError(path, reason)
            err.message += f" ({len(skipped)} unreadable image(s) in all)"
            err.hint = "fix or remove the listed files, or leave strict off to skip them"
            raise err
        for path, reason in skipped:
            log.warning("skipped unreadable image %s: %s", path, reason)
        log.warning("skipped %d of %d images that could not be read", len(skipped), len(dataset))
    if not ok:
        raise DataError(f"none of the {len(dataset)} images of {dataset.name} could be read",
                        hint="check the image files (see the warnings above)")
    kept = dataset.subset(ok)
    return Embeddings(vectors=vectors, dataset=kept, skipped=skipped, backbone=backbone.describe(),
                      num_cached=num_cached, digests=[digests[i] for i in ok])


@torch.no_grad()
def apply_head(head: nn.Module, vectors: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Map backbone embeddings through a trained head: ``float32 [N, D] -> float32 [N, E]``."""
    head.eval()
    out = [head(torch.from_numpy(vectors[i:i + batch_size])).float().numpy()
           for i in range(0, len(vectors), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
