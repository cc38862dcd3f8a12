"""Run every benchmark and write ``OUT/benchmarks.md`` with PNG charts in ``OUT/bench/``.

Usage (from the repository root, in the project's environment)::

    python bench/run_all.py --out docs             # the full run -> docs/benchmarks.md, docs/bench/*.png
    python bench/run_all.py --quick --out /tmp/bq  # a smoke run of every part at tiny sizes
    python bench/run_all.py --out docs --only metrics,search   # rerun some parts, keep the others
    python bench/run_all.py --out docs --render-only   # rewrite benchmarks.md from bench/results.json

Parts (in run order): embed, metrics, search, training, quality, scaling, finetune (which reads
``docs/results/finetune/results.json`` from ``bench/quality_finetune.py`` rather than training), scale
(which reads ``docs/results/scale/results.json`` from ``bench/scale_index.py``), openset (the frozen row
measured again, with the rows of ``bench/openset.py --model RUN`` from ``docs/results/openset``), levers
(which reads ``docs/results/levers/results.json`` from ``bench/quality_levers.py``), trainstep (the
fine-tuning step timed live; the whole runs read from ``docs/results/trainspeed/results.json``, written by
``bench/train_step.py --end-to-end``). Every measurement
is seeded (seed 0) and the raw numbers go to ``OUT/bench/results.json``; ``--only`` merges
into the results already there, so the Markdown always shows every part. A part that fails
is reported in the document (with the error) and the others still run. Run it on a quiet
machine: the figures are ratios and medians measured side by side, but a machine busy with
other work still blurs them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (embed_throughput, metrics_speed, openset, quality, quality_finetune, quality_levers, scale_index,
                   scaling, search_latency, train_step, training_cost)
from bench.common import Context, fmt, fmt_bytes, fmt_s, machine, set_threads, table, verdict, write_json

PARTS = {"embed": embed_throughput, "metrics": metrics_speed, "search": search_latency,
         "training": training_cost, "quality": quality, "scaling": scaling, "finetune": quality_finetune,
         "scale": scale_index, "openset": openset, "levers": quality_levers, "trainstep": train_step}
#: issue 31: the whole benchmark (minus the parts that read saved training results) in under 15 minutes
FULL_RUN_GOAL_MIN = 15
TITLES = {"embed": "1. Embedding throughput: ONNX Runtime vs torch", "metrics": "2. Retrieval metrics", "search": "3. Search latency",
          "training": "4. Training cost", "quality": "5. Quality on unseen classes", "scaling": "6. Scaling",
          "finetune": "7. Fine-tuning the feature extractor", "scale": "8. Scale",
          "openset": "9. Open set", "levers": "10. Ranking levers", "trainstep": "11. Training throughput"}


def summary(results: dict, meta: dict) -> str:
    """The goals table at the top of the document."""
    rows = []
    r = results.get("embed", {})
    if "headline" in r and "speedup" in r["headline"][0]:
        h = embed_throughput.headline(r)
        rows.append(["Embedding end to end: ONNX Runtime speed-up over torch", f">= {embed_throughput.GOAL_SPEEDUP:.0f}x",
                     "; ".join(f"{n} {s}px {x:.1f}x" for n, s, x, _ in h["all"]), verdict(h["speedup_met"])])
        rows.append(["Embedding: ONNX end-to-end / raw forward", f">= {embed_throughput.GOAL_RATIO}",
                     "; ".join(f"{n} {q:.2f}" for n, _, _, q in h["all"]), verdict(h["ratio_met"])])
    r = results.get("metrics", {})
    if "rows" in r:
        h = metrics_speed.headline(r)
        sp = "-" if h["speedup"] is None else f"{'>= ' if h['speedup_is_lower_bound'] else ''}{h['speedup']:.1f}x"
        rows.append([f"Metrics at {h['n']:,}: MAP@R / P@1 / R-precision speed-up vs pytorch-metric-learning",
                     f">= {metrics_speed.GOAL_SPEEDUP:.0f}x",
                     sp, verdict(h["speed_met"])])
        rows.append([f"Metrics at {h['n']:,}: peak memory (whole process)", "<= 2 GiB", fmt_bytes(h["peak_rss"]),
                     verdict(h["memory_met"])])
        if h.get("map_speedup_vs_sklearn") is not None:
            rows.append([f"Metrics at {h['n']:,}: full-ranking mAP speed-up vs scikit-learn",
                         f">= {metrics_speed.GOAL_SPEEDUP:.0f}x", f"{h['map_speedup_vs_sklearn']:.0f}x",
                         verdict(h["map_speed_met"])])
        f = h.get("full_map")
        if f:
            rows.append([f"Metrics at {f['n']:,} (largest size run): full-ranking mAP speed-up vs "
                         "pytorch-metric-learning (k = N-1)", f">= {metrics_speed.GOAL_SPEEDUP:.0f}x",
                         f"{f['speedup']:.1f}x", verdict(f["speedup"] >= metrics_speed.GOAL_SPEEDUP)])
    r = results.get("search", {})
    if "rows" in r:
        h = search_latency.headline(r)
        rows.append([f"Search on {r['n']:,} images: overhead vs bare FAISS (search / prototype)",
                     f"<= {search_latency.GOAL_OVERHEAD:.0%}", f"{h['worst_search_or_prototype']:+.1%} (worst batch)",
                     verdict(h["worst_search_or_prototype"] <= search_latency.GOAL_OVERHEAD)])
        rows.append(["... nearest mode vs bare FAISS k=5", f"<= {search_latency.GOAL_OVERHEAD:.0%}",
                     f"{h['worst_nearest']:+.1%} (worst batch)",
                     verdict(h["worst_nearest"] <= search_latency.GOAL_OVERHEAD)])
    r = results.get("training", {})
    proto = next((x for x in r.get("rows", []) if x["method"] == "protonet" and x.get("available")), None)
    if proto:
        rows.append(["ProtoNet training, per 1,000 episodes", f"< {training_cost.PROTONET_TARGET_S:.0f} s",
                     fmt_s(proto["seconds_per_1000_episodes"]),
                     verdict(proto["seconds_per_1000_episodes"] < training_cost.PROTONET_TARGET_S)])
    r = results.get("scaling", {})
    if "slopes" in r:
        rows.append(["Scaling exponent: metrics (leave-one-out) / search per query", "2 / 1 expected",
                     f"{fmt(r['slopes']['metrics'], 2)} / {fmt(r['slopes']['bare_b1'], 2)}", "-"])
    rows += _finetune_rows(results.get("finetune", {}))
    rows += scale_index.goal_rows(results.get("scale", {}))
    rows += openset.goal_rows(results.get("openset", {}))
    rows += quality_levers.goal_rows(results.get("levers", {}))
    full = meta.get("full_run")
    if isinstance(full, dict):
        minutes, failed = full["seconds"] / 60, full.get("failed_parts") or []
        rows.append(["The full benchmark (`python bench/run_all.py --out docs`), 2 cores", f"< {FULL_RUN_GOAL_MIN} min",
                     f"{minutes:.1f} min ({full['finished'][:16]}, load {full.get('load_average_1m')} at the start"
                     + (f"; parts that failed: {', '.join(failed)}" if failed else "") + ")",
                     verdict(minutes < FULL_RUN_GOAL_MIN and not failed)])
    if "speedup" in results.get("trainstep", {}):
        rows += train_step.goal_rows(results["trainstep"])
    return table(["goal", "target", "measured", "verdict"], rows) if rows else "(no results)"


#: issue 30's Omniglot 20-way 1-shot goal, met with transductive episodes
GOAL_OMNIGLOT_TRANSDUCTIVE = 0.85


def _finetune_rows(r: dict) -> list[list[str]]:
    if "rows" not in r:
        return []
    h = quality_finetune.headline(r)
    rows = []
    if h["best"]:
        b = h["best"]
        rows.append(["Fine-tuning, Grocery unseen test classes: best MAP@R", f">= {quality_finetune.GOAL_MAP_AT_R}",
                     f"{b['map_at_r']:.3f} ({b['name']})", verdict(b["map_at_r"] >= quality_finetune.GOAL_MAP_AT_R)])
        if h.get("best_tta"):
            t = h["best_tta"]
            rows.append(["... the same with `--tta flip` (test-time flip averaging)", f">= {quality_finetune.GOAL_MAP_AT_R}",
                         f"{t['map_at_r']:.3f} ({t['name']})", verdict(t["map_at_r"] >= quality_finetune.GOAL_MAP_AT_R)])
        worst = min(h["per_method"].items(), key=lambda kv: kv[1])
        rows.append(["... every method's best fine-tuned MAP@R", f">= {quality_finetune.GOAL_EACH}",
                     ", ".join(f"{m} {v:.3f}" for m, v in sorted(h["per_method"].items())),
                     verdict(worst[1] >= quality_finetune.GOAL_EACH)])
    if h["omniglot_best"] is not None:
        rows.append(["Omniglot small1 (Korean) 20-way 1-shot, best run", f">= {quality_finetune.GOAL_OMNIGLOT:.0%}",
                     f"{h['omniglot_best']:.1%}", verdict(h["omniglot_best"] >= quality_finetune.GOAL_OMNIGLOT)])
    for lever, label, met in (
            ("bdcspn", "... with `--transductive bdcspn` (not below inductive on imbalanced queries on Grocery)", "met"),
            ("tim", "... with transductive episodes (`--transductive tim`; balanced queries, the protocol's)",
             "met, balanced episodes only")):
        scored = [(row[f"20way1shot_{lever}"], name) for name, row in r.get("rows", {}).items()
                  if row.get(f"20way1shot_{lever}")]
        if scored:
            best, name = max(scored)
            rows.append([label, f">= {GOAL_OMNIGLOT_TRANSDUCTIVE:.0%}", f"{best:.1%} ({name})",
                         met if best >= GOAL_OMNIGLOT_TRANSDUCTIVE else "NOT met"])
    return rows


def _part_dates(meta: dict) -> str:
    """When each part last ran, if they did not all run in one invocation (``--only``)."""
    done = meta.get("part_finished", {})
    if len(set(done.values())) <= 1 or len(done) < 2:
        return ""
    return (" The parts were not all measured in one invocation; each part last finished: "
            + ", ".join(f"{k} {v}" for k, v in done.items()) + ".")


def render(results: dict, meta: dict, ctx: Context) -> str:
    m = meta["machine"]
    quick = meta.get("quick")
    head = [
        "# Benchmarks", "",
        ("**Smoke run (`--quick`): tiny sizes, the figures mean nothing.**\n" if quick else "")
        + "Every figure below comes from one command, run from the repository root:", "",
        "```", meta["command"], "```", "",
        f"{'This smoke run' if quick else 'Last run'}: {meta['finished']}, {fmt_s(meta['total_seconds'])} in all "
        f"(parts: {', '.join(f'{k} {fmt_s(v)}' for k, v in meta['part_seconds'].items())}). Seed 0 everywhere; "
        "raw numbers in `bench/results.json`. fewshot and each reference ran in the same run, side by side "
        "(interleaved rounds, or back-to-back child processes), and the figures are medians over the rounds and "
        "ratios between contenders, because these machines are shared and noisy."
        + _part_dates(meta), "",
        "Machine: " + ", ".join([f"{m.get('cpu')}", f"{m.get('usable_cpus')} usable CPU(s) (os.cpu_count "
                                 f"{m.get('cpu_count')})", f"{m.get('memory_gib')} GiB RAM",
                                 f"torch {m.get('torch')} with {m.get('torch_threads')} intra-op thread(s)",
                                 f"FAISS {m.get('faiss')} with {m.get('faiss_threads')} OpenMP thread(s)",
                                 f"pytorch-metric-learning {m.get('pytorch_metric_learning')}",
                                 f"scikit-learn {m.get('sklearn')}", f"numpy {m.get('numpy')}",
                                 f"Python {m.get('python')}", f"fewshot {m.get('fewshot')} (git {m.get('git_commit')})",
                                 f"1-minute load average at the start {m.get('load_average_1m')}"]) + ".", "",
        "## Goals", "", summary(results, meta), ""]
    body = []
    for name, mod in PARTS.items():
        r = results.get(name)
        if r is None:
            body += [f"## {TITLES[name]}", "", "Not run yet: `python bench/run_all.py --only " + name + "`.", ""]
        elif "error" in r and len(r) <= 3:
            body += [f"## {TITLES[name]}", "", f"This part failed: `{r['error']}`", ""]
        else:
            try:
                body.append(mod.section(r, ctx))
            except Exception as exc:  # a rendering bug must not lose the other sections
                body += [f"## {TITLES[name]}", "", f"(could not render: {type(exc).__name__}: {exc})", ""]
    return "\n".join(head + body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run every fewshot benchmark and write benchmarks.md.")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="folder for benchmarks.md and bench/ (default docs)")
    ap.add_argument("--quick", action="store_true", help="smoke run: every part at tiny sizes (a few minutes)")
    ap.add_argument("--only", default=None, help=f"comma-separated parts to run: {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch / FAISS threads (default: torch's default)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite OUT/benchmarks.md from OUT/bench/results.json without measuring anything")
    args = ap.parse_args(argv)

    only = [p.strip() for p in args.only.split(",")] if args.only else list(PARTS)
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; use {', '.join(PARTS)}")
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("fewshot").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    set_threads(args.threads)

    out = args.out
    (out / "bench").mkdir(parents=True, exist_ok=True)
    results_path = out / "bench" / "results.json"
    if args.render_only:
        if not results_path.is_file():
            ap.error(f"{results_path} does not exist: run the benchmarks first")
        saved = json.loads(results_path.read_text())
        ctx = Context(out_dir=out, work_dir=out, quick=saved["meta"].get("quick", False),
                      results=saved["results"])
        (out / "benchmarks.md").write_text(render(saved["results"], saved["meta"], ctx), encoding="utf-8")
        print(f"[bench] wrote {out / 'benchmarks.md'} from {results_path}", file=sys.stderr)
        return 0
    saved = json.loads(results_path.read_text()) if results_path.is_file() and args.only else {}
    results: dict = saved.get("results", {})
    meta_old = saved.get("meta", {})
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="fewshot-bench-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    ctx = Context(out_dir=out, work_dir=work, quick=args.quick, threads=args.threads, results=results)
    command = "python bench/run_all.py" + (" --quick" if args.quick else "") + f" --out {out}" + (
        f" --threads {args.threads}" if args.threads else "")
    meta = {"command": command, "quick": args.quick, "machine": machine(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "part_seconds": dict(meta_old.get("part_seconds", {})),
            "part_finished": dict(meta_old.get("part_finished", {}))}
    t_all = time.perf_counter()
    try:
        for name in only:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                results[name] = PARTS[name].run(args.quick, ctx)
            except Exception as exc:
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
                print(results[name]["trace"], file=sys.stderr)
            meta["part_seconds"][name] = round(time.perf_counter() - t0, 1)
            meta["part_finished"][name] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
            print(f"[bench] {name} done in {fmt_s(meta['part_seconds'][name])}", file=sys.stderr, flush=True)
            ctx.results = results
            write_json(results_path, {"meta": meta, "results": results})  # keep what is done
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    meta["total_seconds"] = round(sum(meta["part_seconds"].values()), 1)
    meta["this_invocation_seconds"] = round(time.perf_counter() - t_all, 1)
    if not args.only and not args.quick:  # the last full run, kept through later --only reruns
        failed = [p for p in only if "error" in results.get(p, {}) and len(results[p]) <= 3]
        meta["full_run"] = {"seconds": meta["this_invocation_seconds"], "finished": meta["finished"],
                            "load_average_1m": meta["machine"].get("load_average_1m"), "failed_parts": failed}
    elif meta_old.get("full_run"):
        meta["full_run"] = meta_old["full_run"]
    write_json(results_path, {"meta": meta, "results": results})
    doc = render(results, meta, ctx)
    (out / "benchmarks.md").write_text(doc, encoding="utf-8")
    print(f"[bench] wrote {out / 'benchmarks.md'} and {out / 'bench'}/ in {fmt_s(meta['this_invocation_seconds'])}",
          file=sys.stderr)
    print(summary(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
