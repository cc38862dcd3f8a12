"""Inference runtimes for the backbone's forward pass: torch eager or ONNX Runtime.

On a CPU, ONNX Runtime (CPUExecutionProvider, fp32) runs EfficientNet-Lite0 2-3x faster
than torch eager (channels-last, in slices of ``Backbone.cpu_batch`` images) on the same 2
threads, at about 70% of the float32 matrix-product rate of those cores, with the same
embeddings to float rounding (cosine >= 0.9999 per image; ``tests/embed/test_runtime.py`` checks it
on real photos, and ``bench/embed_throughput.py`` measures the speed). The backbone is exported once with
``torch.onnx.export`` (TorchScript exporter, opset :data:`OPSET`, dynamic batch axis) and the
``.onnx`` file is cached under ``$FEWSHOT_CACHE/onnx`` (see :func:`onnx_cache_dir`), keyed by
backbone name, weights digest, image size, preprocessing, test-time augmentation
(:attr:`~fewshot.backbones.Backbone.tta`) and exporter version, so a
fine-tuned backbone gets its own file. Each export is checked against torch before it is
used; the write is atomic and a sidecar JSON records the file's SHA-256, so a damaged cached
file is rebuilt, never used.

Runtimes: ``torch``; ``onnx``; ``auto`` (the default) = ``onnx`` when onnxruntime is
importable and the model is on the CPU, else ``torch``. A backbone that cannot be exported
(or whose export disagrees with torch) runs on torch, with one notice per command.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..backbones import Backbone
from ..backbones.base import weights_digest
from ..errors import BackboneError
from ..io import atomic_write_bytes, atomic_write_json

log = logging.getLogger("fewshot")

RUNTIMES = ("auto", "torch", "onnx")
#: ONNX opset of the exported graphs
OPSET = 17
#: bump when the export procedure changes, so that older cached files are not reused
EXPORT_FORMAT = 1
#: smallest cosine between the torch and ONNX embeddings of the export check
EXPORT_MIN_COSINE = 0.9999
_INPUT, _OUTPUT = "images", "embeddings"


def exporter_version() -> str:
    """What made an exported file: torch version, exporter, opset and our format number."""
    return f"torch{torch.__version__.split('+')[0]}-torchscript-opset{OPSET}-f{EXPORT_FORMAT}"


def onnx_available() -> bool:
    """Whether ``onnxruntime`` can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where exported models live: ``cache_dir/onnx`` when an embedding cache folder is given,
    else ``$FEWSHOT_CACHE/onnx`` (or ``$XDG_CACHE_HOME/fewshot/onnx``, ``~/.cache/fewshot/onnx``)."""
    if cache_dir is not None:
        return Path(cache_dir) / "onnx"
    base = os.environ.get("FEWSHOT_CACHE")
    if base:
        return Path(base) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fewshot" / "onnx"


def export_key(backbone: Backbone, digest: str | None = None) -> str:
    """File-name-safe key of an export: the backbone's name, image size, preprocessing and
    test-time augmentation (its cache key without the weights tag), its weights digest and
    :func:`exporter_version`. The
    digest alone names the weights, so a run that kept the pretrained weights (best epoch 0)
    shares the pretrained backbone's export."""
    digest = digest or weights_digest(backbone.model.state_dict())
    return f"{replace(backbone, weights_tag='onnx').cache_key}-w{digest}-{exporter_version()}"


@dataclass
class TorchForward:
    """Torch eager forward: ``float32 [B, 3, S, S]`` -> ``float32 [B, D]`` numpy, under
    ``torch.inference_mode``, channels-last where the backbone asks for it, and on a CPU in
    slices of at most :attr:`~fewshot.backbones.Backbone.cpu_batch` images."""

    backbone: Backbone
    name: str = "torch"

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        device = _model_device(self.backbone)
        step = self.backbone.cpu_batch if device.type == "cpu" and self.backbone.cpu_batch else len(batch)
        if len(batch) <= step:
            return self._run(batch.to(device))
        return np.concatenate([self._run(batch[i:i + step].to(device)) for i in range(0, len(batch), step)])

    def _run(self, batch: torch.Tensor) -> np.ndarray:
        if self.backbone.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.backbone.inference_module()(batch).float().cpu().numpy()


@dataclass
class OnnxForward:
    """ONNX Runtime forward of an exported backbone: same contract as :class:`TorchForward`.

    Attributes:
        session: the ``onnxruntime.InferenceSession`` (thread-safe for concurrent ``run``).
        path: the cached ``.onnx`` file it was loaded from, or the model's bytes when the
            cache folder could not be written.
        threads: intra-op threads of the session.
    """

    session: Any
    path: Path | bytes
    threads: int
    name: str = "onnx"
    _single: Any = field(default=None, init=False, repr=False)
    _single_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """One batch on ``threads`` intra-op threads (lowest latency for one batch)."""
        return _run(self.session, batch)

    @property
    def lanes(self) -> int:
        """How many batches :meth:`lane` should run at once: one per thread."""
        return self.threads

    def lane(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """One batch on a single thread, safe to call from :attr:`lanes` threads at once.

        For a stream of batches this beats one batch on every thread: each lane decodes
        its next batch while the others compute, and no thread waits at an intra-op barrier
        for a core that is busy decoding (``bench/embed_throughput.py``: about 1.1x the
        images/s on 2 cores)."""
        with self._single_lock:
            if self._single is None:
                self._single = _session(self.path, 1)
        return _run(self._single, batch)


def _run(session, batch: torch.Tensor | np.ndarray) -> np.ndarray:
    x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    out = session.run([_OUTPUT], {_INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return np.asarray(out, dtype=np.float32)


Forward = Callable[[torch.Tensor], np.ndarray]


class LazyForward:
    """A forward made on first use (``factory()``), so that nothing is exported or loaded
    when every image is already cached; passes :attr:`OnnxForward.lanes` through."""

    def __init__(self, factory: Callable[[], Forward]) -> None:
        self._factory = factory
        self._forward: Forward | None = None

    def get(self) -> Forward:
        if self._forward is None:
            self._forward = self._factory()
        return self._forward

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.get()(batch)

    @property
    def lanes(self) -> int:
        return int(getattr(self.get(), "lanes", 1))

    def lane(self, batch: torch.Tensor) -> np.ndarray:
        return self.get().lane(batch)  # type: ignore[attr-defined]


@dataclass
class ForwardChoice:
    """What :func:`make_forward` decided: the forward and, when it fell back to torch, why."""

    forward: TorchForward | OnnxForward
    requested: str
    notice: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return self.forward.name


def check_runtime(runtime: str) -> str:
    """Validate a ``--runtime`` value.

    Raises:
        BackboneError: not one of :data:`RUNTIMES`, or ``onnx`` without onnxruntime installed.
    """
    if runtime not in RUNTIMES:
        raise BackboneError(f"unknown runtime {runtime!r}", hint="use runtime='auto', 'torch' or 'onnx'",
                            options=("runtime",))
    if runtime == "onnx" and not onnx_available():
        raise BackboneError("runtime='onnx' needs the onnxruntime package, which is not installed",
                            hint="pip install onnxruntime (or use runtime='torch')", options=("runtime",))
    return runtime


def make_forward(backbone: Backbone, runtime: str = "auto", *, threads: int | None = None,
                 cache_dir: str | Path | None = None) -> ForwardChoice:
    """The forward pass to embed with.

    Args:
        backbone: the (possibly fine-tuned) backbone; exported as it is now.
        runtime: ``auto`` | ``torch`` | ``onnx`` (see the module docstring).
        threads: ONNX Runtime intra-op threads (default ``torch.get_num_threads()``).
        cache_dir: the embedding cache folder; exports go to :func:`onnx_cache_dir` of it.

    Returns:
        a :class:`ForwardChoice`; ``notice`` is set (and logged once) when ``onnx`` was asked
        for, explicitly or by ``auto``, but torch is used.

    Raises:
        BackboneError: an unknown runtime, or ``onnx`` without onnxruntime.
    """
    check_runtime(runtime)
    if runtime == "torch":
        return ForwardChoice(TorchForward(backbone), runtime)
    if not onnx_available():
        return _fallback(backbone, runtime, "onnxruntime is not installed (pip install onnxruntime)")
    if _model_device(backbone).type != "cpu":
        return ForwardChoice(TorchForward(backbone), runtime)  # a GPU: torch is the fast path there
    threads = threads or torch.get_num_threads()
    try:
        path = cached_export(backbone, onnx_cache_dir(cache_dir))
    except _ExportFailed as exc:
        return _fallback(backbone, runtime, str(exc))
    try:
        session = _session(path, threads)
    except Exception as exc:  # noqa: BLE001 - intact bytes that ONNX Runtime rejects: export again
        log.warning("cached ONNX model %s cannot be loaded (%s); exporting it again", path, exc)
        try:
            path = cached_export(backbone, onnx_cache_dir(cache_dir), force=True)
            session = _session(path, threads)
        except _ExportFailed as exc2:
            return _fallback(backbone, runtime, str(exc2))
    return ForwardChoice(OnnxForward(session, path, threads), runtime,
                         details={"onnx_file": str(path) if isinstance(path, Path) else None, "threads": threads})


def snapshot_forward(backbone: Backbone, threads: int | None = None) -> tuple[OnnxForward | None, str | None]:
    """An ONNX Runtime forward of ``backbone`` as it is now, exported to memory (nothing is
    cached: for weights that are about to change, e.g. validation during fine-tuning, where it
    embeds about 3x faster than torch on a CPU for the ~2 s an export costs).

    Returns:
        ``(forward, None)``, or ``(None, reason)`` when onnxruntime is missing, the model is
        not on the CPU, or the export failed or disagrees with torch (then embed with torch).
    """
    if not onnx_available():
        return None, "onnxruntime is not installed"
    if _model_device(backbone).type != "cpu":
        return None, "the model is not on the CPU"
    threads = threads or torch.get_num_threads()
    try:
        data = export_bytes(backbone)
        session = _session(data, threads)
    except _ExportFailed as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime rejected the bytes: use torch
        return None, f"ONNX Runtime cannot load the export ({type(exc).__name__}: {str(exc)[:200]})"
    return OnnxForward(session, data, threads), None


def _fallback(backbone: Backbone, requested: str, reason: str) -> ForwardChoice:
    notice = f"embedding with torch, not ONNX Runtime ({backbone.name}: {reason}); this is slower on a CPU"
    log.warning(notice)
    return ForwardChoice(TorchForward(backbone), requested, notice=notice)


def _model_device(backbone: Backbone) -> torch.device:
    p = next(iter(backbone.model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _session(path: Path | bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # no busy-waiting between runs: the decode thread needs the cores while a batch is prepared
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    source = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


class _ExportFailed(Exception):
    """The backbone cannot be exported, or its export disagrees with torch; ``transient``
    when the cause may pass (out of memory, an OS error), so no marker is left."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def cached_export(backbone: Backbone, folder: Path, *, force: bool = False) -> Path | bytes:
    """The ``.onnx`` file of ``backbone`` in ``folder``, exported now if there is no intact one.

    Returns the file, or the model's bytes when ``folder`` cannot be written (with a warning).
    A cached file is used only when its sidecar ``.json`` names the same key and SHA-256 and
    ONNX Runtime loads it; otherwise it is rebuilt (with a warning when it was damaged). A
    backbone that failed to export leaves a ``.failed.json`` marker so later commands do
    not retry (the marker names the exporter version, so a new torch tries again).
    ``force`` exports again even when the cached file looks intact.

    Raises:
        _ExportFailed: the export failed now or earlier (the reason is the message).
    """
    key = export_key(backbone)
    path, meta_path, failed = (folder / f"{key}.onnx", folder / f"{key}.json", folder / f"{key}.failed.json")
    reason = _failed_before(failed)
    if reason is not None:
        raise _ExportFailed(f"{reason} (an earlier export; delete {failed} to try again)")
    if path.is_file() and not force:
        problem = _check_cached(path, meta_path, key)
        if problem is None:
            return path
        log.warning("cached ONNX model %s is damaged (%s); exporting it again", path, problem)
    try:
        data = export_bytes(backbone)
    except _ExportFailed as exc:
        if not exc.transient:  # out of memory or a full disk may pass: try again next time
            with contextlib.suppress(OSError):
                atomic_write_json(failed, {"key": key, "reason": str(exc), "exporter": exporter_version()})
        raise
    try:
        atomic_write_bytes(path, data)
        atomic_write_json(meta_path, {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                      "exporter": exporter_version(), "backbone": backbone.describe(),
                                      "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    except OSError as exc:  # a read-only or full cache folder: run from memory, export again next time
        log.warning("cannot cache the ONNX export in %s (%s); using it from memory (it is exported again "
                    "next time: set $FEWSHOT_CACHE or --cache-dir to a writable folder)", folder,
                    exc.strerror or exc)
        return data
    return path


def _failed_before(marker: Path) -> str | None:
    """The reason recorded by an earlier failed export, or ``None``."""
    try:
        return str(json.loads(marker.read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_cached(path: Path, meta_path: Path, key: str) -> str | None:
    """Why a cached export cannot be used, or ``None`` when it is intact."""
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"its record {meta_path.name} is missing"
    except (OSError, ValueError) as exc:
        return f"its record {meta_path.name} is unreadable: {exc}"
    if not isinstance(meta, dict):
        return f"its record {meta_path.name} is not a JSON object"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if meta.get("key") != key or meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return "its SHA-256 differs from the one recorded at export"
    return None


def export_bytes(backbone: Backbone) -> bytes:
    """Export ``backbone.inference_module()`` (eval mode, batch axis dynamic; with its test-time
    augmentation) to ONNX and check it: the
    torch and ONNX Runtime embeddings of a seeded random batch must agree (cosine >=
    :data:`EXPORT_MIN_COSINE`).

    Raises:
        _ExportFailed: the exporter raised, or the check failed.
    """
    was_training = backbone.model.training  # the wrapper of a --tta flip / scales backbone is new each time
    backbone.model.eval()
    model = backbone.inference_module()
    size = backbone.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=OPSET, input_names=[_INPUT],
                              output_names=[_OUTPUT], dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}})
        data = buf.getvalue()
        _check_export(data, TorchForward(backbone)(x), x)
    except (_ExportFailed, BackboneError):  # a backbone that cannot embed at all (--tta scales too small) says so
        raise
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: use torch
        first = (str(exc).splitlines() or [""])[0][:200]
        raise _ExportFailed(f"ONNX export failed: {type(exc).__name__}: {first}",
                            transient=isinstance(exc, (MemoryError, OSError))) from None
    finally:
        backbone.model.train(was_training)
    return data


def _check_export(data: bytes, expected: np.ndarray, x: torch.Tensor) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([_OUTPUT], {_INPUT: x.numpy()})[0]
    if got.shape != expected.shape:
        raise _ExportFailed(f"the exported model gives shape {got.shape}, torch {expected.shape}")
    cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)
    if not np.all(cos >= EXPORT_MIN_COSINE):
        raise _ExportFailed(f"the exported model disagrees with torch (cosine {cos.min():.6f})")
