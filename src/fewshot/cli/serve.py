"""``fewshot serve``: the catalogue as an HTTP service with a web page (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import FewshotError
from . import app, handle_errors


@app.command()
@handle_errors
def serve(
    index: Path = typer.Option(..., "--index", help="Index folder written by `fewshot index` (enrolments rewrite it atomically)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest accepted photo, per file, in MB."),
) -> None:
    """Serve the catalogue: POST /classify, GET/POST/DELETE /articles, a web page at /, OpenAPI at /docs."""
    if max_upload_mb <= 0:
        raise FewshotError(f"--max-upload-mb must be positive, got {max_upload_mb}",
                           hint="use e.g. --max-upload-mb 10")
    if not 0 < port < 65536:
        raise FewshotError(f"--port {port} is not a TCP port", hint="use a port between 1 and 65535")
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise FewshotError(f"the service needs fastapi, uvicorn and python-multipart ({exc})",
                           hint='pip install "fewshot[serve]"') from None
    try:
        application = create_app(index, max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    except RuntimeError as exc:  # FastAPI raises this when python-multipart is missing
        if "multipart" not in str(exc):
            raise
        raise FewshotError(f"the service needs python-multipart ({exc})",
                           hint='pip install "fewshot[serve]"') from None
    snap = application.state.service.snapshot
    typer.echo(f"serving {len(snap.index.articles)} articles ({len(snap.index)} images) from {index} "
               f"at http://{host}:{port}/  (API docs: /docs)")
    uvicorn.run(application, host=host, port=port, log_level="info")
