"""``fewshot serve``: the catalogue as an HTTP service with a web page (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import FewshotError
from .common import RuntimeOpt, ThreadsOpt, app, apply_runtime, handle_errors, positive


@app.command()
@handle_errors
def serve(
    index: Path = typer.Option(..., "--index", help="Index folder written by `fewshot index` (enrolments append to its journal)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", callback=positive, help="Largest accepted photo, per file, in MB."),
    runtime: str = RuntimeOpt, threads: Optional[int] = ThreadsOpt,
) -> None:
    """Serve the catalogue: POST /classify, GET/POST/DELETE /articles, a web page at /, OpenAPI at /docs."""
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise FewshotError(f"the service needs fastapi, uvicorn and python-multipart ({exc})",
                           hint='pip install "fewshot[serve]"') from None
    apply_runtime(runtime, threads)
    sock = bind_socket(host, port)  # a busy port fails at once, before the model loads
    try:
        application = _create(create_app, index, max_upload_mb, runtime, threads)
        service = application.state.service
        cat = service.cat.index
        typer.echo(f"serving {len(cat.articles)} articles ({len(cat)} images, {cat.ann.kind} index) from {index} "
                   f"at http://{host}:{port}/  (API docs: /docs; forward pass: {service.embedder.choice.runtime})")
        server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="info"))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _create(create_app, index: Path, max_upload_mb: float, runtime: str, threads: int | None):
    try:
        return create_app(index, max_upload_bytes=int(max_upload_mb * 1024 * 1024), runtime=runtime, threads=threads)
    except RuntimeError as exc:  # FastAPI raises this when python-multipart is missing
        if "multipart" not in str(exc):
            raise
        raise FewshotError(f"the service needs python-multipart ({exc})",
                           hint='pip install "fewshot[serve]"') from None


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
