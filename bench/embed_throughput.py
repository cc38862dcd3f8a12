"""Embedding throughput: fewshot's end-to-end embedding vs the raw backbone forward.

*End to end* = :func:`fewshot.embed.embed_paths` with the cache off (file read + content
hash, JPEG decode with draft mode, resize, normalise, DataLoader batching, forward) on Grocery
photos; *raw* = the same backbone's forward pass alone on the same images already decoded into
tensors, with the same batch size, threads and memory format. Ratio = end-to-end images/s
divided by raw images/s (1.0 = the input pipeline costs nothing).

1. a grid of settings (decode workers, channels-last, batch size, torch threads), each with
   its own raw reference, one round each on ``grid_n`` photos;
2. the headline: the library default (``--workers 0``, batch 32) and the best grid setting,
   ``rounds`` interleaved rounds (raw, end-to-end, raw, end-to-end, ...) on ``n`` photos,
   median ratio;
3. the per-image costs that explain it: decode (with / without draft mode), preprocessing,
   forward;
4. the ``fewshot embed`` command itself (a fresh process, an empty cache folder) on the
   same photos, and on 8 photos to estimate its start-up cost.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (SEED, Context, child_env, fmt, fmt_s, grocery_root, median, paired_ratios, save_chart,
                          table, usable_cpus, verdict)

GOAL_RATIO = 0.85


def sample_paths(n: int) -> tuple[list[Path], list[str]]:
    """``n`` Grocery photos (all image splits), a seeded sample in dataset order."""
    from fewshot.data.loaders import load_dataset

    ds = load_dataset(grocery_root())
    pick = np.sort(np.random.default_rng(SEED).choice(len(ds), size=min(n, len(ds)), replace=False))
    return [ds.records[i].path for i in pick], [ds.records[i].label for i in pick]


@contextlib.contextmanager
def setting(backbone, channels_last: bool, threads: int):
    """Temporarily set the backbone's ``channels_last`` flag (what ``embed_paths`` feeds the model)
    and torch's thread count."""
    import torch

    before, before_cl = torch.get_num_threads(), backbone.channels_last
    torch.set_num_threads(threads)
    backbone.channels_last = channels_last
    try:
        yield
    finally:
        backbone.channels_last = before_cl
        torch.set_num_threads(before)


def raw_forward(model, tensors, batch: int, channels_last: bool) -> float:
    """Seconds for the forward passes alone over pre-decoded ``tensors [N, 3, S, S]``."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tensors), batch):
            x = tensors[i:i + batch]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
    return time.perf_counter() - t0


def end_to_end(backbone, paths, batch: int, workers: int) -> float:
    from fewshot.embed import embed_paths

    t0 = time.perf_counter()
    vectors, ok, failures, _ = embed_paths(paths, backbone, batch_size=batch, num_workers=workers,
                                           use_cache=False, progress=False)
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} Grocery photos failed to embed: {list(failures.items())[:2]}")
    return seconds


def grid(threads: int, quick: bool, default_cl: bool) -> list[dict[str, Any]]:
    """Settings tried; the first is the library default (``embed_paths`` defaults, the backbone's
    own ``channels_last``). Every other row changes one knob of a row above it (``vs``)."""
    cl = " + channels-last" if default_cl else ""
    g = [
        {"id": "default", "name": f"library default (workers 0, batch 32{cl})", "batch": 32, "workers": 0,
         "channels_last": default_cl},
        {"id": "w1", "name": f"1 decode worker{cl}", "batch": 32, "workers": 1, "channels_last": default_cl,
         "vs": "default", "knob": "Decoding in a worker process (`--workers 1`)"},
        {"id": "w2", "name": f"2 decode workers{cl}", "batch": 32, "workers": 2, "channels_last": default_cl,
         "vs": "default", "knob": "Two decode workers (`--workers 2`)"},
        {"id": "w0_flip", "name": f"workers 0, {'NCHW (no channels-last)' if default_cl else 'channels-last'}",
         "batch": 32, "workers": 0, "channels_last": not default_cl, "vs": "default",
         "knob": "Memory format (channels-last vs NCHW), no workers"},
        {"id": "w1_flip", "name": f"1 worker, {'NCHW (no channels-last)' if default_cl else 'channels-last'}",
         "batch": 32, "workers": 1, "channels_last": not default_cl, "vs": "w1",
         "knob": "Memory format (channels-last vs NCHW), 1 worker"},
        {"id": "w1_b8", "name": f"1 worker{cl}, batch 8", "batch": 8, "workers": 1, "channels_last": default_cl,
         "vs": "w1", "knob": "Batch 8 instead of 32"},
        {"id": "w1_b64", "name": f"1 worker{cl}, batch 64", "batch": 64, "workers": 1, "channels_last": default_cl,
         "vs": "w1", "knob": "Batch 64 instead of 32"},
    ]
    if threads > 1:
        g.append({"id": "w1_t", "name": f"1 worker{cl}, {threads - 1} torch thread(s)", "batch": 32, "workers": 1,
                  "channels_last": default_cl, "threads": threads - 1, "vs": "w1",
                  "knob": "One torch thread fewer (a core left to the decode worker)"})
    if quick:
        g = [g[0], g[1], g[3]]
    for c in g:
        c.setdefault("threads", threads)
    return g


def per_image_costs(backbone, paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each input-pipeline stage, in this process."""
    from fewshot.data.images import load_image
    from fewshot.embed.cache import file_digest

    pre = backbone.preprocess
    images = [load_image(p, target_size=pre.image_size) for p in paths]

    def per_image(fn, items) -> float:
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - t0) / len(items) * 1e3

    stages = {
        "read_and_hash_ms": (lambda p: file_digest(Path(p).read_bytes()), paths),
        "decode_draft_ms": (lambda p: load_image(p, target_size=pre.image_size), paths),
        "decode_no_draft_ms": (lambda p: load_image(p), paths),
        "decode_draft_112_ms": (lambda p: load_image(p, target_size=112), paths),
        "preprocess_ms": (pre, images),
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(3):  # interleaved passes, median
        for k, (fn, items) in stages.items():
            times[k].append(per_image(fn, items))
    out: dict[str, Any] = {k: median(v) for k, v in times.items()}
    out["source_size"] = list(images[0].size)
    return out


def cli_run(paths: list[Path], labels: list[str], work: Path, batch: int, workers: int, threads: int) -> float:
    """Wall seconds of ``fewshot embed`` on these photos in a fresh process with an empty cache."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / f"manifest-{len(paths)}.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([[str(p), lab] for p, lab in zip(paths, labels)])
    cache = work / f"empty-cache-{len(paths)}-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / f"embed-{len(paths)}.npz"
    env = child_env()
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", "import sys; from fewshot.cli import main; sys.argv[0] = 'fewshot'; main()", "embed", "--data", str(manifest), "--out", str(out),
           "--cache-dir", str(cache), "--batch-size", str(batch), "--workers", str(workers), "--no-progress",
           "--overwrite"]  # the file of an earlier round is ours
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fewshot embed failed: {proc.stderr.strip()[-400:]}")
    return seconds


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    import torch

    from fewshot.backbones import create_backbone
    from fewshot.data.images import load_image

    n, grid_n, rounds = (24, 16, 2) if quick else (1000, 500, 3)
    threads = ctx.threads or torch.get_num_threads()
    paths, labels = sample_paths(n)
    backbone = create_backbone("efficientnet_lite0", pretrained=True, image_size=224)
    model = backbone.model.eval()
    default_cl = bool(backbone.channels_last)
    t0 = time.perf_counter()
    tensors = torch.stack([backbone.preprocess(load_image(p, target_size=224)) for p in paths])
    decode_all = time.perf_counter() - t0
    res: dict[str, Any] = {"n": n, "grid_n": grid_n, "rounds": rounds, "threads": threads,
                           "cpus": usable_cpus(), "image_size": 224, "backbone": backbone.name,
                           "default_channels_last": default_cl}
    with setting(backbone, default_cl, threads), torch.inference_mode():
        model(tensors[:8])  # warm-up

    rows = []
    for c in grid(threads, quick, default_cl):
        with setting(backbone, c["channels_last"], c["threads"]):
            raw_forward(model, tensors[:c["batch"]], c["batch"], c["channels_last"])  # warm-up
            raw = raw_forward(model, tensors[:grid_n], c["batch"], c["channels_last"])
            e2e = end_to_end(backbone, paths[:grid_n], c["batch"], c["workers"])
        rows.append({**c, "raw_ips": grid_n / raw, "e2e_ips": grid_n / e2e, "ratio": raw / e2e})
    res["grid"] = rows

    best = max(rows, key=lambda r: r["e2e_ips"])
    heads = [rows[0]] + ([best] if best is not rows[0] else [])
    res["headline"] = []
    for c in heads:
        raws, e2es = [], []
        with setting(backbone, c["channels_last"], c["threads"]):
            for _ in range(rounds):
                raws.append(raw_forward(model, tensors, c["batch"], c["channels_last"]))
                e2es.append(end_to_end(backbone, paths, c["batch"], c["workers"]))
        ratios = paired_ratios(raws, e2es)
        res["headline"].append({"name": c["name"], "batch": c["batch"], "workers": c["workers"],
                                "channels_last": c["channels_last"], "threads": c["threads"],
                                "raw_ips": n / median(raws), "e2e_ips": n / median(e2es), "ratio": median(ratios),
                                "ratios": ratios})

    costs = per_image_costs(backbone, paths[: min(200, n)])
    costs["decode_and_preprocess_all_ms"] = decode_all / n * 1e3
    for cl in (False, True):
        with setting(backbone, cl, threads):
            costs[f"forward_b32{'_cl' if cl else ''}_ms"] = raw_forward(model, tensors[:grid_n], 32, cl) / grid_n * 1e3
    res["costs"] = costs

    work = ctx.work_dir / "embed-cli"
    b = res["headline"][-1]
    try:
        full = cli_run(paths, labels, work, b["batch"], b["workers"], b["threads"])
        small = cli_run(paths[:8], labels[:8], work, b["batch"], b["workers"], b["threads"])
        res["cli"] = {"batch": b["batch"], "workers": b["workers"], "threads": b["threads"], "seconds": full,
                      "startup_s": small,
                      "ips_total": n / full, "ips_after_startup": (n - 8) / max(1e-9, full - small)}
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        res["cli"] = {"error": str(exc)}
    shutil.rmtree(work, ignore_errors=True)
    return res


def helped(res: dict[str, Any]) -> list[str]:
    """One bullet per knob, computed from the grid: what it did to end-to-end images/s and the ratio."""
    g = {r["id"]: r for r in res["grid"]}
    c = res["costs"]
    out = []
    for r in res["grid"]:
        b = g.get(r.get("vs"))
        if b is None:
            continue
        out.append(f"- {r['knob']}: *{b['name']}* -> *{r['name']}*: end to end {r['e2e_ips'] / b['e2e_ips']:.2f}x "
                   f"({b['e2e_ips']:.1f} -> {r['e2e_ips']:.1f} img/s), raw {r['raw_ips'] / b['raw_ips']:.2f}x, "
                   f"ratio {b['ratio']:.2f} -> {r['ratio']:.2f}.")
    out.append(f"- Forward alone: channels-last makes it {c['forward_b32_ms'] / c['forward_b32_cl_ms']:.2f}x as fast "
               f"({c['forward_b32_ms']:.1f} -> {c['forward_b32_cl_ms']:.1f} ms/img at batch 32); the input pipeline "
               f"costs {c['decode_draft_ms'] + c['preprocess_ms']:.1f} ms/img in one process (decode "
               f"{c['decode_draft_ms']:.2f}, resize + normalise {c['preprocess_ms']:.2f}).")
    w, h = c["source_size"]
    out.append(f"- JPEG draft mode: these photos are {w}x{h}, so at 224 px draft cannot shrink them (1/2 scale would "
               f"be {min(w, h) // 2} px < 224): {c['decode_draft_ms']:.2f} ms with vs {c['decode_no_draft_ms']:.2f} ms "
               f"without (no gain, as expected); at 112 px it decodes at 1/2 scale: {c['decode_draft_112_ms']:.2f} ms. "
               "It pays on large camera JPEGs.")
    return out


def headline(res: dict[str, Any]) -> dict[str, Any]:
    best = max(res["headline"], key=lambda r: r["e2e_ips"])
    return {"default_ratio": res["headline"][0]["ratio"], "best_ratio": best["ratio"], "best_name": best["name"],
            "met": best["ratio"] >= GOAL_RATIO}


def section(res: dict[str, Any], ctx: Context) -> str:
    rows = [[r["name"], r["batch"], r["workers"], "yes" if r["channels_last"] else "no", r["threads"],
             fmt(r["raw_ips"], 1), fmt(r["e2e_ips"], 1), fmt(r["ratio"], 2)] for r in res["grid"]]
    hrows = [[r["name"], fmt(r["raw_ips"], 1), fmt(r["e2e_ips"], 1), f"**{r['ratio']:.2f}**",
              ", ".join(f"{x:.2f}" for x in r["ratios"])] for r in res["headline"]]
    c = res["costs"]
    h = headline(res)
    cli = res.get("cli", {})
    chart = _chart(res, ctx)
    lines = [
        "## 1. Embedding throughput: end to end vs raw forward", "",
        f"{res['backbone']} at {res['image_size']} px on Grocery photos ({c['source_size'][0]}x{c['source_size'][1]} "
        f"JPEG), {res['threads']} torch thread(s) on {res['cpus']} usable CPU(s). End to end = `embed_paths` with the "
        "cache off (read + hash, decode, resize, normalise, batching, forward); raw = the forward alone on the "
        "same images pre-decoded, same batch size, threads and memory format (channels-last = the batches are "
        "NHWC, as `embed_paths` feeds a backbone whose `channels_last` is set; the library sets it for "
        "EfficientNet-Lite). Ratio = end-to-end images/s / raw images/s.", "",
        f"Headline ({res['n']:,} photos, {res['rounds']} interleaved rounds, median of the per-round ratios):", "",
        table(["setting", "raw img/s", "end-to-end img/s", "ratio", "per-round ratios"], hrows), "",
        f"Goal ratio >= {GOAL_RATIO}: **{verdict(h['met'])}** with *{h['best_name']}* ({h['best_ratio']:.2f}); "
        f"the library default gives {h['default_ratio']:.2f}.", "",
        f"Settings tried ({res['grid_n']:,} photos, one round each; each row has its own raw reference):", "",
        table(["setting", "batch", "workers", "channels-last", "threads", "raw img/s", "end-to-end img/s", "ratio"],
              rows), "",
        "Per-image costs in one process (ms):", "",
        table(["read + hash", "decode (draft at 224)", "decode (no draft)", "decode (draft at 112)", "preprocess",
               "forward b32", "forward b32 channels-last"],
              [[fmt(c["read_and_hash_ms"], 2), fmt(c["decode_draft_ms"], 2), fmt(c["decode_no_draft_ms"], 2),
                fmt(c["decode_draft_112_ms"], 2), fmt(c["preprocess_ms"], 2), fmt(c["forward_b32_ms"], 1),
                fmt(c["forward_b32_cl_ms"], 1)]]), "",
        "What helped (end-to-end images/s relative to the row it changes, from the grid above):", "",
        *helped(res), ""]
    if "seconds" in cli:
        lines += [f"`fewshot embed` as a command ({res['n']:,} photos, `--batch-size {cli['batch']} --workers "
                  f"{cli['workers']}`, {cli.get('threads')} thread(s), empty cache folder, fresh process, the library's "
                  f"default memory format): {fmt_s(cli['seconds'])} in all = "
                  f"{cli['ips_total']:.1f} img/s; start-up (the same command on 8 photos) {fmt_s(cli['startup_s'])}, "
                  f"so {cli['ips_after_startup']:.1f} img/s after start-up (it also writes the cache).", ""]
    elif cli:
        lines += [f"`fewshot embed` as a command: not measured ({cli.get('error')}).", ""]
    lines += [f"![embedding]({ctx.chart_dir.name}/{chart})", ""]
    return "\n".join(lines)


def _chart(res: dict[str, Any], ctx: Context) -> str:
    from bench.common import pyplot

    plt = pyplot()
    g = res["grid"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(g) + 1.0))
    ys = np.arange(len(g))
    ax.barh(ys + 0.2, [r["raw_ips"] for r in g], 0.4, label="raw forward", color="#bbbbbb")
    ax.barh(ys - 0.2, [r["e2e_ips"] for r in g], 0.4, label="end to end", color="#1f77b4")
    for y, r in zip(ys, g):
        ax.text(r["e2e_ips"], y - 0.2, f" {r['ratio']:.2f}", va="center", fontsize=7)
    ax.set_yticks(ys, [r["name"] for r in g])
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.set_title("Embedding throughput (label: end-to-end / raw)")
    ax.legend(frameon=False, loc="lower right")
    return save_chart(fig, ctx.chart_dir / "embed_throughput.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv, Context(Path("/tmp/fewshot-bench"), Path("/tmp/fewshot-bench"))),
                     indent=1, default=str))
