"""The service's HTTP plumbing: JSON client errors and the request-size limit."""

from __future__ import annotations

from typing import Any, Callable

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ApiError", "BodyLimit", "error_response", "mb", "too_large_hint"]


class ApiError(StarletteHTTPException):
    """A client error answered as ``{"error": code, "message": message, "hint": hint}``.

    A subclass of Starlette's ``HTTPException`` so that FastAPI re-raises it untouched when it
    comes out of body parsing (the streaming size limit raises it there).
    """

    def __init__(self, status: int, code: str, message: str, hint: str | None = None,
                 **extra: Any) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.message = message
        self.hint = hint
        self.extra = extra

    def body(self) -> dict:
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        out.update(self.extra)
        return out


def error_response(status: int, code: str, message: str, hint: str | None = None,
                    headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(ApiError(status, code, message, hint, **extra).body(), status_code=status,
                        headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies above a per-path limit with a JSON 413.

    A declared ``Content-Length`` above the limit is refused before any byte is read; a
    body without one (chunked) is counted as it streams in and refused once it passes the
    limit. Multipart file parts are spooled to temporary files by Starlette (at most 1 MB
    of each in memory), so memory stays bounded either way.

    ``limit_for(method, path)`` gives ``(limit in bytes, what the service accepts)`` or ``None``.
    """

    def __init__(self, app, limit_for: Callable[[str, str], tuple[int, str] | None]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send) -> None:
        rule = self.limit_for(scope.get("method", ""), scope.get("path", "")) \
            if scope["type"] == "http" else None
        if rule is None:
            await self.app(scope, receive, send)
            return
        limit, accepted = rule
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > limit:
            response = error_response(413, "upload_too_large",
                                       f"request body is {mb(declared)}; this service accepts {accepted}",
                                       hint=too_large_hint(), headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "upload_too_large", f"request body is more than {mb(limit)}; "
                                   f"this service accepts {accepted}", hint=too_large_hint())
            return message

        await self.app(scope, limited_receive, send)


def mb(n: int) -> str:
    """Binary megabytes, as ``--max-upload-mb`` counts them (rich.filesize only has decimal units)."""
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} kB"


def too_large_hint() -> str:
    return ("send a smaller photo (resize it to a few megapixels), fewer photos per request, "
            "or start the service with a larger --max-upload-mb")
