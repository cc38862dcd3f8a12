"""Atomic file writes: write to a temporary file beside the target, then rename.

A crash (or a full disk) mid-write leaves the previous file intact and no half-written
file behind. Used for caches, indexes, checkpoints, split files and reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
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
                       hint=f"choose a new {option if option.endswith('path') else option + ' path'} (fewshot "
                            f"replaces only a {what} it wrote, "
                            f"and only with {overwrite_flag})")


# --------------------------------------------------------------------------- one writer per folder
#: folder (real path) -> [open lock file, nesting depth, owner] for the locks this process holds
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


def lock_file(folder: str | Path) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` beside it (not inside, so that replacing the
    folder as a whole, as :func:`atomic_dir` does, never replaces the lock under its holder)."""
    real = _real(folder)
    return real.with_name(f".{real.name}.lock")


def _holder_text(info: dict) -> str:
    if not info:
        return "another process"
    import socket

    mine = info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()
    where = "another writer in this same process" if mine else f"PID {info.get('pid', '?')} on {info.get('host', '?')}"
    return f"{where} ({info.get('command', '?')}, since {info.get('since', '?')})"


def _read_holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(folder: Path, info: dict, what: str):
    from .errors import FolderBusyError

    return FolderBusyError(
        f"{folder} is being written by {_holder_text(info)}: one writer per folder at a time, so this "
        f"{what} is refused", holder=info,
        hint="stop that process (or wait until it ends) and run this again; reading the folder "
             "(fewshot classify --index, fewshot serve --read-only) works meanwhile")


@contextlib.contextmanager
def writer_lock(folder: str | Path, what: str, *, owner: object | None = None) -> Iterator[Path]:
    """Hold the writer lock of ``folder`` (an OS ``flock`` on :func:`lock_file`) for the body.

    The lock dies with the process, so a crash or ``kill -9`` never leaves it stuck. A second
    writer is refused at once (never waits), with the holder's PID, host and command. Inside
    one process the lock is re-entrant for the same ``owner`` object only (a service that
    holds its index folder may compact it); any other writer, in this process or another, is
    refused: two writers of one folder lose each other's changes wherever they run.

    Args:
        folder: the folder to write (need not exist yet; its parent is created).
        what: the writer, for the holder record and messages (e.g. ``"fewshot serve"``).
        owner: the object on whose behalf the lock is held (``None``: this call only).

    Raises:
        FolderBusyError: another writer holds the lock (naming it and the fix).
        FewshotError: the lock file cannot be created beside ``folder`` (a read-only parent).
    """
    real = _real(folder)
    with _HELD_GUARD:
        held = _HELD.get(real)
        if held is not None:
            if owner is None or held[2] is not owner:
                raise _busy(real, _read_holder(lock_file(real)), what)
            held[1] += 1
        else:
            _HELD[real] = [_take(real, what), 1, owner]
    try:
        yield real
    finally:
        with _HELD_GUARD:
            entry = _HELD[real]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[real]
                _let_go(real, entry[0])


def _take(real: Path, what: str):
    """Open and ``flock`` the lock file of ``real`` without waiting; record the holder.

    The holder removes the file when it lets go (:func:`_let_go`), so a lock that was taken on a
    file already unlinked (opened just before its holder removed it) is retried on the new one.
    """
    import fcntl

    path = lock_file(real)
    for _ in range(100):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            from .errors import FewshotError

            raise FewshotError(f"cannot write beside {real} (the lock file {path.name}: {exc.strerror or exc})",
                               hint=f"fewshot writes a lock file beside every folder it writes: {real.parent} "
                                    "must be writable (to serve a read-only index, use fewshot serve "
                                    "--read-only)") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise _busy(real, _read_holder(path), what) from None
        except BaseException:
            fh.close()
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fh.fileno()).st_ino:
            _record_holder(fh, what)
            return fh
        fh.close()  # the file we locked was removed by its last holder: lock the new one
    raise _busy(real, {}, what)  # pragma: no cover - a hundred holders in a row


def _record_holder(fh, what: str) -> None:
    import socket
    import sys
    import time

    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
            "argv": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:6])),
            "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(info))
    fh.flush()


def _let_go(real: Path, fh) -> None:
    """Remove the lock file (while still holding it), then release the lock."""
    with contextlib.suppress(OSError):
        os.unlink(lock_file(real))
    fh.close()


def holds_writer_lock(folder: str | Path) -> bool:
    """Whether this process holds the writer lock of ``folder``."""
    with _HELD_GUARD:
        return _real(folder) in _HELD


@contextlib.contextmanager
def claimed_output(path: str | Path, owner: object, writer: str | None = None, **check: Any) -> Iterator[Path]:
    """:func:`check_output` ``path`` (its arguments in ``check``), then hold its writer lock for
    the body (as ``owner``, which the body passes on to the writes it makes; ``writer`` names it,
    default ``check["what"]``) and check again under the lock, where no other writer can change
    the answer.

    Raises:
        FewshotError: from :func:`check_output`. FolderBusyError: another writer holds ``path``.
    """
    check_output(path, **check)  # a bad --out is named as such before a lock file is made beside it
    with writer_lock(path, writer or check["what"], owner=owner) as real:
        tidy_interrupted(path)
        check_output(path, **check)
        yield real


#: the name :func:`atomic_dir` gives its temporary folder: ``.NAME.`` + mkdtemp's 8 characters + ``.tmp``
_TMP_NAME = r"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp"


def tidy_interrupted(path: str | Path) -> None:
    """What a killed writer of ``path`` left beside it, put right by the next writer (which holds
    ``path``'s writer lock, so no writer of it is alive): the previous folder moved aside by
    :func:`replace_dir` is moved back (:func:`recover_dir`), and :func:`atomic_dir`'s
    unfinished temporary folders ``.NAME.XXXXXXXX.tmp`` are removed. Says so in the log."""
    path = Path(path)
    log = logging.getLogger("fewshot")
    if recover_dir(path):
        log.warning("%s: put back the previous folder, which an interrupted write had moved aside", path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(_TMP_NAME.format(name=re.escape(path.name)))
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if pattern.fullmatch(tmp.name) and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("%s: removed %s, the unfinished folder of an interrupted write", path, tmp.name)
