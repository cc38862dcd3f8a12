"""A resumable HTTP download into ``ROOT/.downloads/NAME.part`` (Range requests, retries)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from rich import filesize

from fewshot.errors import DataError

from .common import DOWNLOADS_DIR, _CHUNK, _TIMEOUT_S, _USER_AGENT, ENV_MIRROR, _bar, _os_error, log
from .registry import DatasetInfo

# --------------------------------------------------------------------------------------------
# download


def _part_paths(root: Path, info: DatasetInfo) -> tuple[Path, Path]:
    d = root / DOWNLOADS_DIR
    return d / f"{info.name}.part", d / f"{info.name}.part.json"


def _remove_download(part: Path, meta: Path) -> None:
    for p in (part, meta):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    with contextlib.suppress(OSError):
        part.parent.rmdir()  # only when empty


class _Interrupted(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _no_network(info: DatasetInfo, url: str, reason: object) -> DataError:
    return DataError(
        f"cannot download dataset '{info.name}' from {url}: {reason}",
        hint=(
            "check your internet connection (and proxy settings), or fetch offline from a "
            f"local copy: `fewshot datasets fetch {info.name} --mirror PATH`, where PATH holds "
            f"{info.mirror_path}/ or the archive (or set {ENV_MIRROR})"
        ),
    )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (START, TOTAL)."""
    if not value:
        return None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _download_once(info: DatasetInfo, url: str, part: Path, meta_path: Path, progress: bool) -> None:
    """One HTTP request that appends to ``part``; returns when the file is complete.

    Raises _Interrupted when the transfer stops early (the part file keeps what arrived).
    """
    meta: dict = {}
    if part.exists():
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("url") != url:
            part.unlink()
            meta = {}
    offset = part.stat().st_size if part.exists() else 0

    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        etag = meta.get("etag")
        if etag and not etag.startswith("W/"):
            headers["If-Range"] = etag
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, total = _parse_content_range(exc.headers.get("Content-Range"))
            exc.close()
            if total is not None and total == offset:
                return  # the part file is already complete
            part.unlink()
            raise _Interrupted("the partial download did not match the server's file") from exc
        exc.close()
        raise DataError(
            f"download of dataset '{info.name}' from {url} failed: HTTP {exc.code} {exc.reason}",
            hint=(
                "the file may have moved or the server may be down: try again later, or fetch "
                f"from a local copy with `fewshot datasets fetch {info.name} --mirror PATH`"
            ),
        ) from exc
    except urllib.error.URLError as exc:
        raise _no_network(info, url, exc.reason) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _no_network(info, url, exc) from exc

    with response:
        _receive(info, url, response, part, meta_path, offset, progress)


def _receive(info: DatasetInfo, url: str, response, part: Path, meta_path: Path, offset: int,
             progress: bool) -> None:
    """Append (HTTP 206) or write (200) the response body to ``part``, with a progress bar.

    Raises _Interrupted when the transfer stops early or does not fit the part file.
    """
    status = response.status
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            part.unlink(missing_ok=True)
            raise _Interrupted("the server answered the resume request with another range")
        mode = "ab"
        if total is None and length is not None:
            total = offset + length
    else:
        if offset:
            log.info("server ignored the Range request; restarting the download of %s", url)
        offset = 0
        mode = "wb"
        total = length
        meta = {"url": url, "etag": response.headers.get("ETag"), "total": total}
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(meta), "utf-8")
        except OSError as exc:
            raise _os_error(exc, meta_path, "writing") from exc

    received = offset
    try:
        fh = open(part, mode)
    except OSError as exc:
        raise _os_error(exc, part, "writing") from exc
    with fh, _bar(total, f"downloading {info.name}", progress, initial=offset) as bar:
        while True:
            try:
                block = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise _Interrupted(f"{type(exc).__name__}: {exc}") from exc
            if not block:
                break
            try:
                fh.write(block)
            except OSError as exc:
                raise _os_error(exc, part, "writing") from exc
            received += len(block)
            bar.update(len(block))
        try:
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            raise _os_error(exc, part, "writing") from exc
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        part.unlink(missing_ok=True)
        raise _Interrupted(f"received {received} bytes, more than the announced {total}")


def _download(info: DatasetInfo, root: Path, progress: bool, retries: int) -> Path:
    """Download ``info.url`` into ``root/.downloads/NAME.part``, resuming; return the part."""
    part, meta = _part_paths(root, info)
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, part.parent, "creating") from exc
    try:
        return _download_attempts(info, part, meta, progress, retries)
    except BaseException:
        if not part.exists():
            _remove_download(part, meta)  # nothing worth resuming: leave no trace
        raise


def _download_attempts(info: DatasetInfo, part: Path, meta: Path, progress: bool,
                       retries: int) -> Path:
    attempt = 0
    while True:
        try:
            _download_once(info, info.url, part, meta, progress)
            return part
        except _Interrupted as exc:
            if attempt >= retries:
                size = part.stat().st_size if part.exists() else 0
                raise DataError(
                    f"download of dataset '{info.name}' from {info.url} was interrupted "
                    f"({exc.reason}); {filesize.decimal(size)} kept in {part}",
                    hint=(
                        "run the same command again to resume the download, or fetch from a "
                        f"local copy with --mirror PATH"
                    ),
                ) from exc
            attempt += 1
            log.warning("download interrupted (%s); resuming (attempt %d)", exc.reason, attempt)
            time.sleep(min(2.0 * attempt, 10.0))
