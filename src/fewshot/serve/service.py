"""The state behind the service's routes: one :class:`~fewshot.catalogue.Catalogue` held for the
service's lifetime, the embedding batcher, upload checks and thumbnails.

:class:`Service` turns requests into catalogue calls and catalogue results into JSON answers: it
checks uploads (size, decodability) and labels, embeds through the :class:`~fewshot.serve.batcher.Embedder`
(concurrent requests batched into one forward pass), classifies with
:func:`fewshot.catalogue.classify_embedded` and changes the catalogue durably
(:meth:`fewshot.catalogue.Catalogue.enrol` / :meth:`~fewshot.catalogue.Catalogue.delete`, which
own the index folder's files). Catalogue images are named by public ids (:func:`image_id`),
never by server paths.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from fastapi import UploadFile
from PIL import Image

from ..version import __version__
from ..catalogue import Catalogue, classify_embedded
from ..catalogue.check import check_article
from ..catalogue.labels import clean_label, normalize_label, resolve_group
from ..data.images import load_image
from ..embed import read_digests
from ..errors import ImageReadError, InputError
from ..index import CatalogueIndex
from .batcher import Embedder
from .http import ApiError, mb, too_large_hint
from .security import Access, AuditLog

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "MAX_ENROL_FILES", "Service", "image_id"]

#: Largest accepted image upload, per file (``fewshot serve --max-upload-mb``).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Most photos accepted in one enrolment request.
MAX_ENROL_FILES = 16
_FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp",
                  "GIF": ".gif", "TIFF": ".tif"}


def image_id(path: str) -> str:
    """Stable public id of a catalogue image (its path never leaves the server as a URL)."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


class ImageIds:
    """The public ids of the catalogue's images, changed with it (under the catalogue's lock).

    ``path_of`` maps each image id to its path; ``first_image`` each article to its first image.
    """

    def __init__(self, index: CatalogueIndex) -> None:
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



class Service:
    """The state behind the routes: the catalogue (its folder's writer lock held by
    :meth:`Catalogue.open`), the model's batcher, the access rules, the audit log."""

    def __init__(self, catalogue: Catalogue, max_upload_bytes: int, runtime: str = "auto",
                 threads: int | None = None, access: Access | None = None) -> None:
        self.catalogue = catalogue
        self.index_dir = catalogue.folder
        self.model = catalogue.model
        self.access = access
        self.read_only = catalogue.read_only
        self.embedder = Embedder(self.model, runtime=runtime, threads=threads)
        self.max_upload_bytes = int(max_upload_bytes)
        self.ids = ImageIds(catalogue.index)
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.audit = AuditLog(self.index_dir)

    def close(self) -> None:
        """Stop the embedding thread and release the index folder's writer lock."""
        self.embedder.close()
        self.catalogue.close()

    # ------------------------------------------------------------------ uploads
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
        with self.catalogue.lock:
            index = self.catalogue.index
            articles, images, kind = len(index.articles), len(index), index.ann.kind
            whitened = index.whitening is not None
        return {"status": "ok", "version": __version__, "index": self.index_dir.name,
                "articles": articles, "images": images, "index_type": kind, "whitened": whitened,
                "backbone": b.name, "image_size": b.image_size, "embedding_dim": self.catalogue.index.dim,
                "model": Path(self.model.run_dir).name if getattr(self.model, "run_dir", None) else None,
                "writes_need_token": self.access.write_token is not None,
                "reads_need_token": self.access.read_token is not None,
                "max_upload_bytes": self.max_upload_bytes, "max_enrol_files": MAX_ENROL_FILES,
                "read_only": self.read_only}

    def _check_writable(self) -> None:
        if self.read_only:
            raise ApiError(403, "read_only", "this service was started with --read-only: it classifies, and "
                           "changes nothing", hint="restart it without --read-only to enrol or delete articles")

    def classify(self, file: UploadFile, top_k: int, mode: str, neighbors: int, reject: str = "auto",
                 target_far: float = 0.05, open_score: str = "relative") -> dict:
        """Top-k articles and nearest catalogue images for one uploaded photo, and the ``answer``
        (its article, or ``unknown`` below the reject threshold, :mod:`fewshot.catalogue.reject`);
        ``reject`` says which threshold was used; ``in_catalogue`` lists the catalogue images
        with exactly its content."""
        start = time.perf_counter()
        with self.catalogue.scratch("classify") as tmp:
            path, name = self.receive_upload(file, Path(tmp), 0)
            x = self.decode(path, name)
            digest = read_digests([path])[0][0]
        vector = self.embedder.embed(x.unsqueeze(0))
        with self.catalogue.lock:
            index = self.catalogue.index
            if len(index.articles) == 0:  # pragma: no cover - deleting the last article is refused
                raise ApiError(409, "empty_catalogue", "the catalogue has no articles",
                               hint="enrol an article with POST /articles")
            try:
                rejector = self.catalogue.rejector(reject, target_far, open_score)
            except InputError as e:
                raise _input_error(e) from None
            result = classify_embedded(index, vector, [digest], [name], top_k=top_k, mode=mode,
                                       leave_one_out=False, rejector=rejector)[0]
            wide = index.search(vector, k=max(neighbors, min(len(index), 256)))[0]
            best_image: dict[str, tuple[str, float]] = {}
            neighbor_list = []
            for rank, nb in enumerate(wide):
                iid = image_id(nb.path)
                best_image.setdefault(nb.label, (iid, nb.score))
                if rank < neighbors:
                    neighbor_list.append({"label": nb.label, "group": nb.group, "score": round(nb.score, 6),
                                          "name": self.ids.name_of(nb.path), "image_id": iid, "image_url": _image_url(iid)})
            predictions = []
            for p in result.predictions:
                iid, iscore = best_image.get(p.label, (image_id(self.ids.first_image[p.label]), None))
                predictions.append({**p.to_dict(), "num_images": index.num_images(p.label),
                                    "image_id": iid, "image_url": _image_url(iid),
                                    "image_score": None if iscore is None else round(iscore, 6)})
            in_catalogue = [image_id(index.paths[i]) for i in result.same_images]
            num_articles = len(index.articles)
        return {"file": name, "mode": mode, "top_k": top_k, "answer": result.answer.to_dict(),
                "reject": rejector.record(), "predictions": predictions,
                "neighbors": neighbor_list, "num_articles": num_articles, "in_catalogue": in_catalogue,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 1)}

    def articles(self) -> dict:
        """Every article with its group, image count, thumbnail and whether it was enrolled here."""
        out = []
        with self.catalogue.lock:
            index = self.catalogue.index
            for label, group in zip(index.articles, index.article_groups):
                first = self.ids.first_image[label]
                iid = image_id(first)
                out.append({"label": label, "group": group, "num_images": index.num_images(label),
                            "enrolled": self.catalogue.is_enrolled(first),
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
        with self.catalogue.scratch("enrol") as tmp:
            received = [self.receive_upload(f, Path(tmp), n) for n, f in enumerate(files)]
            vectors = self.embedder.embed(torch.stack(self._decode_all(received)))
            photos = [_stored_copy(path) for path, _ in received]
            with self.catalogue.lock:
                index = self.catalogue.index
                created = not index.has_article(label)
                group = group if created else _existing_group(index, label, group)
                paths = self.catalogue.enrol(label, group, vectors, photos)
                self.ids.added(label, paths)
                num_images, articles, images = index.num_images(label), len(index.articles), len(index)
                self.audit.write(*who, "enrol", label=label, group=group, created=created, images=len(paths))
                reject = self.catalogue.rejector().record()  # calibrated again for the changed catalogue
                warnings = self._warnings(index, label)
        return {"label": label, "group": group, "created": created, "added": len(paths),
                "num_images": num_images, "articles": articles, "images": images, "reject": reject,
                "warnings": warnings}

    def _warnings(self, index: CatalogueIndex, label: str) -> list[dict]:
        """The catalogue check's findings about article ``label`` (:func:`fewshot.catalogue.check.check_article`),
        its photos named as the service names catalogue images (never by server paths)."""
        return [{"kind": f.kind, "articles": list(f.articles), "figures": f.figures, "message": f.message,
                 "images": [{"name": self.ids.name_of(p), "image_id": image_id(p), "image_url": _image_url(image_id(p))}
                            for p in f.images]}
                for f in check_article(index, label).findings]

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
        with self.catalogue.lock:
            index = self.catalogue.index
            if not index.has_article(label):
                raise ApiError(404, "unknown_article", f"no article '{label}' in the catalogue",
                               hint="GET /articles lists the labels")
            if len(index.articles) == 1:
                raise ApiError(409, "last_article", f"'{label}' is the only article left; a catalogue "
                               "cannot be empty", hint="enrol another article first")
            paths = self.catalogue.delete(label)
            self.ids.removed(label, paths)
            articles, images = len(index.articles), len(index)
            self.audit.write(*who, "delete", label=label, images=len(paths))
        return {"deleted": label, "images_removed": len(paths), "articles": articles, "images": images}

    def catalogue_image(self, image_id_: str, size: int) -> bytes:
        """JPEG thumbnail of the catalogue image with this id."""
        with self.catalogue.lock:
            path = self.ids.path_of.get(image_id_)
        if path is None:
            raise ApiError(404, "unknown_image", f"no catalogue image with id '{image_id_}'",
                           hint="use the image_id values returned by /classify or /articles")
        return self.thumbnail(image_id_, path, size)

    # ------------------------------------------------------------------ thumbnails
    def thumbnail(self, iid: str, path_text: str, size: int) -> bytes:
        """JPEG thumbnail of the catalogue image ``iid`` at ``path_text`` (cached by id)."""
        key = (iid, size)
        with self._thumbs_lock:
            hit = self._thumbs.get(key)
            if hit is not None:
                self._thumbs.move_to_end(key)
                return hit
        path = self.catalogue.photo_file(path_text)
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


def _existing_group(index: CatalogueIndex, label: str, group: str | None) -> str | None:
    """The group of an existing article (:func:`fewshot.catalogue.labels.resolve_group`); a
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
    """The label or group as stored (:func:`fewshot.catalogue.labels.clean_label`); refused: a 422."""
    try:
        return clean_label(value, what, required=required)
    except InputError as exc:
        raise _input_error(exc) from None


def _image_url(image_id_: str, size: int = 160) -> str:
    return f"/catalogue-image/{image_id_}?size={size}"



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
