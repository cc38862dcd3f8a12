"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash (or a full disk) mid-write leaves the previous file intact and no half-written
file behind. Used for caches, indexes, checkpoints, split files and reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

#: this process's umask (read once at import, while no other thread can race os.umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    The temporary file is removed if the body raises. Parent folders are created. The result
    gets the usual mode (``0666 & ~umask``, 0644 under umask 022) whatever the body did: a
    writer that replaces the temporary file with one of its own (safetensors' ``save_file``
    writes a new file and renames it, 0600) would otherwise leave an owner-only file.

    Example::

        with atomic_path("index/vectors.faiss") as tmp:
            faiss.write_index(index, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600, and so may a writer that replaced it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync before rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (a folder) as a whole.

    Used for multi-file artefacts (an index folder, a run folder's weights): readers see
    either the old complete folder or the new complete one. The old folder is moved aside
    and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the result gets the usual permissions
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the complete folder ``src`` onto ``dst`` (same file system), replacing ``dst``.

    ``dst`` is first renamed aside to ``.NAME.old-PID`` and deleted only after ``src`` is in
    place, so a crash between the two renames leaves the old folder for :func:`recover_dir`.
    """
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:  # put the previous folder back
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> bool:
    """Undo a crash inside :func:`atomic_dir`'s two renames.

    Between moving the old folder aside and renaming the new one in, a crash leaves ``path``
    missing and the complete old folder at ``.NAME.old-PID``. If ``path`` is missing and such
    a folder exists, it is renamed back. Returns whether anything was recovered.
    """
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not olds:
        return False
    os.replace(olds[0], path)
    return True


# --------------------------------------------------------------------------- safe outputs
def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _check_writable(out: Path, shown: str | Path, option: str) -> None:
    """The nearest existing ancestor of ``out`` must be a folder this process can write in."""
    from .errors import FewshotError

    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FewshotError(f"{option} {shown}: {parent} is a file, not a folder",
                           hint=f"choose an {option} path whose parent is a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise FewshotError(f"{option} {shown}: cannot write in {parent} ({exc.strerror or exc})",
                           hint=f"choose an {option} path in a folder you can write to") from None


def check_output(path: str | Path, *, what: str, is_ours: Callable[[Path], bool], overwrite: bool,
                 option: str = "--out", inputs: Iterable[str | Path] = (), overwrite_flag: str = "--overwrite",
                 input_roots: Iterable[str | Path] = (), owned: Callable[[str], bool] | None = None) -> None:
    """Refuse to write ``path`` unless it is new (or an empty folder), or it already holds a
    ``what`` that fewshot wrote, holding nothing else, and ``overwrite`` is set.

    Call it after the inputs are known and before any long work, so that a refused output
    costs nothing and touches nothing. Paths are compared after resolving symbolic links.

    Args:
        path: the output file or folder a command is about to (re)place.
        what: what the command writes, for messages (e.g. ``"fewshot index"``).
        is_ours: ``is_ours(path)`` is true when ``path`` holds such an artefact.
        overwrite: the command's ``--overwrite``.
        overwrite_flag: how the messages name it (the Python API: ``overwrite=True``).
        option: the option that named ``path``, for messages.
        inputs: input files (e.g. the images being indexed): ``path`` may neither be one of
            them nor a folder that holds one.
        input_roots: input folders (e.g. a folder-tree dataset): ``path`` may not be one of
            them, hold one, or lie inside one (its files would be read as data next time).
        owned: for a folder artefact, ``owned(name)`` is true for the names the command itself
            writes at its top level; anything else found there (a user's notes, photos) is
            refused even with ``overwrite``, since replacing the folder would delete it.

    Raises:
        FewshotError: naming ``path`` and the fix.
    """
    from .errors import FewshotError

    out = _real(path)
    for root in input_roots:
        r = _real(root)
        if out.is_relative_to(r) or r.is_relative_to(out):
            raise FewshotError(f"{option} {path} would be inside (or contain) the input data folder {r}",
                               hint=f"write the output outside the data folder, e.g. {option} {r.parent / (r.name + '-out')}")
    for item in inputs:
        p = _real(item)
        if p.is_relative_to(out):
            raise FewshotError(f"{option} {path} holds the input image {p}: refusing to replace it",
                               hint=f"choose an {option} path outside the input data")
    _check_writable(out, path, option)
    if not out.exists():
        return
    if is_ours(out):
        foreign = sorted(e.name for e in out.iterdir() if not e.name.startswith(".") and not owned(e.name)) \
            if owned is not None and out.is_dir() else []
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FewshotError(f"{option} {path} holds a {what} and also files fewshot did not write ({shown}): "
                               "refusing to replace it", hint="move those files out first, or choose another "
                                                                f"{option}")
        if overwrite:
            return
        raise FewshotError(f"{option} {path} already holds a {what}",
                           hint=f"pass {overwrite_flag} to replace it, or choose another {option}")
    if out.is_dir() and not any(out.iterdir()):
        return
    kind = "folder" if out.is_dir() else "file"
    raise FewshotError(f"{option} {path} is an existing {kind} that is not a {what}: refusing to replace it",
                       hint=f"choose a new {option} path (fewshot replaces only a {what} it wrote, "
                            f"and only with {overwrite_flag})")
