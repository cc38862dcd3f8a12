"""``fewshot check``: a catalogue's defects (issue 29), written as a report folder; warnings only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (
    DATA,
    OUTPUT,
    NoProgressHidden,
    OverwriteOpt,
    app,
    examples,
    handle_errors,
    log,
    one_line,
)
from .snapshot import current

#: the defaults of :class:`fewshot.catalogue.check.CheckLevels`, and their help panel
_D, LEVELS = current("check_levels"), "Levels"


@app.command("check", epilog=examples("fewshot check --index runs/grocery-index",
                                      "fewshot check --index runs/grocery-index --out runs/grocery-check "
                                      "--duplicate-cosine 0.99 --overwrite"))
@handle_errors
def check_cmd(
    index: Path = typer.Option(..., "--index", rich_help_panel=DATA, help="Index folder written by `fewshot index` (enrolled articles included)."),
    out: Optional[Path] = typer.Option(None, "--out", rich_help_panel=OUTPUT, help="Report folder to write: check.json, check.md, figures/ (default: INDEX-check beside the index; a new folder, or an earlier check with --overwrite)."),
    overwrite: bool = OverwriteOpt,
    duplicate_cosine: float = typer.Option(_D["duplicate_cosine"], "--duplicate-cosine", rich_help_panel=LEVELS, help="Photos of two articles at least this similar (cosine) are near duplicates."),
    mislabel_margin: float = typer.Option(_D["mislabel_margin"], "--mislabel-margin", rich_help_panel=LEVELS, help="A photo nearer another article's prototype than its own (made without it) by at least this is a likely mislabel."),
    confusable_cosine: float = typer.Option(_D["confusable_cosine"], "--confusable-cosine", rich_help_panel=LEVELS, help="Two articles whose prototypes are at least this similar (cosine) are confusable."),
    confusable_share: float = typer.Option(_D["confusable_share"], "--confusable-share", rich_help_panel=LEVELS, help="...and so are two articles whose leave-one-out confusions make at least this share of their photos."),
    min_confusions: int = typer.Option(_D["min_confusions"], "--min-confusions", rich_help_panel=LEVELS, help="...counting at least this many confusions."),
    max_figures: int = typer.Option(50, "--max-figures", min=0, rich_help_panel=OUTPUT, help="Draw at most this many flagged pairs as PNGs (the strongest first)."),
    no_progress: bool = NoProgressHidden,
) -> None:
    """Check a catalogue for defects; exits 0 with warnings.

    The defects: the same photo under two articles, near-duplicate photos, likely mislabels,
    articles the model cannot tell apart, single-photo articles.

    The levels are cosines of the index's own model (defaults read off Grocery with the frozen
    efficientnet_lite0); see check.md for what each one means.
    """
    from ..catalogue.check_report import check_index, summary_lines

    where = index.resolve()  # `--index .` has no name of its own
    out = out if out is not None else where.parent / f"{where.name or 'index'}-check"
    report, doc = check_index(index, out, overwrite=overwrite, max_figures=max_figures,
                              duplicate_cosine=duplicate_cosine, mislabel_margin=mislabel_margin,
                              confusable_cosine=confusable_cosine, confusable_share=confusable_share,
                              min_confusions=min_confusions)
    typer.echo(f"checked {report.num_images} photos of {report.num_articles} articles in {one_line(index)}")
    for kind, n in report.counts().items():
        typer.echo(f"  {kind:<20} {n}")
    for line in summary_lines(report):
        log.warning("%s", one_line(line))
    drawn = sum(1 for f in doc["findings"] if f.get("figure"))
    typer.echo(f"wrote {one_line(out)}/check.json, check.md" + (f" and {drawn} picture(s) in figures/" if drawn else ""))
