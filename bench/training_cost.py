"""Training cost on cached embeddings: seconds per 1,000 episodes / per epoch of each method.

What is timed is exactly what :func:`fewshot.training.train` runs per epoch:
``method.epoch_batches`` + the trainer's ``train_step`` (sampling, feature lookup, head forward / backward,
optimiser step) with each method's default settings (:func:`fewshot.training.make_config`:
the settings ``fewshot train --method NAME`` uses). Embedding (served from the on-disk cache),
validation and checkpointing are not included; the quality benchmark reports whole runs.

Features: the frozen EfficientNet-Lite0 embeddings of the Grocery train classes
(``splits/grocery-unseen.json``), or random features of the same shape with ``--quick``.
A method whose module is not there yet gets a "not available" row with the reason.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import ROOT, SEED, Context, fmt_s, grocery_root, median, save_chart, table

EPISODIC = ("protonet", "maml", "fomaml")
SIAMESE = ("contrastive", "triplet")
GROCERY_SPLIT = ROOT / "splits" / "grocery-unseen.json"
PROTONET_TARGET_S = 10.0  # issue 4: 1,000 protonet episodes under 10 s on 2 CPU cores


def grocery_train_features(progress: bool = False):
    """TrainData over the cached lite0 embeddings of every photo of the split's train classes."""
    import torch

    from fewshot.backbones import create_backbone
    from fewshot.data.loaders import load_dataset
    from fewshot.data.protocol import dataset_for
    from fewshot.data.splits import ClassSplit
    from fewshot.embed import embed_dataset
    from fewshot.methods import TrainData

    ds = dataset_for(load_dataset(grocery_root()), ClassSplit.load(GROCERY_SPLIT), "train")
    emb = embed_dataset(ds, create_backbone("efficientnet_lite0", image_size=224), progress=progress)
    names = sorted(set(emb.labels))
    index = {n: i for i, n in enumerate(names)}
    return TrainData(torch.from_numpy(np.ascontiguousarray(emb.vectors)),
                     torch.tensor([index[lab] for lab in emb.labels], dtype=torch.int64), names)


def random_features(n: int = 2640, classes: int = 40, dim: int = 1280):
    import torch

    from fewshot.methods import TrainData

    g = torch.Generator().manual_seed(SEED)
    y = torch.arange(classes).repeat_interleave(n // classes)
    return TrainData(torch.randn(len(y), dim, generator=g), y, [str(i) for i in range(classes)])


def _units(batch: Any) -> tuple[int, int]:
    """(episodes, images) in one batch from ``epoch_batches``."""
    if isinstance(batch, list):  # a MAML meta-batch of episodes
        return len(batch), 0
    idx = getattr(batch, "idx", None)
    if hasattr(batch, "support_idx"):
        return 1, 0
    return 0, len(idx) if idx is not None else 0


def time_method(name: str, data, rounds: int, episodes: int | None) -> dict[str, Any]:
    """Median seconds of ``rounds`` epochs of ``name`` (``episodes`` per epoch when episodic)."""
    import torch

    from fewshot.training import make_config
    from fewshot.training.optim import make_optimizer, train_step

    over = {"seed": SEED, "progress": False}
    if name in EPISODIC and episodes:
        over["episodes_per_epoch"] = episodes
    cfg = make_config(name, **over)
    method = cfg.build_method(data.dim)
    if getattr(method.head, "use_centre", False) and hasattr(method.head, "set_centre"):
        method.head.set_centre(data.x)
    x = data.x
    method.bind(lambda idx: x[torch.from_numpy(np.asarray(idx, dtype=np.int64))])
    opt = make_optimizer(method, cfg)
    method.train_mode(True)
    torch.manual_seed(SEED)
    for i, batch in enumerate(method.epoch_batches(data, np.random.default_rng(SEED + 100))):  # warm-up
        train_step(method, batch, opt)
        if i >= 2:
            break
    seconds, eps, imgs, steps = [], 0, 0, 0
    for r in range(rounds):
        rng = np.random.default_rng(SEED + r)
        eps = imgs = steps = 0
        t0 = time.perf_counter()
        for batch in method.epoch_batches(data, rng):
            train_step(method, batch, opt)
            e, n = _units(batch)
            eps, imgs, steps = eps + e, imgs + n, steps + 1
        seconds.append(time.perf_counter() - t0)
    s = median(seconds)
    keys = {"protonet": ("ways", "shots", "queries", "lr"),
            "maml": ("ways", "shots", "queries", "inner_steps", "meta_batch", "inner_lr", "lr"),
            "fomaml": ("ways", "shots", "queries", "inner_steps", "meta_batch", "inner_lr", "lr")}.get(
        name, ("batch_size", "m_per_class", "miner", "margin", "lr"))
    row = {"method": name, "available": True, "rounds": rounds, "seconds": seconds, "steps_per_epoch": steps,
           "settings": {k: getattr(cfg, k) for k in keys}, "head": method.head.__class__.__name__}
    if name in EPISODIC:
        row.update(episodes_per_epoch=eps, seconds_per_1000_episodes=s / max(1, eps) * 1000)
    else:
        row.update(images_per_epoch=imgs, seconds_per_epoch=s)
    return row


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    if quick:
        source = "random features, 2,640 x 1,280, 40 classes"
        data = random_features()
    else:
        try:
            data = grocery_train_features()
            source = f"Grocery train classes of {GROCERY_SPLIT.name}, cached lite0 embeddings"
        except Exception as exc:  # e.g. no shared data: still time on random features
            data = random_features()
            source = f"random features (Grocery features unavailable: {exc})"
    res: dict[str, Any] = {"source": source, "items": len(data), "classes": data.num_classes, "dim": data.dim,
                           "rows": []}
    plan = {"protonet": (3, 1000), "fomaml": (3, 100), "maml": (3, 100), "contrastive": (3, None),
            "triplet": (3, None)}
    if quick:
        plan = {k: (1, 10 if k in EPISODIC else None) for k in plan}
    for name, (rounds, episodes) in plan.items():
        try:
            res["rows"].append(time_method(name, data, rounds, episodes))
        except Exception as exc:
            res["rows"].append({"method": name, "available": False,
                                "reason": f"{type(exc).__name__}: {exc}".strip()[:300],
                                "trace": traceback.format_exc(limit=3)[-600:]})
    return res


def section(res: dict[str, Any], ctx: Context) -> str:
    rows = []
    for r in res["rows"]:
        if not r.get("available"):
            rows.append([r["method"], "not available", "-", "-", r.get("reason", "")])
            continue
        st = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        if "seconds_per_1000_episodes" in r:
            rows.append([r["method"], f"**{fmt_s(r['seconds_per_1000_episodes'])}** / 1,000 episodes",
                         f"{r['episodes_per_epoch']:,} episodes x {r['rounds']}",
                         ", ".join(fmt_s(s) for s in r["seconds"]), st])
        else:
            rows.append([r["method"], f"**{fmt_s(r['seconds_per_epoch'])}** / epoch",
                         f"{r['images_per_epoch']:,} images in {r['steps_per_epoch']} batches x {r['rounds']}",
                         ", ".join(fmt_s(s) for s in r["seconds"]), st])
    proto = next((r for r in res["rows"] if r["method"] == "protonet" and r.get("available")), None)
    chart = _chart(res, ctx)
    lines = ["## 4. Training cost on cached embeddings", "",
             f"Features: {res['source']} ({res['items']:,} items, {res['classes']} classes, {res['dim']}-d). Timed: "
             "`epoch_batches` + `step` per epoch with each method's defaults (`fewshot train --method NAME`); "
             "embedding (cached), validation and checkpoints excluded. Median over the rounds.", "",
             table(["method", "cost", "timed", "rounds", "settings"], rows), ""]
    if proto:
        ok = proto["seconds_per_1000_episodes"] < PROTONET_TARGET_S
        lines += [f"ProtoNet target (issue 4: < {PROTONET_TARGET_S:.0f} s per 1,000 episodes): "
                  f"**{'met' if ok else 'NOT met'}** ({fmt_s(proto['seconds_per_1000_episodes'])}).", ""]
    if chart:
        lines += [f"![training]({ctx.chart_dir.name}/{chart})", ""]
    return "\n".join(lines)


def _chart(res: dict[str, Any], ctx: Context) -> str | None:
    from bench.common import pyplot

    ok = [r for r in res["rows"] if r.get("available")]
    if not ok:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.4))
    names = [r["method"] for r in ok]
    vals = [r.get("seconds_per_1000_episodes", r.get("seconds_per_epoch")) for r in ok]
    colors = ["#1f77b4" if "seconds_per_1000_episodes" in r else "#ff7f0e" for r in ok]
    ax.bar(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("Training cost: blue = per 1,000 episodes, orange = per epoch")
    return save_chart(fig, ctx.chart_dir / "training_cost.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv, Context(Path("/tmp/fewshot-bench"), Path("/tmp/fewshot-bench"))),
                     indent=1, default=str))
