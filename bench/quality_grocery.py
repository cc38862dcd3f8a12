"""The README table for the siamese methods (issue 3), in one command.

Grocery Store Dataset, the unseen test classes of ``splits/grocery-unseen.json`` (28 of 81 fine
classes, whole coarse classes; cross-visit: gallery and support sets from the train photos,
queries from the test photos), efficientnet_lite0 at 224 px. Rows:

* ``frozen``: the pretrained backbone (``fewshot evaluate --backbone efficientnet_lite0``);
* ``frozen + centring``: the untrained default head (identity linear map on features centred by
  the mean train-class embedding, SimpleShot's CL2N), i.e. epoch 0 of every default run;
* ``contrastive``, ``triplet``: ``fewshot train`` with the library defaults (identity-initialised
  linear head on centred features, Adam lr 1e-4, batches of 16 classes x 4 photos, semi-hard
  mining, best epoch by val MAP@R, patience 5);
* ``contrastive (mlp head)``, ``triplet (mlp head)``: the same with ``--head mlp``
  (Linear 1280-512, ReLU, Linear 512-256, L2-normalised, no centring), otherwise the same
  settings (lr 1e-4 was also the better of 1e-4 / 1e-3 for this head on the val classes).

Every row is evaluated by :func:`fewshot.evaluation.evaluate` (the code behind ``fewshot evaluate
--model RUN_DIR --split-file splits/grocery-unseen.json --split test``): mAP, MAP@R, P@1 and
5-way 1-shot / 5-shot nearest-prototype accuracy +- 95% CI over ``--episodes`` episodes
(5 queries per class, seed 0). Training time is the trainer's wall time (epochs + per-epoch
validation) on cached embeddings, without the one-off embedding of the images.

Usage (from the repository root; the first run embeds the 5,421 photos, about 4 min on 2 cores)::

    FEWSHOT_CACHE=/tmp/fscache python bench/quality_grocery.py --out docs/results/grocery-unseen

Writes ``OUT/table.md``, ``OUT/results.json`` and ``OUT/curves-<method>.png``; the runs (weights,
history, checkpoints, per-row evaluation reports) go to ``--runs`` (default ``runs/grocery-unseen``,
git-ignored). ``--seeds 0 1 2`` adds a table of the trained rows over several training seeds.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from fewshot.io import atomic_write_json, atomic_write_text  # noqa: E402
from fewshot.training import make_config  # noqa: E402
from fewshot.training import train  # noqa: E402
from fewshot.embed.options import EmbedOptions  # noqa: E402
from fewshot.evaluation import EvalConfig, evaluate  # noqa: E402

SPLIT_FILE = ROOT / "splits" / "grocery-unseen.json"
MLP = {"kind": "mlp", "hidden_dim": 512, "out_dim": 256, "centre": False, "dropout": 0.0}

#: Overrides of the library defaults per row (``bench/quality.py`` reads ``RECIPES`` too: the
#: default rows use the defaults of ``fewshot train --method NAME`` unchanged).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {"grocery": {"contrastive": {}, "triplet": {}}}
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "frozen + centring": ("triplet", {"epochs": 0}),
    "contrastive": ("contrastive", {}),
    "triplet": ("triplet", {}),
    "contrastive (mlp head)": ("contrastive", {"head": MLP}),
    "triplet (mlp head)": ("triplet", {"head": MLP}),
}


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "-", name).strip("-")


def _eval(data: str, out: Path, episodes: int, cache_dir: str | None, model_dir: Path | None) -> dict:
    opts = EmbedOptions(backbone=None if model_dir else "efficientnet_lite0",
                        model_dir=str(model_dir) if model_dir else None, image_size=224, cache_dir=cache_dir,
                        progress=False)
    cfg = EvalConfig(data=data, split=None, split_file=str(SPLIT_FILE), part="test", seed=0, episodes=episodes,
                     n_query=5, embed=opts)
    return evaluate(cfg, out, overwrite=True)


def _row(name: str, m: dict, run: dict | None) -> dict:
    ep = m["episodes"]
    return {"row": name, "map": m["map"], "map_at_r": m["map_at_r"], "precision_at_1": m["precision_at_1"],
            "acc_5w1s": ep["5way1shot"]["accuracy"], "ci_5w1s": ep["5way1shot"]["ci95"],
            "acc_5w5s": ep["5way5shot"]["accuracy"], "ci_5w5s": ep["5way5shot"]["ci95"],
            "num_queries": m["num_queries"], **(run or {})}


def run_one(name: str, method: str, over: dict, args, seed: int) -> tuple[dict, Path]:
    run_dir = Path(args.runs) / f"{_slug(name)}-seed{seed}"
    cfg = make_config(method, data=args.data, split_file=str(SPLIT_FILE), out=str(run_dir), image_size=224,
                      seed=seed, overwrite=True, final_eval="none", progress=not args.no_progress,
                      cache_dir=args.cache_dir, **over)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    metrics = _eval(args.data, run_dir / "eval_test", args.episodes, args.cache_dir, run_dir)
    info = {"method": method, "seed": seed, "overrides": over, "run_dir": str(run_dir),
            "best_epoch": result.best_epoch, "epochs_run": result.history[-1]["epoch"],
            "stopped_early": result.stopped_early, "train_seconds": round(result.seconds, 1),
            "wall_seconds_with_setup": round(wall, 1), "best_val_map_at_r": result.best_metrics["val_map_at_r"],
            "best_val_map": result.best_metrics["val_map"]}
    return _row(name, metrics, info), run_dir


def _f(x: float | None, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def render(res: dict) -> str:
    lines = [
        "| model | mAP | MAP@R | P@1 | 5-way 1-shot | 5-way 5-shot | training time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        t = "-" if "train_seconds" not in r else (
            f"{r['train_seconds']:.0f} s ({r['epochs_run']} epochs, best {r['best_epoch']})")
        lines.append(f"| {r['row']} | {_f(r['map'])} | {_f(r['map_at_r'])} | {_f(r['precision_at_1'])} | "
                     f"{_f(r['acc_5w1s'])} +- {_f(r['ci_5w1s'])} | {_f(r['acc_5w5s'])} +- {_f(r['ci_5w5s'])} | {t} |")
    c = res["config"]
    lines += ["", f"Grocery `splits/grocery-unseen.json`, test part: {c['test_classes']} unseen classes, "
              f"{res['rows'][0]['num_queries']} query photos (test split) against the gallery of their train "
              f"photos; efficientnet_lite0 at 224 px; episodes: {c['episodes']} per setting, 5 queries per class, "
              f"seed 0; training on {c['train_classes']} classes, model selection on {c['val_classes']} val classes. "
              f"Machine: {c['machine']}."]
    if res.get("seeds_table"):
        lines += ["", "Over training seeds " + ", ".join(map(str, c["seeds"])) + " (mean +- std over seeds):", "",
                  "| model | mAP | MAP@R | P@1 | 5-way 5-shot |", "|---|---|---|---|---|"]
        for name, s in res["seeds_table"].items():
            lines.append(f"| {name} | {_f(s['map'][0])} +- {_f(s['map'][1])} | {_f(s['map_at_r'][0])} +- "
                         f"{_f(s['map_at_r'][1])} | {_f(s['precision_at_1'][0])} +- {_f(s['precision_at_1'][1])} | "
                         f"{_f(s['acc_5w5s'][0])} +- {_f(s['acc_5w5s'][1])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import os
    import platform

    import torch

    from fewshot.data.splits import ClassSplit

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "grocery-store-dataset"))
    p.add_argument("--out", default="docs/results/grocery-unseen")
    p.add_argument("--runs", default="runs/grocery-unseen")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--rows", nargs="*", default=None, help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="training seeds (the main table uses the first)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = ClassSplit.load(SPLIT_FILE)
    rows_wanted = args.rows or list(ROWS)

    t0 = time.perf_counter()
    frozen = _eval(args.data, Path(args.runs) / "frozen" / "eval_test", args.episodes, args.cache_dir, None)
    res: dict[str, Any] = {"rows": [_row("frozen", frozen, None)], "config": {
        "split_file": "splits/grocery-unseen.json", "episodes": args.episodes, "seeds": args.seeds,
        "train_classes": len(split.train), "val_classes": len(split.val), "test_classes": len(split.test),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
                   f"Python {platform.python_version()}"}}
    per_seed: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name in rows_wanted:
            method, over = ROWS[name]
            if seed != args.seeds[0] and over.get("epochs") == 0:
                continue  # untrained: the same for every seed
            row, run_dir = run_one(name, method, over, args, seed)
            print(f"{name} seed {seed}: MAP@R {row['map_at_r']:.4f} mAP {row['map']:.4f} "
                  f"({row['train_seconds']:.0f} s, best epoch {row['best_epoch']})", flush=True)
            per_seed.setdefault(name, []).append(row)
            if seed == args.seeds[0]:
                res["rows"].append(row)
                if over.get("epochs") != 0 and (run_dir / "curves.png").exists():
                    shutil.copyfile(run_dir / "curves.png", out / f"curves-{_slug(name)}.png")
    if len(args.seeds) > 1:
        res["seeds_table"] = {}
        for name, rows in per_seed.items():
            if len(rows) < 2:
                continue
            res["seeds_table"][name] = {k: (statistics.mean(r[k] for r in rows), statistics.stdev(r[k] for r in rows))
                                        for k in ("map", "map_at_r", "precision_at_1", "acc_5w5s")}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "table.md", render(res))
    print(render(res))
    return res


if __name__ == "__main__":
    main()
