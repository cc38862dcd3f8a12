"""Bounded load test of ``fewshot serve`` on loopback: N concurrent POST /classify requests.

Starts ``fewshot serve --index INDEX`` in a subprocess on a free 127.0.0.1 port (or uses a
running service given with ``--url``, loopback only), warms it up, then sends ``--requests``
classify requests with at most ``--concurrency`` in flight (default: 200 and 200, all at once)
from an ``httpx.AsyncClient``. Prints errors, wall time, throughput and latency percentiles,
and exits 1 if any request failed. Query photos are real Grocery test photos; their folder
name is the article, so top-1 accuracy is printed as a sanity check.

Example::

    fewshot index --data grocery --split train --out grocery-index
    python bench/load_serve.py --index grocery-index
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 5000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def default_queries() -> Path:
    shared = Path(os.environ.get("FEWSHOT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return shared / "data" / "grocery-store-dataset" / "dataset" / "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    code = "import sys; from fewshot.cli import main; sys.argv[0] = 'fewshot'; main()"
    return subprocess.Popen([sys.executable, "-c", code, "serve", "--index", str(index), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the service exited early:\n{proc.stderr.read().decode(errors='replace')}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the service at {url} did not answer /health within {timeout:.0f} s")


def pick_queries(folder: Path, n: int) -> list[tuple[str, str, bytes]]:
    """``n`` photos spread over the articles: (expected label = parent folder, name, bytes)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no query photos under {folder}: give --queries FOLDER")
    step = max(1, len(files) // n)
    chosen = (files[::step] * (n // max(1, len(files[::step])) + 1))[:n]
    return [(p.parent.name, p.name, p.read_bytes()) for p in chosen]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def run_load(url: str, queries: list[tuple[str, str, bytes]], concurrency: int, top_k: int,
                   timeout: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    correct = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(label: str, name: str, data: bytes) -> None:
            nonlocal correct
            async with sem:
                start = time.perf_counter()
                try:
                    r = await client.post("/classify", params={"top_k": top_k},
                                          files={"file": (name, data, "image/jpeg")})
                except httpx.HTTPError as exc:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    errors.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
                    return
                preds = r.json()["predictions"]
                correct += bool(preds) and preds[0]["label"] == label

        start = time.perf_counter()
        await asyncio.gather(*(one(*q) for q in queries))
        wall = time.perf_counter() - start
    ok = len(queries) - len(errors)
    return {"requests": len(queries), "concurrency": concurrency, "errors": len(errors),
            "error_samples": errors[:5], "wall_s": round(wall, 2),
            "throughput_rps": round(len(queries) / wall, 1),
            "latency_ms": {k: round(percentile(latencies, q) * 1000, 1)
                           for k, q in (("p50", .5), ("p90", .9), ("p99", .99), ("max", 1.0))} if latencies else {},
            "top1_accuracy": round(correct / ok, 3) if ok else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, help="index folder to serve (started here on a free loopback port)")
    ap.add_argument("--url", help="a running service instead (loopback only), e.g. http://127.0.0.1:8000")
    ap.add_argument("--queries", type=Path, default=default_queries(), help="folder of query photos")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=200, help="requests in flight at once")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300, help="per-request timeout, seconds")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if (args.index is None) == (args.url is None):
        ap.error("give exactly one of --index or --url")
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.concurrency <= args.requests:
        ap.error(f"need 1 <= --concurrency <= --requests <= {MAX_REQUESTS}")
    proc = None
    if args.url:
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in LOOPBACK:
            ap.error("this load test only talks to loopback (127.0.0.1 / localhost)")
    else:
        url = f"http://127.0.0.1:{free_port()}"
        proc = start_server(args.index, int(url.rsplit(":", 1)[1]))
    try:
        health = wait_ready(url, proc)
        queries = pick_queries(args.queries, args.requests)
        for label, name, data in queries[:3]:  # warm-up (model, allocator, thumbnails not involved)
            httpx.post(url + "/classify", files={"file": (name, data, "image/jpeg")}, timeout=args.timeout)
        result = asyncio.run(run_load(url, queries, args.concurrency, args.top_k, args.timeout))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    result.update({"catalogue": {k: health[k] for k in ("articles", "images", "backbone", "image_size")},
                   "cpu_count": os.cpu_count()})
    lat = result["latency_ms"]
    print(f"catalogue: {health['articles']} articles, {health['images']} images, {health['backbone']} at "
          f"{health['image_size']} px; {os.cpu_count()} CPU cores")
    print(f"{result['requests']} classify requests, {result['concurrency']} concurrent: {result['errors']} errors, "
          f"{result['wall_s']} s wall, {result['throughput_rps']} req/s")
    if lat:
        print(f"latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; "
              f"top-1 accuracy {result['top1_accuracy']}")
    for e in result["error_samples"]:
        print("error:", e)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
