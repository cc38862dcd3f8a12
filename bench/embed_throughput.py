"""Embedding throughput: ONNX Runtime vs torch, end to end and raw forward, on Grocery photos.

*End to end* = :func:`fewshot.embed.embed_paths` with the cache off (file read + content hash,
JPEG decode, resize, normalise, batching in the background decode thread, forward); *raw* =
the same forward alone on the same images already decoded into tensors, same batch size and
threads. Measured in one run, interleaved (raw ONNX, end-to-end ONNX, raw torch, end-to-end
torch, rotating the order each round), median over the rounds:

1. the headline for efficientnet_lite0 at 224 px (``n`` photos) and efficientnet_lite2 at
   260 px (``n2`` photos): images/s of each, the end-to-end speed-up of ONNX over torch and
   the end-to-end / raw ratio of ONNX; the agreement of the two runtimes' embeddings;
2. a grid of input-pipeline settings with ONNX (decode workers, batch size, threads), each
   with its own raw reference;
3. the per-image costs of each stage, and the one-time export;
4. the service's single-request latency (``POST /classify``, one photo) with each runtime;
5. the ``fewshot embed`` command (fresh process, empty cache folder) with each runtime;
6. the raw forward of both runtimes at each batch size (interleaved), so the speed-up can be
   read at each runtime's own best batch, not only at the library default;
7. the ceiling: the model's FLOPs per image (``torch.utils.flop_counter``) against the fp32
   matrix-multiply rate the same threads reach (``torch.mm``, 2048 x 2048), i.e. the share of the
   cores' attainable fp32 peak the ONNX forward already uses, and what a 4x speed-up over torch's
   best batch would need.
"""

from __future__ import annotations

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

from bench.common import (SEED, Context, child_env, fmt, fmt_s, grocery_root, interleaved, median, paired_ratios,
                          save_chart, table, timed, usable_cpus, verdict)

GOAL_RATIO = 0.85
GOAL_SPEEDUP = 4.0
BACKBONES = (("efficientnet_lite0", 224), ("efficientnet_lite2", 260))
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)


def sample_paths(n: int) -> tuple[list[Path], list[str]]:
    """``n`` Grocery photos (all image splits), a seeded sample in dataset order."""
    from fewshot.data.loaders import load_dataset

    ds = load_dataset(grocery_root())
    pick = np.sort(np.random.default_rng(SEED).choice(len(ds), size=min(n, len(ds)), replace=False))
    return [ds.records[i].path for i in pick], [ds.records[i].label for i in pick]


def raw_forward(forward, tensors, batch: int) -> float:
    """Seconds for the forward passes alone over pre-decoded ``tensors [N, 3, S, S]``."""
    t0 = time.perf_counter()
    for i in range(0, len(tensors), batch):
        forward(tensors[i:i + batch])
    return time.perf_counter() - t0


def end_to_end(backbone, forward, paths, batch: int | None = None, workers: int = 0) -> float:
    from fewshot.embed import DEFAULT_BATCH_SIZE, embed_paths

    t0 = time.perf_counter()
    _, _, failures, _ = embed_paths(paths, backbone, batch_size=batch or DEFAULT_BATCH_SIZE, num_workers=workers, use_cache=False,
                                    progress=False, forward=forward)
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} Grocery photos failed to embed: {list(failures.items())[:2]}")
    return seconds


def _forwards(backbone, threads: int, work: Path) -> tuple[Any, Any, float]:
    """(onnx forward, torch forward, export seconds) for ``backbone``, with an empty export cache."""
    from fewshot.embed import TorchForward, make_forward

    folder = work / f"onnx-{backbone.name}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    choice = make_forward(backbone, "onnx", threads=threads, cache_dir=folder)
    export_s = time.perf_counter() - t0
    if choice.runtime != "onnx":
        raise RuntimeError(f"ONNX Runtime not used: {choice.notice}")
    return choice.forward, TorchForward(backbone), export_s


def compare(name: str, size: int, n: int, rounds: int, threads: int, work: Path) -> dict[str, Any]:
    """The interleaved ONNX-vs-torch rounds for one backbone."""
    import torch

    from fewshot.backbones import create_backbone
    from fewshot.data.images import load_image

    torch.set_num_threads(threads)
    paths, _ = sample_paths(n)
    backbone = create_backbone(name, image_size=size)
    onnx, eager, export_s = _forwards(backbone, threads, work)
    tensors = torch.stack([backbone.preprocess(load_image(p, target_size=size)) for p in paths])
    a, b = onnx(tensors[:64]), eager(tensors[:64])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    from fewshot.embed import DEFAULT_BATCH_SIZE as B

    fns = {"raw_onnx": lambda: raw_forward(onnx, tensors, B), "e2e_onnx": lambda: end_to_end(backbone, onnx, paths),
           "raw_torch": lambda: raw_forward(eager, tensors, B),
           "e2e_torch": lambda: end_to_end(backbone, eager, paths)}
    for fn in (lambda: onnx(tensors[:32]), lambda: eager(tensors[:32])):  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for i in range(len(keys)):
            k = keys[(i + r) % len(keys)]
            times[k].append(fns[k]())
    speedups = paired_ratios(times["e2e_torch"], times["e2e_onnx"])
    ratios = paired_ratios(times["raw_onnx"], times["e2e_onnx"])
    return {"backbone": name, "image_size": size, "n": n, "rounds": rounds, "threads": threads,
            "export_s": export_s, "min_cosine": float(cos.min()),
            **{f"{k}_ips": n / median(v) for k, v in times.items()}, "times": times,
            "speedup": median(speedups), "speedups": speedups, "ratio": median(ratios), "ratios": ratios,
            "torch_ratio": median(paired_ratios(times["raw_torch"], times["e2e_torch"]))}


def grid(backbone, onnx, paths, tensors, threads: int, quick: bool) -> list[dict[str, Any]]:
    """Input-pipeline settings with ONNX; the first row is the library default."""
    import torch

    from fewshot.embed import make_forward

    from fewshot.embed import DEFAULT_BATCH_SIZE as B

    settings = [{"name": f"library default (a batch per thread, batch {B})", "batch": B, "workers": 0},
                {"name": "1 decode worker process", "batch": B, "workers": 1},
                {"name": "2 decode worker processes", "batch": B, "workers": 2},
                {"name": "batch 8", "batch": 8, "workers": 0}, {"name": "batch 32", "batch": 32, "workers": 0},
                {"name": "batch 64", "batch": 64, "workers": 0}]
    if threads > 1:
        settings.append({"name": f"{threads - 1} ONNX thread(s)", "batch": B, "workers": 0, "threads": threads - 1})
    if quick:
        settings = settings[:2]
    rows = []
    for s in settings:
        t = s.get("threads", threads)
        fwd = onnx if t == threads else make_forward(backbone, "onnx", threads=t, cache_dir=onnx.path.parent.parent).forward
        torch.set_num_threads(threads)
        raw_forward(fwd, tensors[:s["batch"]], s["batch"])
        raw = raw_forward(fwd, tensors, s["batch"])
        e2e = end_to_end(backbone, fwd, paths, s["batch"], s["workers"])
        rows.append({**s, "threads": t, "raw_ips": len(paths) / raw, "e2e_ips": len(paths) / e2e, "ratio": raw / e2e})
    return rows


def per_image_costs(backbone, onnx, eager, paths: list[Path], tensors) -> dict[str, float]:
    """Milliseconds per image of each stage, in this process, one at a time."""
    from fewshot.data.images import load_image
    from fewshot.embed.cache import file_digest

    pre = backbone.preprocess
    images = [load_image(p, target_size=pre.image_size) for p in paths]

    def per_image(fn, items) -> float:
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - t0) / len(items) * 1e3

    stages = {"read_and_hash_ms": (lambda p: file_digest(Path(p).read_bytes()), paths),
              "decode_ms": (lambda p: load_image(p, target_size=pre.image_size), paths),
              "preprocess_ms": (pre, images)}
    out: dict[str, Any] = {k: median([per_image(fn, items) for _ in range(3)]) for k, (fn, items) in stages.items()}
    out["forward_onnx_ms"] = raw_forward(onnx, tensors, 16) / len(tensors) * 1e3
    out["forward_torch_ms"] = raw_forward(eager, tensors, 16) / len(tensors) * 1e3
    out["source_size"] = list(images[0].size)
    return out


def batch_sweep(backbone, onnx, tensors, rounds: int, batches=SWEEP_BATCHES) -> list[dict[str, Any]]:
    """Raw forward img/s of both runtimes at each batch size, interleaved, median over ``rounds``;
    torch runs each batch in one forward here (``cpu_batch`` off), to show where its best is."""
    from dataclasses import replace

    from fewshot.embed import TorchForward

    whole = TorchForward(replace(backbone, cpu_batch=None))
    fns = {f"{name}_{b}": (lambda f=f, b=b: raw_forward(f, tensors, b))
           for b in batches for name, f in (("onnx", onnx), ("torch", whole))}
    times = interleaved(fns, rounds)
    return [{"batch": b, "onnx_ips": len(tensors) / median(times[f"onnx_{b}"]),
             "torch_ips": len(tensors) / median(times[f"torch_{b}"]),
             "speedup": median(paired_ratios(times[f"torch_{b}"], times[f"onnx_{b}"]))} for b in batches]


def ceiling(backbone, threads: int, sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The model's GFLOP per image against the fp32 GEMM rate of ``threads`` threads here."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = backbone.preprocess.image_size
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        backbone.inference_module()(torch.zeros(1, 3, size, size))
    gflop = counter.get_total_flops() / 1e9
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    gemm = 2 * a.shape[0] ** 3 / median([timed(lambda: torch.mm(a, a))[0] for _ in range(5)]) / 1e9
    best_onnx = max(r["onnx_ips"] for r in sweep)
    best_torch = max(r["torch_ips"] for r in sweep)
    return {"gflop_per_image": gflop, "gemm_gflops": gemm, "best_onnx_ips": best_onnx, "best_torch_ips": best_torch,
            "onnx_share_of_gemm": best_onnx * gflop / gemm, "speedup_at_best": best_onnx / best_torch,
            "needed_share_for_goal": GOAL_SPEEDUP * best_torch * gflop / gemm}


def serve_latency(work: Path, requests: int) -> dict[str, Any]:
    """Single-request ``POST /classify`` latency (ms) of the service with each runtime,
    requests alternating between the two apps; index = 100 Grocery train photos."""
    from fastapi.testclient import TestClient

    from fewshot.catalogue import build_index
    from fewshot.embed.options import EmbedOptions
    from fewshot.serve.app import create_app

    train, labels = sample_paths(200)
    manifest = work / "serve-manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([[str(p), lab] for p, lab in zip(train[::2], labels[::2])])
    index = work / "serve-index"
    build_index(str(manifest), index, embed=EmbedOptions(progress=False, cache_dir=str(work / "serve-cache")),
                overwrite=True)
    queries = train[1::2]
    shutil.rmtree(work / "serve-index-torch", ignore_errors=True)  # the benchmark's own copy of its own index
    shutil.copytree(index, work / "serve-index-torch")  # one service per index folder
    clients = {r: TestClient(create_app(index if r == "onnx" else work / "serve-index-torch", runtime=r))
               for r in ("onnx", "torch")}
    times: dict[str, list[float]] = {r: [] for r in clients}
    for i in range(requests + 3):
        for r, client in clients.items():
            with open(queries[i % len(queries)], "rb") as fh:
                t0 = time.perf_counter()
                resp = client.post("/classify", files={"file": ("q.jpg", fh, "image/jpeg")})
                dt = time.perf_counter() - t0
            if resp.status_code != 200:
                raise RuntimeError(f"/classify failed: {resp.status_code} {resp.text[:200]}")
            if i >= 3:  # the first requests warm up
                times[r].append(dt * 1e3)
    for c in clients.values():
        c.close()
        c.app.state.service.close()
    return {r: {"median_ms": median(v), "p90_ms": float(np.percentile(v, 90)), "requests": len(v)}
            for r, v in times.items()}


def cli_run(paths: list[Path], labels: list[str], work: Path, runtime: str) -> float:
    """Wall seconds of ``fewshot embed --runtime RUNTIME`` in a fresh process with an empty
    cache folder (so the ONNX export is part of it)."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / f"manifest-{len(paths)}.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows([[str(p), lab] for p, lab in zip(paths, labels)])
    cache = work / f"empty-cache-{len(paths)}-{runtime}"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / f"embed-{len(paths)}.npz"
    cmd = [sys.executable, "-c", "import sys; from fewshot.cli import main; sys.argv[0] = 'fewshot'; main()", "embed",
           "--data", str(manifest), "--out", str(out), "--cache-dir", str(cache), "--runtime", runtime,
           "--no-progress", "--overwrite"]  # the file of an earlier round is ours
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fewshot embed failed: {proc.stderr.strip()[-400:]}")
    return seconds


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    import torch

    from fewshot.backbones import create_backbone
    from fewshot.data.images import load_image

    # 2 rounds (3 before): the whole benchmark in under 15 minutes (issue 31)
    n, n2, grid_n, rounds, requests = (24, 16, 16, 2, 3) if quick else (300, 150, 200, 2, 20)
    threads = ctx.threads or torch.get_num_threads()
    work = ctx.work_dir / "embed"
    work.mkdir(parents=True, exist_ok=True)
    from fewshot.embed import DEFAULT_BATCH_SIZE

    res: dict[str, Any] = {"threads": threads, "cpus": usable_cpus(), "batch": DEFAULT_BATCH_SIZE}
    res["headline"] = [compare(name, size, count, rounds, threads, work)
                       for (name, size), count in zip(BACKBONES, (n, n2))]
    backbone = create_backbone("efficientnet_lite0", image_size=224)
    onnx, eager, _ = _forwards(backbone, threads, work)
    paths, labels = sample_paths(n)
    tensors = torch.stack([backbone.preprocess(load_image(p, target_size=224)) for p in paths[:grid_n]])
    res["grid_n"] = grid_n
    res["grid"] = grid(backbone, onnx, paths[:grid_n], tensors, threads, quick)
    res["costs"] = per_image_costs(backbone, onnx, eager, paths[:min(200, n)], tensors[:min(200, n)])
    sweep_tensors = tensors[:16 if quick else 128]
    res["sweep_n"] = len(sweep_tensors)
    res["sweep_rounds"] = 1 if quick else 2
    res["sweep"] = batch_sweep(backbone, onnx, sweep_tensors, res["sweep_rounds"], (4, 8) if quick else SWEEP_BATCHES)
    res["ceiling"] = ceiling(backbone, threads, res["sweep"])
    try:
        res["serve"] = serve_latency(work, requests)
    except Exception as exc:  # noqa: BLE001 - the service extra may be missing; the rest still counts
        res["serve"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        res["cli"] = {r: cli_run(paths, labels, work / "cli", r) for r in ("auto", "torch")}
        res["cli"]["n"] = n
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        res["cli"] = {"error": str(exc)}
    shutil.rmtree(work, ignore_errors=True)
    return res


def headline(res: dict[str, Any]) -> dict[str, Any]:
    h = res["headline"]
    return {"speedup": h[0]["speedup"], "ratio": h[0]["ratio"], "name": h[0]["backbone"],
            "speedup_met": all(r["speedup"] >= GOAL_SPEEDUP for r in h),
            "ratio_met": all(r["ratio"] >= GOAL_RATIO for r in h),
            "all": [(r["backbone"], r["image_size"], r["speedup"], r["ratio"]) for r in h]}


def section(res: dict[str, Any], ctx: Context) -> str:
    h = res["headline"]
    hrows = [[f"{r['backbone']} {r['image_size']} px", f"{r['n']:,}", fmt(r["raw_onnx_ips"], 1),
              fmt(r["e2e_onnx_ips"], 1), fmt(r["raw_torch_ips"], 1), fmt(r["e2e_torch_ips"], 1),
              f"**{r['speedup']:.2f}x**", f"**{r['ratio']:.2f}**", f"{r['torch_ratio']:.2f}",
              f"{r['min_cosine']:.6f}", fmt_s(r["export_s"])] for r in h]
    rows = [[r["name"], r["batch"], r["workers"], r["threads"], fmt(r["raw_ips"], 1), fmt(r["e2e_ips"], 1),
             fmt(r["ratio"], 2)] for r in res["grid"]]
    c = res["costs"]
    hd = headline(res)
    lines = [
        "## 1. Embedding throughput: ONNX Runtime vs torch", "",
        f"Grocery photos ({c['source_size'][0]}x{c['source_size'][1]} JPEG), {res['threads']} thread(s) on "
        f"{res['cpus']} usable CPU(s), batch {res.get('batch', 32)} (the library default). End to end = `embed_paths` with the cache off (read + hash, "
        "decode, resize, normalise, batching in the background decode thread, forward); raw = the forward alone on "
        "the same images pre-decoded. ONNX = ONNX Runtime CPUExecutionProvider, fp32, on the exported backbone "
        "(`--runtime onnx`, the default on a CPU); torch = eager, channels-last, a batch run in slices of the "
        "backbone's `cpu_batch` images (4 for EfficientNet-Lite) (`--runtime torch`). "
        f"{h[0]['rounds']} interleaved rounds, medians; speed-up = torch end-to-end seconds / ONNX end-to-end "
        "seconds, paired per round.", "",
        table(["backbone", "photos", "ONNX raw img/s", "ONNX end-to-end img/s", "torch raw img/s",
               "torch end-to-end img/s", "end-to-end speed-up", "ONNX end-to-end / raw", "torch end-to-end / raw",
               "min cosine ONNX vs torch", "one-time export"], hrows), "",
        f"Goals: end-to-end speed-up >= {GOAL_SPEEDUP:.0f}x: **{verdict(hd['speedup_met'])}**; ONNX end-to-end / raw "
        f">= {GOAL_RATIO}: **{verdict(hd['ratio_met'])}** (each backbone).", "",
        f"Input-pipeline settings with ONNX (efficientnet_lite0, {res['grid_n']:,} photos, one round each, each row "
        "with its own raw reference):", "",
        table(["setting", "batch", "decode workers", "ONNX threads", "raw img/s", "end-to-end img/s", "ratio"], rows), "",
        "Per-image costs in one process (ms):", "",
        table(["read + hash", "decode", "resize + normalise", "forward ONNX b16", "forward torch b16"],
              [[fmt(c["read_and_hash_ms"], 2), fmt(c["decode_ms"], 2), fmt(c["preprocess_ms"], 2),
                fmt(c["forward_onnx_ms"], 1), fmt(c["forward_torch_ms"], 1)]]), ""]
    lines += _sweep_lines(res) + _serve_lines(res.get("serve", {})) + _cli_lines(res.get("cli", {}))
    lines += [f"![embedding]({ctx.chart_dir.name}/{_chart(res, ctx)})", ""]
    return "\n".join(lines)


def _sweep_lines(res: dict[str, Any]) -> list[str]:
    if "sweep" not in res:
        return []
    c = res["ceiling"]
    rows = [[r["batch"], fmt(r["onnx_ips"], 1), fmt(r["torch_ips"], 1), f"{r['speedup']:.2f}x"] for r in res["sweep"]]
    return [f"Raw forward at each batch size (efficientnet_lite0 224 px, {res['sweep_n']} pre-decoded photos, {res['threads']} "
            f"thread(s), {res['sweep_rounds']} interleaved rounds, medians). Torch runs each batch in one forward "
            "here; `--runtime torch` runs a CPU batch in slices of the backbone's `cpu_batch` (4 for "
            "EfficientNet-Lite), chosen from this curve:", "",
            table(["batch", "ONNX raw img/s", "torch raw img/s (one forward per batch)", "raw speed-up"], rows), "",
            f"Ceiling: efficientnet_lite0 at 224 px costs {c['gflop_per_image']:.3f} GFLOP per image "
            f"(`torch.utils.flop_counter`); a float32 2048 x 2048 matrix product reaches {c['gemm_gflops']:.0f} "
            f"GFLOP/s on the same {res['threads']} thread(s). ONNX Runtime's best batch ({c['best_onnx_ips']:.0f} "
            f"img/s) already runs at **{c['onnx_share_of_gemm']:.0%}** of that rate; against torch's best batch "
            f"({c['best_torch_ips']:.0f} img/s) the raw speed-up is {c['speedup_at_best']:.2f}x, and "
            f"{GOAL_SPEEDUP:.0f}x would need the ONNX forward at **{c['needed_share_for_goal']:.0%}** of the matrix-"
            "product rate, on a network whose depthwise convolutions do far fewer FLOPs per byte than a matrix "
            "product.", ""]


def _serve_lines(s: dict) -> list[str]:
    if "error" in s or not s:
        return [f"Service latency: not measured ({s.get('error', 'not run')}).", ""]
    return ["Service, one photo per `POST /classify` (in-process client, requests alternating between an ONNX and "
            "a torch service on the same index of 100 photos):", "",
            table(["runtime", "median latency", "p90", "requests"],
                  [[r, f"{v['median_ms']:.1f} ms", f"{v['p90_ms']:.1f} ms", v["requests"]] for r, v in s.items()]), ""]


def _cli_lines(cli: dict) -> list[str]:
    if "error" in cli or not cli:
        return [f"`fewshot embed` as a command: not measured ({cli.get('error', 'not run')}).", ""]
    return [f"`fewshot embed` as a command on {cli['n']:,} photos (fresh process, empty cache folder, so the ONNX "
            f"export is included): default runtime (onnx) {fmt_s(cli['auto'])} = {cli['n'] / cli['auto']:.0f} img/s; "
            f"`--runtime torch` {fmt_s(cli['torch'])} = {cli['n'] / cli['torch']:.0f} img/s.", ""]


def _chart(res: dict[str, Any], ctx: Context) -> str:
    from bench.common import pyplot

    plt = pyplot()
    h = res["headline"]
    fig, ax = plt.subplots(figsize=(7, 0.9 * len(h) + 1.2))
    ys = np.arange(len(h))
    bars = [("raw_onnx_ips", "ONNX raw", "#bbbbbb", 0.3), ("e2e_onnx_ips", "ONNX end to end", "#1f77b4", 0.1),
            ("raw_torch_ips", "torch raw", "#dddddd", -0.1), ("e2e_torch_ips", "torch end to end", "#ff7f0e", -0.3)]
    for key, label, colour, off in bars:
        ax.barh(ys - off, [r[key] for r in h], 0.2, label=label, color=colour)
    for y, r in zip(ys, h):
        ax.text(r["e2e_onnx_ips"], y - 0.1, f" {r['speedup']:.1f}x torch", va="center", fontsize=8)
    ax.set_yticks(ys, [f"{r['backbone']} {r['image_size']} px" for r in h])
    ax.invert_yaxis()
    ax.set_xlabel("images / s")
    ax.set_title("Embedding throughput: ONNX Runtime vs torch")
    ax.legend(frameon=False, loc="lower right", fontsize=8)
    return save_chart(fig, ctx.chart_dir / "embed_throughput.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv, Context(Path("/tmp/fewshot-bench"), Path("/tmp/fewshot-bench"))),
                     indent=1, default=str))
