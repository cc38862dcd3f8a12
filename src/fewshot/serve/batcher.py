"""The embedding batcher: one worker thread runs the index's model on the uploads of
concurrent requests, batched into shared forward passes."""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.images import load_image
from ..errors import ImageReadError

__all__ = ["Embedder"]


@dataclass
class _Job:
    x: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class Embedder:
    """Runs the index's model on preprocessed images in one worker thread, batching requests.

    Every forward pass runs on the same thread: torch's OpenMP pool is created once (a
    forward from many request threads would start one spinning thread team per caller and
    slow everything down), and jobs queued while a pass runs share the next one (up to
    ``max_batch`` images).
    """

    def __init__(self, model, max_batch: int = 16, runtime: str = "auto", threads: int | None = None) -> None:
        self.model = model
        self.backbone = model.backbone
        self.backbone.model.eval()
        # made now, not on the first request: an export takes seconds, a session load 0.3 s
        self.choice = model.forward(runtime, threads)
        self.max_batch = max_batch
        # Decoding a large PNG takes width x height x 3 bytes; bound how many run at once.
        self._decode_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    def prepare(self, path: Path) -> torch.Tensor:
        """Decode (:func:`load_image`) and preprocess one file; raises :class:`ImageReadError`."""
        with self._decode_slots:
            image = load_image(path, target_size=self.image_size)
            try:
                return self.backbone.preprocess(image)
            except MemoryError:
                raise ImageReadError(path, "out of memory while preprocessing") from None

    def embed(self, x: torch.Tensor) -> np.ndarray:
        """``float32 [B, 3, S, S]`` -> embeddings ``float32 [B, E]`` (not normalised)."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="fewshot-embedder", daemon=True)
                self._thread.start()
        job = _Job(x)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop the worker thread (it is restarted by the next :meth:`embed`)."""
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join(30)
            self._thread = None

    def _work(self) -> None:
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.x)
            while n < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                n += len(nxt.x)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            batch = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
            vectors = np.asarray(self.model.transform(self.choice.forward(batch)), dtype=np.float32)
            offset = 0
            for j in jobs:
                j.result = vectors[offset:offset + len(j.x)]
                offset += len(j.x)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for j in jobs:
                j.error = exc
        finally:
            for j in jobs:
                j.done.set()
