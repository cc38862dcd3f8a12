"""Constants and helpers every part of the fetcher uses: names, progress bars, write errors,
the data root and its temporary folders."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path


from fewshot.errors import DataError


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
            hint=f"free some disk space, or fetch into another folder with root=DIR "
            f"(or set {ENV_DATA})",
            options=("root",),
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return _WriteError(
            f"permission denied while {what} {path}",
            hint=f"choose a writable folder with root=DIR (or set {ENV_DATA})",
            options=("root",),
        )
    return _WriteError(
        f"cannot write {path} while {what}: {exc.strerror or exc}",
        hint=f"check the disk, or fetch into another folder with root=DIR (or set {ENV_DATA})",
        options=("root",),
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
            f"{root} is not a writable folder for datasets: {exc.strerror or exc}",
            hint=f"choose a writable folder with root=DIR (or set {ENV_DATA})",
            options=("root",),
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


