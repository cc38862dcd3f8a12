"""Open set with batch evidence (issue 29, a measured lever, not a product option): does a batch of
query photos help to say which of them show no catalogue article, and can its threshold be
calibrated without labels?

The score. Each query ``q`` of a batch keeps the ``relative`` score of ``fewshot classify`` (best
prototype cosine minus half the second) and loses ``weight`` times how much nearer it is to its
``k`` nearest other queries than to its best prototype::

    batch(q) = relative(q) - weight * (mean of the k best cos(q, q') - best cos(q, prototype))

A photo of an absent article tends to sit among photos of its own article in the batch and far
from every prototype; a photo of a catalogue article sits near its prototype. It is transductive:
the score of a photo depends on the other photos sent with it.

Two thresholds for a target false-accept rate, both without any label of the queries:

* ``catalogue``: the catalogue's photos as the batch, each scored with its own article left out
  of the prototypes (the absent scores of :mod:`fewshot.catalogue.calibrate`, with batch evidence);
* ``self``: the batch itself, each query scored with its best article left out.

Protocol: ``bench/openset.py``'s (Grocery's 28 unseen test articles halved at random 20 times,
seed 0; catalogue = the train photos of the 14 known articles), with the batch made of the test
photos of all 28, or of a fixed number of photos per known / absent article (drawn with seed 1):
the composition of the batch is what a transductive score depends on.

Usage::

    python bench/openset_batch.py --model runs/triplet --out docs/results/openset-batch
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, normalized as _norm
from bench.openset import SPLIT_FILE, _stamp, rows_main

if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from fewshot.catalogue.scores import relative_score  # noqa: E402
from fewshot.metrics.openset import threshold_for_far  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "openset-batch"
#: batch compositions: (photos per known article, photos per absent article); 0 = all of them
REGIMES = ((0, 0), (10, 10), (3, 3), (1, 1), (0, 3), (3, 0))
K, WEIGHT = 10, 3.0


def relative(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(relative score, best cosine)`` of each row of prototype cosines ``[Q, C]`` (the score of
    ``fewshot classify``, :func:`fewshot.catalogue.scores.relative_score`, in float64)."""
    top = -np.sort(-sims, 1)[:, :2]
    return relative_score(top), top[:, 0]


def batch_score(sims: np.ndarray, batch: np.ndarray, k: int = K, weight: float = WEIGHT) -> np.ndarray:
    """The batch score (module docstring) of queries ``batch [Q, D]`` (unit rows) with prototype
    cosines ``sims [Q, C]``; the relative score for a batch of one."""
    rel, best = relative(sims)
    if len(batch) < 2:
        return rel
    q = batch @ batch.T
    np.fill_diagonal(q, -np.inf)
    near = -np.sort(-q, 1)[:, :min(k, len(batch) - 1)].mean(1)
    return rel - weight * (near - best)


def catalogue_thresholds(x: np.ndarray, own: np.ndarray, protos: np.ndarray, far: float) -> dict[str, float]:
    """Thresholds from the catalogue alone: its photos ``x [N, D]`` (article ``own [N]``) with their
    article left out, scored ``relative`` and ``batch`` (the catalogue as the batch)."""
    sims = x @ protos.T
    sims[np.arange(len(x)), own] = -np.inf
    return {"relative": threshold_for_far(relative(sims)[0], far),
            "batch": threshold_for_far(batch_score(sims, x), far)}


def _subsample(labels: np.ndarray, classes: list[str], known: set[str], regime: tuple[int, int],
               rng: np.random.Generator) -> np.ndarray:
    keep = np.zeros(len(labels), bool)
    for c in classes:
        n = regime[0] if c in known else regime[1]
        idx = np.flatnonzero(labels == c)
        keep[rng.choice(idx, min(n, len(idx)), replace=False) if n else idx] = True
    return keep


def _draw(qv, ql, gv, gl, known: list[str], keep: np.ndarray, far: float) -> dict[str, float]:
    from fewshot.metrics.openset import openset_metrics

    in_cat = np.isin(gl, known)
    x, y = gv[in_cat], gl[in_cat]
    own = np.array([known.index(c) for c in y])
    protos = _norm(np.stack([x[own == i].sum(0) for i in range(len(known))]))
    thresholds = catalogue_thresholds(x, own, protos, far)
    v, yy = qv[keep], ql[keep]
    sims = v @ protos.T
    best = sims.argmax(1)
    is_known, right = np.isin(yy, known), np.asarray(known)[best] == yy
    gone = sims.copy()
    gone[np.arange(len(v)), best] = -np.inf
    scores = {"relative": relative(sims)[0], "batch": batch_score(sims, v)}
    out: dict[str, float] = {"queries": float(len(v))}
    for name, s in scores.items():
        rep = openset_metrics(s[is_known], s[~is_known])
        hindsight = threshold_for_far(s[~is_known], far)
        out[f"{name} auroc"], out[f"{name} fpr95"] = rep.auroc, rep.fpr_at_95tpr
        out[f"{name} hindsight right"] = float(((s >= hindsight) & right)[is_known].mean())
        cals = {"catalogue": thresholds[name]}
        if name == "batch":
            cals["self"] = threshold_for_far(batch_score(gone, v), far)
        for how, t in cals.items():
            accepted = s >= t
            out[f"{name} {how} far"] = float(accepted[~is_known].mean())
            out[f"{name} {how} right"] = float((accepted & right)[is_known].mean())
    return out


def measure(data: str, model_dir: str | None, cache_dir: str | None, draws: int = 20, seed: int = 0,
            far: float = 0.05) -> dict[str, Any]:
    """Every regime of :data:`REGIMES` over ``draws`` draws; each figure a mean and sd over the draws."""
    from fewshot.data.splits import ClassSplit
    from fewshot.embed.options import EmbedOptions
    from fewshot.evaluation import EvalConfig, evaluation_sets
    from fewshot.evaluation.openset import draw_known
    from fewshot.methods.from_options import model_from_options

    opts = EmbedOptions(backbone=None if model_dir else "efficientnet_lite0", model_dir=model_dir, image_size=None if model_dir else 224,
                        cache_dir=cache_dir, progress=False)
    cfg = EvalConfig(data=data, split_file=str(ROOT / SPLIT_FILE), part="test", seed=seed, embed=opts)
    queries, gallery, protocol = evaluation_sets(cfg)
    model = model_from_options(opts)
    q, g = opts.embed(model, queries), opts.embed(model, gallery)
    t0 = time.perf_counter()
    qv, ql = _norm(np.asarray(q.vectors, np.float64)), np.asarray(q.labels, object)
    gv, gl = _norm(np.asarray(g.vectors, np.float64)), np.asarray(g.labels, object)
    classes = ClassSplit.load(protocol["split_file"]).classes_of(protocol["part"])
    regimes = {}
    for regime in REGIMES:
        rng = np.random.default_rng(1)
        rows = []
        for known in draw_known(classes, draws, seed):
            keep = _subsample(ql, classes, set(known), regime, rng)
            rows.append(_draw(qv, ql, gv, gl, sorted(known), keep, far))
        regimes[f"{regime[0] or 'all'} / {regime[1] or 'all'}"] = {
            k: {"mean": float(np.mean([r[k] for r in rows])), "sd": float(np.std([r[k] for r in rows]))} for k in rows[0]}
    name = f"fine-tuned ({Path(model_dir).name})" if model_dir else "frozen efficientnet_lite0"
    return {"name": name, "model": model.describe(), "k": K, "weight": WEIGHT, "target_far": far, "draws": draws,
            "seconds": round(time.perf_counter() - t0, 1), "regimes": regimes, **_stamp()}


def _cell(m: dict, key: str, sd: bool = False) -> str:
    return f"{m[key]['mean']:.3f}" + (f" ({m[key]['sd']:.3f})" if sd else "")


HEADER = ("| photos per known / absent article in the batch | queries | AUROC relative / batch | FPR@95TPR relative / "
          "batch | known right at hindsight 5%: relative / batch | relative, catalogue threshold: FAR / right | batch, "
          "catalogue threshold: FAR / right | batch, self threshold: FAR / right |")


def _line(regime: str, m: dict) -> str:
    pairs = [("relative auroc", "batch auroc"), ("relative fpr95", "batch fpr95"),
             ("relative hindsight right", "batch hindsight right")]
    cells = [f"{_cell(m, a)} / {_cell(m, b)}" for a, b in pairs]
    cells += [f"{_cell(m, f'{s} {how} far', True)} / {_cell(m, f'{s} {how} right')}"
              for s, how in (("relative", "catalogue"), ("batch", "catalogue"), ("batch", "self"))]
    return f"| {regime} | {m['queries']['mean']:.0f} | " + " | ".join(cells) + " |"


def _model_name(model: dict) -> str:
    """The run folder, or the frozen backbone's name."""
    backbone = model.get("backbone")
    return model.get("model_dir") or (backbone.get("name") if isinstance(backbone, dict) else str(backbone))


def render(rows: list[dict]) -> str:
    """One table per row (model): each batch composition, each score, each threshold."""
    lines = []
    for r in rows:
        m = r["machine"]
        lines += [f"### {r['name']}", "",
                  (f"k = {r['k']}, weight = {r['weight']}, target false-accept rate {r['target_far']:.0%}, "
                   f"{r['draws']} draws; realised FAR and known photos accepted with the right article: mean (sd) "
                   "over the draws. Hindsight: the threshold chosen on the absent photos themselves."), "",
                  HEADER, "|---|---|---|---|---|---|---|---|"]
        lines += [_line(regime, v) for regime, v in r["regimes"].items()]
        lines += ["", (f"{r['date']}, {m.get('cpu')}, fewshot {m.get('fewshot')} (git {m.get('git_commit')}); "
                       f"model `{_model_name(r['model'])}`; {r['seconds']:.0f} s."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    rows_main(argv, __doc__.split("\n")[0], RESULTS, measure, "Open set with batch evidence",
              lambda rows: render(list(rows.values())))


if __name__ == "__main__":
    main()
