"""``fewshot serve``: the catalogue as an HTTP service with a web page (FastAPI + uvicorn)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import FewshotError
from .common import (
    DATA,
    RuntimeOpt,
    ThreadsOpt,
    app,
    apply_runtime,
    examples,
    handle_errors,
    positive,
)

SERVICE, SECURITY = "Service", "Security"


@app.command(epilog=examples("fewshot serve --index runs/grocery-index",
                             "fewshot serve --index runs/grocery-index --read-only --port 8001",
                             "fewshot serve --index runs/grocery-index --host 0.0.0.0 --token-file secrets/write-token "
                             "--allowed-host shop-1.example.com"))
@handle_errors
def serve(
    index: Path = typer.Option(..., "--index", rich_help_panel=DATA, help="Index folder written by `fewshot index` (enrolments append to its journal)."),
    host: str = typer.Option("127.0.0.1", "--host", rich_help_panel=SERVICE, help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", rich_help_panel=SERVICE, min=1, max=65535, help="TCP port."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", rich_help_panel=SERVICE, callback=positive, help="Largest accepted photo, per file, in MB."),
    runtime: str = RuntimeOpt, threads: Optional[int] = ThreadsOpt,
    token_file: Optional[Path] = typer.Option(None, "--token-file", rich_help_panel=SECURITY, help="File whose first line is the write token (else $FEWSHOT_API_TOKEN; else a new token is printed once)."),
    read_token_file: Optional[Path] = typer.Option(None, "--read-token-file", rich_help_panel=SECURITY, help="File whose first line is a read token: classify, articles and thumbnails then need it (or the write token). Else $FEWSHOT_READ_TOKEN; else reads are open."),
    no_token: bool = typer.Option(False, "--no-token", rich_help_panel=SECURITY, help="Changes need no token (only with a loopback --host such as 127.0.0.1)."),
    allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host", rich_help_panel=SECURITY, help="A host name clients use to reach the service (repeatable), e.g. the reverse proxy's name; loopback names and this machine's are accepted already."),
    read_only: bool = typer.Option(False, "--read-only", rich_help_panel=SERVICE, help="Classify only: enrolment and deletion are refused and nothing is written beside the index (for a read-only volume, or a second service on a served folder)."),
    allow_origin: Optional[List[str]] = typer.Option(None, "--allow-origin", rich_help_panel=SECURITY, help="A web page origin allowed to call the API from a browser (repeatable), e.g. https://shop.example.com."),
) -> None:
    """Serve the catalogue: POST /classify, GET/POST/DELETE /articles, a web page at /, OpenAPI at /docs.

    Changes need the write token (Authorization: Bearer TOKEN); one writer per index folder."""
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise FewshotError(f"the service needs fastapi, uvicorn and python-multipart ({exc})",
                           hint='pip install "fewshot[serve]"') from None
    apply_runtime(runtime, threads)
    access, generated = _access(host, token_file, read_token_file, no_token, allowed_host or [], allow_origin or [])
    sock = bind_socket(host, port)  # a busy port fails at once, before the model loads
    try:
        application = _create(create_app, index, max_upload_mb, runtime, threads, access, read_only)
        service = application.state.service
        cat = service.catalogue.index
        typer.echo(f"serving {len(cat.articles)} articles ({len(cat)} images, {cat.ann.kind} index) from {index} "
                   f"at http://{host}:{port}/  (API docs: /docs; forward pass: {service.embedder.choice.runtime})")
        if read_only:
            typer.echo("read-only: classify and browse; enrolment and deletion are refused")
        else:
            _announce(access, generated, host, port)
        server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="info"))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _create(create_app, index: Path, max_upload_mb: float, runtime: str, threads: int | None, access,
            read_only: bool = False):
    try:
        return create_app(index, max_upload_bytes=int(max_upload_mb * 1024 * 1024), runtime=runtime, threads=threads,
                          access=access, read_only=read_only)
    except RuntimeError as exc:  # FastAPI raises this when python-multipart is missing
        if "multipart" not in str(exc):
            raise
        raise FewshotError(f"the service needs python-multipart ({exc})",
                           hint='pip install "fewshot[serve]"') from None


def _read_token(path: Optional[Path], env: str, option: str) -> Optional[str]:
    """The token in ``path`` (its first line) or in ``$env``; ``None`` when neither is given."""
    if path is None:
        return os.environ.get(env) or None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FewshotError(f"{option} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})",
                           hint="give a readable text file whose first line is the token") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise FewshotError(f"{option} {path} is empty", hint="write the token on its first line")
    return token


def _access(host: str, token_file: Optional[Path], read_token_file: Optional[Path], no_token: bool,
            allowed_host: list[str], allow_origin: list[str]):
    """The service's :class:`~fewshot.serve.security.Access` and whether its write token was made here."""
    from ..serve.security import Access, default_hosts, is_loopback, new_token

    write = _read_token(token_file, "FEWSHOT_API_TOKEN", "--token-file")
    read = _read_token(read_token_file, "FEWSHOT_READ_TOKEN", "--read-token-file")
    if no_token:
        if write is not None or read is not None:
            raise FewshotError("--no-token and a token (--token-file, --read-token-file or $FEWSHOT_API_TOKEN / "
                               "$FEWSHOT_READ_TOKEN) contradict each other", hint="drop one of them")
        if not is_loopback(host):
            raise FewshotError(f"--no-token with --host {host} would let anyone on the network change the catalogue",
                               hint="use --host 127.0.0.1 with --no-token, or drop --no-token and give clients the token")
    for origin in allow_origin:
        if not origin.startswith(("http://", "https://")) or origin.rstrip("/") != origin or origin.count("/") != 2:
            raise FewshotError(f"--allow-origin {origin!r} is not an origin", hint="write scheme://host[:port], "
                               "e.g. --allow-origin https://shop.example.com (no path, no trailing slash)")
    for name in allowed_host:
        if not name or any(c in name for c in "/:[] ") or name.startswith("*") and not name.startswith("*."):
            raise FewshotError(f"--allowed-host {name!r} is not a host name", hint="give the name alone, without "
                               "scheme or port, e.g. --allowed-host shop-1.example.com or '*.example.com' "
                               "(IP addresses are always accepted)")
    generated = write is None and not no_token
    access = Access(write_token=None if no_token else (write or new_token()), read_token=read,
                    allowed_hosts=default_hosts(host, allowed_host), allowed_origins=tuple(allow_origin))
    return access, generated


def _announce(access, generated: bool, host: str, port: int) -> None:
    """Print how to use the tokens (a generated write token once, here and nowhere else)."""
    from ..serve.security import token_id

    if access.write_token is None:
        typer.echo("changes need no token (--no-token; loopback only)")
    elif generated:
        typer.echo(f"write token (shown once; keep it to enrol or delete, or pass --token-file next time): "
                   f"{access.write_token}")
        typer.echo(f"open the page with it: http://{host}:{port}/#token={access.write_token}")
    else:
        typer.echo(f"changes need the write token {token_id(access.write_token)} (Authorization: Bearer TOKEN)")
    if access.read_token is not None:
        typer.echo(f"reads need the read token {token_id(access.read_token)} (or the write token)")


def bind_socket(host: str, port: int):
    """A listening TCP socket on ``host:port``, bound before the service is announced.

    Raises:
        FewshotError: the port is in use, the address is not this machine's, or binding is
            not allowed, with the fix.
    """
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise FewshotError(f"--host {host} is not an address of this machine ({exc.strerror})",
                           hint="use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise FewshotError(f"port {port} on {host} is already in use (another service, or another "
                               "`fewshot serve`, listens there)", hint=f"choose a free port, e.g. --port {port + 1}") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise FewshotError(f"not allowed to listen on port {port} ({exc.strerror})",
                               hint="use a port above 1023, e.g. --port 8000") from None
        raise FewshotError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                           hint="use --host 127.0.0.1 and a free --port") from None
    sock.set_inheritable(True)
    return sock
