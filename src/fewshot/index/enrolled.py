"""Enrolled photos of an index folder: what a rebuild keeps, and the export of a catalogue.

The service stores the photos of articles enrolled over HTTP in ``INDEX_DIR/enrolled/`` (the
only copy a user has of them). Rebuilding the folder (``fewshot index --overwrite``, a
retrained model) must keep them: :func:`enrolled_articles` reads them from the old folder,
:func:`add_enrolled` re-embeds them with the new model into the new index. :func:`export_catalogue`
(``fewshot export``) writes every article's photos as a folder tree plus a CSV manifest that
``fewshot index --data`` reads back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.records import ImageRecord
from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text

#: the file that marks a folder as written by :func:`export_catalogue`
EXPORT_MARKER = "fewshot-export.json"
#: the manifest it writes beside the photos (exact labels and groups)
EXPORT_MANIFEST = "manifest.csv"


@dataclass
class EnrolledArticle:
    """The enrolled photos of one article (``files``: absolute; ``paths``: as the index keeps them)."""

    label: str
    group: str | None
    files: list[Path] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def enrolled_articles(index, folder: str | Path) -> list[EnrolledArticle]:
    """The photos under ``folder/enrolled/`` that ``index`` (loaded from ``folder``, journal
    replayed) references, grouped by article in the index's order."""
    wanted = {str(p) for p in index.enrolled_files(folder)}
    root = Path(folder).resolve()
    out: dict[str, EnrolledArticle] = {}
    for label, group, path in zip(index.labels, index.groups, index.paths):
        file = Path(path) if Path(path).is_absolute() else root / path
        if str(file) not in wanted:
            continue
        art = out.setdefault(label, EnrolledArticle(label, index.article_group(label)))
        art.files.append(file)
        art.paths.append(file.relative_to(root).as_posix())
    return list(out.values())


#: ``embed(records) -> (vectors float32 [M, E], kept positions into records, digests per kept)``
EmbedRecords = Callable[[list[ImageRecord]], tuple[np.ndarray, list[int], list[str | None]]]


def add_enrolled(index, articles: Sequence[EnrolledArticle], embed: EmbedRecords) -> tuple[int, int, list[str]]:
    """Add the enrolled photos of ``articles`` to ``index``, embedded by ``embed``; an article
    already in ``index`` (from the data) gets the photos under its own group.

    Returns:
        ``(articles added to, photos added, unreadable photos as "path: reason")``.
    """
    records = [ImageRecord(f, a.label, a.group) for a in articles for f in a.files]
    rel = [p for a in articles for p in a.paths]
    if not records:
        return 0, 0, []
    vectors, kept, digests = embed(records)
    bad = sorted(set(range(len(records))) - set(kept))
    by_label: dict[str, list[int]] = {}
    for row, k in enumerate(kept):
        by_label.setdefault(records[k].label, []).append(row)
    for label, rows in by_label.items():
        group = index.article_group(label) if index.has_article(label) else records[kept[rows[0]]].group
        index.add_article(label, group, vectors[rows], [rel[kept[r]] for r in rows],
                          digests=[digests[r] for r in rows])
    return len(by_label), len(kept), [str(records[k].path) for k in bad]


# --------------------------------------------------------------------------- export
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def _folder_name(text: str) -> str | None:
    """``text`` itself when it can be a folder name that a dataset loader reads back as the
    same label, else ``None``."""
    ok = (text and text == text.strip() and not text.startswith(".") and not _UNSAFE.search(text)
          and len(text.encode("utf-8")) <= 200 and unicodedata.normalize("NFC", text) == text)
    return text if ok else None


def slug(text: str) -> str:
    """A file-name-safe folder name for an article label, unique per label (ASCII letters,
    digits, ``._-``, then 8 hex digits of the label's SHA-1): where the service stores an
    article's enrolled photos, and the export's folder for a label that cannot be one as it is."""
    import hashlib

    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode())
    return f"{plain.strip('-.')[:60] or 'article'}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_catalogue`."""
    try:
        return json.loads((Path(path) / EXPORT_MARKER).read_text(encoding="utf-8")).get("format") == "fewshot.export"
    except (OSError, ValueError, AttributeError):
        return False


def export_foreign(out: str | Path) -> list[str]:
    """What an earlier export folder holds that :func:`export_catalogue` did not write there
    (photos or notes a user added, folders they made), relative to ``out``; replacing the folder
    would delete them."""
    out = Path(out)
    try:
        with open(out / EXPORT_MANIFEST, newline="", encoding="utf-8") as fh:
            ours = {row["path"] for row in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError, csv.Error):
        ours = set()
    ours |= {EXPORT_MANIFEST, EXPORT_MARKER}
    parents = {p.as_posix() for rel in ours for p in Path(rel).parents}
    foreign = []
    for item in sorted(out.rglob("*")):
        rel = item.relative_to(out).as_posix()
        if rel not in (ours if item.is_file() else parents):
            foreign.append(rel + ("" if item.is_file() else "/"))
    return foreign


def export_catalogue(index, folder: str | Path, out: str | Path, info: dict) -> dict:
    """Copy every catalogue image of ``index`` (loaded from ``folder``) into ``out`` as
    ``out/<group>/<label>/<file>`` (``out/<label>/<file>`` when no article has a group), and write
    ``out/manifest.csv`` (``path,label,group``, exact names) and ``out/fewshot-export.json``.

    The folder is written as a whole (:func:`fewshot.io.atomic_dir`): a failed export leaves
    nothing half-written. ``out`` must have been checked by the caller (new, or an export).

    Returns:
        a summary: ``articles``, ``images``, ``missing`` (paths that are not on disk),
        ``tree_exact`` (whether the folder tree alone reads back with the same labels).

    Raises:
        DataError: no catalogue image is on disk.
    """
    from ..io import atomic_dir

    root = Path(folder).resolve()
    grouped = any(g is not None for g in index.article_groups)
    exact = all(_folder_name(a) for a in index.articles) and (
        not grouped or all(g is not None and _folder_name(g) for g in index.article_groups))
    rows, missing, used = [], [], set()
    with atomic_dir(out) as tmp:
        for label, path in zip(index.labels, index.paths):
            src = Path(path) if Path(path).is_absolute() else root / path
            if not src.is_file():
                missing.append(str(path))
                continue
            group = index.article_group(label)
            parts = [g for g in ((_folder_name(group or "") or slug(group or "no-group")) if grouped else None,
                                 _folder_name(label) or slug(label)) if g]
            rel = _unique("/".join(parts + [_folder_name(src.name) or slug(src.stem) + src.suffix]), used)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
            rows.append((rel, label, group or ""))
        if not rows:
            raise DataError(f"none of the {len(index.paths)} catalogue images of {folder} is on disk",
                            hint="restore the photos the index was built from, then export again")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([("path", "label", "group"), *rows])
        atomic_write_text(tmp / EXPORT_MANIFEST, buf.getvalue())
        summary = {"format": "fewshot.export", "articles": len({r[1] for r in rows}), "images": len(rows),
                   "missing": missing, "tree_exact": bool(exact), "source_index": root.name, **info}
        atomic_write_json(tmp / EXPORT_MARKER, summary)
    return summary


def _unique(rel: str, used: set[str]) -> str:
    """``rel``, or ``stem-2.ext``, ``stem-3.ext``... when an earlier photo took that name."""
    base, ext = os.path.splitext(rel)
    n, out = 1, rel
    while out.lower() in used:
        n += 1
        out = f"{base}-{n}{ext}"
    used.add(out.lower())
    return out
