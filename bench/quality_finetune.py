"""Fine-tuning the feature extractor, measured (issue 13): head-only vs ``last:N`` vs ``all``.

Grocery (``splits/grocery-unseen.json``, the 28 unseen test classes, cross-visit: gallery and
support from the train photos, queries from the test photos), efficientnet_lite0 at 224 px:
one row per (method, ``--fine-tune``), each a ``fewshot train`` run with the library defaults
plus the row's settings, evaluated by :func:`fewshot.evaluation.evaluate` on the test classes
(mAP, MAP@R, P@1, 5-way 1-shot / 5-shot accuracy over 1,000 episodes). ``seconds`` is the
trainer's wall time (training epochs plus per-epoch validation; the one-off embedding and image
decoding excluded), on this machine's CPU cores.

Omniglot (``splits/omniglot-small1.json``, test alphabet Korean, 40 characters; support from
the gallery half, queries from the other half): 20-way 1-shot and 5-way 1-shot accuracy over
1,000 episodes, for conv4 trained from scratch at 28 px (protonet; maml second order with
``--inner-params all``) and Lite0 fine-tuned.

Shelf photo -> studio image (``--studio RUN``): the test photos of the unseen test classes
classified against those classes' single iconic catalogue image (``classes.csv``): top-1 of the
frozen backbone and of the given fine-tuned run.

Every run appends to ``OUT/results.json`` as soon as it finishes (rerunning a row replaces it),
and ``OUT/table.md`` is rewritten from it, so the grid can be measured a few rows at a time::

    python bench/quality_finetune.py --out docs/results/finetune --only triplet-last2
    python bench/quality_finetune.py --out docs/results/finetune --studio runs/finetune/triplet-last2
    python bench/quality_finetune.py --out docs/results/finetune --list

Runs go to ``--runs`` (default ``runs/finetune``, git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import grocery_root, machine, omniglot_root  # noqa: E402

GROCERY_SPLIT = "splits/grocery-unseen.json"
OMNIGLOT_SPLIT = "splits/omniglot-small1.json"

#: name -> (dataset, method, settings); the grid of the issue, cheapest first within a method
ROWS: dict[str, tuple[str, str, dict]] = {}
for _m in ("contrastive", "triplet", "protonet", "maml"):
    ROWS[f"{_m}-head"] = ("grocery", _m, {"fine_tune": "none"})
    ROWS[f"{_m}-last2"] = ("grocery", _m, {"fine_tune": "last:2", "epochs": 5, "patience": 2, "backbone_lr": 1e-4}
                           if _m in ("contrastive", "triplet") else
                           {"fine_tune": "last:2", "episodes": 300 if _m == "protonet" else 200,
                            "episodes_per_epoch": 100, "patience": 2, "backbone_lr": 1e-4})
    ROWS[f"{_m}-all"] = ("grocery", _m, {"fine_tune": "all", "epochs": 4, "patience": 2}
                         if _m in ("contrastive", "triplet") else
                         {"fine_tune": "all", "episodes": 200, "episodes_per_epoch": 100, "patience": 2})
ROWS["triplet-last2-lr4e-4"] = ("grocery", "triplet", {"fine_tune": "last:2", "epochs": 5, "patience": 2,
                                                      "lr": 4e-4, "backbone_lr": 1e-4})
ROWS["triplet-last2-equal-lr"] = ("grocery", "triplet", {"fine_tune": "last:2", "epochs": 5, "patience": 2,
                                                        "lr": 1e-4, "backbone_lr": 1e-4})
for _s in (1, 2):
    # epochs 4: seed 0's best epoch was 3 and epoch 4 was worse, so 4 epochs give seed 0 the same run
    ROWS[f"triplet-last2-seed{_s}"] = ("grocery", "triplet", {"fine_tune": "last:2", "epochs": 4, "patience": 2,
                                                              "backbone_lr": 1e-4, "seed": _s})
for _s in (1, 2):
    ROWS[f"triplet-all-seed{_s}"] = ("grocery", "triplet", {"fine_tune": "all", "epochs": 4, "patience": 2,
                                                            "seed": _s})
ROWS["triplet-all-blr-half"] = ("grocery", "triplet", {"fine_tune": "all", "epochs": 5, "patience": 2,
                                                     "backbone_lr": 5e-5})
for _s in (1, 2):
    ROWS[f"triplet-all-blr-half-seed{_s}"] = ("grocery", "triplet", {"fine_tune": "all", "epochs": 5, "patience": 2,
                                                                    "backbone_lr": 5e-5, "seed": _s})
# cosine decay over all 5 epochs (no early stop: the last, low-rate epochs are the point)
ROWS["triplet-all-blr-half-cosine"] = ("grocery", "triplet", {"fine_tune": "all", "epochs": 5, "patience": 0,
                                                            "backbone_lr": 5e-5, "lr_schedule": "cosine"})
for _s in (1, 2):
    ROWS[f"triplet-all-blr-half-cosine-seed{_s}"] = ("grocery", "triplet", {
        "fine_tune": "all", "epochs": 5, "patience": 0, "backbone_lr": 5e-5, "lr_schedule": "cosine", "seed": _s})
# `fewshot train --method M` exactly as a user runs it (no setting given): the time target is
# for these; measured again on each CPU the table names
for _m in ("fomaml", "protonet", "triplet", "multisimilarity", "proxyanchor", "arcface"):
    ROWS[f"{_m}-default"] = ("grocery", _m, {})
for _w in ("ema", "swa"):  # weight averaging of the default triplet run (issue 30)
    ROWS[f"triplet-default-{_w}"] = ("grocery", "triplet", {"weight_average": _w})
ROWS["fomaml-all"] = ("grocery", "fomaml", {"fine_tune": "all", "episodes": 200, "episodes_per_epoch": 100,
                                           "patience": 2})
ROWS["triplet-last2-blr-quarter"] = ("grocery", "triplet", {"fine_tune": "last:2", "epochs": 5, "patience": 2,
                                                           "backbone_lr": 2.5e-5})
_CONV4 = {"backbone": "conv4", "pretrained": False, "fine_tune": "all", "image_size": 28, "augment": "none",
          "lr": 1e-3, "ways": 20, "shots": 1, "queries": 5, "patience": 0, "head": {"kind": "linear", "centre": False}}
ROWS["omniglot-conv4-protonet"] = ("omniglot", "protonet", {**_CONV4, "episodes": 3000, "episodes_per_epoch": 300})
ROWS["omniglot-conv4-maml"] = ("omniglot", "maml", {**_CONV4, "ways": 5, "episodes": 1500, "episodes_per_epoch": 150,
                                                    "inner_params": "all", "inner_lr": 0.4, "inner_steps": 1,
                                                    "meta_batch": 4})
ROWS["omniglot-conv4-maml-long"] = ("omniglot", "maml", {**_CONV4, "ways": 5, "episodes": 4500, "episodes_per_epoch": 300,
                                                         "inner_params": "all", "inner_lr": 0.4, "inner_steps": 1,
                                                         "meta_batch": 4})
ROWS["omniglot-conv4-maml-xl"] = ("omniglot", "maml", {**_CONV4, "ways": 5, "episodes": 9000, "episodes_per_epoch": 600,
                                                       "inner_params": "all", "inner_lr": 0.4, "inner_steps": 1,
                                                       "meta_batch": 4})
# class rotations (Santoro et al. 2016, Vinyals et al. 2016): the 74 train characters x 4 rotations
ROWS["omniglot-conv4-maml-rot4"] = ("omniglot", "maml", {**_CONV4, "ways": 5, "episodes": 4500, "episodes_per_epoch": 300,
                                                         "inner_params": "all", "inner_lr": 0.4, "inner_steps": 1,
                                                         "meta_batch": 4, "class_rotations": 4})
ROWS["omniglot-conv4-protonet-rot4"] = ("omniglot", "protonet", {**_CONV4, "episodes": 3000, "episodes_per_epoch": 300,
                                                                 "class_rotations": 4})
ROWS["omniglot-conv4-protonet-rot4-60way"] = ("omniglot", "protonet", {**_CONV4, "ways": 60, "episodes": 3000,
                                                                       "episodes_per_epoch": 300, "class_rotations": 4})
ROWS["omniglot-conv4-protonet-rot4-crops"] = ("omniglot", "protonet", {**_CONV4, "augment": "standard", "episodes": 3000,
                                                                       "episodes_per_epoch": 300, "class_rotations": 4})
ROWS["omniglot-lite0-protonet-last2"] = ("omniglot", "protonet", {"fine_tune": "last:2", "image_size": 112,
                                                                   "augment": "none", "ways": 20, "shots": 1,
                                                                   "queries": 5, "episodes": 400,
                                                                   "episodes_per_epoch": 100, "patience": 2})
ROWS["omniglot-lite0-head"] = ("omniglot", "protonet", {"fine_tune": "none", "image_size": 112, "ways": 20,
                                                        "shots": 1, "queries": 5})


def _data(dataset: str) -> tuple[str, str]:
    if dataset == "grocery":
        return str(grocery_root()), GROCERY_SPLIT
    return str(omniglot_root()), OMNIGLOT_SPLIT


def train_row(name: str, runs: Path, cache_dir: str | None, progress: bool) -> dict:
    """Train row ``name`` and evaluate it on the test classes; return its results row."""
    from fewshot.training import make_config
    from fewshot.training import train

    dataset, method, settings = ROWS[name]
    data, split_file = _data(dataset)
    settings = dict(settings)
    final = "test" if dataset == "grocery" else "none"
    cfg = make_config(method, data=data, split_file=split_file, out=str(runs / name), overwrite=True,
                      cache_dir=cache_dir, progress=progress, final_eval=final, **settings)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    row = {"name": name, "dataset": dataset, "method": method, "settings": settings,
           "fine_tune": cfg.fine_tune, "seconds": round(result.seconds, 1), "wall_seconds": round(wall, 1),
           "best_epoch": result.best_epoch, "epochs_run": result.history[-1]["epoch"],
           "best_val_map_at_r": result.best_metrics["val_map_at_r"], "run_dir": str(runs / name),
           "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "load_average_at_end": os.getloadavg()[0], "cpu": machine().get("cpu")}
    if dataset == "grocery":
        m = result.final_metrics
        row.update({"map": m["map"], "map_at_r": m["map_at_r"], "precision_at_1": m["precision_at_1"],
                    "5way1shot": m["episodes"]["5way1shot"]["accuracy"],
                    "5way5shot": m["episodes"]["5way5shot"]["accuracy"]})
    else:
        row.update(omniglot_episodes(runs / name, cache_dir))
    return row


def tta_row(name: str, row: dict, cache_dir: str | None) -> dict:
    """Row ``name``'s saved run evaluated again on the test classes with ``--tta flip`` (the
    mean embedding over each photo and its mirror image, gallery and queries alike)."""
    from fewshot.embed.options import EmbedOptions
    from fewshot.evaluation import EvalConfig, evaluate

    run_dir = Path(row["run_dir"])
    data, split_file = _data("grocery")
    opts = EmbedOptions(backbone=None, model_dir=str(run_dir), cache_dir=cache_dir, progress=False, tta="flip")
    cfg = EvalConfig(data=data, split_file=split_file, part="test", seed=row["settings"].get("seed", 0),
                     episodes=1000, embed=opts)
    t0 = time.perf_counter()
    m = evaluate(cfg, run_dir / "eval_test_ttaflip", overwrite=True)
    return {"map": m["map"], "map_at_r": m["map_at_r"], "precision_at_1": m["precision_at_1"],
            "5way1shot": m["episodes"]["5way1shot"]["accuracy"], "5way5shot": m["episodes"]["5way5shot"]["accuracy"],
            "eval_seconds": round(time.perf_counter() - t0, 1), "cpu": machine().get("cpu"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def omniglot_episodes(run_dir: Path | None, cache_dir: str | None, backbone: str | None = None,
                      image_size: int = 112) -> dict:
    """20-way and 5-way 1-shot accuracy (1,000 episodes, 5 queries per class) on Omniglot's test
    alphabet; for a run whose episode classifier does not adapt (not MAML) also with the transductive ones
    (``20way1shot_tim``, ...: :mod:`fewshot.methods.transductive`, balanced queries)."""
    from fewshot.data.protocol import protocol_sets
    from fewshot.evaluation.levers import adapts, episode_inputs
    from fewshot.methods.runs import load_embedding_model
    from fewshot.metrics import episodic_accuracy
    from fewshot.data.protocol import load_protocol

    data, split_file = _data("omniglot")
    dataset, split = load_protocol(data, split_file, None)
    q_set, g_set = protocol_sets(dataset, split, "test")
    model = load_embedding_model(backbone=backbone, model_dir=run_dir, image_size=image_size)
    q = model.embed(q_set, cache_dir=cache_dir, progress=False)
    g = model.embed(g_set, cache_dir=cache_dir, progress=False)
    out = {}
    levers = ("none",) if adapts(model.episode_classifier) else ("none", "bdcspn", "tim")
    for lever in levers:
        classifier, support, queries = episode_inputs(lever, model.episode_classifier, g.vectors, q.vectors)
        for n_way in (20, 5):
            res = episodic_accuracy(support, g.labels, n_way=n_way, k_shot=1, n_query=5, episodes=1000, seed=0,
                                    query_embeddings=queries, query_labels=q.labels, classifier=classifier)
            suffix = "" if lever == "none" else f"_{lever}"
            out[f"{n_way}way1shot{suffix}"] = res.accuracy
            out[f"{n_way}way1shot{suffix}_ci95"] = res.ci95
    return out


def studio(run_dir: Path | None, cache_dir: str | None) -> dict:
    """Top-1 of the unseen test classes' test photos against their single iconic catalogue image."""
    import csv

    import numpy as np

    from fewshot.data.splits import ClassSplit
    from fewshot.data.loaders import load_dataset
    from fewshot.methods.runs import load_embedding_model

    root = grocery_root()
    split = ClassSplit.load(GROCERY_SPLIT)
    test = set(split.test)
    with open(root / "dataset" / "classes.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    iconic = {r[0]: root / "dataset" / r[4].lstrip("/") for r in rows if r[0] in test}
    ds = load_dataset(str(root))
    photos = [r for r in ds.records if r.label in test and r.split == "test"]
    model = load_embedding_model(backbone=None if run_dir else "efficientnet_lite0", model_dir=run_dir)
    names = sorted(iconic)
    g, ok_g, _, _ = model.embed_paths([iconic[n] for n in names], cache_dir=cache_dir, progress=False)
    q, ok_q, _, _ = model.embed_paths([r.path for r in photos], cache_dir=cache_dir, progress=False)
    names = [names[i] for i in ok_g]
    truth = np.array([photos[i].label for i in ok_q])
    pred = np.array(names)[np.argmax(q @ g.T, axis=1)]
    return {"top1": float((pred == truth).mean()), "queries": int(len(truth)), "catalogue_images": len(names)}


def _fmt(x, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


#: the CPU in results.json's machine entry before each row recorded its own
LEGACY_CPU = "Intel(R) Xeon(R) Processor"


def _cpu(row: dict) -> str:
    return row.get("cpu") or "-"


def render(results: dict) -> str:
    """``table.md`` from ``results.json``."""
    rows = results.get("rows", {})
    lines = ["# Fine-tuning the feature extractor (bench/quality_finetune.py)", "",
             f"Machine of the last row run: {results.get('machine', {}).get('summary', '')}", "",
             "## Grocery, unseen test classes (28), efficientnet_lite0 224 px", "",
             "| run | --fine-tune | mAP | MAP@R | P@1 | 5-way 1-shot | 5-way 5-shot | best epoch / run | train time | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r and r["dataset"] == "grocery":
            lines.append(f"| {name} | {r['fine_tune']} | {_fmt(r['map'])} | {_fmt(r['map_at_r'])} | "
                         f"{_fmt(r['precision_at_1'])} | {_fmt(r['5way1shot'])} | {_fmt(r['5way5shot'])} | "
                         f"{r['best_epoch']} / {r['epochs_run']} | {r['seconds'] / 60:.1f} min | {_cpu(r)} |")
            if r.get("tta_flip"):
                t = r["tta_flip"]
                lines.append(f"| {name}, evaluated with `--tta flip` | {r['fine_tune']} | {_fmt(t['map'])} | "
                             f"{_fmt(t['map_at_r'])} | {_fmt(t['precision_at_1'])} | {_fmt(t['5way1shot'])} | "
                             f"{_fmt(t['5way5shot'])} | (the same model) | - | {_cpu(t)} |")
    lines += ["", "## Omniglot small1, test alphabet Korean (40 characters), 1,000 episodes", "",
              "| run | --fine-tune | 20-way 1-shot | 5-way 1-shot | train time | CPU |", "|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r and r["dataset"] == "omniglot":
            lines.append(f"| {name} | {r['fine_tune']} | {_fmt(r['20way1shot'])} | {_fmt(r['5way1shot'])} | "
                         f"{r['seconds'] / 60:.1f} min | {_cpu(r)} |")
            for lever in ("bdcspn", "tim"):
                if r.get(f"20way1shot_{lever}") is not None:
                    lines.append(f"| {name}, episodes classified with `--transductive {lever}` | {r['fine_tune']} | "
                                 f"{_fmt(r[f'20way1shot_{lever}'])} | {_fmt(r[f'5way1shot_{lever}'])} | "
                                 f"(the same model) | {_cpu(r)} |")
    if results.get("studio"):
        lines += ["", "## Shelf photo -> single studio image (28 unseen classes)", "",
                  "| model | top-1 | queries |", "|---|---|---|"]
        for name, s in results["studio"].items():
            lines.append(f"| {name} | {_fmt(s['top1'])} | {s['queries']} |")
    notes = [f"- {name}: {r['note']}." for name, r in rows.items() if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "A row *evaluated with `--tta flip`* is the run above it, unchanged, with every test photo "
              "(queries and gallery) embedded as the mean over the photo and its mirror image: twice the "
              "embedding time.", "",
              "Each row's settings are in results.json (`settings`), with the date and the load average. "
              "Train times compare only within one CPU: the machines differ (torch's Lite0 inference "
              "forward took 11 ms per image on the Intel Xeon and 23-31 ms on the AMD EPYC, "
              "docs/benchmarks.md part 1). A row without a "
              "CPU was measured before it was recorded per row; the file's machine entry then named "
              f"{LEGACY_CPU}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/finetune"))
    ap.add_argument("--runs", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--only", nargs="*", default=None, help="rows to (re)run (default: every row)")
    ap.add_argument("--studio", nargs="*", default=None, help="run folders for the shelf -> studio table")
    ap.add_argument("--tta", nargs="*", default=None,
                    help="finished Grocery rows whose saved runs to evaluate again with --tta flip")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(f"{k}: {v[0]} {v[1]} {v[2]}" for k, v in ROWS.items()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    m = machine()
    machine_entry = {**m, "summary": f"{m.get('cpu', '')}, {m.get('usable_cpus', '')} CPU(s), torch {m.get('torch', '')}"}
    if args.studio is not None:
        found = {"frozen efficientnet_lite0": studio(None, args.cache_dir)}
        found.update({Path(run).name: studio(Path(run), args.cache_dir) for run in args.studio})
        _update(path, args.out, machine_entry, lambda res: res.setdefault("studio", {}).update(found))
    for name in args.tta or []:
        row = _load(path)["rows"].get(name)
        if not row or row["dataset"] != "grocery" or not (Path(row["run_dir"]) / "config.json").is_file():
            raise SystemExit(f"row {name!r} has no saved Grocery run to evaluate with --tta flip")
        print(f"== {name} --tta flip", flush=True)
        tta = tta_row(name, row, args.cache_dir)
        print(json.dumps(tta), flush=True)
        _update(path, args.out, machine_entry, lambda res, n=name, t=tta: res["rows"][n].update(tta_flip=t))
    skip = args.studio is not None or args.tta is not None
    for name in (args.only if args.only is not None else ([] if skip else list(ROWS))):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; --list shows them")
        print(f"== {name}", flush=True)
        row = train_row(name, args.runs, args.cache_dir, not args.no_progress)
        print(json.dumps(row, default=str), flush=True)
        _update(path, args.out, machine_entry, lambda res, n=name, r=row: res["rows"].__setitem__(n, r))


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def _update(path: Path, out: Path, machine_entry: dict, change) -> None:
    """Apply ``change(results)`` to the file as it is now (another run of this script may have
    added rows since this one started) and write it atomically, with ``table.md``."""
    results = _load(path)
    results["machine"] = machine_entry
    change(results)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)
    (out / "table.md").write_text(render(results))


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- part 7 of run_all
GOAL_MAP_AT_R, GOAL_EACH, GOAL_OMNIGLOT = 0.60, 0.50, 0.75


def run(quick: bool, ctx) -> dict:
    """Part 7 of ``bench/run_all.py``: the fine-tuning runs take hours on 2 cores, so this part
    reads the results ``python bench/quality_finetune.py`` wrote (``docs/results/finetune``)
    instead of training again."""
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "finetune" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run python bench/quality_finetune.py first")
    return json.loads(path.read_text())


def headline(results: dict) -> dict:
    rows = results.get("rows", {})
    grocery = [r for r in rows.values() if r.get("dataset") == "grocery" and r.get("fine_tune") != "none"]
    best = max(grocery, key=lambda r: r["map_at_r"]) if grocery else None
    per_method: dict[str, float] = {}
    for r in grocery:
        per_method[r["method"]] = max(per_method.get(r["method"], 0.0), r["map_at_r"])
    omni = [r["20way1shot"] for r in rows.values() if r.get("dataset") == "omniglot" and r.get("20way1shot")]
    tta = [{**r["tta_flip"], "name": r["name"]} for r in grocery if r.get("tta_flip")]
    return {"best": best, "per_method": per_method, "omniglot_best": max(omni) if omni else None,
            "best_tta": max(tta, key=lambda t: t["map_at_r"]) if tta else None}


def section(results: dict, ctx) -> str:
    body = render(results).split("\n", 1)[1]  # drop the page title
    body = body.replace("\n## ", "\n### ")
    return ("## 7. Fine-tuning the feature extractor\n\nFrom `python bench/quality_finetune.py --out "
            "docs/results/finetune` (hours of training on 2 cores, so `run_all.py` reads its results instead "
            "of training again; each row records its own date and load).\n" + body)
