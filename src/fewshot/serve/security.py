"""Who may use the service: access tokens, trusted host names, browser origins, the audit log.

* **Tokens.** Every change (enrol, add photos, delete) needs the write token in an
  ``Authorization: Bearer TOKEN`` header, compared in constant time (:func:`hmac.compare_digest`).
  An optional read token guards classify, the article list and the thumbnails as well (the write
  token is accepted there too). ``fewshot serve`` takes the write token from
  ``$FEWSHOT_API_TOKEN`` or ``--token-file``, or makes one and prints it once (as Jupyter does).
  Open writes (``--no-token``) are allowed on a loopback address only.
* **Host names.** A request whose ``Host`` header names a host the service is not served under
  is refused with 400: a DNS-rebinding page (whose requests carry the attacker's host name)
  cannot reach it. An IP address in ``Host`` is always accepted: a browser sends one only to a
  page loaded from that very address, which no other site can rebind. (Starlette's
  ``TrustedHostMiddleware`` cannot express that rule, nor answer in the service's JSON form.)
* **Origins.** A browser request from another origin (its ``Origin`` header differs from the
  service's own) is refused with 403 unless ``--allow-origin`` names that origin; Starlette's
  ``CORSMiddleware`` answers the preflight requests of the allowed ones.
* **Audit log.** Each change is appended to ``INDEX_DIR/audit.jsonl``, one JSON object per line:
  when, who (the token's id: a hash prefix, never the token), from where, what.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fastapi.responses import JSONResponse

from ..errors import FewshotError
from ..catalogue.store import AUDIT_FILE

#: paths anyone may read: the page, its files and the API description
PUBLIC_PATHS = ("/", "/static/", "/docs", "/openapi.json", "/favicon.ico")


def new_token() -> str:
    """A fresh random token (32 bytes, URL-safe base64: 43 characters)."""
    return secrets.token_urlsafe(32)


def token_id(token: str | None) -> str:
    """The public id of a token for logs and responses: ``tok-`` + 10 hex digits of its SHA-256
    (``"open"`` when writes need no token)."""
    if token is None:
        return "open"
    return "tok-" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:10]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback interface only."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """The service's access rules.

    Attributes:
        write_token: needed for every change; ``None`` = open writes (loopback only, checked by
            ``fewshot serve``).
        read_token: also needed for reads (classify, articles, thumbnails, health); ``None`` =
            reads are open.
        allowed_hosts: the ``Host`` names accepted, ``*.example.com`` for a domain's names; an IP
            address is always accepted (``None``: no check, for an application a user mounts
            behind their own server).
        allowed_origins: browser origins (``https://app.example.com``) besides the service's own.
    """

    write_token: str | None
    read_token: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, token in (("write token", self.write_token), ("read token", self.read_token)):
            if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable()
                                      or any(c.isspace() for c in token)):
                raise FewshotError(f"the {name} must be at least 16 printable ASCII characters without spaces "
                                   f"(HTTP headers carry nothing else reliably); it has {len(token)} characters",
                                   hint="use at least 16 characters without spaces, e.g. the output of "
                                        "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")

    def who(self, header: str | None) -> tuple[str | None, bool]:
        """``(token id, may write)`` for an ``Authorization`` header (``(None, False)``: no valid token)."""
        given = _bearer(header)
        if self.write_token is None:
            return "open", True
        if given is not None and hmac.compare_digest(given.encode("utf-8"), self.write_token.encode("utf-8")):
            return token_id(self.write_token), True
        if given is not None and self.read_token is not None and hmac.compare_digest(
                given.encode("utf-8"), self.read_token.encode("utf-8")):
            return token_id(self.read_token), False
        return None, False


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def default_hosts(host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The host names a service listening on ``host`` answers to (addresses are always
    accepted, :class:`Guard`): ``localhost``, ``host`` when it is a name, and for a wildcard
    address (``0.0.0.0``, ``::``) this machine's names; plus ``extra`` (``--allowed-host``)."""
    names = ["localhost"]
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    elif not _is_address(host.strip("[]")):
        names.append(host)
    return tuple(dict.fromkeys(n.lower() for n in [*names, *extra] if n))


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def is_write(method: str, path: str) -> bool:
    """Whether a request changes the catalogue (every POST / PUT / PATCH / DELETE but classify)."""
    return method in ("POST", "PUT", "PATCH", "DELETE") and path.rstrip("/") != "/classify"


def _public(path: str) -> bool:
    return path == "/" or any(path.startswith(p) for p in PUBLIC_PATHS[1:])


def _deny(status: int, code: str, message: str, hint: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "hint": hint}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: refuse cross-origin browser requests and requests without the token
    their endpoint needs; put the caller's token id in ``scope["state"]["token_id"]``."""

    def __init__(self, app, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        denied = self.check(scope)
        if denied is not None:
            await denied(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope) -> JSONResponse | None:
        """The refusal for this request, or ``None`` when it may go on."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope.get("method", ""), scope.get("path", "")
        host = host_name(headers.get("host", ""))
        allowed = None if self.access.allowed_hosts is None else {a.lower() for a in self.access.allowed_hosts}
        if allowed is not None and not _is_address(host) and host not in allowed \
                and not any(a.startswith("*.") and host.endswith(a[1:]) for a in allowed):
            return _deny(400, "unknown_host", f"this service does not answer to the host name {host!r}",
                         "reach it by an address or one of its names, or start it with --allowed-host " + (host or "NAME"))
        origin = headers.get("origin")
        if origin and origin != "null" and not self._same_origin(origin, scope, headers) \
                and origin not in self.access.allowed_origins:
            return _deny(403, "cross_origin", f"requests from the web page at {origin} are not allowed here",
                         "use the service's own page, or start it with --allow-origin " + origin)
        if origin == "null":
            return _deny(403, "cross_origin", "requests from an opaque origin (a sandboxed page or a file) are "
                         "not allowed here", "use the service's own page")
        if method == "OPTIONS" or _public(path):
            return None
        token, may_write = self.access.who(headers.get("authorization"))
        scope.setdefault("state", {})["token_id"] = token
        needs_write = is_write(method, path)
        if needs_write and not may_write or not needs_write and token is None and self.access.read_token:
            what = "changing the catalogue" if needs_write else "this service"
            return _deny(401, "unauthorized",
                         f"{what} needs the {'write' if needs_write else 'access'} token "
                         + ("(the token sent is not it)" if _bearer(headers.get("authorization")) else "(none was sent)"),
                         "send 'Authorization: Bearer TOKEN' with " + (
                             "the write token `fewshot serve` printed or was given (--token-file / $FEWSHOT_API_TOKEN)"
                             if needs_write else "the read token the service was given (--read-token-file / "
                             "$FEWSHOT_READ_TOKEN) or its write token"), headers={"WWW-Authenticate": "Bearer"})
        return None

    @staticmethod
    def _same_origin(origin: str, scope, headers: dict) -> bool:
        scheme = scope.get("scheme", "http")
        return origin.rstrip("/").lower() == f"{scheme}://{headers.get('host', '')}".lower()


# --------------------------------------------------------------------------- audit log
class AuditLog:
    """Append-only JSON lines in ``INDEX_DIR/audit.jsonl`` (fsync'ed; carried along when the
    folder is rewritten by a compaction or a rebuild)."""

    def __init__(self, index_dir: str | Path) -> None:
        self.path = Path(index_dir) / AUDIT_FILE

    def write(self, token: str | None, client: str | None, action: str, **details) -> None:
        """Append one entry: ``{"time", "token", "client", "action", ...details}``."""
        entry = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                 "token": token, "client": client, "action": action, **details}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        """Every entry, oldest first (a torn last line, from a crash, is left out)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
