"""Errors that reach a user carry a message naming the file and the fix.

The CLI catches :class:`FewshotError` and prints ``error: <message>`` (plus the hint)
without a traceback; anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class FewshotError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` how to fix it.

    Library code names its options as they are spelt in Python (``ways=1``, ``option ways = 1``,
    ``split='all'``, a bare ``image_size``), never as command-line flags, and lists them in
    ``options``; the CLI shows each as the command's flag (:func:`fewshot.cli.common.show_flags`).

    Attributes:
        options: the names of the options (parameters or dataclass fields: a method's, the
            training loop's, an index kind's) that the message and hint name. Empty when none.
    """

    options: tuple[str, ...] = ()

    def __init__(self, message: str, hint: str | None = None, *, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if options:
            self.options = tuple(options)

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class DataError(FewshotError):
    """A dataset, manifest or split file cannot be used (missing path, bad columns, empty)."""


class InputError(DataError, ValueError):
    """A value given to fewshot cannot be used: an article label or group, an image array.

    Both a :class:`DataError` (the CLI and the service print its message and hint) and a
    ``ValueError`` (what a Python caller expects for a bad argument value).

    Attributes:
        code: the problem for machines, e.g. ``"invalid_label"``, ``"empty_enrolment"``,
            ``"group_conflict"`` (the service answers it as its JSON ``error``).
    """

    def __init__(self, message: str, hint: str | None = None, code: str = "invalid_input", *,
                 options: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint, options=options)
        self.code = code


class ImageReadError(FewshotError):
    """One image cannot be decoded (missing, zero-byte, truncated, corrupt, not an image).

    Attributes:
        path: the offending file.
        reason: a short human reason, e.g. ``"zero-byte file"``.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"cannot read image {self.path}: {reason}",
            hint="replace or delete the file, or leave strict off to skip it",
            options=("strict",),
        )


class BackboneError(FewshotError):
    """A backbone name is unknown, its package is missing, or its weights cannot be loaded."""


class CheckpointError(FewshotError):
    """A saved run, index or cache is damaged or does not match the requested backbone."""


class FolderBusyError(FewshotError):
    """Another process (or another writer in this one) holds the writer lock of a folder.

    Attributes:
        holder: what the lock file says about the holder (``pid``, ``host``, ``command``,
            ``since``), empty when it cannot be read.
    """

    def __init__(self, message: str, hint: str | None = None, holder: dict | None = None) -> None:
        super().__init__(message, hint)
        self.holder = dict(holder or {})
