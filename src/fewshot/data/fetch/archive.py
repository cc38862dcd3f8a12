"""Extraction of an archive (or copy of a mirror folder) into a temporary folder, and its verification."""

from __future__ import annotations

import lzma
import re
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO


from fewshot.errors import DataError

from .common import _CHUNK, ENV_MIRROR, _bar, _os_error
from .registry import DatasetInfo
from .verify import _file_sha256, _is_hidden, _iter_files, _write_marker, count_files, tree_digest

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
        hint=f"point mirror (or {ENV_MIRROR}) at a folder that holds {info.mirror_path}/",
        options=("mirror",),
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
