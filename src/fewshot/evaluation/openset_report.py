"""The open-set part of an evaluation's report: the ``report.md`` section, the console lines
and the PNGs (``roc.png``, ``open_set_scores.png``, ``oscr.png``), all from the ``open_set``
section of ``metrics.json`` (:func:`fewshot.evaluation.openset.evaluate_open_set`)."""

from __future__ import annotations

from pathlib import Path

from ..viz import rate_curves, score_histogram

__all__ = ["OPEN_SET_FILES", "render_open_set", "summary_lines", "write_open_set_plots"]

OPEN_SET_FILES = ("roc.png", "open_set_scores.png", "oscr.png")


def _f(x: float | None, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def _pm(s: dict) -> str:
    """``mean +- sd`` of a summary over draws."""
    return "-" if s.get("mean") is None else f"{s['mean']:.3f} +- {s['sd']:.3f}"


def _range(s: dict) -> str:
    return "-" if s.get("mean") is None else f"{s['min']:.3f}-{s['max']:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def summary_lines(section: dict) -> list[str]:
    """The console lines: one per score (AUROC, FPR@95TPR), then the default score's operating
    point and brand fallback (means over the draws; the brand precision pooled)."""
    p, default = section["protocol"], section["default_score"]
    lines = [f"open set: {p['classes']} articles halved {p['draws']} times (seed {p['seed']}), {p['queries']} "
             f"query photos; mean over the draws:"]
    for name, s in section["scores"].items():
        mark = " (default)" if name == default else ""
        lines.append(f"  {name:<9} AUROC {_f(s['auroc']['mean'])}  FPR@95TPR {_f(s['fpr_at_95tpr']['mean'])}{mark}")
    op = section["operating_point"][default]
    far, pooled = op["realised_far"], op["pooled"]
    lines.append(f"  at the calibrated {default} threshold: realised false-accept rate {_f(far['mean'])} "
                 f"(sd {_f(far['sd'])}, {_range(far)}; target {p['target_far']:g}), known photos accepted and "
                 f"right {_f(op['known_accepted_right']['mean'])}, brand named for {_pct(pooled['brand_named'])} of "
                 f"absent photos of known brands, right for {_pct(pooled['brand_precision'])} of those (pooled)")
    return lines


def _score_table(section: dict) -> list[str]:
    rows = ["| score | AUROC | FPR@95TPR | OSCR area |", "|---|---|---|---|"]
    for name, s in section["scores"].items():
        mark = " (default)" if name == section["default_score"] else ""
        rows.append(f"| {name}{mark} | {_pm(s['auroc'])} | {_pm(s['fpr_at_95tpr'])} | {_f(s['oscr_area'])} |")
    return rows


def _operating_table(section: dict) -> list[str]:
    rows = ["| score | threshold | realised FAR | FAR min-max | known accepted | known accepted and right | "
            "catalogue photos accepted (calibration) |", "|---|---|---|---|---|---|---|"]
    for name, o in section["operating_point"].items():
        rows.append(f"| {name} | {_pm(o['threshold'])} | {_pm(o['realised_far'])} | {_range(o['realised_far'])} | "
                    f"{_pm(o['known_accepted'])} | {_pm(o['known_accepted_right'])} | {_pm(o['catalogue_accepted'])} |")
    return rows


def _brand_table(section: dict) -> list[str]:
    rows = ["| score | absent photos of known brands given a brand | right brand of those (pooled; mean of draws) | "
            "absent photos of unknown brands given a brand |", "|---|---|---|---|"]
    for name, o in section["operating_point"].items():
        q = o["pooled"]
        rows.append(f"| {name} | {_pct(q['brand_named'])} of {q['absent_known_brand']} | "
                    f"{_pct(q['brand_precision'])} of {q['named']}; {_f(o['brand_precision']['mean'])} | "
                    f"{_pct(q['unknown_brand_named'])} of {q['absent_unknown_brand']} |")
    return rows


def _brand_rows(section: dict) -> list[str]:
    rows = ["| brand | known photos (x draws) | absent photos (x draws) | AUROC (draws) | realised FAR | known accepted and right |",
            "|---|---|---|---|---|---|"]
    for brand, b in section["per_brand"].items():
        rows.append(f"| {brand} | {b['known_photos']} | {b['absent_photos']} | {_f(b['auroc'])} ({b['auroc_draws']}) | "
                    f"{_f(b['realised_far'])} | {_f(b['known_accepted_right'])} |")
    return rows


def render_open_set(section: dict) -> list[str]:
    """The ``## Open set`` section of ``report.md`` (Markdown lines)."""
    p, default = section["protocol"], section["default_score"]
    dropped = (f" ({len(p['dropped_classes'])} article(s) without gallery photos left out)"
               if p["dropped_classes"] else "")
    t1 = section["top1_known"]
    return [
        "", "## Open set", "",
        f"The {p['classes']} articles{dropped} are halved at random {p['draws']} times (seed {p['seed']}): "
        f"{p['known_per_draw']} known articles make the catalogue (their gallery photos), the others are absent; "
        f"the queries are the {p['queries']} query photos of all of them. Each draw runs `fewshot classify "
        f"--reject auto` (thresholds calibrated on the catalogue alone for a {p['target_far']:.0%} false-accept "
        f"rate). Figures: mean +- population sd over the draws; curves: {p['curves']}.", "",
        *_score_table(section), "",
        f"Top-1 of known photos (best prototype): {_pm(t1)}. knn1 / knn5: cosine of the 1st / 5th nearest "
        "catalogue photo (Sun et al. 2022).", "",
        "### At the calibrated threshold", "", *_operating_table(section), "",
        "### Brand fallback (a rejected photo named by its brand)", "",
        "Photo counts are summed over the draws (a photo counts once per draw).", "", *_brand_table(section), "",
        f"### Per brand ({default} score; FAR and accepted-and-right pooled over the draws)", "",
        *_brand_rows(section), "",
        "![ROC](roc.png)", "", "![OSCR](oscr.png)", "", "![open-set scores](open_set_scores.png)"]


def write_open_set_plots(section: dict, out: Path, title: str = "") -> list[Path]:
    """``roc.png`` (every score's ROC), ``oscr.png`` (OSCR with each calibrated operating point)
    and ``open_set_scores.png`` (the default score's histogram, pooled over the draws) in ``out``."""
    c, default, p = section["curves"], section["default_score"], section["protocol"]
    how = f"mean of {p['draws']} draws"
    head = f"{title}: " if title else ""
    roc = rate_curves(c["fpr_grid"], c["roc"], out / "roc.png", ylabel="known photos accepted", highlight=default,
                      title=f"{head}ROC of each open-set score ({how})")
    points = {n: (o["realised_far"]["mean"], o["known_accepted_right"]["mean"])
              for n, o in section["operating_point"].items()}
    oscr = rate_curves(c["fpr_grid"], c["oscr"], out / "oscr.png", ylabel="known photos accepted and right (CCR)",
                       points=points, highlight=default,
                       title=f"{head}OSCR ({how})\ndots: calibrated thresholds (target FAR {p['target_far']:g}), mean of the draws")
    h = section["histogram"]
    t = h["threshold"]
    hist = score_histogram(h["edges"], h["known"], h["absent"], out / "open_set_scores.png", threshold=t["mean"],
                           threshold_range=(t["min"], t["max"]), xlabel=f"{h['score']} score",
                           title=(f"{title}\n" if title else "") + f"{h['score']} score of query photos, pooled over "
                                 f"{p['draws']} draws\nline: mean calibrated threshold; shaded: its min-max over the draws")
    return [roc, oscr, hist]
