"""The HTTP service (``fewshot serve``): classify photos, enrol and remove articles, a web page.

Needs the ``serve`` extra (``pip install "fewshot[serve]"``: fastapi, uvicorn, python-multipart).
See :func:`fewshot.serve.app.create_app` for the endpoints.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """Build the FastAPI app; see :func:`fewshot.serve.app.create_app` (imported lazily)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
