"""Ray embedding throughput: ``--distributed ray`` with 1 and 2 local workers vs ``fewshot embed``.

Every run embeds the same seeded sample of Grocery photos (efficientnet_lite0, 224 px, ONNX
Runtime, the library's default batch) into an empty embedding store (the ONNX export is made
once beforehand and copied into each store folder, so no run pays for it):

* ``fewshot embed``: :func:`fewshot.embed.embed_paths` in this process (read + hash, decode
  in the background / one batch per ONNX thread, forward), 2 ONNX threads;
* ``ray 1x2``: :func:`fewshot.embed.distributed.ray_embed_paths`, one actor with 2 CPUs
  (2 ONNX threads); ``ray 2x1``: two actors with 1 CPU each.

Wall = the whole call (for Ray: start of a local Ray, the actors loading the model, the run,
the shutdown). Each contender also embeds the first :data:`SMALL` photos alone, in a fresh
store: that wall is its fixed cost (for Ray, mostly start-up), and the marginal throughput
``(n - SMALL) / (wall(n) - wall(SMALL))`` is what a long run converges to. The contenders
run interleaved, rotating the order each round; medians over the rounds. Also checked: the
Ray vectors equal the local ones.

``python bench/ray_embed.py [--quick] [--n N] [--notes FILE]`` prints the results as JSON and,
with ``--notes``, writes the Markdown section there.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import Context, cpu_model, fmt, fmt_s, median, table, usable_cpus

SIZE = 224
#: photos of the fixed-cost run
SMALL = 8


def _store(work: Path, onnx: Path) -> Path:
    """An empty embedding store folder holding a copy of the ONNX export."""
    folder = work / f"store-{uuid.uuid4().hex[:8]}"
    shutil.copytree(onnx, folder / "onnx")
    return folder


def local_run(paths: list[Path], backbone, work: Path, onnx: Path) -> dict[str, Any]:
    """``fewshot embed``'s path: :func:`embed_paths` with the store on."""
    from fewshot.embed import embed_paths

    store = _store(work, onnx)
    t0 = time.perf_counter()
    vectors, ok, failures, cached = embed_paths(paths, backbone, cache_dir=store, progress=False, runtime="onnx")
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    assert not failures and cached == 0 and len(ok) == len(paths)
    return {"wall": wall, "vectors": vectors}


def ray_run(paths: list[Path], backbone, work: Path, onnx: Path, workers: int, cpus: int) -> dict[str, Any]:
    """:func:`ray_embed_paths` on a local Ray of ``workers`` actors x ``cpus`` CPUs."""
    from fewshot.embed.distributed import RayOptions, ray_embed_paths

    store = _store(work, onnx)
    temp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # Ray's socket paths must stay short
    opts = RayOptions(workers=workers, cpus_per_worker=cpus, temp_dir=temp)
    t0 = time.perf_counter()
    vectors, ok, failures, cached = ray_embed_paths(paths, backbone, options=opts, cache_dir=store, progress=False,
                                                    runtime="onnx")
    wall = time.perf_counter() - t0
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(temp, ignore_errors=True)
    assert not failures and cached == 0 and len(ok) == len(paths)
    return {"wall": wall, "vectors": vectors}


def both(fn: Callable[[list[Path]], dict[str, Any]], paths: list[Path]) -> dict[str, Any]:
    """``fn`` on the first :data:`SMALL` photos (the fixed cost), then on all of them."""
    small = fn(paths[:SMALL])["wall"]
    full = fn(paths)
    return {**full, "small_wall": small}


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def run(quick: bool, ctx: Context, n: int | None = None) -> dict[str, Any]:
    from bench.embed_throughput import sample_paths
    from fewshot.backbones import create_backbone
    from fewshot.embed import make_forward

    n = n or (24 if quick else 300)
    rounds = 1 if quick else 2
    work = ctx.work_dir / "ray_embed"
    work.mkdir(parents=True, exist_ok=True)
    paths, _ = sample_paths(n)
    backbone = create_backbone("efficientnet_lite0", image_size=SIZE)
    export = work / "export"
    make_forward(backbone, "onnx", cache_dir=export)  # export once; every store gets a copy
    onnx = export / "onnx"
    contenders: dict[str, Callable[[], dict[str, Any]]] = {
        "fewshot embed": lambda: both(lambda p: local_run(p, backbone, work, onnx), paths),
        "ray 1 worker x 2 CPUs": lambda: both(lambda p: ray_run(p, backbone, work, onnx, 1, 2), paths),
        "ray 2 workers x 1 CPU": lambda: both(lambda p: ray_run(p, backbone, work, onnx, 2, 1), paths)}
    res: dict[str, Any] = {"n": n, "rounds": rounds, "image_size": SIZE, "cpus": usable_cpus(), "cpu": cpu_model(),
                           "date": dt.datetime.now().isoformat(timespec="minutes"), "load_before": _load()}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            out[name].append(contenders[name]())
    res["load_after"] = _load()
    ref = out["fewshot embed"][0]["vectors"]
    rows = []
    for name, runs in out.items():
        marginal = [(n - SMALL) / (x["wall"] - x["small_wall"]) if x["wall"] > x["small_wall"] else None
                    for x in runs]
        rows.append({"name": name, "wall_s": median([x["wall"] for x in runs]),
                     "wall_ips": n / median([x["wall"] for x in runs]),
                     "fixed_s": median([x["small_wall"] for x in runs]), "marginal_ips": median(marginal),
                     "walls": [x["wall"] for x in runs], "small_walls": [x["small_wall"] for x in runs],
                     "max_abs_diff": float(max(np.abs(x["vectors"] - ref).max() for x in runs))})
    res["rows"] = rows
    shutil.rmtree(work, ignore_errors=True)
    return res


def section(res: dict[str, Any], ctx: Context | None = None) -> str:
    base, base_m = res["rows"][0]["wall_ips"], res["rows"][0]["marginal_ips"]
    rows = [[r["name"], fmt_s(r["wall_s"]), fmt(r["wall_ips"], 1), f"{r['wall_ips'] / base:.2f}x",
             fmt_s(r["fixed_s"]), fmt(r["marginal_ips"], 1), f"{r['marginal_ips'] / base_m:.2f}x",
             f"{r['max_abs_diff']:.1e}"] for r in res["rows"]]
    return "\n".join([
        "## Ray embedding throughput (`fewshot embed --distributed ray`)", "",
        f"Measured {res['date']} on {res['cpus']} usable CPU(s) ({res['cpu']}); {res['n']} Grocery photos, "
        f"efficientnet_lite0 at {res['image_size']} px, ONNX Runtime, an empty store each run (ONNX export made "
        f"beforehand), {res['rounds']} interleaved round(s), medians.", "",
        f"Load before: `{res['load_before']}`  ", f"Load after: `{res['load_after']}`", "",
        table(["run", f"wall ({res['n']} photos)", "img/s (wall)", "vs fewshot embed", f"fixed cost ({SMALL} photos)",
               "marginal img/s", "vs fewshot embed", "max abs diff vs fewshot embed"], rows), "",
        "Wall = the whole call; for Ray it includes starting a local Ray, the actors loading the model and the "
        f"shutdown. Fixed cost = the wall of the same call on {SMALL} photos; marginal img/s = "
        f"(photos - {SMALL}) / (wall - fixed cost), what a long run converges to.", ""])


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--notes", type=Path, default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fewshot-bench-ray-"))
    result = run(a.quick, Context(work, work), n=a.n)
    print(json.dumps(result, indent=1, default=str))
    if a.notes:
        a.notes.parent.mkdir(parents=True, exist_ok=True)
        a.notes.write_text(section(result) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
