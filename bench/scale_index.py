"""Scale: flat vs IVF-PQ vs HNSW catalogue indexes at 100,000 and 1,000,000 images, and
enrolment latency (issue 16).

Data: synthetic clustered 1,280-d embeddings, 5 images per article (``N / 5`` articles): each
image is its article's Gaussian centre plus Gaussian noise (``--noise`` per dimension relative
to a unit-variance centre), L2-normalised, written once to a memory-mapped ``.npy`` in
``--work``. Queries: ``--queries`` fresh noisy views of random articles.

Each (index type, size) runs in its own child process, so that its memory is its own:

1. build a :class:`fewshot.index.CatalogueIndex` of the first ``N`` vectors (time, peak memory)
   and save the folder (bytes of the image index: ``images.faiss``, or ``N x D x 4`` for flat,
   which is rebuilt from ``vectors.npy`` at load);
2. load the folder in a fresh state and answer 200 queries one at a time with ``search(k=10)``
   (median latency), then all of them in one batch; the same with ``classify(top_k=10)``
   (prototype mode: a flat index scans every prototype, an approximate one re-ranks the
   articles of its nearest images by their exact prototype cosine);
3. recall against the exact flat search of the same size (the flat child writes the ground
   truth): recall@1 = the exact nearest image is the first result; recall@10 = it is among the
   first 10 (FAISS's "1-recall@10"); also 10-recall@10 = overlap of the two top-10 lists; the
   same for the classified articles against the flat index's scan of every prototype;
4. memory after loading and querying (``VmRSS``: the index plus the memory-mapped vector pages
   the re-ranking touched, and ``RssAnon``: the heap alone);
5. enrolment: ``append_change`` of a new 5-image article (the service's path: one journal
   entry, fsync'ed, then the in-memory update), median and 95th percentile over 30, and the
   removal of an article.

Usage::

    python bench/scale_index.py --out docs/results/scale             # 100k and 1M, ~40 min on 2 cores
    python bench/scale_index.py --sizes 20000 --out /tmp/scale-quick  # a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import ROOT, fmt, fmt_bytes, fmt_s, machine, peak_rss, run_child, table

DIM, PER, K = 1280, 5, 10
KINDS = ("flat", "ivfpq", "hnsw")
#: queries timed one at a time (the flat scan of 1M takes about 0.3 s each); recall uses all
SINGLE_QUERIES = 200
GOAL_RECALL, GOAL_LATENCY_X, GOAL_MEMORY_X, GOAL_ENROL_S = 0.95, 10.0, 8.0, 0.050


# --------------------------------------------------------------------------- data
def make_data(work: Path, n: int, queries: int, noise: float, seed: int = 0) -> Path:
    """Write ``vectors.npy`` (float32 [n, DIM], normalised, article = row // PER),
    ``queries.npy`` and ``query_articles.npy`` into ``work`` once per (n, noise, seed)."""
    tag = work / f"data-{n}-{noise}-{seed}"
    if (tag / "done").is_file():
        return tag
    tag.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_art = n // PER
    centres = rng.standard_normal((n_art + 64, DIM), dtype=np.float32)  # +64 for new articles
    out = np.lib.format.open_memmap(tag / "vectors.npy", mode="w+", dtype=np.float32, shape=(n_art * PER, DIM))
    step = 8192
    for start in range(0, n_art * PER, step):
        rows = np.arange(start, min(start + step, n_art * PER))
        block = centres[rows // PER] + noise * rng.standard_normal((len(rows), DIM), dtype=np.float32)
        out[start:start + len(rows)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    np.save(tag / "centres_new.npy", centres[n_art:])
    np.save(tag / "centres.npy", centres[:n_art])
    (tag / "done").write_text("ok")
    return tag


def query_set(tag: Path, n: int, queries: int, noise: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fresh noisy views of random articles among the first ``n // PER``."""
    rng = np.random.default_rng(seed)
    centres = np.load(tag / "centres.npy", mmap_mode="r")
    arts = rng.integers(0, n // PER, size=queries)
    q = np.asarray(centres[arts]) + noise * rng.standard_normal((queries, DIM), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), arts


# --------------------------------------------------------------------------- one child
def _memory() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _build(tag: Path, kind: str, n: int, folder: Path, params: dict) -> dict[str, Any]:
    from fewshot.catalogue.store import save_index
    from fewshot.index import AnnConfig, CatalogueIndex

    vectors = np.load(tag / "vectors.npy", mmap_mode="r")[:n]
    labels = [f"a{i // PER}" for i in range(n)]
    t0 = time.perf_counter()
    index = CatalogueIndex.build(vectors, labels, [None] * n, [f"img{i}.jpg" for i in range(n)],
                                 ann_config=AnnConfig(kind, **params))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_index(index, folder)
    save_s = time.perf_counter() - t0
    faiss_file = folder / "images.faiss"
    index_bytes = faiss_file.stat().st_size if faiss_file.is_file() else n * DIM * 4
    return {"build_s": build_s, "save_s": save_s, "index_bytes": index_bytes, "build_peak_rss": peak_rss(),
            "ann": index.ann.to_dict()}


def _timed(call, q: np.ndarray) -> tuple[float, float, float, Any]:
    """``call`` on the first SINGLE_QUERIES queries one at a time, then on all of them:
    (median and 95th-percentile seconds per single query, batch seconds per query, batch result)."""
    single = []
    for i in range(min(len(q), SINGLE_QUERIES)):
        t0 = time.perf_counter()
        call(q[i:i + 1])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    result = call(q)
    batch_s = time.perf_counter() - t0
    return float(np.median(single)), float(np.percentile(single, 95)), batch_s / len(q), result


def _search(index, q: np.ndarray) -> dict[str, Any]:
    """Image search (``search(k=10)``): latency one at a time and in a batch, and the top-10
    images (``img123.jpg`` -> 123) for the recall against the flat index."""
    latency, p95, batch, hits = _timed(lambda x: index.search(x, K), q)
    ids = np.array([[int(h.path[3:-4]) for h in row] + [-1] * (K - len(row)) for row in hits])
    return {"latency_s": latency, "latency_p95_s": p95, "batch_s_per_query": batch, "ids": ids}


def _queries(index, q: np.ndarray) -> dict[str, Any]:
    """:func:`_search`, then prototype classification (``classify(top_k=10)``) timed the same
    way, with the top-10 articles (``a123`` -> 123) for the recall against the flat scan."""
    latency, p95, batch, preds = _timed(lambda x: index.classify(x, top_k=K), q)
    articles = np.array([[int(p.label[1:]) for p in row] + [-1] * (K - len(row)) for row in preds])
    return {**_search(index, q), "classify_s": latency, "classify_p95_s": p95,
            "classify_batch_s_per_query": batch, "articles": articles}


def _enrol(index, folder: Path, tag: Path, noise: float) -> dict[str, Any]:
    from fewshot.catalogue.journal import Change
    from fewshot.catalogue.store import append_change

    rng = np.random.default_rng(7)
    centres = np.load(tag / "centres_new.npy")
    times = []
    for j in range(30):
        v = centres[j] + noise * rng.standard_normal((PER, DIM), dtype=np.float32)
        change = Change("add", f"new{j}", None, v, [f"new{j}-{i}.jpg" for i in range(PER)], [None] * PER)
        t0 = time.perf_counter()
        append_change(index, folder, change)
        times.append(time.perf_counter() - t0)
    removal = []
    for j in range(10):
        t0 = time.perf_counter()
        append_change(index, folder, Change("remove", f"a{j}"))
        removal.append(time.perf_counter() - t0)
    found = index.search(centres[:1] / np.linalg.norm(centres[:1]), 1)[0][0].label
    return {"enrol_s": float(np.median(times)), "enrol_p95_s": float(np.percentile(times, 95)),
            "remove_s": float(np.median(removal)), "enrolled_found": found == "new0"}


def _recall(ids: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    return {"recall_at_1": float(np.mean(ids[:, 0] == gt[:, 0])),
            "recall_at_10": float(np.mean([gt[i, 0] in ids[i] for i in range(len(ids))])),
            "recall_10_at_10": float(np.mean([len(set(ids[i]) & set(gt[i])) / K for i in range(len(ids))]))}


#: the query-time settings swept after the default one
SWEEP = {"ivfpq": ("nprobe", (16, 32, 64, 128, 256)), "hnsw": ("ef_search", (64, 128, 256, 512))}


def _sweep(index, kind: str, q: np.ndarray, gt: np.ndarray) -> list[dict[str, Any]]:
    if kind not in SWEEP:
        return []
    name, values = SWEEP[kind]
    out = []
    for v in values:
        index.with_search(**{name: v})
        got = _search(index, q)
        out.append({name: v, "latency_s": got["latency_s"], **_recall(got["ids"], gt)})
    return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One phase for one (kind, n), in its own process; prints one JSON line.

    ``build``: build and save (time, bytes, peak memory). ``query``: a fresh process loads the
    folder, answers the queries (latency, recall, memory), sweeps the query-time setting,
    enrols and removes articles, and deletes the folder."""
    from fewshot.catalogue.store import load_index

    tag = Path(args.data)
    folder = Path(args.work) / f"index-{args.kind}-{args.n}"
    if args.phase == "build":
        shutil.rmtree(folder, ignore_errors=True)
        return {"kind": args.kind, "n": args.n, **_build(tag, args.kind, args.n, folder, json.loads(args.params))}
    t0 = time.perf_counter()
    index = load_index(folder)
    res: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    q, _ = query_set(tag, args.n, args.queries, args.noise)
    got = _queries(index, q)
    ids, articles = got.pop("ids"), got.pop("articles")
    res.update(got)
    res["memory"] = _memory()  # the loaded index plus the pages the queries touched
    res["query_peak_rss"] = peak_rss()
    gt_path, gt_proto_path = Path(args.work) / f"gt-{args.n}.npy", Path(args.work) / f"gt-proto-{args.n}.npy"
    if args.kind == "flat":
        np.save(gt_path, ids)
        np.save(gt_proto_path, articles)
    gt = np.load(gt_path)
    res.update(_recall(ids, gt))
    res.update({f"classify_{k}": v for k, v in _recall(articles, np.load(gt_proto_path)).items()})
    res["sweep"] = _sweep(index, args.kind, q, gt)
    index.ann = type(index.ann).from_dict(json.loads((folder / "meta.json").read_text())["index"])
    res.update(_enrol(index, folder, tag, args.noise))
    shutil.rmtree(folder, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- driver
def measure(sizes: list[int], kinds: list[str], work: Path, queries: int, noise: float,
        params: dict[str, dict], timeout: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tag = make_data(work, max(sizes), queries, noise)
    rows = []
    for n in sizes:
        for kind in kinds:
            print(f"[scale] {kind} at {n:,} ...", file=sys.stderr, flush=True)
            common = ["--kind", kind, "--n", str(n), "--data", str(tag), "--work", str(work), "--queries",
                      str(queries), "--noise", str(noise), "--params", json.dumps(params.get(kind, {}))]
            r = run_child("scale_index", ["child", "--phase", "build", *common], timeout)
            if "error" not in r and not r.get("timed_out"):
                built_wall = r.pop("wall_s", None)
                r.update(run_child("scale_index", ["child", "--phase", "query", *common], timeout))
                r["build_wall_s"] = built_wall
            r.update(kind=kind, n=n, date=dt.datetime.now().isoformat(timespec="minutes"), load_after=os.getloadavg())
            rows.append(r)
            print(f"[scale] {json.dumps(r)[:400]}", file=sys.stderr, flush=True)
    return {"rows": rows, "noise": noise, "queries": queries, "dim": DIM, "per_article": PER,
            "params": params, "data_s": time.perf_counter() - t0, "machine": machine(),
            "date": dt.datetime.now().isoformat(timespec="minutes"), "load_before": os.getloadavg()}


def headline(res: dict) -> dict:
    """The issue's targets at the largest size."""
    n = max(r["n"] for r in res["rows"])
    at = {r["kind"]: r for r in res["rows"] if r["n"] == n and "error" not in r and not r.get("timed_out")}
    flat, ivf = at.get("flat"), at.get("ivfpq")
    out: dict[str, Any] = {"n": n}
    if flat and ivf:
        out["recall_ratio"] = ivf["recall_at_10"] / max(flat["recall_at_10"], 1e-9)
        out["latency_x"] = flat["latency_s"] / ivf["latency_s"]
        out["memory_x"] = flat["memory"]["VmRSS"] / ivf["memory"]["VmRSS"]
        out["index_bytes_x"] = flat["index_bytes"] / ivf["index_bytes"]
        if "classify_s" in flat and "classify_s" in ivf:
            out["classify_recall_1"] = ivf["classify_recall_at_1"]
            out["classify_latency_x"] = flat["classify_s"] / ivf["classify_s"]
        out["met"] = (out["recall_ratio"] >= GOAL_RECALL and out["latency_x"] >= GOAL_LATENCY_X
                      and out["memory_x"] >= GOAL_MEMORY_X)
    enrol = {(r["kind"], r["n"]): r["enrol_s"] for r in res["rows"] if "enrol_s" in r}
    out["enrol"] = enrol
    out["enrol_met"] = bool(enrol) and all(v < GOAL_ENROL_S for v in enrol.values())
    return out


def render(res: dict) -> str:
    rows = []
    for r in res["rows"]:
        if "error" in r or r.get("timed_out"):
            rows.append([r["kind"], fmt(r["n"]), r.get("error", "timed out")[:80]] + ["-"] * 12)
            continue
        rows.append([r["kind"], fmt(r["n"]), fmt_s(r["build_s"]), fmt_bytes(r["index_bytes"]),
                     fmt_bytes(r["build_peak_rss"]), fmt_bytes(r["memory"]["VmRSS"]),
                     fmt_s(r["latency_s"]), fmt_s(r["batch_s_per_query"]), fmt(r["recall_at_1"]),
                     fmt(r["recall_at_10"]), fmt(r["recall_10_at_10"]),
                     fmt_s(r["classify_s"]) if "classify_s" in r else "-",
                     fmt(r["classify_recall_at_1"]) if "classify_s" in r else "-",
                     fmt(r["classify_recall_10_at_10"]) if "classify_s" in r else "-",
                     f"{fmt_s(r['enrol_s'])} (p95 {fmt_s(r['enrol_p95_s'])})"])
    h = headline(res)
    lines = [table(["index", "images", "build", "index bytes", "build peak RSS", "RSS loaded + queried",
                    "query (1 at a time)", "query (batch)", "recall@1", "recall@10", "10-recall@10",
                    "classify (1 at a time)", "classify recall@1", "classify 10-recall@10",
                    "enrol 5 images"], rows)]
    if "latency_x" in h:
        lines.append(f"\nAt {h['n']:,} images, ivfpq vs flat: recall@10 ratio {h['recall_ratio']:.3f} (goal >= "
                     f"{GOAL_RECALL}), single-query latency {h['latency_x']:.0f}x lower (goal >= {GOAL_LATENCY_X:.0f}x), "
                     f"memory {h['memory_x']:.0f}x less (goal >= {GOAL_MEMORY_X:.0f}x; index bytes "
                     f"{h['index_bytes_x']:.0f}x less).")
    if "classify_latency_x" in h:
        lines.append(f"Prototype classification at {h['n']:,}: ivfpq finds the flat scan's best article for "
                     f"{h['classify_recall_1']:.1%} of the queries, {h['classify_latency_x']:.0f}x faster.")
    for r in res["rows"]:
        if r.get("sweep"):
            name = next(iter(set(r["sweep"][0]) - {"latency_s", "recall_at_1", "recall_at_10", "recall_10_at_10"}))
            lines.append(f"\n{r['kind']} at {r['n']:,}, query-time {name}: " + "; ".join(
                f"{x[name]}: recall@10 {x['recall_at_10']:.3f}, {fmt_s(x['latency_s'])}" for x in r["sweep"]))
    p = {r["kind"]: r.get("ann") for r in res["rows"] if r.get("ann")}
    lines.append(f"\nParameters: ivfpq {p.get('ivfpq')}; hnsw {p.get('hnsw')}. Data: {res['dim']}-d, "
                 f"{res['per_article']} images per article, noise {res['noise']}, {res['queries']} queries; "
                 f"measured {res['date']}, load average before {tuple(round(x, 2) for x in res['load_before'])}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- part 8 of run_all
def run(quick: bool, ctx) -> dict:
    """Part 8 of ``bench/run_all.py``: the 1M builds take about half an hour on 2 cores, so this
    part reads what ``python bench/scale_index.py`` wrote (``docs/results/scale``)."""
    path = ROOT / "docs" / "results" / "scale" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run python bench/scale_index.py first")
    return json.loads(path.read_text())


def section(results: dict, ctx) -> str:
    return ("## 8. Scale: catalogue index types and enrolment\n\nFrom `python bench/scale_index.py --out "
            "docs/results/scale` (about half an hour on 2 cores, so `run_all.py` reads its results). "
            + __doc__.split("\n\n", 1)[1].split("\n\nUsage")[0] + "\n\n" + render(results) + _ray_section())


def _ray_section() -> str:
    """The Ray embedding measurements (``bench/ray_embed.py``), kept in docs/results/scale/ray.md."""
    path = ROOT / "docs" / "results" / "scale" / "ray.md"
    return "\n" + path.read_text() if path.is_file() else ""


def goal_rows(results: dict) -> list[list[str]]:
    """Rows for the goals table of ``docs/benchmarks.md``."""
    from bench.common import verdict

    if "rows" not in results:
        return []
    h = headline(results)
    rows = []
    if "latency_x" in h:
        rows.append([f"ivfpq at {h['n']:,} images vs flat: recall@10 / latency / memory",
                     f">= {GOAL_RECALL} / >= {GOAL_LATENCY_X:.0f}x lower / >= {GOAL_MEMORY_X:.0f}x less",
                     f"{h['recall_ratio']:.3f} / {h['latency_x']:.0f}x / {h['memory_x']:.0f}x", verdict(h["met"])])
    if h["enrol"]:
        rows.append(["Enrolment of a 5-image article (journal + in memory)", f"< {GOAL_ENROL_S * 1000:.0f} ms",
                     ", ".join(f"{k} {n:,}: {fmt_s(v)}" for (k, n), v in sorted(h["enrol"].items())),
                     verdict(h["enrol_met"])])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    c.add_argument("--phase", choices=("build", "query"), required=True)
    for name, typ in (("--kind", str), ("--n", int), ("--data", str), ("--work", str), ("--queries", int),
                      ("--noise", float), ("--params", str)):
        c.add_argument(name, type=typ, required=True)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--work", default="/tmp/fewshot-scale")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "scale"))
    ap.add_argument("--params", default="{}", help='JSON, e.g. {"ivfpq": {"nprobe": 64}}')
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of OUT/results.json that this run does not measure again")
    args = ap.parse_args(argv)
    if args.cmd == "child":
        print(json.dumps(child(args)))
        return 0
    res = measure([int(s) for s in args.sizes.split(",")], args.kinds.split(","), Path(args.work), args.queries,
              args.noise, json.loads(args.params), args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "results.json").is_file():
        done = {(r["kind"], r["n"]) for r in res["rows"]}
        earlier = json.loads((out / "results.json").read_text())["rows"]
        res["rows"] = sorted([r for r in earlier if (r["kind"], r["n"]) not in done] + res["rows"],
                             key=lambda r: (r["n"], KINDS.index(r["kind"])))
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "README.md").write_text("# Scale: catalogue index types\n\n" + render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
