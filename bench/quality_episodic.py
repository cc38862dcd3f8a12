"""The README numbers for prototypical networks and MAML (issue 4), in one command.

Grocery Store Dataset, unseen test classes of ``splits/grocery-unseen.json`` (cross-visit: support
sets and gallery from the train photos, queries from the test photos), efficientnet_lite0 at
224 px: mAP, MAP@R, P@1 and 5-way 1-shot / 5-way 5-shot accuracy +- 95% CI over 1,000 episodes
(5 queries per class) for

* ``frozen``: the pretrained backbone, cosine nearest prototype (the baseline to beat);
* ``frozen+centre``: the untrained default head (identity linear map on features centred by the
  train-class mean, SimpleShot's CL2N), i.e. epoch 0 of every run below;
* ``protonet``, ``maml``, ``fomaml``: trained with :func:`fewshot.training.train` (the code
  behind ``fewshot train``) on the train classes, best epoch by val MAP@R, then evaluated with
  :func:`fewshot.evaluation.evaluate` (the code behind ``fewshot evaluate``). MAML runs classify each
  episode by adapting on its support set (their ``episode_classifier``).

Omniglot ``images_background_small1`` (``splits/omniglot-small1.json``: whole alphabets per part;
test = the 40 Korean characters, each character's 20 drawings divided 10 support / 10 queries
with the split's seed), efficientnet_lite0 at 112 px: 5-way and 20-way 1-shot accuracy +- 95% CI
(1,000 episodes, 5 queries per class) and MAP@R for frozen, frozen+centre, protonet, maml and fomaml.

Usage::

    FEWSHOT_CACHE=/tmp/fscache python bench/quality_episodic.py --out results/episodic --train-seeds 0 1 2
    python bench/quality_episodic.py --out results/episodic --only omniglot --episodes 1000

Writes ``OUT/results.json``, ``OUT/results.md`` (the tables) and the runs in ``OUT/runs/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fewshot.data.loaders import load_dataset  # noqa: E402
from fewshot.data.protocol import protocol_sets  # noqa: E402
from fewshot.data.splits import ClassSplit  # noqa: E402
from fewshot.embed import embed_dataset  # noqa: E402
from fewshot.methods.runs import load_embedding_model  # noqa: E402
from fewshot.model import EmbeddingModel  # noqa: E402
from fewshot.training import make_config  # noqa: E402
from fewshot.methods.runs import load_run  # noqa: E402
from fewshot.training import train  # noqa: E402
from fewshot.metrics import episodic_accuracy, retrieval_metrics  # noqa: E402
from fewshot.embed.options import EmbedOptions  # noqa: E402
from fewshot.evaluation import EvalConfig, evaluate  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

#: Per-dataset training settings (chosen on the val classes; see docs/guides/training.md).
GROCERY = {
    "data": str(SHARED / "grocery-store-dataset"),
    "split_file": str(ROOT / "splits" / "grocery-unseen.json"),
    "image_size": 224,
    # the methods' defaults: 5-way 5-shot 5-query episodes, 2,000 episodes, validation every 100
    "runs": {"protonet": {}, "maml": {}, "fomaml": {}},
}
OMNIGLOT = {
    "data": str(SHARED / "omniglot" / "images_background_small1"),
    "split_file": str(ROOT / "splits" / "omniglot-small1.json"),
    "image_size": 112,
    # 5-way 1-shot training episodes (validation: 5-way 1-shot on the val alphabet)
    "runs": {
        "protonet": dict(ways=5, shots=1, queries=5, episodes=4000, episodes_per_epoch=200),
        "maml": dict(ways=5, shots=1, queries=5, episodes=4000, episodes_per_epoch=200),
        "fomaml": dict(ways=5, shots=1, queries=5, episodes=4000, episodes_per_epoch=200),
    },
}


def centred_model(data: str, split_file: str, image_size: int) -> EmbeddingModel:
    """The untrained default head: identity linear map on features centred by the mean train-class
    embedding (SimpleShot's CL2N); every run below starts here (its epoch 0)."""
    from fewshot.data.protocol import dataset_for
    from fewshot.methods.heads import ProjectionHead

    model = load_embedding_model("efficientnet_lite0", image_size=image_size)
    train_set = dataset_for(load_dataset(data), ClassSplit.load(split_file), "train")
    emb = embed_dataset(train_set, model.backbone, progress=False)
    head = ProjectionHead("linear", in_dim=model.backbone.dim, out_dim=model.backbone.dim, centre=True)
    head.set_centre(torch.from_numpy(emb.vectors))
    head.eval()
    return EmbeddingModel(backbone=model.backbone, head=head, run_config={"method": "frozen+centre"})


def _episodes_row(ep: dict) -> dict:
    return {k: {"accuracy": v.get("accuracy"), "ci95": v.get("ci95")} for k, v in ep.items()}


def grocery(out: Path, episodes: int, seed: int, methods: list[str], train_seeds: list[int]) -> dict:
    g = GROCERY
    rows: dict[str, dict] = {}

    def ev(model: EmbeddingModel, name: str) -> dict:
        cfg = EvalConfig(data=g["data"], split=None, split_file=g["split_file"], part="test", seed=seed,
                         episodes=episodes, n_query=5,
                         embed=EmbedOptions(backbone=model.backbone.name, image_size=g["image_size"], progress=False))
        t = time.perf_counter()
        m = evaluate(cfg, out / "eval" / f"grocery-{name}", model=model, overwrite=True)
        return {"map": m["map"], "map_at_r": m["map_at_r"], "precision_at_1": m["precision_at_1"],
                "episodes": _episodes_row(m["episodes"]), "eval_seconds": round(time.perf_counter() - t, 1)}

    frozen = load_embedding_model("efficientnet_lite0", image_size=g["image_size"])
    rows["frozen"] = ev(frozen, "frozen") | {"train_seconds": 0.0}
    rows["frozen+centre"] = ev(centred_model(g["data"], g["split_file"], g["image_size"]), "frozen-centre") | {
        "train_seconds": 0.0}
    for name in methods:
        if name not in g["runs"]:
            continue
        per_seed = {}
        for i, train_seed in enumerate(train_seeds):
            tag = name if i == 0 else f"{name}-seed{train_seed}"
            run_dir = out / "runs" / f"grocery-{tag}"
            model, res, row = train_run(name, g, run_dir, train_seed)
            row = ev(model, tag) | {"train_seed": train_seed} | row | {
                "val_map_at_r_epoch0": res.history[0]["val_map_at_r"]}
            per_seed[train_seed] = row
        rows[name] = dict(per_seed[train_seeds[0]])
        if len(train_seeds) > 1:
            rows[name]["over_seeds"] = _over_seeds(list(per_seed.values()))
    return rows


def _over_seeds(rows: list[dict]) -> dict:
    """Mean and std (ddof=0) over training seeds of the headline metrics."""
    def stat(values):
        v = np.asarray(values, dtype=np.float64)
        return {"mean": float(v.mean()), "std": float(v.std()), "values": [float(x) for x in v]}

    return {"seeds": [r["train_seed"] for r in rows],
            "map": stat([r["map"] for r in rows]), "map_at_r": stat([r["map_at_r"] for r in rows]),
            "precision_at_1": stat([r["precision_at_1"] for r in rows]),
            **{k: stat([r["episodes"][k]["accuracy"] for r in rows]) for k in ("5way1shot", "5way5shot")}}


def omniglot_eval(model: EmbeddingModel, episodes: int, seed: int) -> dict:
    o = OMNIGLOT
    ds = load_dataset(o["data"])
    q, g = protocol_sets(ds, ClassSplit.load(o["split_file"]), "test")
    eq = model.embed(q, progress=False)
    eg = model.embed(g, progress=False)
    rep = retrieval_metrics(eq.vectors, eq.labels, eg.vectors, eg.labels)
    res = {"map": rep.map, "map_at_r": rep.map_at_r, "precision_at_1": rep.precision_at_1, "episodes": {}}
    for n_way, k in ((5, 1), (20, 1), (5, 5)):
        r = episodic_accuracy(eg.vectors, eg.labels, n_way=n_way, k_shot=k, n_query=5, episodes=episodes, seed=seed,
                              query_embeddings=eq.vectors, query_labels=eq.labels,
                              classifier=model.episode_classifier)
        res["episodes"][f"{n_way}way{k}shot"] = {"accuracy": r.accuracy, "ci95": r.ci95}
    return res


TRAIN_CONFIG_KEYS = ("ways", "shots", "queries", "episodes", "lr", "inner_lr", "inner_steps", "inner_steps_test",
                     "meta_batch")


def train_run(name: str, protocol: dict, run_dir: Path, seed: int) -> tuple[EmbeddingModel, object, dict]:
    """Train ``name`` on ``protocol`` (GROCERY / OMNIGLOT) with the recipe's overrides, reload the run.

    Returns ``(model, RunResult, row fields about the training)``.
    """
    cfg = make_config(name, data=protocol["data"], split_file=protocol["split_file"], out=str(run_dir),
                      image_size=protocol["image_size"], seed=seed, overwrite=True, progress=False,
                      final_eval="none", **protocol["runs"][name])
    res = train(cfg)
    model = load_run(run_dir)
    flat = {**cfg.to_dict(), **cfg.to_dict()["options"]}  # the loop's fields and the method's options
    return model, res, {
        "train_seconds": round(res.seconds, 1), "best_epoch": res.best_epoch,
        "epochs_run": res.history[-1]["epoch"], "best_val_map_at_r": res.best_metrics["val_map_at_r"],
        "best_val_episodic_acc": res.best_metrics["val_episodic_acc"],
        "classifier": model.describe()["episode_classifier"],
        "train_config": {k: flat[k] for k in TRAIN_CONFIG_KEYS if k in flat}}


def omniglot(out: Path, episodes: int, seed: int, methods: list[str]) -> dict:
    o = OMNIGLOT
    rows = {"frozen": omniglot_eval(load_embedding_model("efficientnet_lite0", image_size=o["image_size"]),
                                    episodes, seed) | {"train_seconds": 0.0},
            "frozen+centre": omniglot_eval(centred_model(o["data"], o["split_file"], o["image_size"]),
                                           episodes, seed) | {"train_seconds": 0.0}}
    for name in methods:
        if name not in o["runs"]:
            continue
        run_dir = out / "runs" / f"omniglot-{name}"
        model, _, row = train_run(name, o, run_dir, seed)
        rows[name] = omniglot_eval(model, episodes, seed) | row
    return rows


def _acc(e: dict | None) -> str:
    if not e or e.get("accuracy") is None:
        return "-"
    return f"{100 * e['accuracy']:.1f} +- {100 * e['ci95']:.1f}"


def _ms(d: dict, percent: bool = False) -> str:
    if percent:
        return f"{100 * d['mean']:.1f} +- {100 * d['std']:.1f}"
    return f"{d['mean']:.3f} +- {d['std']:.3f}"


def render(results: dict, episodes: int) -> str:
    lines = []
    if "grocery" in results:
        lines += [f"Grocery unseen test classes (splits/grocery-unseen.json), efficientnet_lite0 224 px, "
                  f"{episodes} episodes, 5 queries/class, accuracy % +- 95% CI", "",
                  "| model | mAP | MAP@R | P@1 | 5-way 1-shot | 5-way 5-shot | train time |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in results["grocery"].items():
            if "map" not in r:
                continue
            lines.append(f"| {name} | {r['map']:.3f} | {r['map_at_r']:.3f} | {r['precision_at_1']:.3f} | "
                         f"{_acc(r['episodes'].get('5way1shot'))} | {_acc(r['episodes'].get('5way5shot'))} | "
                         f"{r.get('train_seconds', 0):.0f} s |")
        lines.append("")
        seeded = {n: r["over_seeds"] for n, r in results["grocery"].items() if "over_seeds" in r}
        if seeded:
            seeds = next(iter(seeded.values()))["seeds"]
            lines += [f"Over training seeds {', '.join(map(str, seeds))} (mean +- std; evaluation episodes seed fixed)", "",
                      "| model | mAP | MAP@R | P@1 | 5-way 1-shot | 5-way 5-shot |", "|---|---|---|---|---|---|"]
            for n, o in seeded.items():
                lines.append(f"| {n} | {_ms(o['map'])} | {_ms(o['map_at_r'])} | {_ms(o['precision_at_1'])} | "
                             f"{_ms(o['5way1shot'], True)} | {_ms(o['5way5shot'], True)} |")
            lines.append("")
    if "omniglot" in results:
        lines += [f"Omniglot images_background_small1, test alphabet Korean (splits/omniglot-small1.json), "
                  f"efficientnet_lite0 112 px, {episodes} episodes, 5 queries/class, accuracy % +- 95% CI", "",
                  "| model | 5-way 1-shot | 20-way 1-shot | 5-way 5-shot | MAP@R | train time |",
                  "|---|---|---|---|---|---|"]
        for name, r in results["omniglot"].items():
            e = r["episodes"]
            lines.append(f"| {name} | {_acc(e.get('5way1shot'))} | {_acc(e.get('20way1shot'))} | "
                         f"{_acc(e.get('5way5shot'))} | {r['map_at_r']:.3f} | {r.get('train_seconds', 0):.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/episodic")
    ap.add_argument("--only", choices=["grocery", "omniglot"], default=None)
    ap.add_argument("--methods", default="protonet,maml,fomaml")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="episode / evaluation seed (and training seed)")
    ap.add_argument("--train-seeds", type=int, nargs="*", default=None,
                    help="Grocery: train each method with these seeds (first = the main table row) and "
                         "report mean +- std over them")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.only in (None, "grocery"):
        results["grocery"] = grocery(out, args.episodes, args.seed, methods, args.train_seeds or [args.seed])
        path.write_text(json.dumps(results, indent=2, default=str))
    if args.only in (None, "omniglot"):
        results["omniglot"] = omniglot(out, args.episodes, args.seed, methods)
        path.write_text(json.dumps(results, indent=2, default=str))
    md = render(results, args.episodes)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
