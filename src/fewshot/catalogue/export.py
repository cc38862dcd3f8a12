"""``fewshot export``: every article's photos out of an index, as a tree ``fewshot index --data`` reads back.

:func:`export_index` copies the photos of every article (from the data and enrolled through the
service) as ``out/<group>/<article>/...`` plus ``out/manifest.csv`` (exact labels and groups),
with :func:`export_catalogue`, so that the same catalogue can be built again, e.g. with another
model.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import unicodedata
from pathlib import Path

from ..errors import DataError
from ..index import CatalogueIndex
from ..io import atomic_write_json, atomic_write_text, claimed_output
from ..version import environment
from .store import load_index, slug

__all__ = ["EXPORT_MANIFEST", "EXPORT_MARKER", "export_catalogue", "export_foreign", "export_index", "is_export_dir"]

#: the file that marks a folder as written by :func:`export_catalogue`
EXPORT_MARKER = "fewshot-export.json"
#: the manifest it writes beside the photos (exact labels and groups)
EXPORT_MANIFEST = "manifest.csv"


def export_index(index_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """``fewshot export``: copy every article's photos (from the data and enrolled through the
    service) out of an index as ``out/<group>/<article>/...`` plus ``out/manifest.csv``
    (:func:`export_catalogue`), so that ``fewshot index --data`` builds
    the same catalogue again, e.g. with another model.

    Raises:
        CheckpointError: the index cannot be read. FewshotError: ``out`` may not be written
            (an existing folder that is not an earlier export, or one inside the index).
    """
    index = load_index(index_dir)
    with claimed_output(out, object(), what="fewshot export", is_ours=is_export_dir, overwrite=overwrite,
                        input_roots=[index_dir]):
        foreign = export_foreign(out) if is_export_dir(out) else []
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise DataError(f"--out {out} holds an earlier export and also files fewshot did not write there "
                            f"({shown}): refusing to replace it", hint="move those files out first (or enrol "
                            "added photos with `fewshot index --data`), or choose another --out")
        return export_catalogue(index, index_dir, out, environment())


# --------------------------------------------------------------------------- export
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def _folder_name(text: str) -> str | None:
    """``text`` itself when it can be a folder name that a dataset loader reads back as the
    same label, else ``None``."""
    ok = (text and text == text.strip() and not text.startswith(".") and not _UNSAFE.search(text)
          and len(text.encode("utf-8")) <= 200 and unicodedata.normalize("NFC", text) == text)
    return text if ok else None


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


def export_catalogue(index: CatalogueIndex, folder: str | Path, out: str | Path, info: dict) -> dict:
    """Copy every catalogue image of ``index`` (loaded from ``folder``) into ``out`` as
    ``out/<group>/<label>/<file>`` (``out/<label>/<file>`` when no article has a group), and write
    ``out/manifest.csv`` (``path,label,group``, exact names) and ``out/fewshot-export.json``.

    The folder is written as a whole (:func:`fewshot.io.atomic_dir`): a failed export leaves
    nothing half-written. ``out`` must have been checked by the caller (new, or an export).

    Returns:
        a summary: ``articles``, ``images``, ``missing`` (paths that are not on disk),
        ``tree_exact`` (whether the folder tree alone reads back with the same labels),
        ``whitened`` (whether the index was: its rebuild takes ``--whiten`` again).

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
                   "missing": missing, "tree_exact": bool(exact), "source_index": root.name,
                   "whitened": index.whitening is not None, **info}
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
