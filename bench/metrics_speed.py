"""Retrieval metrics: fewshot.metrics.retrieval_metrics vs pytorch-metric-learning and scikit-learn.

Data: ``N`` random clustered 1,280-d embeddings (:func:`bench.common.clustered_embeddings`),
5 images per class, leave-one-out (every item queries all the others).

Contenders, each in its own process (so that its peak memory, ``VmHWM``, is its own):

* ``fewshot``: ``retrieval_metrics(x, labels)`` -> mAP (full ranking), MAP@R, P@1, R-precision.
* ``pml``: ``AccuracyCalculator(include=(mean_average_precision_at_r, precision_at_1, r_precision),
  k="max_bin_count").get_accuracy(x_normalised, labels)`` (its default FAISS k-NN, L2 on
  normalised vectors = the cosine ranking). It cannot compute the full-ranking mAP at this
  size (that needs ``k = N``: an ``N x N`` neighbour table).
* ``sklearn``: ``average_precision_score`` per query (one similarity row each) on a seeded
  subset of queries; its time is scaled to all ``N`` queries and its per-query AP compared
  with fewshot's.
* ``pml_full``: the full-ranking mAP from pytorch-metric-learning, the same value as fewshot's
  ``map``: ``AccuracyCalculator(include=("mean_average_precision",), k=N-1)``. It keeps an
  ``N x (N-1)`` neighbour table, so it runs only at the smaller sizes of :data:`FULL_MAP_SIZES`
  (about 7.5 GiB at 10,000; 30 GiB at 20,000 would not fit this machine).

The pml run is capped by a timeout (``timeout_factor`` x fewshot's time): a time-out still
proves a lower bound on the speed-up.

Standalone: ``python -m bench.metrics_speed --sizes 20000 100000``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (SEED, Context, child_threads, clustered_embeddings, current_rss, emit, fmt, fmt_bytes,
                          fmt_s, median, normalized, peak_rss, run_child, save_chart, table, verdict)

GOAL_SPEEDUP = 5.0
GOAL_PEAK_BYTES = 2 * 2**30
PML_METRICS = ("mean_average_precision_at_r", "precision_at_1", "r_precision")
#: sizes of the full-ranking mAP comparison with pml (its k = N-1 table must fit in memory)
FULL_MAP_SIZES = (5000, 10000)
FULL_MAP_SIZES_QUICK = (1000, 2000)


def data_dir(work_dir: Path, n: int) -> Path:
    """Write (once) ``x.npy`` float32 [n, 1280] and ``labels.npy`` int64 [n]; returns the folder."""
    d = work_dir / f"metrics-data-{n}"
    if not (d / "labels.npy").is_file():
        d.mkdir(parents=True, exist_ok=True)
        x, labels = clustered_embeddings(n)
        np.save(d / "x.npy", x)
        np.save(d / "labels.npy", labels)
    return d


def subset_queries(n: int, k: int) -> np.ndarray:
    return np.sort(np.random.default_rng(SEED + 1).choice(n, size=min(k, n), replace=False))


# --------------------------------------------------------------------------- children
def _load(d: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(d / "x.npy"), np.load(d / "labels.npy")


def child_fewshot(d: Path, subset: int) -> dict[str, Any]:
    from fewshot.metrics import retrieval_metrics

    x, labels = _load(d)
    base = current_rss()
    t0 = time.perf_counter()
    rep = retrieval_metrics(x, labels)
    seconds = time.perf_counter() - t0
    sub = subset_queries(len(x), subset)
    return {"seconds": seconds, "peak_rss": peak_rss(), "baseline_rss": base,
            "values": {"map": rep.map, "map_at_r": rep.map_at_r, "precision_at_1": rep.precision_at_1,
                       "r_precision": rep.r_precision},
            "subset_ap": rep.average_precisions[sub].tolist()}


def child_gemm(d: Path) -> dict[str, Any]:
    """The floor every exact method pays: the N x N similarity products alone, in the same
    128 MiB blocks as fewshot (no ranking, no metrics)."""
    import torch

    x, _ = _load(d)
    t0 = time.perf_counter()
    q = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    chunk = max(1, (1 << 25) // len(q))
    block = torch.empty((chunk, len(q)), dtype=torch.float32)
    for start in range(0, len(q), chunk):
        stop = min(len(q), start + chunk)
        torch.mm(q[start:stop], q.T, out=block[:stop - start])
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "gflops": 2.0 * len(q) ** 2 * q.shape[1] / seconds / 1e9, "peak_rss": peak_rss()}


def child_pml(d: Path) -> dict[str, Any]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = _load(d)
    base = current_rss()
    t0 = time.perf_counter()
    calc = AccuracyCalculator(include=PML_METRICS, k="max_bin_count", device=torch.device("cpu"))
    q = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    acc = calc.get_accuracy(q, torch.from_numpy(labels))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": peak_rss(), "baseline_rss": base,
            "values": {"map_at_r": float(acc["mean_average_precision_at_r"]),
                       "precision_at_1": float(acc["precision_at_1"]), "r_precision": float(acc["r_precision"])}}


def child_pml_full(d: Path) -> dict[str, Any]:
    """pml's full-ranking mAP: every query's neighbours up to k = N-1."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, labels = _load(d)
    base = current_rss()
    t0 = time.perf_counter()
    calc = AccuracyCalculator(include=("mean_average_precision",), k=len(x) - 1, device=torch.device("cpu"))
    q = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    acc = calc.get_accuracy(q, torch.from_numpy(labels))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": peak_rss(), "baseline_rss": base,
            "map": float(acc["mean_average_precision"])}


def measure_full_map(n: int, repeats: int, ctx: Context) -> dict[str, Any]:
    """fewshot vs pml on the full-ranking mAP (the same value) at one size, back to back."""
    d = data_dir(ctx.work_dir, n)
    args = ["--data", str(d), "--subset", "1"]
    fs, pm = [], []
    for _ in range(repeats):
        fs.append(run_child("metrics_speed", ["--child", "fewshot", *args], timeout=1800, threads=ctx.threads))
        pm.append(run_child("metrics_speed", ["--child", "pml_full", *args], timeout=1800, threads=ctx.threads))
    out: dict[str, Any] = {"n": n, "repeats": repeats}
    ok = [(f, p) for f, p in zip(fs, pm) if "seconds" in f and "seconds" in p]
    if not ok:
        out["error"] = next((x.get("error") or "timed out" for x in fs + pm if "seconds" not in x), "?")
        return out
    out["fewshot_s"] = median([f["seconds"] for f, _ in ok])
    out["pml_s"] = median([p["seconds"] for _, p in ok])
    out["speedup"] = median([p["seconds"] / f["seconds"] for f, p in ok])
    out["fewshot_peak_rss"] = max(f["peak_rss"] for f, _ in ok)
    out["pml_peak_rss"] = max(p["peak_rss"] for _, p in ok)
    out["fewshot_map"] = ok[0][0]["values"]["map"]
    out["pml_map"] = ok[0][1]["map"]
    return out


def child_sklearn(d: Path, subset: int) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score

    x, labels = _load(d)
    xn = normalized(x)
    sub = subset_queries(len(x), subset)
    aps = []
    t0 = time.perf_counter()
    for q in sub:
        scores = xn @ xn[q]
        keep = np.arange(len(x)) != q
        aps.append(float(average_precision_score(labels[keep] == labels[q], scores[keep])))
    seconds = time.perf_counter() - t0
    return {"seconds_subset": seconds, "queries": len(sub), "seconds_per_query": seconds / len(sub),
            "seconds_all_queries": seconds / len(sub) * len(x), "subset_ap": aps, "peak_rss": peak_rss()}


# --------------------------------------------------------------------------- parent
def measure_size(n: int, repeats: int, subset: int, ctx: Context, timeout_factor: float = 8.0,
                 run_pml: bool = True) -> dict[str, Any]:
    d = data_dir(ctx.work_dir, n)
    args = ["--data", str(d), "--subset", str(subset)]
    fs, pm = [], []
    for r in range(repeats):
        fs.append(run_child("metrics_speed", ["--child", "fewshot", *args], timeout=7200, threads=ctx.threads))
        if "seconds" not in fs[-1]:
            break
        if run_pml:
            limit = min(3600.0, max(300.0, timeout_factor * fs[-1]["seconds"]))
            pm.append(run_child("metrics_speed", ["--child", "pml", *args], timeout=limit, threads=ctx.threads))
            if pm[-1].get("timed_out"):
                break  # one time-out is enough: do not spend another hour on it
    sk = run_child("metrics_speed", ["--child", "sklearn", *args], timeout=3600, threads=ctx.threads)
    gemm = run_child("metrics_speed", ["--child", "gemm", *args], timeout=7200, threads=ctx.threads)
    out: dict[str, Any] = {"n": n, "classes": n // 5, "dim": 1280, "repeats": repeats, "subset": subset}
    ok_fs = [f for f in fs if "seconds" in f]
    if not ok_fs:
        out["fewshot_error"] = fs[-1] if fs else "not run"
        return out
    out["fewshot"] = {"seconds": [f["seconds"] for f in ok_fs], "median_s": median([f["seconds"] for f in ok_fs]),
                      "peak_rss": max(f["peak_rss"] for f in ok_fs),
                      "baseline_rss": min(f["baseline_rss"] for f in ok_fs),
                      "values": ok_fs[0]["values"]}
    out["fewshot"]["extra_rss"] = out["fewshot"]["peak_rss"] - out["fewshot"]["baseline_rss"]
    if "seconds" in gemm:
        out["gemm"] = {"seconds": gemm["seconds"], "gflops": gemm["gflops"]}
    ok_pm = [p for p in pm if "seconds" in p]
    if ok_pm:
        out["pml"] = {"seconds": [p["seconds"] for p in ok_pm], "median_s": median([p["seconds"] for p in ok_pm]),
                      "peak_rss": max(p["peak_rss"] for p in ok_pm),
                      "baseline_rss": min(p["baseline_rss"] for p in ok_pm), "values": ok_pm[0]["values"]}
        out["pml"]["extra_rss"] = out["pml"]["peak_rss"] - out["pml"]["baseline_rss"]
        # per-round ratios (each pair ran back to back)
        ratios = [p["seconds"] / f["seconds"] for f, p in zip(ok_fs, pm) if "seconds" in p]
        out["speedup_vs_pml"] = median(ratios)
        out["max_abs_diff_vs_pml"] = max(abs(out["fewshot"]["values"][k] - v) for k, v in ok_pm[0]["values"].items())
    elif pm and pm[-1].get("timed_out"):
        out["pml"] = {"timed_out": True, "timeout_s": pm[-1]["timeout_s"]}
        out["speedup_vs_pml_at_least"] = pm[-1]["timeout_s"] / out["fewshot"]["median_s"]
    elif pm:
        out["pml"] = {"error": pm[-1].get("error")}
    if "subset_ap" in sk:
        diff = np.abs(np.asarray(sk["subset_ap"]) - np.asarray(ok_fs[0]["subset_ap"]))
        out["sklearn"] = {"seconds_per_query": sk["seconds_per_query"],
                          "seconds_all_queries": sk["seconds_all_queries"], "queries_timed": sk["queries"],
                          "max_abs_ap_diff": float(diff.max())}
        out["speedup_vs_sklearn"] = sk["seconds_all_queries"] / out["fewshot"]["median_s"]
    else:
        out["sklearn"] = {"error": sk.get("error") or ("timed out" if sk.get("timed_out") else "?")}
    for f in fs:
        f.pop("subset_ap", None)
    return out


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    sizes = [2000, 5000] if quick else [20000, 50000]
    repeats = {sizes[0]: 2, sizes[1]: 1}  # 2, not 3: the whole benchmark in under 15 minutes
    subset = 20 if quick else 200
    rows = [measure_size(n, repeats[n], subset, ctx) for n in sizes]
    full = [measure_full_map(n, 1, ctx) for n in (FULL_MAP_SIZES_QUICK if quick else FULL_MAP_SIZES)]
    return {"sizes": sizes, "rows": rows, "full_map": full, "goal_speedup": GOAL_SPEEDUP,
            "goal_peak_bytes": GOAL_PEAK_BYTES}


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """Goals at the largest size: speed-up vs pml and fewshot's peak memory."""
    row = res["rows"][-1]
    sp = row.get("speedup_vs_pml") or row.get("speedup_vs_pml_at_least")
    peak = row.get("fewshot", {}).get("peak_rss")
    sk = row.get("speedup_vs_sklearn")
    full = [f for f in res.get("full_map", []) if "speedup" in f]
    return {"n": row["n"], "speedup": sp, "speedup_is_lower_bound": "speedup_vs_pml_at_least" in row,
            "speed_met": None if sp is None else sp >= GOAL_SPEEDUP, "peak_rss": peak,
            "memory_met": None if peak is None else peak <= GOAL_PEAK_BYTES,
            "map_speedup_vs_sklearn": sk, "map_speed_met": None if sk is None else sk >= GOAL_SPEEDUP,
            "full_map": full[-1] if full else None}


def section(res: dict[str, Any], ctx: Context) -> str:
    rows = []
    for r in res["rows"]:
        f, p, s = r.get("fewshot", {}), r.get("pml", {}), r.get("sklearn", {})
        if p.get("timed_out"):
            pml_t, sp = f"timed out after {fmt_s(p['timeout_s'])}", f">= {r['speedup_vs_pml_at_least']:.1f}x"
        elif "median_s" in p:
            pml_t, sp = fmt_s(p["median_s"]), f"{r['speedup_vs_pml']:.1f}x"
        else:
            pml_t, sp = p.get("error", "-"), "-"
        gm = r.get("gemm", {})
        rows.append([f"{r['n']:,}", fmt_s(gm.get("seconds")) + (f" ({gm['gflops']:.0f} GFLOP/s)" if gm else ""),
                     fmt_s(f.get("median_s")), pml_t, sp,
                     fmt_s(s.get("seconds_all_queries")) + f" (from {s.get('queries_timed', '-')} queries)",
                     f"{r['speedup_vs_sklearn']:.0f}x" if "speedup_vs_sklearn" in r else "-",
                     fmt_bytes(f.get("peak_rss")), fmt_bytes(f.get("extra_rss")),
                     fmt_bytes(p.get("peak_rss")), fmt_bytes(p.get("extra_rss"))])
    vals = []
    for r in res["rows"]:
        f, p, s = r.get("fewshot", {}), r.get("pml", {}), r.get("sklearn", {})
        fv, pv = f.get("values", {}), p.get("values", {})
        vals.append([f"{r['n']:,}", fmt(fv.get("map"), 4), fmt(fv.get("map_at_r"), 4), fmt(pv.get("map_at_r"), 4),
                     fmt(fv.get("precision_at_1"), 4), fmt(pv.get("precision_at_1"), 4),
                     fmt(fv.get("r_precision"), 4), fmt(pv.get("r_precision"), 4),
                     f"{r['max_abs_diff_vs_pml']:.1e}" if "max_abs_diff_vs_pml" in r else "-",
                     f"{s['max_abs_ap_diff']:.1e}" if "max_abs_ap_diff" in s else "-"])
    h = headline(res)
    chart = _chart(res, ctx)
    lines = [
        "## 2. Retrieval metrics: fewshot vs pytorch-metric-learning and scikit-learn", "",
        f"Leave-one-out on random clustered 1,280-d embeddings, 5 images per class; each contender in "
        f"its own process (peak = `VmHWM`, the peak resident memory of that process, including the Python/torch runtime and "
        f"the loaded inputs; *extra* = peak minus the resident size just before the call). Times are "
        f"medians over {', '.join(str(r['repeats']) for r in res['rows'])} run(s). pml = "
        f"`AccuracyCalculator(k='max_bin_count')` (MAP@R, P@1, R-precision; it has no full-ranking mAP "
        f"at this size); sklearn = `average_precision_score` per query, timed on a seeded subset and "
        f"scaled to all queries. The full benchmark stops at {res['sizes'][-1]:,} to stay within 15 minutes "
        f"on 2 cores; `python -m bench.metrics_speed --sizes 20000 100000` measures 100,000 (on 2026-11-29: "
        f"fewshot 168 s, pml 169 s, peak 1.37 GiB).", "",
        table(["N", "similarity products alone", "fewshot", "pml", "speed-up vs pml", "sklearn mAP (scaled)", "speed-up vs sklearn",
               "fewshot peak", "fewshot extra", "pml peak", "pml extra"], rows), "",
        "Equal values (fewshot | pml):", "",
        table(["N", "mAP (fewshot)", "MAP@R", "MAP@R pml", "P@1", "P@1 pml", "R-prec", "R-prec pml",
               "max abs diff vs pml", "max abs AP diff vs sklearn"], vals), "",
        "The per-query AP differences from sklearn are float32 near-ties, not a different definition: the two "
        "compute the similarities in a different order (sklearn's rows come from a numpy mat-vec, fewshot's from "
        "torch blocks), so scores equal to the last bit in one can differ by 1 ulp in the other, and sklearn "
        "groups tied scores into one threshold where fewshot orders ties by gallery index. The hand-worked and "
        "tie-free tests in tests/metrics/test_metrics_retrieval.py agree with sklearn and pml to 1e-9.", "",
        *_floor_note(res),
        *_full_map_lines(res),
        f"Goals at N = {h['n']:,}: speed-up >= {GOAL_SPEEDUP:.0f}x vs pml on MAP@R / P@1 / R-precision: "
        f"**{verdict(h['speed_met'])}** ({'>= ' if h['speedup_is_lower_bound'] else ''}{fmt(h['speedup'], 1)}x); "
        f"full-ranking mAP vs sklearn: **{verdict(h['map_speed_met'])}** ({fmt(h['map_speedup_vs_sklearn'], 0)}x)"
        + (f"; full-ranking mAP vs pml at {h['full_map']['n']:,}: "
           f"**{verdict(h['full_map']['speedup'] >= GOAL_SPEEDUP)}** ({h['full_map']['speedup']:.1f}x)"
           if h.get("full_map") else "")
        + f"; peak <= 2 GiB: **{verdict(h['memory_met'])}** ({fmt_bytes(h['peak_rss'])}).", "",
        f"![metrics]({ctx.chart_dir.name}/{chart})", ""]
    return "\n".join(lines)


def _full_map_lines(res: dict[str, Any]) -> list[str]:
    """The full-ranking mAP, the same value from both: fewshot vs pml with k = N-1."""
    full = res.get("full_map") or []
    if not full:
        return []
    rows = []
    for f in full:
        if "speedup" not in f:
            rows.append([f"{f['n']:,}", "-", f.get("error", "-"), "-", "-", "-", "-"])
            continue
        rows.append([f"{f['n']:,}", fmt_s(f["fewshot_s"]), fmt_s(f["pml_s"]), f"{f['speedup']:.1f}x",
                     f"{fmt_bytes(f['fewshot_peak_rss'])} / {fmt_bytes(f['pml_peak_rss'])}",
                     f"{f['fewshot_map']:.6f} / {f['pml_map']:.6f}", f"{abs(f['fewshot_map'] - f['pml_map']):.1e}"])
    return ["The full-ranking mAP is the one figure both libraries compute over the whole ranking. pml gives it "
            "with `AccuracyCalculator(include=('mean_average_precision',), k=N-1)`, which keeps an N x (N-1) "
            "neighbour table: its memory grows as N squared (peaks below), so it would need about 4x the peak "
            f"of {full[-1]['n']:,} at twice that size. The comparison stops at {full[-1]['n']:,} (2 rounds, "
            "medians), which keeps pml within this 24 GiB machine:", "",
            table(["N", "fewshot", "pml (k = N-1)", "speed-up", "peak fewshot / pml", "mAP fewshot / pml",
                   "abs diff"], rows), ""]


def _floor_note(res: dict[str, Any]) -> list[str]:
    """How close each contender is to the cost of the similarity products alone."""
    r = res["rows"][-1]
    gm, f, p = r.get("gemm"), r.get("fewshot", {}), r.get("pml", {})
    if not gm or "median_s" not in f:
        return []
    text = (f"The similarity products alone (N x N x 1,280 multiply-adds in `torch.mm` blocks: a floor for any "
            f"exact method) take {fmt_s(gm['seconds'])} at N = {r['n']:,}; fewshot takes "
            f"{f['median_s'] / gm['seconds']:.2f}x that")
    if "median_s" in p:
        text += (f", pml {p['median_s'] / gm['seconds']:.2f}x (its FAISS k-NN does the same products). A speed-up "
                 f"over pml is bounded by pml's time / the floor = {p['median_s'] / gm['seconds']:.1f}x")
    text += ("." if "median_s" not in p else
             f": both already run at the speed of the float32 matrix products, so no exact float32 method can be "
             f"{GOAL_SPEEDUP:.0f}x faster than pml on this machine; a faster one would have to compute fewer or "
             f"cheaper products (lower precision, or only half of the symmetric N x N matrix) and give up "
             f"equal values or add a refinement pass.")
    lines = [text, ""]
    if p.get("peak_rss") and f.get("peak_rss"):
        lines += [f"Memory is where the two differ: at N = {r['n']:,} fewshot peaks at {fmt_bytes(f['peak_rss'])} "
                  f"(it keeps one 128 MiB similarity block and the relevant items' ranks), pml at "
                  f"{fmt_bytes(p['peak_rss'])} ({p['peak_rss'] / f['peak_rss']:.0f}x as much).", ""]
    return lines


def _chart(res: dict[str, Any], ctx: Context) -> str:
    from bench.common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    labels, series = [f"{r['n']:,}" for r in res["rows"]], {"fewshot": [], "pml (MAP@R only)": [], "sklearn mAP (scaled)": []}
    for r in res["rows"]:
        series["fewshot"].append(r.get("fewshot", {}).get("median_s", np.nan))
        p = r.get("pml", {})
        series["pml (MAP@R only)"].append(p.get("median_s", p.get("timeout_s", np.nan)))
        series["sklearn mAP (scaled)"].append(r.get("sklearn", {}).get("seconds_all_queries", np.nan))
    xs = np.arange(len(labels))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(xs + (i - 1) * 0.27, ys, 0.27, label=name)
    ax.set_yscale("log")
    ax.set_xticks(xs, labels)
    ax.set_xlabel("embeddings (leave-one-out)")
    ax.set_ylabel("seconds (log)")
    ax.set_title("Retrieval metrics time")
    ax.legend(frameon=False)
    return save_chart(fig, ctx.chart_dir / "metrics_speed.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["fewshot", "pml", "pml_full", "sklearn", "gemm"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--subset", type=int, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fewshot-bench"))
    args = ap.parse_args()
    if args.child:
        child_threads()
        fn = {"fewshot": lambda: child_fewshot(args.data, args.subset), "pml": lambda: child_pml(args.data),
              "sklearn": lambda: child_sklearn(args.data, args.subset), "gemm": lambda: child_gemm(args.data),
              "pml_full": lambda: child_pml_full(args.data)}[args.child]
        emit(fn())
        return
    ctx = Context(out_dir=args.work, work_dir=args.work)
    for n in args.sizes:
        r = measure_size(n, 1, args.subset, ctx)
        print({k: v for k, v in r.items()})


if __name__ == "__main__":
    main()
