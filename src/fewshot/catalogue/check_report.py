"""``fewshot check``: a catalogue check (:mod:`fewshot.catalogue.check`) written as a report folder.

:func:`check_index` checks an index folder and writes ``OUT/check.json`` (the findings with
their figures, the levels, the fewshot version), ``OUT/check.md`` (a table per kind) and one
PNG per flagged pair in ``OUT/figures/`` (the photos, or the two articles' photos, side by
side), as one atomic folder that replaces only an earlier check (:func:`fewshot.io.claimed_output`).
:func:`summary_lines` is what ``fewshot check`` and ``fewshot index`` print.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..index import CatalogueIndex
from ..io import atomic_dir, atomic_write_json, atomic_write_text, claimed_output
from ..version import environment
from .check import KINDS, CheckLevels, CheckReport, Finding, check_catalogue
from .store import load_index

__all__ = ["CHECK_FILES", "KIND_TITLES", "MAX_FIGURES", "check_index", "is_check_dir", "render_check",
           "summary_lines"]

#: what a check folder holds (nothing else is replaced with it)
CHECK_FILES = frozenset({"check.json", "check.md", "figures"})
#: the most pictures a report draws (the strongest findings of each kind first)
MAX_FIGURES = 50
#: how reports name each kind of finding
KIND_TITLES = {"same_photo": "same photo under two articles", "near_duplicate": "near-duplicate photos",
               "likely_mislabel": "likely mislabels", "confusable_articles": "confusable articles",
               "single_photo": "single-photo articles"}
#: photos per article in a picture of two articles
_PER_ARTICLE = 6


def is_check_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`check_index`."""
    try:
        return json.loads((Path(path) / "check.json").read_text(encoding="utf-8")).get("format") == "fewshot.check"
    except (OSError, ValueError, AttributeError):
        return False


def check_index(index_dir: str | Path, out: str | Path, *, overwrite: bool = False, max_figures: int = MAX_FIGURES,
                **levels: float) -> tuple[CheckReport, dict]:
    """``fewshot check``: check the index folder ``index_dir`` (:func:`check_catalogue`, with
    ``levels``: :class:`CheckLevels`) and write the report folder ``out``.

    Returns:
        the report, and what ``check.json`` holds (each finding with its ``figure``: the PNG's
        path relative to ``out``, or ``None`` beyond ``max_figures`` and for single photos).

    Raises:
        CheckpointError: the index cannot be read. DataError: a level out of range.
        FewshotError: ``out`` may not be written (an existing folder that is not an earlier
            check, an earlier check without ``overwrite``, or one inside the index).
    """
    chosen = CheckLevels(**levels)  # a bad level is named before anything is read or written
    index = load_index(index_dir)
    with claimed_output(out, object(), what="fewshot check", is_ours=is_check_dir, overwrite=overwrite,
                        owned=CHECK_FILES.__contains__, input_roots=[index_dir]):
        report = check_catalogue(index, **chosen.as_dict())
        doc = {"format": "fewshot.check", **report.as_dict(),
               "config": {"index": str(Path(index_dir).resolve()), "model": index.config.get("model"),
                          "image_size": index.config.get("image_size"), "max_figures": max_figures,
                          **environment()}}
        with atomic_dir(out) as tmp:
            for item, finding, figure in zip(doc["findings"], report.findings, _figures(report, max_figures)):
                item["figure"] = figure and _draw(index, finding, figure, tmp)
            atomic_write_json(tmp / "check.json", doc)
            atomic_write_text(tmp / "check.md", render_check(doc))
    return report, doc


def _figures(report: CheckReport, limit: int) -> list[str | None]:
    """The PNG name of each finding (``None``: not drawn), ``limit`` in all, shared out by kind."""
    names: list[str | None] = []
    drawn = 0
    for n, f in enumerate(report.findings, 1):
        ok = f.kind != "single_photo" and drawn < limit
        drawn += ok
        names.append(f"figures/{n:03d}-{f.kind}.png" if ok else None)
    return names


def _file(index: CatalogueIndex, path: str) -> Path:
    """The file of catalogue image ``path`` (an enrolled photo's is relative to the index folder)."""
    p = Path(path)
    return p if p.is_absolute() or index.folder is None else Path(index.folder) / p


def _draw(index: CatalogueIndex, finding: Finding, name: str, folder: Path) -> str:
    """Draw ``finding`` as ``folder/name``: its photos with their articles, or each article's photos."""
    from ..viz import image_rows

    if finding.kind == "confusable_articles":
        rows = [(a, index.article_paths(a)[:_PER_ARTICLE]) for a in finding.articles]
    elif finding.kind == "likely_mislabel":
        own, other = finding.articles
        photo = finding.images[0]
        rows = [(f"this photo, labelled '{own}'", [photo]),
                (f"other photos of '{own}'", [p for p in index.article_paths(own) if p != photo][:_PER_ARTICLE]),
                (f"photos of '{other}'", index.article_paths(other)[:_PER_ARTICLE])]
    else:  # the photos themselves, each under its article
        label_of = dict(zip(index.paths, index.labels))
        rows = [(f"under '{label_of.get(p, '?')}'", [p]) for p in finding.images]
    image_rows([(caption, [_file(index, p) for p in paths]) for caption, paths in rows], folder / name,
               title=textwrap.fill(finding.message, 100))
    return name


def summary_lines(report: CheckReport, first: int = 3) -> list[str]:
    """One line per kind found: its count and the first ``first`` findings' messages."""
    lines = []
    for kind, n in report.counts().items():
        if n:
            shown = "; ".join(f.message for f in report.of_kind(kind)[:first]) + (" ..." if n > first else "")
            lines.append(f"{KIND_TITLES[kind]}: {n} ({shown})")
    return lines


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _levels_text(levels: dict) -> str:
    return (f"near duplicates: two articles' photos with cosine >= {levels['duplicate_cosine']}; likely mislabels: "
            f"a photo nearer another article's prototype than its own (made without it) by >= "
            f"{levels['mislabel_margin']}; confusable articles: prototype cosine >= {levels['confusable_cosine']}, "
            f"or >= {levels['min_confusions']} leave-one-out confusions making >= "
            f"{levels['confusable_share']:.0%} of their photos")


def render_check(doc: dict) -> str:
    """``check.md``: the catalogue, the levels, the count per kind and a table per kind found."""
    cfg = doc["config"]
    lines = ["# Catalogue check", "",
             f"Index `{_cell(cfg['index'])}`: {doc['num_images']} photos of {doc['num_articles']} articles; "
             f"fewshot {cfg['fewshot_version']}, {cfg['created']}.", "",
             f"Levels: {_levels_text(doc['levels'])}.", "", "| finding | count |", "| --- | ---: |"]
    lines += [f"| {KIND_TITLES[k]} | {n} |" for k, n in doc["counts"].items()]
    for kind in KINDS:
        found = [f for f in doc["findings"] if f["kind"] == kind]
        if not found:
            continue
        lines += ["", f"## {KIND_TITLES[kind].capitalize()} ({len(found)})", "",
                  "| # | articles | figures | photos | picture |", "| ---: | --- | --- | --- | --- |"]
        for n, f in enumerate(found, 1):
            figures = ", ".join(f"{k} {v}" for k, v in f["figures"].items())
            photos = "<br>".join(_cell(p) for p in f["images"][:4]) + (" ..." if len(f["images"]) > 4 else "")
            picture = f"[png]({f['figure']})" if f.get("figure") else ""
            lines.append(f"| {n} | {_cell(' / '.join(f['articles']))} | {figures} | {photos} | {picture} |")
    if not doc["findings"]:
        lines += ["", "Nothing found: no defect above these levels."]
    return "\n".join(lines) + "\n"
