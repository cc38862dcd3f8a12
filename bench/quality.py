"""Quality of every method on the class-disjoint protocols: one table, one bar chart.

Protocols (test classes, never seen in training; :func:`fewshot.data.protocol.protocol_sets`):

* Grocery unseen articles, ``splits/grocery-unseen.json``: queries = the test classes' test
  photos, gallery / support sets = their train photos (a different shop visit);
* Omniglot, ``splits/omniglot-small1.json``: the test alphabet's characters, each character's
  20 drawings divided 10 gallery / 10 queries (seeded).

Rows: ``frozen`` (the pretrained backbone, :func:`fewshot.evaluation.evaluate`) and every training
method (:func:`fewshot.training.train`, the code behind ``fewshot train``: best epoch by
val MAP@R, then the same evaluation on the test classes). Metrics: mAP, MAP@R, P@1, 5-way 1-shot
and 5-way 5-shot accuracy with 95% CI (``episodes`` episodes, seed 0), training time.

Settings per method: the library defaults with the head trained on the cached frozen embeddings
(``fewshot train --method NAME --fine-tune none``; the fine-tuned rows are part 7), unless a
recipe overrides them. Recipes come from the methods' own benchmark scripts when present:
a module ``bench/quality_grocery.py`` or ``bench/quality_episodic.py`` (or ``bench/recipes.py``)
that defines ``RECIPES = {"grocery": {"protonet": {TrainConfig field: value}}, "omniglot":
{...}}`` (or ``{method: {...}}`` for both datasets). The table lists every override used.
A method that cannot be trained (module missing, error) gets a "not available" row with the
reason; the other rows still run.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import ROOT, SEED, Context, fmt, fmt_s, grocery_root, omniglot_root, save_chart, table

#: fomaml is left out to keep the whole benchmark under 15 minutes (issue 31): its head-only rows
#: equal maml's within 0.001 MAP@R (docs/measurements.md, head-only training, episodic)
METHODS = ("contrastive", "triplet", "protonet", "maml")
RECIPE_MODULES = ("bench.recipes", "bench.quality_grocery", "bench.quality_episodic")
#: this part trains the head on the cached frozen embeddings (``fine_tune="none"``; a recipe may
#: say otherwise): the fine-tuned rows are part 7's (``bench/quality_finetune.py``), whose runs
#: take 5-20 minutes each. Since fine-tuning became the default of ``fewshot train``, a row
#: without it fine-tuned every method (over an hour for the part).
HEAD_ONLY = "none"


def datasets(quick: bool, work: Path) -> list[dict[str, Any]]:
    """The protocols to run: name, data root, split file, image size."""
    if not quick:
        return [{"name": "grocery", "title": "Grocery unseen articles", "data": grocery_root(),
                 "split_file": ROOT / "splits" / "grocery-unseen.json", "image_size": 224},
                {"name": "omniglot", "title": "Omniglot small1", "data": omniglot_root(),
                 "split_file": ROOT / "splits" / "omniglot-small1.json", "image_size": 224}]
    # smoke run: 18 Omniglot characters at 64 px (8 train / 5 val / 5 test)
    from fewshot.data.splits import ClassSplit

    full = ClassSplit.load(ROOT / "splits" / "omniglot-small1.json")
    tiny = ClassSplit.from_dict({**full.to_dict(), "name": "omniglot-tiny", "train": full.train[:8],
                                 "val": full.val[:5], "test": full.test[:5]})
    path = work / "omniglot-tiny.json"
    tiny.save(path)
    return [{"name": "omniglot-tiny", "title": "Omniglot, 18 characters (smoke run)", "data": omniglot_root(),
             "split_file": path, "image_size": 64}]


def load_recipes() -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, Any]], list[str]]:
    """Training overrides and dataset settings from the methods' benchmark scripts, if present.

    Returns ``({dataset: {method: overrides}}, {dataset: {"image_size": ...}}, modules used)``.
    Understood: ``RECIPES = {dataset: {method: overrides}}`` or ``{method: overrides}`` (both
    datasets), and ``GROCERY`` / ``OMNIGLOT = {"image_size": S, "runs": {method: overrides}}``.
    """
    out: dict[str, dict[str, dict]] = {}
    settings: dict[str, dict[str, Any]] = {}
    found = []
    for mod in RECIPE_MODULES:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        used = False
        rec = getattr(m, "RECIPES", None)
        if isinstance(rec, dict):
            used = True
            for key, value in rec.items():
                if key in METHODS:  # flat: {method: overrides} for every dataset
                    for ds in ("grocery", "omniglot"):
                        out.setdefault(ds, {}).setdefault(key, {}).update(value)
                elif isinstance(value, dict):
                    for method, over in value.items():
                        out.setdefault(key, {}).setdefault(method, {}).update(over)
        for ds, attr in (("grocery", "GROCERY"), ("omniglot", "OMNIGLOT")):
            spec = getattr(m, attr, None)
            if isinstance(spec, dict) and isinstance(spec.get("runs"), dict):
                used = True
                for method, over in spec["runs"].items():
                    out.setdefault(ds, {}).setdefault(method, {}).update(over)
                if spec.get("image_size"):
                    settings.setdefault(ds, {})["image_size"] = int(spec["image_size"])
        if used:
            found.append(mod)
    return out, settings, found


QUICK_OVERRIDES = {"epochs": 1, "patience": 0, "episodes": 10, "episodes_per_epoch": 10, "val_episodes": 10,
                   "batch_size": 16, "m_per_class": 4}


def _row_from_metrics(m: dict) -> dict[str, Any]:
    e = m.get("episodes", {})
    return {"map": m.get("map"), "map_at_r": m.get("map_at_r"), "precision_at_1": m.get("precision_at_1"),
            "acc_5w1s": e.get("5way1shot", {}).get("accuracy"), "ci_5w1s": e.get("5way1shot", {}).get("ci95"),
            "acc_5w5s": e.get("5way5shot", {}).get("accuracy"), "ci_5w5s": e.get("5way5shot", {}).get("ci95"),
            "num_queries": m.get("num_queries")}


def frozen_row(ds: dict, episodes: int, out: Path) -> dict[str, Any]:
    from fewshot.embed.options import EmbedOptions
    from fewshot.evaluation import EvalConfig, evaluate

    cfg = EvalConfig(data=str(ds["data"]), split=None, split_file=str(ds["split_file"]), part="test", seed=SEED,
                     episodes=episodes, embed=EmbedOptions(image_size=ds["image_size"], progress=False))
    t0 = time.perf_counter()
    m = evaluate(cfg, out, overwrite=True)  # the benchmark owns its output folders
    return {"method": "frozen", "available": True, "train_seconds": 0.0, "eval_seconds": time.perf_counter() - t0,
            "overrides": {}, **_row_from_metrics(m)}


def trained_row(ds: dict, method: str, episodes: int, out: Path, overrides: dict) -> dict[str, Any]:
    from fewshot.training import config_keys, make_config
    from fewshot.training import train

    given = {"data": str(ds["data"]), "split_file": str(ds["split_file"]), "out": str(out), "seed": SEED,
             "image_size": ds["image_size"], "progress": False, "overwrite": True, "final_eval": "test",
             "eval_episodes": episodes, "fine_tune": HEAD_ONLY, **overrides}
    keys = config_keys(method)  # the quick overrides hold options of every method
    cfg = make_config(method, **{k: v for k, v in given.items() if k in keys})
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    return {"method": method, "available": True, "train_seconds": result.seconds, "wall_seconds": wall,
            "best_epoch": result.best_epoch, "epochs_run": result.history[-1]["epoch"],
            "stopped_early": result.stopped_early, "overrides": overrides,
            "val_map_at_r": result.best_metrics.get("val_map_at_r"), **_row_from_metrics(result.final_metrics or {})}


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    episodes = 50 if quick else 1000
    work = ctx.work_dir / "quality"
    work.mkdir(parents=True, exist_ok=True)
    recipes, settings, found = load_recipes()
    res: dict[str, Any] = {"episodes": episodes, "recipe_modules": found, "datasets": [], "quick": quick,
                           "quick_overrides": QUICK_OVERRIDES if quick else {}}
    for ds in datasets(quick, work):
        base = "grocery" if ds["name"].startswith("grocery") else "omniglot"
        if not quick:
            ds.update(settings.get(base, {}))
        entry = {"name": ds["name"], "title": ds["title"], "split_file": str(Path(ds["split_file"]).name),
                 "image_size": ds["image_size"], "rows": []}
        try:
            entry["rows"].append(frozen_row(ds, episodes, work / f"{ds['name']}-frozen"))
        except Exception as exc:
            entry["rows"].append({"method": "frozen", "available": False, "reason": f"{type(exc).__name__}: {exc}"[:300],
                                  "trace": traceback.format_exc(limit=4)[-800:]})
        for method in METHODS:
            # the smoke run's 18-character split cannot hold the recipes' episode sizes: defaults only
            over = dict(QUICK_OVERRIDES) if quick else dict(recipes.get(base, {}).get(method, {}))
            try:
                entry["rows"].append(trained_row(ds, method, episodes, work / f"{ds['name']}-{method}", over))
            except Exception as exc:
                entry["rows"].append({"method": method, "available": False,
                                      "reason": f"{type(exc).__name__}: {exc}".strip()[:300], "overrides": over,
                                      "trace": traceback.format_exc(limit=4)[-800:]})
        res["datasets"].append(entry)
    return res


def _acc(a, ci) -> str:
    return "-" if a is None else f"{a:.3f} +- {ci:.3f}" if ci is not None else f"{a:.3f}"


def section(res: dict[str, Any], ctx: Context) -> str:
    rows = []
    for d in res["datasets"]:
        for r in d["rows"]:
            if not r.get("available"):
                rows.append([f"{d['title']}, {d['image_size']} px", r["method"], "not available", "", "", "", "", "", r.get("reason", "")])
                continue
            train_t = "-" if r["method"] == "frozen" else fmt_s(r["train_seconds"])
            note = []
            if r["method"] != "frozen":
                note.append(f"best epoch {r['best_epoch']} of {r['epochs_run']}")
            shown = {k: v for k, v in (r.get("overrides") or {}).items() if k not in res.get("quick_overrides", {})}
            if shown:
                note.append(", ".join(f"{k}={v}" for k, v in shown.items()))
            rows.append([f"{d['title']}, {d['image_size']} px", r["method"], fmt(r["map"]), fmt(r["map_at_r"]), fmt(r["precision_at_1"]),
                         _acc(r["acc_5w1s"], r["ci_5w1s"]), _acc(r["acc_5w5s"], r["ci_5w5s"]), train_t,
                         "; ".join(note) or "library defaults"])
    chart = _chart(res, ctx)
    src = ("recipes from " + ", ".join(f"`{m}`" for m in res["recipe_modules"])) if res["recipe_modules"] else \
        "no recipe module found: every method ran with the library defaults of `fewshot train --method NAME --fine-tune none`"
    lines = ["## 5. Quality on unseen classes", "",
             f"Test classes of each class-disjoint split (never seen in training); retrieval of queries against "
             f"the gallery, and N-way K-shot episodes ({res['episodes']:,} per setting, 5 queries per class, seed "
             f"{SEED}) with 95% confidence intervals. Trained rows: the head on the cached frozen embeddings "
             f"(`--fine-tune none`; fine-tuned rows: part 7), best epoch by validation MAP@R; training time "
             f"= epochs + validation (embedding from the cache and the final evaluation excluded). Settings: {src}.",
             "", *([f"Smoke run: every method trained with the tiny budget {res['quick_overrides']}.", ""]
                   if res.get("quick") else []),
             table(["protocol", "method", "mAP", "MAP@R", "P@1", "5-way 1-shot", "5-way 5-shot",
                        "training time", "notes"], rows), ""]
    if chart:
        lines += [f"![quality]({ctx.chart_dir.name}/{chart})", ""]
    return "\n".join(lines)


def _chart(res: dict[str, Any], ctx: Context) -> str | None:
    from bench.common import pyplot

    sets = [d for d in res["datasets"] if any(r.get("available") for r in d["rows"])]
    if not sets:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 2.8), squeeze=False)
    keys = (("map", "mAP", None), ("map_at_r", "MAP@R", None), ("precision_at_1", "P@1", None),
            ("acc_5w1s", "5-way 1-shot", "ci_5w1s"), ("acc_5w5s", "5-way 5-shot", "ci_5w5s"))
    for ax, d in zip(axes[0], sets):
        rows = [r for r in d["rows"] if r.get("available")]
        xs = np.arange(len(rows))
        w = 0.8 / len(keys)
        for i, (k, name, ci) in enumerate(keys):
            vals = [r.get(k) if r.get(k) is not None else np.nan for r in rows]
            err = [r.get(ci) or 0 for r in rows] if ci else None
            ax.bar(xs + (i - (len(keys) - 1) / 2) * w, vals, w, yerr=err, label=name, capsize=1.5 if ci else 0)
        ax.set_xticks(xs, [r["method"] for r in rows], rotation=20)
        ax.set_ylim(0, 1.08)
        ax.set_title(d["title"])
    axes[0][0].legend(frameon=False, ncol=5, loc="upper left", fontsize=6.5)
    return save_chart(fig, ctx.chart_dir / "quality.png")


if __name__ == "__main__":
    import json

    r = run("--quick" in sys.argv, Context(Path("/tmp/fewshot-bench"), Path("/tmp/fewshot-bench")))
    print(json.dumps(r, indent=1, default=str))
