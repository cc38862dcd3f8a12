"""The HTTP service: classify photos against a catalogue index, enrol and remove articles.

:func:`create_app` returns a FastAPI application over one index folder (written by
``fewshot index`` / :func:`fewshot.catalogue.build_index`)::

    GET    /                         web page: upload a photo, see the top-k articles; enrol form
    GET    /health                   status, catalogue size, backbone
    POST   /classify?top_k=5&mode=prototype&reject=auto&target_far=0.05
                                                multipart field ``file`` -> the answer (an article
                                                or "unknown"), top-k articles + nearest images
    GET    /articles                 the catalogue's articles
    POST   /articles                 form ``label``, ``group``, one or more ``files``: enrol (no retraining)
    DELETE /articles/{label}         remove an article
    GET    /catalogue-image/{id}     a thumbnail of one catalogue image (only images in the index)
    GET    /docs, /openapi.json      OpenAPI, as FastAPI serves it

Design:

* **Same embedding as the index.** Uploads are decoded with :func:`fewshot.data.images.load_image`
  and embedded by the index's own model (:class:`fewshot.catalogue.EmbedderSpec`: same
  backbone, image size, trained head), exactly as :func:`fewshot.embed.embed_paths` does.
  Concurrent requests are batched into one forward pass (:class:`fewshot.serve.batcher.Embedder`).
* **Incremental, durable changes.** A mutation (enrol, delete) changes only its article: the
  photos are written into ``INDEX_DIR/enrolled/<article>/`` (fsync'ed), then one journal entry
  with the article's vectors is appended (:meth:`fewshot.catalogue.Catalogue.enrol`, which owns
  the folder's files), and only then is the change applied in memory and acknowledged. The index folder is never
  rewritten per request: a crash loses no acknowledged change, and a half-written entry is
  ignored. When the journal holds :data:`COMPACT_AFTER` entries the service compacts the folder
  at start-up (one atomic rewrite; photos of removed articles are dropped then). Index reads and
  changes take one lock (the embedding runs outside it); racing enrolments are serialised.
* **One writer, known callers.** The service holds the index folder's writer lock
  (:func:`fewshot.io.writer_lock`, taken by :meth:`fewshot.catalogue.Catalogue.open`) for its
  lifetime: a second service on the folder is refused.
  Changes need the write token; host names and browser origins are checked
  (:mod:`fewshot.serve.security`); each change is appended to ``INDEX_DIR/audit.jsonl``.
  Responses name images relative to the data folder, never by a server path.
* **Bad input never changes the index and never gives a 500:** unreadable, non-image,
  decompression-bomb or oversize uploads, unknown labels, empty enrolments are answered with a
  4xx and ``{"error": CODE, "message": TEXT, "hint": FIX}``. Oversize requests are refused from
  their ``Content-Length`` before the body is read, or as soon as a streamed body passes the limit.

This module holds the routes, the request limits and the error answers; the state behind the
routes is :class:`fewshot.serve.service.Service` (thumbnails, uploads, the embedding batcher).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, List, Optional

from fastapi import APIRouter, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..version import __version__
from ..catalogue import Catalogue
from ..errors import FewshotError
from .http import ApiError, BodyLimit, mb
from .security import Access, Guard, new_token
from .service import DEFAULT_MAX_UPLOAD_BYTES, MAX_ENROL_FILES, Service

log = logging.getLogger("fewshot.serve")

__all__ = ["create_app", "ApiError", "DEFAULT_MAX_UPLOAD_BYTES", "MAX_ENROL_FILES"]

#: Journal entries after which the service compacts the index folder when it starts.
COMPACT_AFTER = 500
#: Allowance for multipart boundaries and form fields on top of the file bytes.
_MULTIPART_OVERHEAD = 64 * 1024
_STATIC = Path(__file__).resolve().parent / "static"


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
            default: the index's own backbone / run (:meth:`fewshot.catalogue.EmbedderSpec.load`).
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
    service = _service(Path(index_dir), max_upload_bytes, model, runtime, threads, access, read_only)

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


def _service(index_dir: Path, max_upload_bytes: int, model, runtime: str, threads: int | None, access: Access,
             read_only: bool) -> Service:
    """The service over the catalogue of ``index_dir``, opened for this service's lifetime."""
    catalogue = Catalogue.open(index_dir, model=model, runtime=runtime, read_only=read_only,
                               compact_after=COMPACT_AFTER)
    try:
        return Service(catalogue, max_upload_bytes, runtime, threads, access)
    except BaseException:
        catalogue.close()
        raise


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


def _router(service: Service) -> APIRouter:
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
        reject: str = Query("auto", max_length=32,
                            description="auto: answer 'unknown' below the threshold calibrated on the catalogue "
                                        "for target_far; none: always the best article; a number: that threshold "
                                        "on open_score."),
        target_far: float = Query(0.05, gt=0, lt=1, description="With reject=auto: the false-accept rate the "
                                                                 "threshold is calibrated for."),
        open_score: str = Query("relative", max_length=32,
                                description="The open-set score the threshold applies to: relative (best minus "
                                            "half the second best cosine), cosine, margin or softmax."),
    ) -> dict:
        return service.classify(file, top_k, mode, neighbors, reject, target_far, open_score)

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
