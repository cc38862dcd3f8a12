"""Folder-tree datasets: ``root/<class>/<images>`` or ``root/<group>/<class>/<images>``.

How the tree is read is its **layout** (``load_dataset(..., layout=...)``, ``--layout`` on every
command that reads a dataset):

* ``"class"``: every top-level folder is a class (``label`` = its name, ``group`` = None);
  images in its sub-folders, at any depth, are the class's own.
* ``"group/class"``: every top-level folder is a group (a brand) and each of its sub-folders a
  class (images deeper down are the class's own). Images lying directly in a group folder fit
  no class: they are skipped, with one warning in ``Dataset.warnings`` naming the folders and
  the count (``strict=True``: refused).
* ``"auto"`` (the default): ``class`` when top-level folders hold images directly,
  ``group/class`` when they hold only sub-folders. A tree whose depth is mixed is **refused**
  with a :class:`DataError` naming the folders, since reading it either way silently turns
  articles into brands or brands into articles:

  - some top-level folders hold images directly and others only sub-folders (e.g. two stray
    photos dropped into one brand folder of a ``<brand>/<article>/`` tree);
  - in a ``group/class`` tree, a class folder holds no image directly, only sub-folders of
    images (is it a class, or a group of classes?).

  A ``class`` tree whose class folders also hold sub-folders of images loads (their images
  count for the class, as documented) with a note in ``Dataset.warnings``.

When class folder names repeat across groups, labels are ``"<group>/<class>"`` (a note says
so); a two-level tree of PNG files whose path mentions ``omniglot`` (or whose class folders are
named ``characterNN``) is Omniglot (``source="omniglot"``, labels always ``"<alphabet>/<character>"``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, is_image_file
from .records import Dataset, ImageRecord
from .rows import Row, examples, hidden, note, warn

__all__ = ["LAYOUTS", "check_layout", "load_tree", "FOLDER_HINT"]

#: the accepted layouts, ``auto`` first
LAYOUTS = ("auto", "class", "group/class")

FOLDER_HINT = ("put each class's images in its own folder: root/<class>/<image>.jpg "
               "(or root/<group>/<class>/<image>.jpg); accepted suffixes: "
               + " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)))

_LAYOUT_FIX = ("pass layout='group/class' to read top-level folders as groups "
               "and their sub-folders as classes, or layout='class' to read every top-level folder as one class")


def check_layout(layout: object) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`.

    Raises:
        TypeError: not a string. ValueError: another string (the message lists the layouts).
    """
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a str (one of {', '.join(LAYOUTS)}), not {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, image file names) directly in ``folder``, sorted, hidden skipped."""
    dirs, images = [], []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if hidden(e.name):
                    continue
                try:
                    if e.is_dir():
                        dirs.append(e.name)
                    elif is_image_file(e.name) and e.is_file():
                        images.append(e.name)
                except OSError:
                    continue
    except OSError as exc:
        raise DataError(f"cannot list folder {folder}: {exc}", hint="check the folder's permissions") from None
    return sorted(dirs), sorted(images)


def _images_under(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), as paths relative to it, sorted."""
    out: list[str] = []
    for cur, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        rel = os.path.relpath(cur, folder)
        for f in sorted(files):
            if not hidden(f) and is_image_file(f):
                out.append(f if rel == "." else os.path.join(rel, f))
    return out


def _images_below(folder: str, dirs: list[str]) -> bool:
    """Whether any of the sub-folders ``dirs`` of ``folder`` holds an image, at any depth."""
    for d in dirs:
        for _, sub, files in os.walk(os.path.join(folder, d)):
            sub[:] = [s for s in sub if not hidden(s)]
            if any(not hidden(f) and is_image_file(f) for f in files):
                return True
    return False


# --------------------------------------------------------------------------- layout detection


def _detect(root: Path, scans: dict[str, tuple[list[str], list[str]]]) -> str:
    """``"class"`` or ``"group/class"`` for a tree of consistent depth.

    Raises:
        DataError: the depth is mixed (the message names the folders, the hint the fix).
    """
    base = str(root)
    direct = [d for d, (_, images) in scans.items() if images]
    nested = [d for d, (dirs, images) in scans.items() if not images and _images_below(os.path.join(base, d), dirs)]
    if not direct:
        _check_class_depth(root, scans)
        return "group/class"
    if nested:
        raise _mixed_top_level(root, scans, direct, nested)
    return "class"


def _mixed_top_level(root: Path, scans: dict[str, tuple[list[str], list[str]]], direct: list[str],
                     nested: list[str]) -> DataError:
    base = str(root)
    shown = []
    for d in direct:
        dirs, images = scans[d]
        beside = " beside its sub-folders" if _images_below(os.path.join(base, d), dirs) else ""
        shown.append(f"{d} ({len(images)} photo(s){beside})")
    return DataError(
        f"{root} mixes two layouts: {len(nested)} of {len(scans)} top-level folders hold only sub-folders "
        f"(<group>/<class>/photo: {examples(nested, 3)}), but {len(direct)} hold(s) photos directly "
        f"(<class>/photo): {examples(shown)}",
        hint="move the stray photos into an article folder (root/<group>/<class>/photo.jpg), or " + _LAYOUT_FIX
             + "; layout='group/class' skips photos lying directly in a group folder",
        options=("layout",))


def _check_class_depth(root: Path, scans: dict[str, tuple[list[str], list[str]]]) -> None:
    """In a ``group/class`` tree, every class folder that holds images must hold some directly.

    Raises:
        DataError: class folders that hold only sub-folders of images (named, with the fix).
    """
    deep, flat = [], 0
    for group, (class_dirs, _) in scans.items():
        for cls in class_dirs:
            folder = os.path.join(str(root), group, cls)
            sub, images = _scan(folder)
            if images:
                flat += 1
            elif _images_below(folder, sub):
                deep.append(f"{group}/{cls}")
    if not deep:
        return
    where = (f"while {flat} other class folder(s) hold photos directly: the photos lie at different depths"
             if flat else "the photos lie three or more levels deep")
    raise DataError(
        f"{root}: {len(deep)} class folder(s) hold no photo directly, only sub-folders of photos "
        f"({examples(deep)}), {where}; each of them may be one class or a group of classes",
        hint="put each class's photos directly in its folder (root/<group>/<class>/photo.jpg), point data at "
             "a folder one level down, or pass layout='group/class' to count "
             "the photos in a class folder's sub-folders as that class's own", options=("data", "layout"))


# --------------------------------------------------------------------------- reading


def load_tree(root: Path, strict: bool, layout: str = "auto") -> tuple[Dataset, list[Row]]:
    """Read a folder tree in ``layout`` (see the module docstring).

    Returns:
        ``(Dataset without records, rows)``: ``source`` is ``"folder"`` or ``"omniglot"``,
        ``warnings`` the notes gathered; rows in sorted folder order.

    Raises:
        DataError: no class folders or no images; a mixed-depth tree with ``layout="auto"``;
            with ``strict``, any warning.
    """
    root = root.resolve()
    base = str(root)
    top_dirs, root_images = _scan(base)
    warnings: list[str] = []
    hint_layout = "put each class's images in its own folder: root/<class>/<image> or root/<group>/<class>/<image>"
    if not top_dirs:
        if root_images:
            raise DataError(f"no class folders in {root}: {len(root_images)} image(s) lie directly in it",
                            hint=hint_layout)
        raise DataError(f"no images found in {root}", hint=FOLDER_HINT)
    if root_images:
        warn(warnings, f"{len(root_images)} image(s) directly in {root} ignored (not in a class folder)",
             strict, root, hint_layout)
    scans = {d: _scan(os.path.join(base, d)) for d in top_dirs}
    if check_layout(layout) == "auto":
        layout = _detect(root, scans)
    name = root.name or "dataset"
    if layout == "class":
        entries = [(None, cls) for cls in top_dirs]
    else:
        entries = _class_folders(root, scans, warnings, strict)
    found = _files(root, entries, warnings, strict)
    _note_sub_folders(found, warnings)
    rows, omniglot = _rows(root, found, warnings)
    return Dataset([], name=name, root=root, source="omniglot" if omniglot else "folder", warnings=warnings), rows


def _class_folders(root: Path, scans: dict[str, tuple[list[str], list[str]]], warnings: list[str],
                   strict: bool) -> list[tuple[str | None, str]]:
    """``(group, class)`` of a ``group/class`` tree; images lying directly in a group folder are
    skipped with one warning (refused with ``strict``)."""
    base = str(root)
    entries: list[tuple[str | None, str]] = []
    strays = [(group, len(images)) for group, (_, images) in scans.items() if images]
    if strays:
        total = sum(n for _, n in strays)
        warn(warnings, f"{total} photo(s) lying directly in group folder(s) skipped (stray: not in a class folder): "
             + examples([f"{g} ({n})" for g, n in strays]), strict, root,
             "move them into a class folder (root/<group>/<class>/photo.jpg), or pass layout='class' to read "
             "every top-level folder as one class", options=("layout",))
    for group, (class_dirs, _) in scans.items():
        if not class_dirs:
            warn(warnings, f"empty group folder (no class folders): {os.path.join(base, group)}", strict, root,
                 "add class folders with images to it or delete it")
        entries += [(group, cls) for cls in class_dirs]
    return entries


def _files(root: Path, entries: list[tuple[str | None, str]], warnings: list[str],
           strict: bool) -> list[tuple[str | None, str, list[str]]]:
    """``(group, class, image paths relative to the class folder)``; empty class folders warned."""
    out = []
    for group, cls in entries:
        folder = os.path.join(str(root), *([group] if group is not None else []), cls)
        files = _images_under(folder)
        if not files:
            warn(warnings, f"empty class folder (no images): {folder}", strict, root,
                 "add images to the folder or delete it")
            continue
        out.append((group, cls, files))
    return out


def _note_sub_folders(found: list[tuple[str | None, str, list[str]]], warnings: list[str]) -> None:
    """Say which class folders got images from their sub-folders (they may be classes of their own)."""
    deep = ["/".join(p for p in (group, cls) if p) for group, cls, files in found if any(os.sep in f for f in files)]
    if deep:
        note(warnings, f"{len(deep)} class folder(s) hold photos in sub-folders, counted as the class's own: "
             f"{examples(deep)} (if those sub-folders are classes, see --layout)")


def _rows(root: Path, found: list[tuple[str | None, str, list[str]]], warnings: list[str]) -> tuple[list[Row], bool]:
    """The rows, and whether the tree is Omniglot; class names that repeat across groups make
    labels ``"<group>/<class>"`` (with a note)."""
    two_level = any(group is not None for group, _, _ in found)
    all_png = bool(found) and all(f.lower().endswith(".png") for _, _, files in found for f in files)
    omniglot = two_level and all_png and (
        "omniglot" in str(root).lower() or all(re.fullmatch(r"character\d+", cls) for _, cls, _ in found))
    groups_of: dict[str, set[str]] = {}
    for group, cls, _ in found:
        if group is not None:
            groups_of.setdefault(cls, set()).add(group)
    repeated = sorted(c for c, g in groups_of.items() if len(g) > 1)
    if repeated and not omniglot:
        example = repeated[0]
        note(warnings, f"class folder names repeat across groups (e.g. {example!r} in "
             f"{', '.join(sorted(groups_of[example])[:3])}): labels are '<group>/<class>'")
    qualify = omniglot or bool(repeated)
    rows: list[Row] = []
    for group, cls, files in found:
        label = f"{group}/{cls}" if qualify and group is not None else cls
        parts = [group, cls] if group is not None else [cls]
        folder = os.path.join(str(root), *parts)
        for f in files:
            rows.append(Row(ImageRecord(Path(os.path.join(folder, f)), label, group, None),
                            tuple(Path(os.path.join(*parts, f)).parts)))
    return rows, omniglot

