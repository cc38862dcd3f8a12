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

Parts: :mod:`.registry` (the datasets), :mod:`.download` (resumable HTTP), :mod:`.archive`
(extraction and mirrors), :mod:`.verify` (tree digests, markers), :mod:`.common` (names and
helpers); this module holds the entry points :func:`fetch_dataset` and :func:`resolve_data`.

Atomicity. A download goes to ``ROOT/.downloads/NAME.part`` and resumes with an HTTP Range
request after an interruption (a server that ignores Range restarts it from zero). The
archive (or mirror folder) is extracted into a hidden temporary folder in ``ROOT``, verified,
marked with ``.fewshot-verified.json`` and only then renamed onto ``ROOT/NAME`` with
:func:`os.replace`. So ``ROOT/NAME`` is either absent or complete and verified; a failure
removes the temporary folder and keeps at most the ``.part`` file, for resuming.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path, PurePosixPath

from fewshot.errors import DataError
from fewshot.io import replace_dir

from .archive import _archive_sha256_check, _extract, _find_in_mirror, _populate, _verify_tmp  # noqa: F401
from .common import (DOWNLOADS_DIR, ENV_DATA, ENV_MIRROR, MARKER_NAME, _clean_stale, _new_tmp,  # noqa: F401
                     _os_error, _prepare_root, _WriteError, log)
from .download import _download, _part_paths, _remove_download
from .registry import (DATASETS, DatasetInfo, dataset_path, default_root, get_dataset_info,  # noqa: F401
                       list_datasets, register_dataset, unregister_dataset)
from .verify import _iter_files, _read_marker, _write_marker, count_files, is_verified, tree_digest  # noqa: F401

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
        raise DataError(f"{dest} was not fetched by fewshot: force=True replaces only a copy that fewshot fetched",
                        hint="move it away, or fetch into another folder with root=DIR", options=("force", "root"))
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
                hint="move it away, or fetch into another folder with root=DIR",
                options=("root",),
            )
        log.warning("%s failed verification; fetching it again", dest)
    elif not force and (dest.exists() or dest.is_symlink()):
        raise DataError(
            f"{dest} exists and is not a folder",
            hint="move it away, or choose another root=DIR",
            options=("root",),
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
        _refuse_foreign_files(dest, tmp)
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


def _refuse_foreign_files(dest: Path, new: Path) -> None:
    """Refuse to replace ``dest`` when it holds files the new copy ``new`` does not (a user's
    annotations added to a fetched dataset): replacing the folder would delete them.

    Raises:
        DataError: naming the files and the fix.
    """
    if not dest.is_dir():
        return
    extra = sorted({rel for rel, _ in _iter_files(dest)} - {rel for rel, _ in _iter_files(new)})
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise DataError(f"{dest} holds files that are not part of the dataset ({shown}): replacing the copy "
                        "would delete them", hint="move them out of the dataset folder, then fetch again")


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

