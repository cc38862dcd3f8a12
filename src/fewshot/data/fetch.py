"""Fetch the public datasets: a registry, a resumable download, a verified atomic install.

A new user has no local copy of the data. ``fetch_dataset("grocery")`` downloads the Grocery
Store Dataset from its public GitHub repository (``omniglot`` likewise), verifies it and
installs it as ``ROOT/grocery``; offline (and in CI) ``mirror=PATH`` or the environment
variable ``FEWSHOT_DATASETS_MIRROR`` takes the same dataset from a local folder or archive.

Integrity. Archives that GitHub builds on the fly are not byte-stable, so each dataset pins a
*tree digest* of its extracted content (:func:`tree_digest`): the SHA-256 of the lines
``"<sha256 of file>  <relative posix path>\\n"`` for every regular file, sorted by path, with
hidden files and folders (any path part starting with ``.``) left out. It is what
``sha256sum`` prints, so it can be reproduced in a shell::

    cd DIR && find . -type f -not -path '*/.*' -printf '%P\\n' | LC_ALL=C sort \\
        | while IFS= read -r f; do sha256sum "$f"; done | sha256sum

An optional pinned archive SHA-256 (:attr:`DatasetInfo.archive_sha256`) is checked on a
downloaded archive before it is extracted.

Atomicity. A download goes to ``ROOT/.downloads/NAME.part`` and resumes with an HTTP Range
request after an interruption (a server that ignores Range restarts it from zero). The
archive (or mirror folder) is extracted into a hidden temporary folder in ``ROOT``, verified,
marked with ``.fewshot-verified.json`` and only then renamed onto ``ROOT/NAME`` with
:func:`os.replace`. So ``ROOT/NAME`` is either absent or complete and verified; a failure
removes the temporary folder and keeps at most the ``.part`` file, for resuming.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

from rich import filesize

from fewshot.errors import DataError
from fewshot.io import replace_dir
from fewshot.registry import Registry

log = logging.getLogger(__name__)

MARKER_NAME = ".fewshot-verified.json"
"""Name of the marker file written inside a dataset folder once its content is verified."""

DOWNLOADS_DIR = ".downloads"
"""Folder in the data root that holds partial downloads (``NAME.part``)."""

ENV_DATA = "FEWSHOT_DATA"
ENV_MIRROR = "FEWSHOT_DATASETS_MIRROR"

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_USER_AGENT = "fewshot-datasets/0.1 (+https://github.com/; python-urllib)"


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset that :func:`fetch_dataset` knows how to get.

    Attributes:
        name: short name used on the command line and as the folder name (``grocery``).
        title: human title.
        url: public archive URL.
        archive_format: ``"zip"``, ``"tar"``, ``"tar.gz"``, ``"tar.bz2"`` or ``"tar.xz"``.
        licence: licence of the data.
        size_bytes: approximate download size, for display.
        citation: how to cite it.
        homepage: where it is published.
        subdir: the folder inside the archive to keep (it becomes ``ROOT/NAME``); ``""`` keeps
            the whole archive.
        tree_sha256: pinned :func:`tree_digest` of the extracted content.
        mirror_subpath: where the extracted dataset sits inside a mirror folder (default:
            ``name``).
        archive_sha256: optional pinned SHA-256 of the downloaded archive bytes.
        file_count: number of files the digest covers (for display and a cheap check).
    """

    name: str
    title: str
    url: str
    archive_format: str
    licence: str
    size_bytes: int
    citation: str
    homepage: str
    subdir: str
    tree_sha256: str
    mirror_subpath: str | None = None
    archive_sha256: str | None = None
    file_count: int | None = None

    @property
    def mirror_path(self) -> str:
        """The relative folder of this dataset inside a mirror (``mirror_subpath`` or name)."""
        return self.mirror_subpath or self.name


#: the datasets ``fewshot datasets fetch`` knows, by name
DATASETS: Registry[DatasetInfo] = Registry(
    "dataset", DataError, hint="run `fewshot datasets list` to see the datasets that can be fetched")


def register_dataset(info: DatasetInfo, *, replace: bool = False) -> DatasetInfo:
    """Add ``info`` to the registry (used by tests and plugins); returns it.

    Raises:
        ValueError: the name is taken and ``replace`` is false.
    """
    return DATASETS.add(info.name, info, replace=replace)


def unregister_dataset(name: str) -> None:
    """Remove a dataset from the registry (no error when absent)."""
    DATASETS.remove(name)


register_dataset(
    DatasetInfo(
        name="grocery",
        title="Grocery Store Dataset",
        url="https://github.com/marcusklasson/GroceryStoreDataset/archive/refs/heads/master.zip",
        archive_format="zip",
        licence="MIT",
        size_bytes=124_000_000,
        citation=(
            "M. Klasson, C. Zhang, H. Kjellström. A Hierarchical Grocery Store Image Dataset "
            "with Visual and Semantic Labels. WACV 2019."
        ),
        homepage="https://github.com/marcusklasson/GroceryStoreDataset",
        subdir="GroceryStoreDataset-master",
        tree_sha256="d7620dcae7942c1e35d7b868b63627b5616c3e00a19a85a2d48f1a11c029bea5",
        mirror_subpath="grocery-store-dataset",
        file_count=5697,
    )
)
register_dataset(
    DatasetInfo(
        name="omniglot",
        title="Omniglot (images_background_small1)",
        url="https://github.com/brendenlake/omniglot/raw/master/python/images_background_small1.zip",
        archive_format="zip",
        licence="MIT",
        size_bytes=1_300_000,
        citation=(
            "B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning "
            "through probabilistic program induction. Science 350(6266), 2015."
        ),
        homepage="https://github.com/brendenlake/omniglot",
        subdir="images_background_small1",
        tree_sha256="db0d64d585dbbff865b7aa47f88422009d0e5a28fd6363d0993f80216e80c9e1",
        mirror_subpath="omniglot/images_background_small1",
        file_count=2720,
    )
)


def list_datasets() -> list[DatasetInfo]:
    """All registered datasets, sorted by name."""
    return [DATASETS.get(k) for k in DATASETS.names()]


def get_dataset_info(name: str | DatasetInfo) -> DatasetInfo:
    """Look up a dataset by name (a :class:`DatasetInfo` is returned as is).

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    if isinstance(name, DatasetInfo):
        return name
    return DATASETS.get(name)


def default_root() -> Path:
    """The data root: ``$FEWSHOT_DATA``, else ``$XDG_CACHE_HOME/fewshot/datasets``, else
    ``~/.cache/fewshot/datasets``."""
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "fewshot" / "datasets"


def dataset_path(name: str | DatasetInfo, root: str | Path | None = None) -> Path:
    """Where dataset ``name`` lives (or would live) under ``root`` (default :func:`default_root`)."""
    info = get_dataset_info(name)
    return (Path(root).expanduser() if root is not None else default_root()) / info.name


# --------------------------------------------------------------------------------------------
# tree digest and marker


def _is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _iter_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """Yield (relative posix path, absolute path) for every non-hidden regular file."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("."):
                continue
            full = Path(dirpath) / fn
            if not full.is_file():
                continue
            yield full.relative_to(folder).as_posix(), full


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def count_files(folder: str | Path) -> int:
    """Number of files :func:`tree_digest` covers in ``folder``."""
    return sum(1 for _ in _iter_files(Path(folder)))


def tree_digest(folder: str | Path, progress: bool = False, desc: str | None = None) -> str:
    """SHA-256 over the sorted ``"<file sha256>  <relative posix path>\\n"`` lines of ``folder``.

    Hidden files and folders (a path part starting with ``.``, e.g. the verification marker)
    are left out; symbolic links to files are followed. ``desc`` labels the progress bar.
    """
    folder = Path(folder)
    files = sorted(_iter_files(folder))
    outer = hashlib.sha256()
    with _bar(len(files), desc or f"verifying {folder.name}", progress, unit="file") as bar:
        for rel, full in files:
            outer.update(f"{_file_sha256(full)}  {rel}\n".encode("utf-8"))
            bar.update(1)
    return outer.hexdigest()


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_verified(folder: str | Path, info: DatasetInfo, full: bool = False) -> bool:
    """Whether ``folder`` holds ``info``'s dataset.

    The cheap check (default) needs the marker file with the pinned digest and the same number
    of files as when it was verified; ``full=True`` recomputes the tree digest.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    marker = _read_marker(folder)
    if marker is None or marker.get("tree_sha256") != info.tree_sha256:
        return False
    if full:
        return tree_digest(folder) == info.tree_sha256
    return marker.get("file_count") == count_files(folder)


def _write_marker(folder: Path, info: DatasetInfo, n_files: int, source: str) -> None:
    marker = {
        "name": info.name,
        "tree_sha256": info.tree_sha256,
        "file_count": n_files,
        "source": source,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")


# --------------------------------------------------------------------------------------------
# helpers


def _bar(total: int | None, desc: str, enabled: bool, unit: str = "B", initial: int = 0):
    """A tqdm progress bar on stderr (a disabled tqdm when ``enabled`` is false); bytes are
    shown scaled (KiB, MiB)."""
    from tqdm.auto import tqdm

    kwargs = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not enabled, **kwargs)


class _WriteError(DataError):
    """A DataError caused by writing (full disk, permissions): the download stays valid."""


def _os_error(exc: OSError, path: Path, what: str) -> DataError:
    """Turn a write-side OSError into a DataError with a fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _WriteError(
            f"no space left on device while {what} {path}",
            hint=f"free some disk space, or fetch into another folder with --root DIR "
            f"(or set {ENV_DATA})",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return _WriteError(
            f"permission denied while {what} {path}",
            hint=f"choose a writable folder with --root DIR (or set {ENV_DATA})",
        )
    return _WriteError(
        f"cannot write {path} while {what}: {exc.strerror or exc}",
        hint=f"check the disk, or fetch into another folder with --root DIR (or set {ENV_DATA})",
    )


def _prepare_root(root: Path) -> None:
    """Create ``root`` and prove it is writable, or raise a DataError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DataError(
            f"dataset root {root} is not a writable folder: {exc.strerror or exc}",
            hint=f"choose a writable folder with --root DIR (or set {ENV_DATA})",
        ) from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_stale(root: Path, name: str) -> None:
    """Remove temporary folders of ``name`` left by a fetch that was killed."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\..*\.tmp$")
    for entry in root.glob(f".{name}.*.tmp"):
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            log.info("removing stale temporary folder %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _new_tmp(root: Path, name: str, tag: str = "") -> Path:
    """A hidden temporary folder in ``root`` (named after the pid, for stale cleanup), with
    the usual folder permissions rather than mkdtemp's 0700: it becomes the dataset folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.{tag}", suffix=".tmp", dir=root))
    umask = os.umask(0o022)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o777 & ~umask)
    return tmp


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


# --------------------------------------------------------------------------------------------
# extraction and copy


def _archive_kind(path: Path, declared: str | None) -> str:
    if declared:
        return "zip" if declared == "zip" else "tar"
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    return "tar"


def _choose_prefix(names: list[str], subdir: str) -> str:
    """The folder inside the archive to keep: ``subdir`` if present, else a lone top folder."""
    subdir = subdir.strip("/")
    if subdir and any(n == subdir or n.startswith(subdir + "/") for n in names):
        return subdir
    tops = {n.split("/", 1)[0] for n in names if n}
    if len(tops) == 1 and all("/" in n for n in names if n):
        return tops.pop()
    return ""


def _tar_member_is_safe(member: tarfile.TarInfo, dest: Path) -> None:
    """tarfile's own ``"data"`` extraction filter (PEP 706) vets the member: no absolute path,
    no ``..``, no link or device pointing outside ``dest``.

    Raises:
        DataError: the archive is unsafe to extract.
    """
    try:
        tarfile.data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        raise DataError(f"archive member {member.name!r} is unsafe to extract ({exc})",
                        hint="the archive may be malicious; fetch the dataset from its official source") from None


def _safe_rel(name: str, prefix: str) -> PurePosixPath | None:
    """Member name relative to ``prefix``; None for members outside it or hidden ones.

    Raises DataError on absolute paths or ``..`` (a malicious archive; zip files have no
    extraction filter of their own, tar members are vetted by :func:`_tar_member_is_safe` too).
    """
    name = name.replace("\\", "/")
    if prefix:
        if not name.startswith(prefix + "/"):
            return None
        name = name[len(prefix) + 1 :]
    rel = PurePosixPath(name)
    if not name or name.endswith("/"):
        return None
    if rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"archive member {name!r} points outside the extraction folder")
    if _is_hidden(rel):
        return None
    return rel


class _SourceReadError(Exception):
    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _write_member(src: IO[bytes], target: Path) -> None:
    """Copy ``src`` into the new file ``target``; write errors raise a DataError, read errors
    ``_SourceReadError``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "wb")
    except OSError as exc:
        raise _os_error(exc, target, "writing") from exc
    with out:
        while True:
            try:
                block = src.read(_CHUNK)
            except OSError as exc:
                raise _SourceReadError(exc) from exc
            if not block:
                break
            try:
                out.write(block)
            except OSError as exc:
                raise _os_error(exc, target, "writing") from exc


def _extract(archive: Path, dest: Path, info: DatasetInfo, declared: str | None, progress: bool) -> None:
    """Extract the kept part of ``archive`` into the existing empty folder ``dest``."""
    kind = _archive_kind(archive, declared)
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            prefix = _choose_prefix([m.filename for m in members], info.subdir)
            with _bar(len(members), f"extracting {info.name}", progress, unit="file") as bar:
                for m in members:
                    rel = _safe_rel(m.filename, prefix)
                    if rel is not None:
                        with zf.open(m) as src:
                            _write_member(src, dest / rel)
                    bar.update(1)
    else:
        with tarfile.open(archive, "r:*") as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
            names = [m.name[2:] if m.name.startswith("./") else m.name for m in members]
            prefix = _choose_prefix(names, info.subdir)
            with _bar(len(members), f"extracting {info.name}", progress, unit="file") as bar:
                for m, mname in zip(members, names):
                    _tar_member_is_safe(m, dest)
                    rel = _safe_rel(mname, prefix)
                    if rel is not None:
                        src = tf.extractfile(m)
                        if src is None:  # pragma: no cover - isfile() members always have data
                            continue
                        with src:
                            _write_member(src, dest / rel)
                    bar.update(1)


def _copy_tree(src: Path, dest: Path, info: DatasetInfo, progress: bool) -> None:
    """Copy the non-hidden files of ``src`` into the existing folder ``dest``."""
    files = list(_iter_files(src))
    with _bar(len(files), f"copying {info.name}", progress, unit="file") as bar:
        for rel, full in files:
            try:
                fin = open(full, "rb")
            except OSError as exc:
                raise _SourceReadError(exc) from exc
            with fin:
                _write_member(fin, dest / rel)
            bar.update(1)


_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
            lzma.LZMAError)


def _populate(
    tmp: Path, info: DatasetInfo, source: Path, is_archive: bool, declared: str | None,
    progress: bool, downloaded: bool = False,
) -> None:
    """Fill ``tmp`` from an archive or a folder, mapping failures to DataError."""
    try:
        if is_archive:
            _extract(source, tmp, info, declared, progress)
        else:
            _copy_tree(source, tmp, info, progress)
    except DataError:
        raise
    except _CORRUPT as exc:
        raise DataError(
            f"archive {source} of dataset '{info.name}' is truncated or corrupt: {exc}",
            hint=(
                "the download was deleted: run the command again to download it afresh"
                if downloaded
                else "replace it with a complete copy of the archive (or use the network)"
            ),
        ) from exc
    except (_SourceReadError, OSError) as err:
        exc = err.exc if isinstance(err, _SourceReadError) else err
        raise DataError(
            f"cannot read {exc.filename or source} for dataset '{info.name}': "
            f"{exc.strerror or exc}",
            hint="check that the archive or mirror folder is complete and readable",
        ) from exc


def _verify_tmp(tmp: Path, info: DatasetInfo, source: str, progress: bool,
                downloaded: bool = False) -> int:
    digest = tree_digest(tmp, progress=progress, desc=f"verifying {info.name}")
    if digest != info.tree_sha256:
        raise DataError(
            f"checksum mismatch for dataset '{info.name}' from {source}: content digest "
            f"{digest} != pinned {info.tree_sha256}; nothing was installed",
            hint=(
                "the download was damaged or the dataset changed upstream; it was deleted: run "
                "the command again, and report it if the mismatch persists"
                if downloaded
                else "the mirror holds other files than the published dataset (damaged, "
                "edited, or the wrong folder): point --mirror at an unmodified copy"
            ),
        )
    n = count_files(tmp)
    _write_marker(tmp, info, n, source)
    return n


def _find_in_mirror(mirror: Path, info: DatasetInfo) -> tuple[Path, bool]:
    """Locate ``info`` in a mirror: (path, is_archive)."""
    if mirror.is_file():
        return mirror, True
    if not mirror.is_dir():
        raise DataError(
            f"mirror {mirror} does not exist",
            hint=f"pass a folder that holds {info.mirror_path}/ (or the dataset archive), "
            "or an archive file, with --mirror PATH",
        )
    tried = []
    for rel in dict.fromkeys([info.mirror_path, info.name]):
        candidate = mirror / rel
        tried.append(candidate)
        if candidate.is_dir():
            return candidate, False
    url_name = PurePosixPath(info.url.split("?", 1)[0]).name
    ext = info.archive_format
    for fname in dict.fromkeys([f"{info.name}.{ext}", f"{info.mirror_path}.{ext}", url_name]):
        candidate = mirror / fname
        tried.append(candidate)
        if candidate.is_file():
            return candidate, True
    raise DataError(
        f"dataset '{info.name}' not found in mirror {mirror} (looked for "
        + ", ".join(str(t) for t in tried) + ")",
        hint=f"point --mirror (or {ENV_MIRROR}) at a folder that holds {info.mirror_path}/",
    )


def _archive_sha256_check(part: Path, info: DatasetInfo) -> None:
    if info.archive_sha256 is None:
        return
    got = _file_sha256(part)
    if got != info.archive_sha256.lower():
        raise DataError(
            f"checksum mismatch for the archive of dataset '{info.name}' downloaded from "
            f"{info.url}: sha256 {got} != pinned {info.archive_sha256}",
            hint="the download was damaged or the file changed upstream; it was deleted, "
            "run the command again to download it afresh",
        )


# --------------------------------------------------------------------------------------------
# public entry points


def fetch_dataset(
    name: str | DatasetInfo,
    root: str | Path | None = None,
    mirror: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    verify: bool = False,
    retries: int = 2,
) -> Path:
    """Make dataset ``name`` available under ``root`` and return its folder ``root/NAME``.

    Args:
        name: a registered name (``"grocery"``, ``"omniglot"``) or a :class:`DatasetInfo`.
        root: data root; default ``$FEWSHOT_DATA`` or ``~/.cache/fewshot/datasets``
            (honouring ``XDG_CACHE_HOME``).
        mirror: local folder (holding ``info.mirror_path`` or ``NAME/`` or the archive) or
            archive file to use instead of the network; default ``$FEWSHOT_DATASETS_MIRROR``.
        progress: show progress bars on stderr.
        force: fetch again and replace an existing copy.
        verify: re-check an existing copy with the full tree digest (default: the cheap
            marker + file-count check).
        retries: how many times to resume an interrupted download within this call.

    Returns:
        The dataset folder, complete and verified.

    Raises:
        DataError: no network, HTTP error, checksum mismatch, truncated or corrupt archive,
            write error or full disk, root not writable, dataset missing from the mirror.
            Nothing is left behind except a partial download kept for resuming.
    """
    info = get_dataset_info(name)
    root = Path(root).expanduser() if root is not None else default_root()
    dest = root / info.name

    if force and (dest.exists() or dest.is_symlink()) and not dest.joinpath(MARKER_NAME).is_file():
        raise DataError(f"{dest} was not fetched by fewshot: --force replaces only a copy that fewshot fetched",
                        hint="move it away, or fetch into another folder with --root DIR")
    if not force and dest.is_dir():
        marker = _read_marker(dest)
        if is_verified(dest, info, full=verify):
            return dest
        if marker is None and not dest.joinpath(MARKER_NAME).exists():
            # Not ours: adopt it only if it is exactly the dataset.
            if tree_digest(dest, progress, f"verifying {info.name}") == info.tree_sha256:
                _prepare_root(root)
                try:
                    _write_marker(dest, info, count_files(dest), "existing folder")
                except OSError as exc:
                    raise _os_error(exc, dest / MARKER_NAME, "writing") from exc
                return dest
            raise DataError(
                f"{dest} exists but does not hold the dataset '{info.name}' "
                "(its content does not match the pinned checksum); it was not fetched by fewshot, so it "
                "is left as it is",
                hint="move it away, or fetch into another folder with --root DIR",
            )
        log.warning("%s failed verification; fetching it again", dest)
    elif not force and (dest.exists() or dest.is_symlink()):
        raise DataError(
            f"{dest} exists and is not a folder",
            hint="move it away, or choose another --root DIR",
        )

    created_root = not root.exists()
    _prepare_root(root)
    try:
        return _fetch_into(info, root, dest, mirror, progress, retries)
    except BaseException:
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if the failed fetch left it empty
        raise


def _fetch_into(
    info: DatasetInfo, root: Path, dest: Path, mirror: str | Path | None, progress: bool,
    retries: int,
) -> Path:
    """Get ``info`` from the mirror or the network into the writable ``root`` (see
    :func:`fetch_dataset`)."""
    _clean_stale(root, info.name)

    mirror_value = mirror if mirror is not None else os.environ.get(ENV_MIRROR) or None
    part = meta = None
    if mirror_value is not None:
        source, is_archive = _find_in_mirror(Path(mirror_value).expanduser(), info)
        declared = info.archive_format if source.name == PurePosixPath(info.url).name else None
        source_label = str(source)
    else:
        part = _download(info, root, progress, retries)
        _, meta = _part_paths(root, info)
        source, is_archive, declared, source_label = part, True, info.archive_format, info.url
        try:
            _archive_sha256_check(part, info)
        except DataError:
            _remove_download(part, meta)
            raise

    try:
        tmp = _new_tmp(root, info.name)
    except OSError as exc:
        raise _os_error(exc, root, "creating a temporary folder in") from exc
    try:
        try:
            _populate(tmp, info, source, is_archive, declared, progress, part is not None)
            _verify_tmp(tmp, info, source_label, progress, part is not None)
        except _WriteError:
            raise  # full disk etc.: the downloaded archive is fine, keep it for the next run
        except DataError:
            # a complete but corrupt or mismatching download is useless for resuming: drop it
            if part is not None:
                _remove_download(part, meta)
            raise
        except OSError as exc:
            raise _os_error(exc, tmp, "writing") from exc
        try:
            replace_dir(tmp, dest)  # the old copy is deleted only once the new one is in place
        except OSError as exc:
            raise _os_error(exc, dest, "installing") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if part is not None:
        _remove_download(part, meta)
    return dest


def resolve_data(value: str | Path, root: str | Path | None = None) -> Path:
    """Resolve a ``--data`` value: an existing path, or the name of a fetched dataset.

    Raises:
        DataError: a known dataset that is not downloaded (the message says how to fetch it),
            or neither an existing path nor a known dataset name.
    """
    path = Path(value).expanduser()
    if path.exists():
        return path
    name = str(value)
    info = DATASETS.find(name)
    if info is not None:
        dest = dataset_path(info, root)
        if is_verified(dest, info):
            return dest
        raise DataError(
            f"dataset '{name}' is not downloaded (looked in {dest}); run "
            f"`fewshot datasets fetch {name}` (or with --mirror PATH offline)",
            hint=f"`fewshot datasets fetch {name}` downloads it from {info.homepage}; set "
            f"{ENV_DATA} if it lives under another root",
        )
    known = ", ".join(DATASETS.names())
    raise DataError(
        f"no such file or folder: {value}",
        hint=f"pass an existing path, or a dataset name ({known}) fetched with "
        "`fewshot datasets fetch NAME`",
    )


__all__ = [
    "DatasetInfo",
    "MARKER_NAME",
    "count_files",
    "dataset_path",
    "default_root",
    "fetch_dataset",
    "get_dataset_info",
    "is_verified",
    "list_datasets",
    "register_dataset",
    "resolve_data",
    "tree_digest",
    "unregister_dataset",
]

