"""Open set (issue 29): how well each score tells photos of catalogue articles from photos of
absent ones, and what the threshold calibrated on the catalogue alone does, frozen and fine-tuned.

Grocery, ``splits/grocery-unseen.json``, the 28 unseen test articles: halved at random 20 times
(seed 0) into 14 known articles, whose gallery photos (train split) make the catalogue, and 14
absent ones; the queries are the test photos of all 28. Each draw runs the product path of
``fewshot classify --reject auto`` (:func:`fewshot.evaluation.openset.evaluate_open_set`, the code
behind ``fewshot evaluate --open-set``). Rows: the frozen efficientnet_lite0 at 224 px, and each
``--model RUN`` (a ``fewshot train`` run folder). Embeddings come from the embedding cache (the
same path as ``fewshot evaluate``).

Usage (from the repository root)::

    python bench/openset.py --out docs/results/openset                       # the frozen row
    python bench/openset.py --out docs/results/openset --model runs/triplet  # a fine-tuned row
    python bench/openset.py --out docs/results/openset --whiten --model runs/triplet  # whitened rows

Every row is written to ``OUT/results.json`` as soon as it is measured (rerunning a row replaces
it) with its date, CPU, load and versions; ``OUT/table.md`` is rendered from it. Part 9 of
``bench/run_all.py`` measures the frozen row again and shows the stored rows with it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, clustered_embeddings, grocery_root, machine, write_json  # noqa: E402

if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

SPLIT_FILE = "splits/grocery-unseen.json"
RESULTS = ROOT / "docs" / "results" / "openset"
#: the issue's goal for the brand fallback: the brand right for this share of the photos given one
GOAL_BRAND_PRECISION = 0.80


def _stamp() -> dict[str, Any]:
    return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine()}


def measure(data: str, model_dir: str | None, cache_dir: str | None, draws: int = 20, seed: int = 0,
            target_far: float = 0.05, backbone: str = "efficientnet_lite0", whiten: bool = False) -> dict[str, Any]:
    """One row: the open-set section of ``fewshot evaluate --open-set`` (``--whiten``: each
    catalogue whitened) on Grocery's unseen test articles, for the frozen ``backbone``
    (``model_dir`` ``None``) or a trained run."""
    from fewshot.embed.options import EmbedOptions
    from fewshot.evaluation import EvalConfig, evaluation_sets, open_set_metrics
    from fewshot.methods.from_options import model_from_options

    opts = EmbedOptions(backbone=None if model_dir else backbone, model_dir=model_dir, image_size=None if model_dir else 224,
                        cache_dir=cache_dir, progress=False)
    cfg = EvalConfig(data=data, split_file=str(ROOT / SPLIT_FILE), part="test", seed=seed, open_set=True,
                     open_set_draws=draws, target_far=target_far, whiten=whiten, embed=opts)
    queries, gallery, protocol = evaluation_sets(cfg)
    model = model_from_options(opts)
    t0 = time.perf_counter()
    q, g = opts.embed(model, queries), opts.embed(model, gallery)
    t1 = time.perf_counter()
    from fewshot.index.prior import load_prior

    section = open_set_metrics(cfg, protocol, q, g, load_prior(model, g.labels, g.digests or None) if whiten else None)
    name = ((f"fine-tuned ({Path(model_dir).name})" if model_dir else f"frozen {backbone}") + (", whitened" if whiten else "")
            + (", its training photos pooled in" if section["protocol"].get("whiten_prior") else "")
            + (", its articles as rivals" if (section["protocol"].get("whiten_prior") or {}).get("rivals") else ""))
    return {"name": name, "model": model.describe(), "embed_seconds": round(t1 - t0, 1),
            "seconds": round(time.perf_counter() - t1, 1), "open_set": section, **_stamp()}


def smoke() -> dict[str, Any]:
    """``--quick``: the same code on clustered synthetic embeddings (3 draws); the figures mean nothing."""
    from fewshot.evaluation import evaluate_open_set

    x, y = clustered_embeddings(600, dim=64, per_class=10, noise=2.0)
    names = np.array([f"c{int(c):02d}" for c in y], dtype=object)
    groups = np.array([f"b{int(c) % 5}" for c in y], dtype=object)
    gal = np.arange(len(y)) % 2 == 0  # half of the photos of each article in the gallery
    t0 = time.perf_counter()
    section = evaluate_open_set(x[~gal], names[~gal].tolist(), groups[~gal].tolist(), x[gal], names[gal].tolist(),
                                groups[gal].tolist(), sorted(set(names)), draws=3)
    return {"name": "synthetic (smoke)", "model": {"method": "synthetic"}, "embed_seconds": 0.0,
            "seconds": round(time.perf_counter() - t0, 1), "open_set": section, **_stamp()}


# --------------------------------------------------------------------------- rendering
def _f(s: dict | float | None) -> str:
    if isinstance(s, dict):
        s = s.get("mean")
    return "-" if s is None else f"{s:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def render(rows: list[dict]) -> str:
    """The Markdown tables of the rows (no page title)."""
    if not rows:
        return "(no rows yet)\n"
    scores = list(rows[0]["open_set"]["scores"])
    lines = ["AUROC / FPR@95TPR of each score (mean over the draws; knn1 / knn5: cosine of the 1st / 5th nearest "
             "catalogue photo, Sun et al. 2022; the default score in bold):", "",
             "| model | " + " | ".join(f"**{s}**" if s == rows[0]["open_set"]["default_score"] else s
                                      for s in scores) + " | top-1 of known photos |",
             "|---|" + "---|" * (len(scores) + 1)]
    for r in rows:
        o = r["open_set"]
        lines.append(f"| {r['name']} | " + " | ".join(f"{_f(o['scores'][s]['auroc'])} / {_f(o['scores'][s]['fpr_at_95tpr'])}"
                                                    for s in scores) + f" | {_f(o['top1_known'])} |")
    lines += ["", "At the threshold calibrated on the catalogue alone (`--reject auto`, target false-accept rate "
              f"{rows[0]['open_set']['protocol']['target_far']:.0%}); realised FAR: mean +- sd (min-max) over the draws; "
              "brand fallback pooled over the draws (absent photos of brands with articles in the catalogue given "
              "their brand; right brand of those; absent photos of brands the catalogue lacks given one):", "",
              "| model | score | realised FAR | known accepted and right | known accepted | brand given | brand right "
              "| unknown brand given |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s, op in r["open_set"]["operating_point"].items():
            far, p = op["realised_far"], op["pooled"]
            lines.append(f"| {r['name']} | {s} | {far['mean']:.3f} +- {far['sd']:.3f} ({far['min']:.3f}-"
                         f"{far['max']:.3f}) | {_f(op['known_accepted_right'])} | {_f(op['known_accepted'])} | "
                         f"{_pct(p['brand_named'])} | {_pct(p['brand_precision'])} of {p['named']} | "
                         f"{_pct(p['unknown_brand_named'])} |")
    lines += [""] + [f"- {r['name']}" + (f" (`{r['model']['model_dir']}`)" if r["model"].get("model_dir") else "")
                     + f": {r['date']}, {r['machine'].get('cpu')} ({r['machine'].get('usable_cpus')} CPUs, "
                     f"load {r['machine'].get('load_average_1m')}), fewshot {r['machine'].get('fewshot')} (git "
                     f"{r['machine'].get('git_commit')}), torch {r['machine'].get('torch')}; embedding "
                     f"{r['embed_seconds']:.0f} s (cache), protocol {r['seconds']:.0f} s; "
                     f"{r['open_set']['protocol']['queries']} queries, {r['open_set']['protocol']['draws']} draws, "
                     f"seed {r['open_set']['protocol']['seed']}" for r in rows]
    return "\n".join(lines) + "\n"


def _ordered(stored: dict) -> list[dict]:
    """Frozen rows first, then the others by name."""
    return sorted(stored.values(), key=lambda r: (not r["name"].startswith("frozen"), r["name"]))


# --------------------------------------------------------------------------- part 9 of run_all
def run(quick: bool, ctx) -> dict:
    """Part 9 of ``bench/run_all.py``: the frozen row measured now (``--quick``: synthetic), with
    the rows ``python bench/openset.py --model RUN`` stored in ``docs/results/openset``."""
    if quick:
        return {"rows": [smoke()]}
    frozen = measure(str(grocery_root()), None, None)
    stored = _load(RESULTS / "results.json")["rows"]
    stored[frozen["name"]] = frozen
    return {"rows": _ordered(stored)}


def headline(results: dict) -> dict:
    """The default score's operating point of each row: realised FAR and brand precision."""
    out = []
    for r in results.get("rows", []):
        o = r["open_set"]
        op = o["operating_point"][o["default_score"]]
        out.append({"name": r["name"], "score": o["default_score"], "far": op["realised_far"],
                    "target": o["protocol"]["target_far"], "brand_precision": op["pooled"]["brand_precision"],
                    "auroc": o["scores"][o["default_score"]]["auroc"]["mean"], "draws": o["protocol"]["draws"]})
    return {"rows": out}


def goal_rows(results: dict) -> list[list[str]]:
    """Rows of the goals table of ``run_all``."""
    from bench.common import verdict

    rows = []
    for h in headline(results)["rows"]:
        far = h["far"]
        rows.append([f"Open set, {h['name']}: realised false-accept rate at the calibrated {h['score']} threshold "
                     f"(mean of {h['draws']} draws)", f"~ {h['target']:.0%}", f"{far['mean']:.3f} (sd {far['sd']:.3f})", "-"])
        p = h["brand_precision"]
        rows.append(["... brand fallback: right brand of the absent-article photos given one", f">= {GOAL_BRAND_PRECISION:.0%}",
                     _pct(p), verdict(None if p is None else p >= GOAL_BRAND_PRECISION)])
    return rows


def section(results: dict, ctx) -> str:
    rows = results.get("rows", [])
    p = rows[0]["open_set"]["protocol"] if rows else {"classes": 28, "draws": 20, "seed": 0, "known_per_draw": 14}
    return ("## 9. Open set\n\n" + ("**Smoke run: synthetic embeddings, the figures mean nothing.**\n\n"
                                     if rows and rows[0]["name"].startswith("synthetic") else "")
            + f"Grocery `splits/grocery-unseen.json`, the {p['classes']} unseen test articles halved at random "
            f"{p['draws']} times (seed {p['seed']}) into {p['known_per_draw']} known ones (the catalogue: their train "
            f"photos) and the others, absent; queries: the test photos of all {p['classes']}. The code of "
            "`fewshot evaluate --open-set`; the frozen row measured by `run_all.py`, the others by `python bench/openset.py --model RUN` (each with its own date).\n\n"
            + render(results.get("rows", [])))


# --------------------------------------------------------------------------- command line
def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def rows_main(argv: list[str] | None, description: str, default_out: Path, measure_row: Callable[..., dict],
              title: str, render_rows: Callable[[dict], str]) -> None:
    """The command line of a benchmark of rows, one per model (the frozen backbone, each ``--model
    RUN``): measure each, keep it in ``OUT/results.json`` at once (a rerun replaces its row), then
    write ``OUT/table.md`` (``# title`` and ``render_rows`` of every stored row) and print it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=str(grocery_root()))
    p.add_argument("--out", default=str(default_out))
    p.add_argument("--model", action="append", default=[], help="a `fewshot train` run folder (repeatable)")
    p.add_argument("--no-frozen", action="store_true", help="measure only the --model rows")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--whiten", action="store_true", help="each catalogue whitened (fewshot evaluate --whiten)")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = _load(out / "results.json")
    for model_dir in ([None] if not args.no_frozen else []) + args.model:
        row = measure_row(args.data, model_dir, args.cache_dir, draws=args.draws,
                          **({"whiten": True} if args.whiten else {}))
        results["rows"][row["name"]] = row
        write_json(out / "results.json", results)
        print(f"{row['name']}: done in {row['seconds']:.0f} s (+ {row.get('embed_seconds', 0):.0f} s embedding)", flush=True)
    text = f"# {title}\n\n" + render_rows(results["rows"])
    (out / "table.md").write_text(text, encoding="utf-8")
    print(text)


def main(argv: list[str] | None = None) -> None:
    rows_main(argv, __doc__.split("\n")[0], RESULTS, measure, "Open set", lambda rows: render(_ordered(rows)))


if __name__ == "__main__":
    main()
