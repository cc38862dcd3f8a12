"""The HTTP service: classify photos against a catalogue index, enrol and remove articles.

:func:`create_app` returns a FastAPI application over one index folder (written by
``fewshot index`` / :func:`fewshot.pipeline.build_index`)::

    GET    /                         web page: upload a photo, see the top-k articles; enrol form
    GET    /health                   status, catalogue size, backbone
    POST   /classify?top_k=5&mode=prototype    multipart field ``file`` -> top-k articles + nearest images
    GET    /articles                 the catalogue's articles
    POST   /articles                 form ``label``, ``group``, one or more ``files``: enrol (no retraining)
    DELETE /articles/{label}         remove an article
    GET    /catalogue-image/{id}     a thumbnail of one catalogue image (only images in the index)
    GET    /docs, /openapi.json      OpenAPI, as FastAPI serves it

Design:

* **Same embedding as the index.** Uploads are decoded with :func:`fewshot.data.images.load_image`
  and embedded by the index's own model (:func:`fewshot.pipeline.model_for_index`: same
  backbone, image size, trained head), exactly as :func:`fewshot.embed.embed_paths` does.
  Concurrent requests are batched into one forward pass (:class:`fewshot.serve.batcher.Embedder`).
* **Incremental, durable changes.** A mutation (enrol, delete) changes only its article: the
  photos are written into ``INDEX_DIR/enrolled/<article>/`` (fsync'ed), then one journal entry
  with the article's vectors is appended (:meth:`fewshot.index.CatalogueIndex.append_change`),
  and only then is the change applied in memory and acknowledged. The index folder is never
  rewritten per request: a crash loses no acknowledged change, and a half-written entry is
  ignored. When the journal holds :data:`COMPACT_AFTER` entries the service compacts the folder
  at start-up (one atomic rewrite; photos of removed articles are dropped then). Index reads and
  changes take one lock (the embedding runs outside it); racing enrolments are serialised.
* **One writer, known callers.** The service holds the index folder's writer lock
  (:func:`fewshot.io.writer_lock`) for its lifetime: a second service on the folder is refused.
  Changes need the write token; host names and browser origins are checked
  (:mod:`fewshot.serve.security`); each change is appended to ``INDEX_DIR/audit.jsonl``.
  Responses name images relative to the data folder, never by a server path.
* **Bad input never changes the index and never gives a 500:** unreadable, non-image,
  decompression-bomb or oversize uploads, unknown labels, empty enrolments are answered with a
  4xx and ``{"error": CODE, "message": TEXT, "hint": FIX}``. Oversize requests are refused from
  their ``Content-Length`` before the body is read, or as soon as a streamed body passes the limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from ..data.images import load_image
from ..embed import read_digests
from ..errors import FewshotError, ImageReadError, InputError
from ..index import ENROLLED_DIR as INDEX_ENROLLED_DIR, CatalogueIndex, Change
from ..index.journal import Journal
from ..index.enrolled import slug
from ..index.labels import clean_label, normalize_label, resolve_group
from ..io import writer_lock
from .batcher import Embedder
from .http import ApiError, BodyLimit, mb, too_large_hint
from .security import Access, AuditLog, Guard, new_token

log = logging.getLogger("fewshot.serve")

__all__ = ["create_app", "ApiError", "DEFAULT_MAX_UPLOAD_BYTES", "MAX_ENROL_FILES", "ENROLLED_DIR"]

#: Largest accepted image upload, per file (``fewshot serve --max-upload-mb``).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Most photos accepted in one enrolment request.
MAX_ENROL_FILES = 16
#: Sub-folder of the index folder that holds enrolled photos.
ENROLLED_DIR = INDEX_ENROLLED_DIR
#: Hidden sub-folder of the index folder for the uploads of requests in progress.
UPLOAD_DIR = ".uploads"
#: Journal entries after which the service compacts the index folder when it starts.
COMPACT_AFTER = 500
#: Allowance for multipart boundaries and form fields on top of the file bytes.
_MULTIPART_OVERHEAD = 64 * 1024
_STATIC = Path(__file__).resolve().parent / "static"
_FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp",
                  "GIF": ".gif", "TIFF": ".tif"}


# --------------------------------------------------------------------------- catalogue state
def image_id(path: str) -> str:
    """Stable public id of a catalogue image (its path never leaves the server as a URL)."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


class _Catalogue:
    """The live catalogue: the index plus the public image ids, changed in place under ``lock``.

    ``path_of`` maps each image id to its path; ``first_image`` each article to its first image.
    """

    def __init__(self, index: CatalogueIndex) -> None:
        self.index = index
        self.lock = threading.RLock()
        data = Path(str(index.config.get("data") or ""))
        self.data_root = (data.parent if data.suffix.lower() in (".csv", ".tsv") else data) if data.is_absolute() else None
        self.path_of = {image_id(p): p for p in index.paths}
        self.first_image: dict[str, str] = {}
        for label, path in zip(index.labels, index.paths):
            self.first_image.setdefault(label, path)

    def name_of(self, path: str) -> str:
        """The name a response shows for a catalogue image: relative to the data folder (or to the
        index folder, for enrolled photos), never a server path."""
        p = Path(path)
        if not p.is_absolute():
            return p.as_posix()
        if self.data_root is not None and p.is_relative_to(self.data_root):
            return p.relative_to(self.data_root).as_posix()
        return p.name

    def added(self, label: str, paths: list[str]) -> None:
        self.path_of.update((image_id(p), p) for p in paths)
        self.first_image.setdefault(label, paths[0])

    def removed(self, label: str, paths: list[str]) -> None:
        for p in paths:
            self.path_of.pop(image_id(p), None)
        self.first_image.pop(label, None)


class _Service:
    """The state behind the routes: the catalogue snapshot, the model, the locks."""

    def __init__(self, index_dir: Path, max_upload_bytes: int, model=None, runtime: str = "auto",
                 threads: int | None = None, access: Access | None = None, read_only: bool = False) -> None:
        self.index_dir = Path(index_dir).resolve()
        self.access = access or Access(write_token=new_token())
        self.read_only = read_only
        self._writer = contextlib.ExitStack()
        if not self.index_dir.is_dir():  # say so as a missing index, before a lock file is made beside it
            CatalogueIndex.load(self.index_dir)
        if not read_only:  # the one writer of this folder for the service's lifetime
            self._writer.enter_context(writer_lock(self.index_dir, "fewshot serve", owner=self))
        try:
            self._open(max_upload_bytes, model, runtime, threads)
        except BaseException:
            self._writer.close()
            raise

    def close(self) -> None:
        """Stop the embedding thread and release the index folder's writer lock."""
        self.embedder.close()
        self._writer.close()

    def _open(self, max_upload_bytes: int, model, runtime: str, threads: int | None) -> None:
        index = CatalogueIndex.load(self.index_dir)
        if model is None:
            from ..pipeline import model_for_index

            model = model_for_index(index, self.index_dir)
        self.model = model
        from ..errors import CheckpointError
        from ..pipeline import index_tta

        if model.dim != index.dim:
            raise CheckpointError(
                f"the model gives {model.dim}-dimensional embeddings but index {self.index_dir} "
                f"has {index.dim}", hint="serve the index with the model it was built with")
        built_with = index_tta(index.config)
        if model.backbone.tta != built_with:
            raise CheckpointError(
                f"the model embeds with test-time augmentation {model.backbone.tta!r} but index "
                f"{self.index_dir} was built with {built_with!r}",
                hint="serve the index with the model it was built with (leave model out to use it)")
        self.embedder = Embedder(model, runtime=runtime, threads=threads)
        self.max_upload_bytes = int(max_upload_bytes)
        self.cat = _Catalogue(index)
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.enrolled_root = self.index_dir / ENROLLED_DIR
        self.upload_dir = self.index_dir / UPLOAD_DIR
        self.audit = AuditLog(self.index_dir)
        if self.read_only:
            return
        self._drop_leftovers(index)
        if len(Journal(self.index_dir)) >= COMPACT_AFTER:
            self.compact()

    def _drop_leftovers(self, index: CatalogueIndex) -> None:
        """Remove what a crash mid-change left: temporary journal entries and photos, enrolled
        photos no acknowledged change references, uploads of requests in progress (all written
        by this service)."""
        journal = self.index_dir / "journal"
        stale = list(journal.glob(".*.tmp")) if journal.is_dir() else []
        if self.enrolled_root.is_dir():
            referenced = set(index.enrolled_files(self.index_dir))
            stale += [f for f in self.enrolled_root.rglob("*") if f.is_file() and f not in referenced]
        for f in stale:
            self._remove(f)
        uploads = sum(f.is_file() for f in self.upload_dir.rglob("*")) if self.upload_dir.is_dir() else 0
        shutil.rmtree(self.upload_dir, ignore_errors=True)  # requests in progress when the service stopped
        if stale or uploads:
            log.warning("removed %d file(s) left by an interrupted change in %s", len(stale) + uploads,
                        self.index_dir)

    # ------------------------------------------------------------------ uploads
    def _scratch(self, what: str):
        """A private temporary folder for one request's uploads, inside ``INDEX_DIR/.uploads``
        (not the system's temporary folder): what a killed request leaves there is removed
        when the service starts again."""
        if self.read_only:  # classify only: nothing may be written beside the index
            return tempfile.TemporaryDirectory(prefix=f"fewshot-{what}-")
        self.upload_dir.mkdir(exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=f"{what}-", dir=self.upload_dir)

    def receive_upload(self, upload: UploadFile, tmpdir: Path, n: int) -> tuple[Path, str]:
        """Copy one upload into ``tmpdir`` (size-checked); returns ``(path, display name)``."""
        name = os.path.basename(upload.filename or "") or f"upload {n + 1}"
        size = upload.size
        if size is None:
            upload.file.seek(0, os.SEEK_END)
            size = upload.file.tell()
        if size > self.max_upload_bytes:
            raise ApiError(413, "upload_too_large",
                           f"'{name}' is {mb(size)}, above this service's limit of "
                           f"{mb(self.max_upload_bytes)} per image", hint=too_large_hint())
        if size == 0:
            raise ApiError(400, "unreadable_image", f"cannot read image '{name}': empty file (0 bytes)",
                           hint="send a JPEG, PNG or WebP photo")
        path = tmpdir / f"upload-{n}"
        upload.file.seek(0)
        with open(path, "wb") as fh:
            shutil.copyfileobj(upload.file, fh, 1024 * 1024)
        return path, name

    def decode(self, path: Path, name: str) -> torch.Tensor:
        try:
            return self.embedder.prepare(path)
        except ImageReadError as exc:
            raise ApiError(400, "unreadable_image", f"cannot read image '{name}': {exc.reason}",
                           hint="send a photo as JPEG, PNG or WebP, at most "
                                f"{int(np.sqrt(_max_pixels()))} x {int(np.sqrt(_max_pixels()))} pixels",
                           file=name) from None

    # ------------------------------------------------------------------ requests
    def health(self) -> dict:
        """Service status: version, index folder, catalogue size, model, limits."""
        b = self.model.backbone
        with self.cat.lock:
            index = self.cat.index
            articles, images, kind = len(index.articles), len(index), index.ann.kind
        return {"status": "ok", "version": __version__, "index": self.index_dir.name,
                "articles": articles, "images": images, "index_type": kind,
                "backbone": b.name, "image_size": b.image_size, "embedding_dim": self.cat.index.dim,
                "model": Path(self.model.run_dir).name if getattr(self.model, "run_dir", None) else None,
                "writes_need_token": self.access.write_token is not None,
                "reads_need_token": self.access.read_token is not None,
                "max_upload_bytes": self.max_upload_bytes, "max_enrol_files": MAX_ENROL_FILES,
                "read_only": self.read_only}

    def _check_writable(self) -> None:
        if self.read_only:
            raise ApiError(403, "read_only", "this service was started with --read-only: it classifies, and "
                           "changes nothing", hint="restart it without --read-only to enrol or delete articles")

    def classify(self, file: UploadFile, top_k: int, mode: str, neighbors: int) -> dict:
        """Top-k articles and nearest catalogue images for one uploaded photo; ``in_catalogue``
        lists the catalogue images with exactly its content."""
        start = time.perf_counter()
        with self._scratch("classify") as tmp:
            path, name = self.receive_upload(file, Path(tmp), 0)
            x = self.decode(path, name)
            digest = read_digests([path])[0][0]
        vector = self.embedder.embed(x.unsqueeze(0))
        with self.cat.lock:
            index = self.cat.index
            if len(index.articles) == 0:  # pragma: no cover - deleting the last article is refused
                raise ApiError(409, "empty_catalogue", "the catalogue has no articles",
                               hint="enrol an article with POST /articles")
            preds = index.classify(vector, top_k=top_k, mode=mode)[0]
            wide = index.search(vector, k=max(neighbors, min(len(index), 256)))[0]
            best_image: dict[str, tuple[str, float]] = {}
            neighbor_list = []
            for rank, nb in enumerate(wide):
                iid = image_id(nb.path)
                best_image.setdefault(nb.label, (iid, nb.score))
                if rank < neighbors:
                    neighbor_list.append({"label": nb.label, "group": nb.group, "score": round(nb.score, 6),
                                          "name": self.cat.name_of(nb.path), "image_id": iid, "image_url": _image_url(iid)})
            predictions = []
            for p in preds:
                iid, iscore = best_image.get(p.label, (image_id(self.cat.first_image[p.label]), None))
                predictions.append({**p.to_dict(), "num_images": index.num_images(p.label),
                                    "image_id": iid, "image_url": _image_url(iid),
                                    "image_score": None if iscore is None else round(iscore, 6)})
            in_catalogue = [image_id(index.paths[i]) for i in index.find_images([digest])[0]]
            num_articles = len(index.articles)
        return {"file": name, "mode": mode, "top_k": top_k, "predictions": predictions,
                "neighbors": neighbor_list, "num_articles": num_articles, "in_catalogue": in_catalogue,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 1)}

    def articles(self) -> dict:
        """Every article with its group, image count, thumbnail and whether it was enrolled here."""
        out = []
        with self.cat.lock:
            index = self.cat.index
            for label, group in zip(index.articles, index.article_groups):
                first = self.cat.first_image[label]
                iid = image_id(first)
                out.append({"label": label, "group": group, "num_images": index.num_images(label),
                            "enrolled": self.is_enrolled(first),
                            "image_id": iid, "image_url": _image_url(iid)})
            images = len(index)
        return {"count": len(out), "images": images, "articles": out}

    def enrol(self, label: str | None, group: str | None, files: list[UploadFile] | None,
              who: tuple[str | None, str | None] = (None, None)) -> dict:
        """Add an article (or photos of an existing one) from uploaded photos; all or nothing."""
        self._check_writable()
        label = _clean_text(label, "label", required=True)
        group = _clean_text(group, "group", required=False)
        files = [f for f in (files or []) if f.filename or f.size]
        if not files:
            raise ApiError(422, "empty_enrolment", f"no photos were sent for article '{label}'",
                           hint=f"attach 1 to {MAX_ENROL_FILES} photos in the form field 'files'")
        if len(files) > MAX_ENROL_FILES:
            raise ApiError(422, "too_many_files", f"{len(files)} photos sent; at most {MAX_ENROL_FILES} "
                           "per request", hint="enrol the rest in a second request with the same label")
        assert label is not None
        with self._scratch("enrol") as tmp:
            received = [self.receive_upload(f, Path(tmp), n) for n, f in enumerate(files)]
            vectors = self.embedder.embed(torch.stack(self._decode_all(received)))
            folder = self.enrolled_root / slug(label)
            new_files = [(src, folder / f"{uuid.uuid4().hex[:12]}{suffix}")
                         for src, suffix in (_stored_copy(path) for path, _ in received)]
            with self.cat.lock:
                index = self.cat.index
                created = not index.has_article(label)
                group = group if created else _existing_group(index, label, group)
                paths = [dst.relative_to(self.index_dir).as_posix() for _, dst in new_files]  # the folder can move
                change = Change("add", label, group, vectors, paths, read_digests([s for s, _ in new_files])[0])
                self._write_durably(new_files, lambda: index.append_change(self.index_dir, change, owner=self))
                self.cat.added(label, paths)
                num_images, articles, images = index.num_images(label), len(index.articles), len(index)
                self.audit.write(*who, "enrol", label=label, group=group, created=created, images=len(paths))
        return {"label": label, "group": group, "created": created, "added": len(new_files),
                "num_images": num_images, "articles": articles, "images": images}

    def _write_durably(self, new_files: list[tuple[Path, Path]], append: Callable[[], object]) -> None:
        """Store the photos (fsync'ed), then ``append`` the journal entry; on any failure the
        photos written here are removed again and nothing changed."""
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
                self._remove(path)
            raise

    def _remove(self, path: Path) -> None:
        """Delete a file this service wrote, and the folders above it (below INDEX_DIR) that
        this leaves empty."""
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.index_dir or not folder.is_relative_to(self.index_dir):
                break
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break

    def _decode_all(self, received: list[tuple[Path, str]]) -> list[torch.Tensor]:
        tensors, bad = [], []
        for path, name in received:
            try:
                tensors.append(self.decode(path, name))
            except ApiError as exc:
                bad.append({"file": name, "message": exc.message})
        if bad:
            raise ApiError(400, "unreadable_image", "; ".join(b["message"] for b in bad) + " (nothing was enrolled)",
                           hint="send photos as JPEG, PNG or WebP", files=bad)
        return tensors

    def delete(self, label: str, who: tuple[str | None, str | None] = (None, None)) -> dict:
        """Remove an article and its images (the last article cannot be removed)."""
        self._check_writable()
        label = normalize_label(label)  # as the enrolment stored it
        with self.cat.lock:
            index = self.cat.index
            if not index.has_article(label):
                raise ApiError(404, "unknown_article", f"no article '{label}' in the catalogue",
                               hint="GET /articles lists the labels")
            if len(index.articles) == 1:
                raise ApiError(409, "last_article", f"'{label}' is the only article left; a catalogue "
                               "cannot be empty", hint="enrol another article first")
            paths = index.article_paths(label)
            index.append_change(self.index_dir, Change("remove", label), owner=self)
            self.cat.removed(label, paths)
            self._drop_enrolled(paths)
            articles, images = len(index.articles), len(index)
            self.audit.write(*who, "delete", label=label, images=len(paths))
        return {"deleted": label, "images_removed": len(paths), "articles": articles, "images": images}

    def catalogue_image(self, image_id_: str, size: int) -> bytes:
        """JPEG thumbnail of the catalogue image with this id."""
        with self.cat.lock:
            path = self.cat.path_of.get(image_id_)
        if path is None:
            raise ApiError(404, "unknown_image", f"no catalogue image with id '{image_id_}'",
                           hint="use the image_id values returned by /classify or /articles")
        return self.thumbnail(image_id_, path, size)

    def _drop_enrolled(self, paths: list[str]) -> None:
        """Delete the photos this service enrolled for a removed article (after the removal is
        in the journal: a crash before this only leaves files that compaction drops)."""
        for p in paths:
            if self.is_enrolled(p):
                self._remove(self.resolve(p))

    # ------------------------------------------------------------------ compaction
    def compact(self) -> None:
        """Rewrite the index folder without its journal, as one atomic folder write; the
        enrolled photos the index still references go along, those of removed articles are
        dropped (:meth:`fewshot.index.CatalogueIndex.save`)."""
        with self.cat.lock:
            index = self.cat.index
            index.save(self.index_dir, owner=self)
        log.info("compacted index %s (%d images)", self.index_dir, len(index))

    def is_enrolled(self, path: str) -> bool:
        """Whether catalogue image ``path`` is a photo this service enrolled (in ``enrolled/``)."""
        return self.resolve(path).is_relative_to(self.enrolled_root)

    # ------------------------------------------------------------------ thumbnails
    def thumbnail(self, iid: str, path_text: str, size: int) -> bytes:
        """JPEG thumbnail of the catalogue image ``iid`` at ``path_text`` (cached by id)."""
        key = (iid, size)
        with self._thumbs_lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        path = self.resolve(path_text)
        try:
            image = load_image(path, target_size=size)
        except ImageReadError as exc:
            raise ApiError(404, "image_unavailable",
                           f"catalogue image {iid} cannot be read on the server: {exc.reason}") from None
        image.thumbnail((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=82, optimize=True)
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return data

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.index_dir / p


def _existing_group(index: CatalogueIndex, label: str, group: str | None) -> str | None:
    """The group of an existing article (:func:`fewshot.index.labels.resolve_group`); a
    different ``group`` is a 409."""
    try:
        return resolve_group(index, label, group)
    except InputError as exc:
        raise _input_error(exc) from None


def _input_error(exc: InputError) -> ApiError:
    """The answer to a refused label or group: 409 for ``group_conflict``, else 422 (same code)."""
    return ApiError(409 if exc.code == "group_conflict" else 422, exc.code, exc.message, exc.hint)


def _max_pixels() -> int:
    from ..data.images import MAX_IMAGE_PIXELS

    return MAX_IMAGE_PIXELS


def _clean_text(value: str | None, what: str, required: bool) -> str | None:
    """The label or group as stored (:func:`fewshot.index.labels.clean_label`); refused: a 422."""
    try:
        return clean_label(value, what, required=required)
    except InputError as exc:
        raise _input_error(exc) from None


def _image_url(image_id_: str, size: int = 160) -> str:
    return f"/catalogue-image/{image_id_}?size={size}"


# --------------------------------------------------------------------------- the app
def create_app(index_dir: str | os.PathLike, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               model=None, runtime: str = "auto", threads: int | None = None,
               access: Access | None = None, read_only: bool = False) -> FastAPI:
    """The FastAPI application serving the catalogue index in ``index_dir``.

    Args:
        index_dir: an index folder written by ``fewshot index``; enrolments and deletions
            append to its journal (a crash loses no acknowledged change).
        max_upload_bytes: largest accepted image, per file (default 10 MB). A classify
            request may be this plus 64 KB of multipart overhead; an enrolment request
            :data:`MAX_ENROL_FILES` times this.
        model: the :class:`~fewshot.model.EmbeddingModel` to embed uploads with;
            default :func:`fewshot.pipeline.model_for_index` (the index's own backbone/run).
        runtime, threads: the forward pass (:func:`fewshot.embed.make_forward`): ``auto``
            (ONNX Runtime on a CPU when installed) | ``torch`` | ``onnx``; its threads.
        access: tokens, host names and origins (:class:`fewshot.serve.security.Access`); default:
            changes need a new random write token (``app.state.access.write_token``), reads are
            open, any ``Host`` is accepted (``fewshot serve`` checks it), other origins refused.
        read_only: classify only (enrolment and deletion answer 403): no writer lock, nothing
            written beside the index, so it can be served from a read-only volume.

    The application holds the index folder's writer lock until its lifespan ends (or
    ``app.state.service.close()``): a second service on the same folder is refused.

    Raises:
        CheckpointError: the index folder is missing or damaged, its model changed since it
            was built, or ``model`` does not match its embedding dimension.
        FolderBusyError: another writer (another service, ``fewshot index``) holds the folder.
    """
    if max_upload_bytes <= 0:
        raise FewshotError(f"upload limit must be positive, got {max_upload_bytes} bytes",
                           hint="use e.g. --max-upload-mb 10")
    access = access or Access(write_token=new_token())
    service = _Service(Path(index_dir), max_upload_bytes, model, runtime, threads, access, read_only)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.close()

    app = FastAPI(
        lifespan=lifespan,
        title="fewshot catalogue service",
        version=__version__,
        description="Classify product photos against a few-shot catalogue and enrol new articles "
                    "without retraining. Errors are JSON: `{\"error\": code, \"message\": text, \"hint\": fix}`.",
    )
    app.state.service = service
    app.state.access = access
    app.add_middleware(BodyLimit, limit_for=_body_limits(max_upload_bytes))
    _add_access_middleware(app, access)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    app.include_router(_router(service))
    return app


def _add_access_middleware(app: FastAPI, access: Access) -> None:
    """Host names, tokens and origins (:class:`Guard`), and outside it the preflight answers for
    ``--allow-origin`` (each added middleware wraps the ones before it)."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(Guard, access=access)
    if access.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(access.allowed_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization"])


def _body_limits(max_upload_bytes: int) -> Callable[[str, str], tuple[int, str] | None]:
    """``limit_for(method, path)``: the largest request body each endpoint accepts, and why."""
    classify_limit = max_upload_bytes + _MULTIPART_OVERHEAD
    enrol_limit = max_upload_bytes * MAX_ENROL_FILES + _MULTIPART_OVERHEAD

    def limit_for(method: str, path: str) -> tuple[int, str] | None:
        if method == "POST" and path.rstrip("/") == "/classify":
            return classify_limit, f"one photo of at most {mb(max_upload_bytes)}"
        if method == "POST" and path.rstrip("/") == "/articles":
            return enrol_limit, f"up to {MAX_ENROL_FILES} photos of at most {mb(max_upload_bytes)} each"
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            return _MULTIPART_OVERHEAD, "no request body here"
        return None

    return limit_for


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"error", "message", "hint"}`` with a 4xx (or 500) status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}.get(
            exc.status_code, "bad_request" if exc.status_code < 500 else "server_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
            msg = err.get("msg", "invalid")
            if err.get("type") == "missing":
                msg = "required but missing"
            problems.append(f"{loc}: {msg}" if loc else msg)
        return JSONResponse({"error": "invalid_request", "message": "; ".join(problems) or "invalid request",
                             "hint": "see /docs for the expected parameters"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal_error",
                             "message": f"unexpected server error ({type(exc).__name__})"}, status_code=500)


def _router(service: "_Service") -> APIRouter:
    """The routes: each one validates its parameters and calls the service."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(_STATIC / "index.html", media_type="text/html")

    @router.get("/health", summary="Service status and catalogue size")
    def health() -> dict:
        return service.health()

    @router.post("/classify", summary="Top-k articles for one photo, with the nearest catalogue images")
    def classify(
        file: UploadFile = File(..., description="The photo (JPEG, PNG, WebP, ...)."),
        top_k: int = Query(5, ge=1, le=100, description="Articles to return."),
        mode: str = Query("prototype", pattern="^(prototype|nearest)$",
                          description="prototype: cosine to the article's mean embedding; "
                                      "nearest: the article's best catalogue image."),
        neighbors: int = Query(8, ge=0, le=100, description="Nearest catalogue images to return."),
    ) -> dict:
        return service.classify(file, top_k, mode, neighbors)

    @router.get("/articles", summary="The catalogue's articles")
    def list_articles() -> dict:
        return service.articles()

    @router.post("/articles", status_code=201,
                 summary="Enrol an article from a few photos (added to the index at once, no retraining)")
    def enrol(
        request: Request,
        label: Optional[str] = Form(None, description="Article name (new, or existing to add photos)."),
        group: Optional[str] = Form(None, description="Group / brand / coarse class (optional)."),
        files: Optional[List[UploadFile]] = File(None, description=f"1 to {MAX_ENROL_FILES} photos "
                                                                   "of the article."),
    ) -> dict:
        return service.enrol(label, group, files, who=_who(request))

    @router.delete("/articles/{label:path}", summary="Remove an article and its images from the catalogue")
    def delete_article(request: Request, label: str = PathParam(..., description="The article's label.")) -> dict:
        return service.delete(label, who=_who(request))

    @router.get("/catalogue-image/{image_id}", summary="Thumbnail of one catalogue image",
                response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def catalogue_image(image_id: str = PathParam(..., pattern="^[0-9a-f]{16}$"),
                        size: int = Query(160, ge=32, le=512)) -> Response:
        data = service.catalogue_image(image_id, size)
        cache = "private" if service.access.read_token else "public"  # behind a read token: no shared caches
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": f"{cache}, max-age=600"})

    return router


def _who(request: Request) -> tuple[str | None, str | None]:
    """``(token id, client address)`` of a request, for the audit log."""
    return getattr(request.state, "token_id", None), request.client.host if request.client else None


def _stored_copy(path: Path) -> tuple[Path, str]:
    """``(file to store, suffix)`` for a decoded upload, named by its real format.

    Common formats are stored byte for byte; anything else Pillow decoded (PPM, ICO, ...) is
    stored as PNG so the dataset loaders, which go by suffix, still see an image.
    """
    try:
        with Image.open(path) as im:
            suffix = _FORMAT_SUFFIX.get(im.format or "")
    except Exception:  # pragma: no cover - it was decoded a moment ago
        suffix = None
    if suffix:
        return path, suffix
    png = path.with_name(path.name + ".png")
    load_image(path).save(png, "PNG")
    return png, ".png"
