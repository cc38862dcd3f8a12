"""Scaling: metrics time and search time as the gallery grows (5k -> 20k -> 50k).

* Metrics: ``retrieval_metrics`` leave-one-out on ``N`` clustered 1,280-d embeddings (the
  metrics benchmark's data and child process; the sizes the metrics benchmark measured in
  the same run, 20k and 50k, reuse its measurement: only 5k is measured here).
* Search: per-query latency of bare FAISS ``IndexFlatIP.search`` and of
  ``CatalogueIndex.classify(mode="nearest")`` on an ``N``-image catalogue, single queries and
  batches of 64.

The exponent is the least-squares slope of log(time) against log(N): 1 = linear, 2 = quadratic.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Context, fmt_bytes, fmt_s, loglog_slope, run_child, save_chart, table
from bench.metrics_speed import data_dir
from bench.search_latency import search_time


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    # the metrics part's sizes (20k, 50k; quick 2k, 5k) are reused, not measured again
    sizes = [1000, 2000, 5000] if quick else [5_000, 20_000, 50_000]
    earlier = {r["n"]: r for r in ctx.results.get("metrics", {}).get("rows", []) if "fewshot" in r}
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        if n in earlier:
            f = earlier[n]["fewshot"]
            row.update(metrics_s=f["median_s"], metrics_peak=f["peak_rss"], metrics_from="metrics benchmark")
        else:
            d = data_dir(ctx.work_dir, n)
            r = run_child("metrics_speed", ["--child", "fewshot", "--data", str(d), "--subset", "10"], timeout=7200,
                          threads=ctx.threads)
            if "seconds" in r:
                row.update(metrics_s=r["seconds"], metrics_peak=r["peak_rss"], metrics_from="measured here")
            else:
                row["metrics_error"] = r.get("error") or "timed out"
        row["search"] = search_time(n, quick)
        rows.append(row)
    ok = [r for r in rows if "metrics_s" in r]
    slopes = {"metrics": loglog_slope([r["n"] for r in ok], [r["metrics_s"] for r in ok])}
    for key in rows[0]["search"]:
        slopes[key] = loglog_slope([r["n"] for r in rows], [r["search"][key] for r in rows])
    return {"sizes": sizes, "rows": rows, "slopes": slopes}


def _growth(s: float) -> str:
    if s != s:  # NaN
        return "-"
    if s < 0.75:
        return "sub-linear (fixed costs dominate)"
    if s < 1.4:
        return "about linear"
    if s < 1.75:
        return "between linear and quadratic"
    return "about quadratic"


def section(res: dict[str, Any], ctx: Context) -> str:
    rows = []
    for r in res["rows"]:
        s = r["search"]
        rows.append([f"{r['n']:,}", fmt_s(r.get("metrics_s")), fmt_bytes(r.get("metrics_peak")),
                     fmt_s(s["bare_b1"]), fmt_s(s["nearest_b1"]), fmt_s(s["bare_b64"]), fmt_s(s["nearest_b64"])])
    sl = res["slopes"]
    names = {"metrics": "metrics, leave-one-out (N queries x N gallery)", "bare_b1": "bare FAISS, 1 query",
             "nearest_b1": "fewshot nearest, 1 query", "bare_b64": "bare FAISS, per query in batches of 64",
             "nearest_b64": "fewshot nearest, per query in batches of 64"}
    srows = [[names.get(k, k), f"{v:.2f}", _growth(v)] for k, v in sl.items()]
    chart = _chart(res, ctx)
    return "\n".join([
        "## 6. Scaling with the gallery size", "",
        table(["N", "metrics (LOO)", "metrics peak RSS", "search 1 query", "nearest 1 query",
               "search / query, batch 64", "nearest / query, batch 64"], rows), "",
        "Fitted exponent (slope of log time vs log N):", "",
        table(["cost", "exponent", "growth"], srows), "",
        "Why: leave-one-out metrics compare every one of the N queries with all N gallery items, N x N x 1,280 "
        "multiply-adds in `torch.mm` blocks, then per row a partial sort of the few items that score above the "
        "row's worst relevant item: quadratic in N (the per-row work is linear, done N times). Memory stays "
        "linear: the inputs plus a fixed 128 MiB similarity block. A query against the catalogue is one pass "
        "over the N stored vectors (N x 1,280 multiply-adds plus a top-k heap): linear in N; for small N the "
        "fixed per-call costs (Python, thread start-up, result objects) flatten the curve. An exact flat index "
        "is the right choice up to about a million images; beyond that an approximate FAISS index (IVF, HNSW) "
        "would make search sub-linear.", "",
        f"![scaling]({ctx.chart_dir.name}/{chart})", ""])


def _chart(res: dict[str, Any], ctx: Context) -> str:
    from bench.common import pyplot

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
    ok = [r for r in res["rows"] if "metrics_s" in r]
    a.loglog([r["n"] for r in ok], [r["metrics_s"] for r in ok], marker="o",
             label=f"metrics (slope {res['slopes']['metrics']:.2f})")
    a.set_xlabel("N (leave-one-out)")
    a.set_ylabel("seconds")
    a.set_title("Retrieval metrics")
    a.legend(frameon=False)
    ns = [r["n"] for r in res["rows"]]
    for key, name in (("bare_b1", "bare, 1 query"), ("nearest_b1", "nearest, 1 query"),
                      ("bare_b64", "bare, batch 64"), ("nearest_b64", "nearest, batch 64")):
        b.loglog(ns, [r["search"][key] * 1e3 for r in res["rows"]], marker="o",
                 label=f"{name} ({res['slopes'][key]:.2f})")
    b.set_xlabel("catalogue images N")
    b.set_ylabel("ms per query")
    b.set_title("Search (slope)")
    b.legend(frameon=False, fontsize=7)
    return save_chart(fig, ctx.chart_dir / "scaling.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv, Context(Path("/tmp/fewshot-bench"), Path("/tmp/fewshot-bench"))),
                     indent=1, default=str))
