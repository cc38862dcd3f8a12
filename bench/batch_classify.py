"""Photos classified together (``fewshot classify --reject none --transductive paddle``) against a
catalogue, on Grocery's test photos, in batches of several shapes (docs/measurements.md,
"Classifying photos together").

Each index (``fewshot index`` of Grocery; e.g. the main job's ``--split train``, or
``--catalogue iconic``) classifies the 2,485 test photos one at a time (``none``) and in batches
(``paddle``): all photos in one batch, one article's photos per batch, and ``--draws`` seeded
draws of ``k`` random articles with all their test photos or ``m`` of each. Top-1 over the
photos of each shape.

    fewshot index --data grocery --split train --out runs/grocery-index
    python bench/batch_classify.py --index main-frozen=runs/grocery-index --out docs/results/batch-classify
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import grocery_root, machine  # noqa: E402

#: (articles per batch, photos per article: None = all its test photos)
SHAPES = ((5, None), (10, 3), (10, 1), (5, 1), (20, 1))


def _top1(cat, batches: list[tuple[list, list[str]]]) -> dict:
    right = {"none": 0, "paddle": 0}
    photos = 0
    for paths, truth in batches:
        for how in right:
            said = cat.classify(paths, top_k=1, reject="none", transductive=how)
            right[how] += sum(r.answer.article == t for r, t in zip(said, truth))
        photos += len(paths)
    return {**{how: round(n / photos, 6) for how, n in right.items()}, "photos": photos, "batches": len(batches)}


def measure(index_dir: str, draws: int, seed: int) -> dict:
    """Top-1 one at a time and as batches, per batch shape, for one index."""
    from fewshot.catalogue import Catalogue
    from fewshot.data.loaders import load_dataset

    cat = Catalogue.load(index_dir)
    by: dict[str, list] = defaultdict(list)
    for r in load_dataset(str(grocery_root())).with_split("test").records:
        by[r.label].append(r.path)
    labels = sorted(by)
    out = {"all photos": _top1(cat, [([p for a in labels for p in by[a]], [a for a in labels for _ in by[a]])]),
           "one article": _top1(cat, [(by[a], [a] * len(by[a])) for a in labels])}
    for k, m in SHAPES:
        rng = np.random.default_rng(seed)
        batches = []
        for _ in range(draws):
            pick = rng.choice(labels, k, replace=False)
            chosen = {a: by[a] if m is None else list(rng.choice(by[a], m, replace=False)) for a in pick}
            batches.append(([p for a in pick for p in chosen[a]], [a for a in pick for _ in chosen[a]]))
        out[f"{k} x {'all' if m is None else m}"] = _top1(cat, batches)
    return out


def render(results: dict) -> str:
    shapes = ["all photos", "one article"] + [f"{k} x {'all' if m is None else m}" for k, m in SHAPES]
    lines = ["# Photos classified together (bench/batch_classify.py)", "",
             "Grocery's test photos, top-1 one at a time -> `--transductive paddle`; *k x m*: draws of k random "
             "articles, m test photos of each (all: every one).", "",
             "| index | " + " | ".join(shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for name, entry in results["indexes"].items():
        row = entry["rows"]
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['none']:.3f} -> {row[s]['paddle']:.3f}" for s in shapes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", action="append", required=True, help="NAME=INDEX_DIR; repeat for several")
    ap.add_argument("--out", type=Path, default=Path("docs/results/batch-classify"))
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"indexes": {}}
    for spec in args.index:
        name, _, index_dir = spec.partition("=")
        rows = measure(index_dir, args.draws, args.seed)
        m = machine()
        results["indexes"][name] = {"index": index_dir, "rows": rows, "draws": args.draws, "seed": args.seed,
                                    "machine": f"{m.get('cpu')}, {m.get('usable_cpus')} CPU(s)",
                                    "load_average": os.getloadavg()[0],
                                    "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        print(name, json.dumps(rows), flush=True)
        path.write_text(json.dumps(results, indent=1))
        (args.out / "table.md").write_text(render(results))


if __name__ == "__main__":
    main()
