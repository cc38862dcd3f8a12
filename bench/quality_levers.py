"""Ranking levers measured (issue 30): re-ranking the gallery and transductive episodes, on fixed
embeddings of a frozen or fine-tuned model.

Grocery (``splits/grocery-unseen.json``, the 28 unseen test articles, cross-visit: gallery and
support from the train photos, queries from the test photos), the protocol of
``fewshot evaluate --split-file``: one row per lever, alone and combined, with mAP, MAP@R, P@1
(retrieval, after re-ranking), 5-way 1-shot and 5-shot (1,000 balanced episodes, 5 queries per
class), 5-way 1-shot with imbalanced query sets (Dirichlet(2) class shares, Veilleux et al. 2021,
from a pool of 15 queries per class) and shelf photo -> studio image top-1 (each test photo
against the 28 iconic catalogue images; transductive levers take all the shelf photos as one
batch, then batches of the photos of 5 articles and of one article). ``ms/query`` is the lever's own time per query (re-ranking: all queries at once;
episodes: per episode of 25 queries); the embedding is shared by every row.

    python bench/quality_levers.py --out docs/results/levers --model frozen \\
        --model triplet=runs/finetune/triplet-default

Each model's rows are written to ``OUT/results.json`` as soon as they are measured and
``OUT/table.md`` is rewritten from it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import grocery_root, machine  # noqa: E402

GROCERY_SPLIT = "splits/grocery-unseen.json"
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "levers"
#: the folders part 10 reads: the first runs, then the 0.4.0 default run's three seeds, without and
#: with ``--tta scales`` (each of the last two a seed group: a target is met when its worst seed meets it)
RESULT_FOLDERS = ("levers", "levers-040", "levers-040-scales")
SEED_GROUPS = ("levers-040", "levers-040-scales")
#: the levers that do not assume the queries spread evenly over the classes: TIM falls to 0.73 on
#: imbalanced episodes and to 0.22 on shelves of 5 articles; BD-CSPN holds on both but falls to
#: 0.025-0.054 on a batch of one article's photos (its shift by the query mean)
HOLDS_ON_IMBALANCE = ("none", "centre", "bdcspn", "paddle")
HOLDS_ON_SHELVES = ("none", "centre", "paddle")
#: issue 30's targets
GOAL_MAP_AT_R, GOAL_5WAY1SHOT, GOAL_STUDIO = 0.66, 0.94, 0.70
#: (row, rerank, transductive): each lever alone, then the combinations
LEVERS = [("none", "none", "none"), ("qe", "qe", "none"), ("dba", "dba", "none"), ("dba-qe", "dba-qe", "none"),
          ("k-reciprocal", "k-reciprocal", "none"), ("centre", "none", "centre"), ("bdcspn", "none", "bdcspn"),
          ("tim", "none", "tim"), ("paddle", "none", "paddle"), ("dba-qe + bdcspn", "dba-qe", "bdcspn"),
          ("k-reciprocal + tim", "k-reciprocal", "tim")]


def embed_sets(model_dir: str | None, cache_dir: str | None, tta: str = "none"):
    """``(model, queries, gallery, studio vectors, studio labels)`` of the Grocery test articles."""
    from fewshot.data.protocol import load_protocol, protocol_sets
    from fewshot.embed.options import EmbedOptions
    from fewshot.methods.from_options import model_from_options

    opts = EmbedOptions(backbone=None if model_dir else "efficientnet_lite0", model_dir=model_dir,
                        cache_dir=cache_dir, progress=False, tta=tta)
    model = model_from_options(opts)
    dataset, split = load_protocol(str(grocery_root()), GROCERY_SPLIT, None)
    q_set, g_set = protocol_sets(dataset, split, "test")
    q, g = opts.embed(model, q_set), opts.embed(model, g_set)
    root = grocery_root()
    with open(root / "dataset" / "classes.csv", newline="", encoding="utf-8") as fh:
        iconic = {r[0]: root / "dataset" / r[4].lstrip("/") for r in list(csv.reader(fh))[1:] if r[0] in set(q.labels)}
    names = sorted(iconic)
    s, ok, _, _ = model.embed_paths([iconic[n] for n in names], cache_dir=cache_dir, progress=False)
    return model, q, g, s, [names[i] for i in ok]


def studio_top1(transductive: str, q, studio: np.ndarray, names: list[str],
                shelf_articles: int | None = None, batches: int = 200, seed: int = 0) -> float:
    """Top-1 of shelf photos against the studio images; transductive levers see a batch of shelf
    photos at once: all of them (``shelf_articles`` ``None``, the 28 articles about evenly), or
    ``batches`` seeded batches of the photos of ``shelf_articles`` random articles (a shelf shows
    a few articles: the imbalanced case), averaged."""
    import torch

    from fewshot.evaluation.levers import episode_inputs

    labels = np.asarray(q.labels)
    if shelf_articles is None:
        picks = [np.arange(len(labels))]
    else:
        rng = np.random.default_rng(seed)
        picks = [np.flatnonzero(np.isin(labels, rng.choice(names, shelf_articles, replace=False)))
                 for _ in range(batches)]
    unit = lambda a: torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(a)), dim=1)  # noqa: E731
    right = []
    for pick in picks:
        classifier, s, x = episode_inputs(transductive, None, studio, q.vectors[pick])
        sx, qx = unit(s), unit(x)
        pred = (qx @ sx.T).argmax(1) if classifier is None else classifier(sx, torch.arange(len(names)), qx, len(names))
        right.append(float((np.asarray(names)[np.asarray(pred)] == labels[pick]).mean()))
    return float(np.mean(right))


def lever_row(name: str, rerank: str, transductive: str, model, q, g, studio, names, seed: int) -> dict:
    from fewshot.evaluation import EvalConfig
    from fewshot.evaluation.levers import adapts, check_levers, ranked_report
    from fewshot.evaluation.run import episode_metrics

    opts = check_levers(rerank, transductive, None, gallery=True, model_classifier=adapts(model.episode_classifier))
    t0 = time.perf_counter()
    report = ranked_report(opts, q, g)
    rerank_ms = (time.perf_counter() - t0) * 1000 / len(q.vectors)
    cfg = EvalConfig(data=str(grocery_root()), split_file=GROCERY_SPLIT, seed=seed, transductive=transductive)
    t0 = time.perf_counter()
    episodes = episode_metrics(cfg, model, q, g)
    episode_ms = (time.perf_counter() - t0) * 1000 / (2 * cfg.episodes * 25)
    imbalanced = episode_metrics(replace(cfg, query_imbalance=2.0), model, q, g)
    return {"name": name, "rerank": opts.to_dict(), "transductive": transductive, "map": report.map,
            "map_at_r": report.map_at_r, "precision_at_1": report.precision_at_1,
            "5way1shot": episodes["5way1shot"]["accuracy"], "5way5shot": episodes["5way5shot"]["accuracy"],
            "5way1shot_imbalanced": imbalanced["5way1shot"]["accuracy"],
            "5way5shot_imbalanced": imbalanced["5way5shot"]["accuracy"],
            "studio_top1": studio_top1(transductive, q, studio, names),
            "studio_top1_shelves": studio_top1(transductive, q, studio, names, shelf_articles=5, seed=seed),
            "studio_top1_one": studio_top1(transductive, q, studio, names, shelf_articles=1, seed=seed),
            "rerank_ms_per_query": round(rerank_ms, 3), "episode_ms_per_query": round(episode_ms, 3)}


def catalogue_cost(n: int = 100_000, dim: int = 1280, queries: int = 16, repeats: int = 3, seed: int = 0) -> dict:
    """Per-query time of ``Catalogue.search`` (k 5) on a flat index of ``n`` random unit vectors
    with and without ``dba-qe`` re-ranking (shortlist of 100), interleaved, medians."""
    from fewshot.index import CatalogueIndex

    from bench.common import interleaved

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    index = CatalogueIndex.build(vectors, [f"a{i // 5}" for i in range(n)], [None] * n, [f"{i}.jpg" for i in range(n)])
    q = vectors[rng.choice(n, queries, replace=False)] + 0.5 * rng.standard_normal((queries, dim), dtype=np.float32)
    times = interleaved({"plain": lambda: index.search(q, 5), "dba-qe": lambda: index.search(q, 5, rerank="dba-qe")},
                        repeats=repeats)
    return {"images": n, "dim": dim, "queries": queries, "index": "flat",
            **{f"{k}_ms_per_query": round(statistics.median(v) * 1000 / queries, 2) for k, v in times.items()}}


def _fmt(x, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def render(results: dict) -> str:
    cost = results.get("catalogue_cost")
    lines = ["# Ranking levers (bench/quality_levers.py)", "",
             "Grocery, the 28 unseen test articles of `splits/grocery-unseen.json`, efficientnet_lite0 (frozen at 224 px, a run at its own test size). "
             "Retrieval figures after re-ranking; episodes 1,000 per setting; *imb.* = imbalanced query sets "
             "(Dirichlet(2)); studio = shelf photo -> single studio image top-1, *all*: every shelf photo in one batch (the "
             "28 articles about evenly), *shelves*: 200 batches of the photos of 5 random articles, *one*: 200 batches of "
             "one random article's photos.", ""]
    for model, entry in results.get("models", {}).items():
        tta = f", every photo embedded with `--tta {entry['tta']}`" if entry.get("tta", "none") != "none" else ""
        lines += [f"## {model}", "", f"{entry['machine']}, {entry['finished']}, load {entry['load_average']:.1f}{tta}", "",
                  "| lever | mAP | MAP@R | P@1 | 5w1s | 5w1s imb. | 5w5s | 5w5s imb. | studio, all | studio, shelves "
                  "| studio, one | ms/query |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            ms = r["rerank_ms_per_query"] + (r["episode_ms_per_query"] if r["transductive"] != "none" else 0)
            lines.append(f"| {r['name']} | {_fmt(r['map'])} | {_fmt(r['map_at_r'])} | {_fmt(r['precision_at_1'])} | "
                         f"{_fmt(r['5way1shot'])} | {_fmt(r['5way1shot_imbalanced'])} | {_fmt(r['5way5shot'])} | "
                         f"{_fmt(r['5way5shot_imbalanced'])} | {_fmt(r['studio_top1'])} | {_fmt(r.get('studio_top1_shelves'))} | "
                         f"{_fmt(r.get('studio_top1_one'))} | {ms:.2f} |")
        lines.append("")
    if cost:
        lines += [f"Catalogue search at {cost['images']:,} images ({cost['index']} index, {cost['dim']} dimensions, "
                  f"k 5, load {cost['load_average']:.1f}): {cost['plain_ms_per_query']} ms per query plain, "
                  f"{cost['dba-qe_ms_per_query']} ms with `dba-qe` (shortlist of 100 re-ranked).", ""]
    return "\n".join(lines)


def run(quick: bool, ctx) -> dict:
    """Part 10 of ``bench/run_all.py``: the rows ``python bench/quality_levers.py`` stored in
    ``docs/results/<folder>`` for each of :data:`RESULT_FOLDERS` (they need trained runs, so
    nothing is measured here); ``groups`` names each seed group's models."""
    merged: dict = {"models": {}, "groups": {}}
    for folder in RESULT_FOLDERS:
        path = RESULTS.parent / folder / "results.json"
        if not path.is_file():
            continue
        found = json.loads(path.read_text())
        merged["models"].update(found.get("models", {}))
        merged.setdefault("catalogue_cost", found.get("catalogue_cost"))
        if folder in SEED_GROUPS:
            merged["groups"][folder] = list(found.get("models", {}))
    return merged


def _worst_seed(results: dict, key: str, rows: tuple[str, ...]) -> tuple[float, str] | None:
    """The lever whose worst seed is best, over the seed groups: ``(worst value, "group, lever:
    seed values")``."""
    found = []
    for group, names in results.get("groups", {}).items():
        entries = [results["models"][n] for n in names if n in results.get("models", {})]
        for row in rows:
            values = [next((r.get(key) for r in e["rows"] if r["name"] == row), None) for e in entries]
            if values and None not in values:
                found.append((min(values), f"{group}, {row}: " + " / ".join(f"{v:.3f}" for v in values)))
    return max(found) if found else None


def _best(results: dict, key: str, rows: tuple[str, ...] | None = None) -> tuple[float, str] | None:
    """The best value of ``key`` over the models' rows (``rows``: only these levers); a tie goes to
    the row with fewer levers (a combination that adds nothing is not credited)."""
    found = [(r[key], -len(r["name"]), f"{m}, {r['name']}") for m, e in results.get("models", {}).items()
             for r in e["rows"] if r.get(key) is not None and (rows is None or r["name"] in rows)]
    return (max(found)[0], max(found)[2]) if found else None


def goal_rows(results: dict) -> list[list[str]]:
    """Rows of the goals table of ``run_all`` (issue 30's targets). A target is judged on the seed
    groups (:data:`SEED_GROUPS`: the lever whose worst seed is best); the best single run of any
    model is shown under it, unjudged (``-``), as is a figure that holds only under a condition."""
    from bench.common import verdict

    inductive = ("none", "qe", "dba", "dba-qe", "centre")
    everything = tuple(row for row, _, _ in LEVERS)
    rows = []
    for key, goal, what, which, judged in (
            ("map_at_r", GOAL_MAP_AT_R, "Ranking levers, Grocery unseen test classes: MAP@R, re-ranking one query at a "
             "time", inductive, True),
            ("map_at_r", GOAL_MAP_AT_R, "... k-reciprocal (each query ranked with the help of all the others)",
             ("k-reciprocal",), False),
            ("5way1shot", GOAL_5WAY1SHOT, "... 5-way 1-shot, balanced queries, a lever that holds on imbalanced ones "
             "(not TIM)", HOLDS_ON_IMBALANCE, True),
            ("5way1shot_imbalanced", GOAL_5WAY1SHOT, "... 5-way 1-shot, imbalanced queries", everything, False),
            ("studio_top1", GOAL_STUDIO, "... shelf photo -> studio image top-1, all shelf photos in one batch (the 28 "
             "articles about evenly), a lever that holds on shelves and on one article's photos (not TIM, not "
             "BD-CSPN)", HOLDS_ON_SHELVES, True),
            ("studio_top1_shelves", GOAL_STUDIO, "... the same, shelves of 5 articles", HOLDS_ON_SHELVES, True)):
        target = f">= {goal:.2f}" if goal < 0.9 else f">= {goal:.0%}"
        worst = _worst_seed(results, key, which)
        if worst:
            rows.append([what + ", every seed", target, f"{worst[0]:.3f} ({worst[1]})",
                         verdict(worst[0] >= goal) if judged else "-"])
        best = _best(results, key, None if which is everything else which)
        if best:
            rows.append(["... best single run", target, f"{best[0]:.3f} ({best[1]})", "-"])
    return rows


def section(results: dict, ctx) -> str:
    body = render(results).split("\n", 2)[2].replace("\n## ", "\n### ")
    return ("## 10. Ranking levers\n\nFrom `python bench/quality_levers.py --model NAME=RUN_DIR --cost` (it needs trained "
            "runs, so `run_all.py` reads its results). The levers and their caveats: docs/guides/evaluation.md, \"Re-ranking and "
            "transductive episodes\".\n\n" + body)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/levers"))
    ap.add_argument("--model", action="append",
                    help="'frozen' or NAME=RUN_DIR (a fewshot train run); repeat for several")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tta", default="none", help="test-time augmentation of every model's embeddings (none | flip | scales)")
    ap.add_argument("--cost", action="store_true", help="also time Catalogue.search with dba-qe at 100,000 images")
    ap.add_argument("--levers", default=None, help="comma-separated rows to measure (default: all); a model's "
                    "other rows already in OUT/results.json are kept")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    if args.cost:
        results["catalogue_cost"] = {**catalogue_cost(), "load_average": os.getloadavg()[0]}
        print(json.dumps(results["catalogue_cost"]), flush=True)
    for spec in args.model or []:
        name, _, run = spec.partition("=")
        model, q, g, studio, names = embed_sets(run or None, args.cache_dir, args.tta)
        wanted = set(args.levers.split(",")) if args.levers else {row for row, _, _ in LEVERS}
        kept = {r["name"]: r for r in results["models"].get(name, {}).get("rows", []) if r["name"] not in wanted}
        for row, rerank, transductive in LEVERS:
            if row in wanted:
                print(f"== {name}: {row}", flush=True)
                kept[row] = lever_row(row, rerank, transductive, model, q, g, studio, names, args.seed)
                print(json.dumps(kept[row]), flush=True)
        rows = [kept[row] for row, _, _ in LEVERS if row in kept]
        m = machine()
        results["models"][name] = {"run_dir": run or None, "tta": args.tta, "rows": rows, "machine": f"{m.get('cpu')}, "
                                   f"{m.get('usable_cpus')} CPU(s)", "load_average": os.getloadavg()[0],
                                   "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        path.write_text(json.dumps(results, indent=1))
        (args.out / "table.md").write_text(render(results))


if __name__ == "__main__":
    main()
