"""Distributed batch embedding with Ray Data (``fewshot embed --distributed ray``).

The driver (this process) reads every file once to hash it (:func:`fewshot.embed.read_digests`,
the same SHA-256 content key as the embedding store), leaves out the digests the store already
holds for this backbone key, and builds a ``ray.data`` dataset of rows ``{path, digest}`` (one
per distinct content; Ray does not keep the order, so every row carries its own key).
``map_batches`` runs them through :class:`RayEmbedder`, a callable class, so each actor loads
the model once (``concurrency`` actors, ``num_cpus`` each); an actor decodes, resizes and
runs the forward pass with the very code of ``fewshot embed`` (``_ImageFiles`` and
``_embedded_batches`` of :mod:`fewshot.embed`, :func:`~fewshot.embed.runtime.make_forward`),
so the vectors are the same. Each actor hashes a file again before embedding it: a file that
changed since it was listed is reported, never stored under its old key.

Only the driver writes the store: it appends the vectors it receives as a new shard every
``flush_rows`` rows or :data:`~fewshot.embed.SAVE_SECONDS` seconds (and once more when the run
ends or is interrupted), through
:meth:`EmbeddingCache.save`, which is atomic and takes the store's lock. So the store is
consistent at every moment, and a rerun after an interruption embeds only what is missing
(resumable). The vectors are then returned in the order of the input paths.

Ray is optional (``pip install -e ".[scale]"``) and imported only here, inside functions.
Without ``address`` a local Ray is started (``num_cpus = workers x cpus_per_worker``, a
512 MiB object store, no dashboard) and always shut down at the end, so no worker process is
left behind; with ``address`` the run connects to that cluster (every node must have fewshot
installed and see the image paths, e.g. on a shared file system) and disconnects at the end.
A Ray session that the caller already started is used as it is and left running.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backbones import Backbone
from ..data.records import Dataset
from ..errors import FewshotError
from . import DEFAULT_BATCH_SIZE, Embeddings, PeriodicSave, _embedded_batches, _ImageFiles, dataset_embeddings, read_digests
from .cache import SMALL_ROWS, EmbeddingCache, default_cache_dir
from .runtime import check_runtime, make_forward

log = logging.getLogger("fewshot")

INSTALL_HINT = 'pip install -e ".[scale]" (or pip install "ray[data]>=2.9")'
#: the ``--distributed`` back-ends
DISTRIBUTED = ("ray",)
#: object store of a local Ray (bytes)
LOCAL_OBJECT_STORE = 512 * 1024**2
#: rows per ``map_batches`` call (one Ray block each)
BATCH_ROWS = 64
#: the driver appends a shard after this many new vectors (or SAVE_SECONDS seconds): an
#: interrupted run loses at most this many, and such shards are not "small" (not merged again)
FLUSH_ROWS = SMALL_ROWS
CHANGED = "the file changed after it was listed (its content hash differs); run again"

__all__ = ["RayOptions", "RayEmbedder", "ray_embed_paths", "ray_embed_dataset", "check_distributed",
           "ray_available", "DISTRIBUTED", "INSTALL_HINT"]


@dataclass
class RayOptions:
    """How a Ray embedding run is laid out.

    Attributes:
        address: a Ray cluster to connect to (``ray.init(address=...)``, e.g. ``auto`` or
            ``ray://head:10001``); ``None`` = start a local Ray for this run.
        workers: actors, one model each (``map_batches(concurrency=workers)``); ``None`` = as
            many as the CPUs allow (a local Ray: the usable CPUs; a cluster: its CPUs), divided
            by ``cpus_per_worker``.
        cpus_per_worker: CPUs Ray reserves per actor; also its forward-pass threads unless
            ``threads`` is given to :func:`ray_embed_paths`.
        batch_rows: rows per ``map_batches`` call.
        flush_rows: new vectors between two appends to the store.
        temp_dir: the local Ray's temporary folder (``ray.init(_temp_dir=...)``; default
            Ray's own); ignored with ``address``.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    batch_rows: int = BATCH_ROWS
    flush_rows: int = FLUSH_ROWS
    temp_dir: str | None = None

    def describe(self) -> dict:
        """JSON-ready description for result files."""
        return {"backend": "ray", "address": self.address, "workers": self.workers,
                "cpus_per_worker": self.cpus_per_worker, "batch_rows": self.batch_rows}


def ray_available() -> bool:
    """Whether ``ray`` and ``ray.data`` can be imported."""
    try:
        import ray.data
    except ImportError:
        return False
    return ray.data is not None


def check_distributed(backend: str) -> str:
    """Validate a ``--distributed`` value and that its package is installed.

    Raises:
        FewshotError: not one of :data:`DISTRIBUTED`, or Ray is not installed (the message
            names ``pip install -e ".[scale]"``).
    """
    if backend not in DISTRIBUTED:
        raise FewshotError(f"unknown option distributed = {backend!r}", hint="use distributed='ray'",
                           options=("distributed",))
    if not ray_available():
        raise FewshotError("distributed='ray' needs Ray Data, which is not installed", hint=INSTALL_HINT,
                           options=("distributed",))
    return backend


class RayEmbedder:
    """The ``map_batches`` callable: one forward pass per actor, made in ``__init__``.

    Args:
        backbone: the backbone to embed with, or ``[ObjectRef]`` of it (``ray.put`` once by the
            driver; a list, so Ray passes the reference and the actor fetches it).
        runtime: ``torch`` | ``onnx`` | ``auto`` (:func:`~fewshot.embed.runtime.make_forward`).
        threads: forward-pass threads (torch and ONNX Runtime).
        cache_dir: where the actor looks for (or writes) the ONNX export.
        batch_size: images per forward pass inside a ``map_batches`` call.
    """

    def __init__(self, backbone: Backbone | list, runtime: str, threads: int, cache_dir: str | None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        import torch

        if isinstance(backbone, list):  # [ObjectRef]: one copy in the object store, fetched by each actor
            import ray

            backbone = ray.get(backbone[0])
        torch.set_num_threads(threads)
        backbone.model.eval()
        self.preprocess = backbone.preprocess
        self.dim = backbone.dim
        self.batch_size = batch_size
        self.forward = make_forward(backbone, runtime, threads=threads, cache_dir=cache_dir).forward

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{path [B] str, digest [B] str}`` -> ``{digest [B], vector float32 [B, D], error [B] str}``
        (``error`` is ``""`` for an embedded image; a failed one has a zero vector and its reason)."""
        paths = [Path(str(p)) for p in batch["path"]]
        expected = [str(d) for d in batch["digest"]]
        found, failures = read_digests(paths)
        for i, (now, before) in enumerate(zip(found, expected)):
            if now is not None and now != before:
                failures[i] = CHANGED
        todo = [i for i in range(len(paths)) if i not in failures]
        vectors = np.zeros((len(paths), self.dim), np.float32)
        files = _ImageFiles([paths[i] for i in todo], self.preprocess)
        for idx, vecs, bad in _embedded_batches(files, self.batch_size, 0, self.forward):
            for j, reason in bad:
                failures[todo[j]] = reason
            if vecs is not None:
                vectors[[todo[j] for j in idx.tolist()]] = vecs
        errors = np.array([failures.get(i, "") for i in range(len(paths))], dtype=object)
        return {"digest": np.array(expected, dtype=object), "vector": vectors, "error": errors}


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FewshotError("distributed='ray' needs Ray Data, which is not installed", hint=INSTALL_HINT,
                           options=("distributed",)) from None
    return ray


def _start(ray, options: RayOptions) -> bool:
    """Start or join Ray; ``True`` when this call started the session (and must shut it down).

    Raises:
        FewshotError: the cluster at ``options.address`` cannot be reached.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "configure_logging": True}
    try:
        if options.address:
            _check_reachable(options.address)
            ray.init(address=options.address, **kwargs)
        else:
            if options.temp_dir:
                kwargs["_temp_dir"] = str(options.temp_dir)
            cpus = options.workers * options.cpus_per_worker if options.workers else default_workers()
            ray.init(num_cpus=cpus, object_store_memory=LOCAL_OBJECT_STORE,
                     **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray"
        if options.address == "auto" and isinstance(exc, ConnectionError):
            # Ray's own text names its CLI's `--address` flag, which fewshot does not have
            raise FewshotError("cannot start the Ray cluster at auto: no running Ray cluster was found on this "
                               "machine (nor one named by the RAY_ADDRESS environment variable)",
                               hint="start one first (`ray start --head`), pass address='HOST:6379' (a head node's), "
                                    "or leave address out to run a local Ray "
                                    "for this command", options=("address",)) from None
        raise FewshotError(f"cannot start {where}: {(str(exc).splitlines() or [''])[0][:300]}",
                           hint="check address (the head node's host:port, e.g. HOST:6379 or ray://HOST:10001) "
                                "and that the cluster runs the same Ray and Python versions"
                                if options.address else "see Ray's message above", options=("address",)) from None
    return True


#: seconds to wait for a TCP connection to ``--ray-address`` before calling it unreachable
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """Fail fast on a ``HOST:PORT`` (or ``ray://HOST:PORT``) address nothing listens on: Ray
    itself keeps retrying for minutes. ``auto`` and other forms are left to Ray.

    Raises:
        ConnectionError: no TCP connection within :data:`CONNECT_TIMEOUT_S`.
    """
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc})") from None


def _quiet(ray) -> None:
    """Ray Data's own progress output off (the run has its own bar); its warnings stay."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _todo(digests: Sequence[str | None], cache: EmbeddingCache, dim: int) -> list[int]:
    """The first index of each distinct readable digest the store does not hold (at ``dim``)."""
    seen: set[str] = set()
    todo = []
    for i, d in enumerate(digests):
        if d is None or d in seen:
            continue
        seen.add(d)
        hit = cache.get(d)
        if hit is None or hit.shape[-1] != dim:
            todo.append(i)
    return todo


def _collect(results, cache: EmbeddingCache, failed: dict[str, str], total: int, options: RayOptions,
             progress: bool, callback: Callable[[int, int], None] | None) -> int:
    """Take every result batch into the cache, appending to the store every ``flush_rows``
    vectors or :data:`~fewshot.embed.SAVE_SECONDS` seconds; failures go to ``failed {digest:
    reason}``. Returns how many vectors were received."""
    from tqdm.auto import tqdm

    done = received = 0
    saver = PeriodicSave(cache, rows=options.flush_rows)
    batches = iter(results.iter_batches(batch_size=None, batch_format="numpy"))  # a generator, closed below
    try:
        with tqdm(total=total, desc="embedding (ray)", unit="img", disable=not progress, leave=False) as bar:
            for batch in batches:
                before = received
                for d, v, e in zip(batch["digest"], batch["vector"], batch["error"]):
                    if e:
                        failed[str(d)] = str(e)
                    else:
                        cache.put(str(d), v)
                        received += 1
                saver.added(received - before)
                done += len(batch["digest"])
                bar.update(len(batch["digest"]))
                if callback is not None:
                    callback(done, total)
    finally:  # an interrupted run keeps what it received
        # an exception (a Ctrl-C, a failed store) leaves the generator alive in its traceback,
        # and Ray Data shuts its streaming executor down only when the generator ends: close
        # it now, before the caller shuts Ray down under an executor that still runs
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        saver.flush()
    return received


def _run_ray(paths: list[Path], digests: list[str | None], todo: list[int], backbone: Backbone,
             cache: EmbeddingCache, failed: dict[str, str], *, options: RayOptions, batch_size: int,
             runtime: str, threads: int | None, cache_dir: str | Path | None, progress: bool,
             callback: Callable[[int, int], None] | None) -> int:
    """Embed ``todo`` on Ray (started and always shut down here, unless the caller's)."""
    ray = _import_ray()
    # export (and check) the ONNX model once here, so the actors load it instead of racing to
    # export it; a backbone that falls back to torch then runs on torch in every actor
    choice = make_forward(backbone, runtime, threads=1, cache_dir=cache_dir)
    started = _start(ray, options)
    _quiet(ray)
    try:
        workers = options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // options.cpus_per_worker)
        rows = [{"path": str(paths[i].resolve()), "digest": digests[i]} for i in todo]
        # a few calls per actor at least, so that every actor has work and they finish together
        per_call = max(1, min(options.batch_rows, -(-len(rows) // (4 * workers))))
        ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_call))
        results = ds.map_batches(
            RayEmbedder, fn_constructor_kwargs={
                "backbone": [ray.put(backbone)], "runtime": choice.runtime, "threads": threads or options.cpus_per_worker,
                "cache_dir": str(cache_dir) if cache_dir else None, "batch_size": batch_size},
            batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=options.cpus_per_worker,
            batch_format="numpy")
        try:
            t0 = time.perf_counter()
            got = _collect(results, cache, failed, len(rows), options, progress, callback)
            seconds = time.perf_counter() - t0
            log.info("ray: embedded %d new image(s) with %d worker(s) in %.1f s (%.1f img/s)", got, workers,
                     seconds, got / max(seconds, 1e-9))
            return got
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise FewshotError(f"the Ray embedding run failed: {type(exc).__name__}: {first}",
                               hint="see the worker's traceback above; rerun to resume (what was embedded "
                                    "is kept in the store)") from None
    finally:
        if started:
            ray.shutdown()


def ray_embed_paths(
    paths: Sequence[str | Path],
    backbone: Backbone,
    *,
    options: RayOptions | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | Path | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    digests: tuple[list[str | None], dict[int, str]] | None = None,
    progress: bool = True,
    callback: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[int], dict[int, str], int]:
    """Embed image files on Ray, through the embedding store (same contract as
    :func:`fewshot.embed.embed_paths`).

    Ray is started only when something is missing from the store: a rerun of a finished run
    neither starts Ray nor loads a model.

    Args:
        paths: image files (on a cluster: paths every node can read).
        backbone: from :func:`fewshot.backbones.create_backbone` (shipped to each actor).
        options: :class:`RayOptions` (default: one local worker).
        batch_size: images per forward pass inside an actor.
        cache_dir: the embedding store (default :func:`~fewshot.embed.default_cache_dir`);
            the results are written there, and it is what makes a run resumable.
        runtime: ``auto`` | ``torch`` | ``onnx`` for the actors' forward pass.
        threads: forward-pass threads per actor (default ``options.cpus_per_worker``).
        digests: :func:`~fewshot.embed.read_digests` of ``paths`` when the caller has them.
        progress: a progress bar over the images to embed.
        callback: called as ``callback(done, total)`` after each result batch (``total`` =
            images sent to Ray); an exception it raises stops the run, after what was
            received is stored.

    Returns:
        ``(vectors float32 [M, D], ok_indices (M positions into paths), failures {index: reason},
        num_cached)``; ``num_cached`` = images whose vector was in the store before this run,
        so ``M - num_cached`` were embedded now.

    Raises:
        FewshotError: Ray is not installed, the cluster cannot be reached, or the Ray run failed
            (what was received until then is kept in the store).
        BackboneError: an unknown ``runtime``, or ``onnx`` without onnxruntime.
    """
    options = options or RayOptions()
    if min(options.workers or 1, options.cpus_per_worker, options.batch_rows, options.flush_rows) < 1:
        raise FewshotError(f"bad Ray options {options}", hint="workers, cpus_per_worker, batch_rows and flush_rows "
                                                               "must be 1 or more")
    check_runtime(runtime)
    paths = [Path(p) for p in paths]
    digest_list, found = digests if digests is not None else read_digests(paths)
    failures = dict(found)
    cache = EmbeddingCache(cache_dir or default_cache_dir(), backbone.cache_key)
    todo = _todo(digest_list, cache, backbone.dim)
    failed: dict[str, str] = {}
    if todo:
        _run_ray(paths, list(digest_list), todo, backbone, cache, failed, options=options, batch_size=batch_size,
                 runtime=runtime, threads=threads, cache_dir=cache_dir, progress=progress, callback=callback)
    elif digest_list:
        log.info("ray: all %d image(s) are in the embedding store; nothing to embed", len(digest_list) - len(found))
    out: dict[int, np.ndarray] = {}
    num_cached = 0
    fresh = {digest_list[i] for i in todo}
    for i, d in enumerate(digest_list):
        if d is None or i in failures:
            continue
        if d in failed:
            failures[i] = failed[d]
            continue
        v = cache.get(d)
        if v is None:  # cannot happen unless an actor lost a row: report, never guess
            failures[i] = "no vector came back from Ray"
            continue
        out[i] = v
        num_cached += d not in fresh
    ok = sorted(out)
    vectors = np.stack([out[i] for i in ok]).astype(np.float32) if ok else np.zeros((0, backbone.dim), np.float32)
    return vectors, ok, failures, num_cached


def ray_embed_dataset(dataset: Dataset, backbone: Backbone, *, options: RayOptions | None = None,
                      strict: bool = False, **kwargs) -> Embeddings:
    """Embed every readable image of ``dataset`` on Ray (:func:`ray_embed_paths`; ``kwargs``
    go there); unreadable images are handled as in :func:`fewshot.embed.embed_dataset`.

    Returns:
        :class:`~fewshot.embed.Embeddings` with ``vectors float32 [N, D]`` aligned to
        ``embeddings.dataset`` (the dataset's order, whatever order Ray returned).

    Raises:
        DataError: the dataset is empty, or no image at all could be read.
        ImageReadError: ``strict=True`` and at least one image could not be read.
        FewshotError: as in :func:`ray_embed_paths`.
    """
    from ..errors import DataError

    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.name} has no images", hint="check data and split",
                        options=("data", "split"))
    digests = read_digests(dataset.paths)
    result = ray_embed_paths(dataset.paths, backbone, options=options, digests=digests, **kwargs)
    return dataset_embeddings(dataset, backbone, digests[0], result, strict=strict)


def default_workers() -> int:
    """One local worker per usable CPU."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
