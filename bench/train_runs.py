"""Whole ``fewshot train`` runs for the training-throughput benchmark (``bench/train_step.py
--end-to-end``): fewshot 0.1.0's default run (``--old-src``: a checkout of main at 7f58e0a) and
today's, each in a fresh process, timed from outside, merged into
``docs/results/trainspeed/results.json``; and their rows in the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, fmt, grocery_root, machine, median, table, timed, write_json

GROCERY_SPLIT = ROOT / "splits" / "grocery-unseen.json"
OLD, NEW = "one forward (0.1.0)", "slices, BatchNorm folded, frozen stem (default)"


#: the whole runs: 0.1.0's default run (main at 7f58e0a, from a checkout of it: ``--old-src``; else
#: today's code with 0.1.0's training settings: the batch in one forward, BatchNorm apart, the whole
#: backbone trained) and today's default run
STEPS = {"old": (OLD, ["--micro-batch", "64", "--no-fold-bn", "--fine-tune", "all"]), "new": (NEW, [])}
#: the commit whose default ``fewshot train`` issue 31 measures against
OLD_COMMIT = "7f58e0a"


def train_run(method: str, extra: list[str], run_dir: Path, src: Path | None = None) -> dict[str, Any]:
    """One whole ``fewshot train`` job with its defaults (plus ``extra``) in a fresh process,
    timed from outside; with ``src``, the fewshot package of that source folder (a checkout of
    another commit) instead of this one."""
    from fewshot.training import read_history

    cmd = [sys.executable, "-m", "fewshot", "train", "--data", str(grocery_root()), "--split-file", str(GROCERY_SPLIT),
           "--method", method, "--out", str(run_dir), "--no-progress", "--overwrite", *extra]
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    load = os.getloadavg()[0]
    wall, proc = timed(lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    config = json.loads((run_dir / "config.json").read_text())
    history = [r for r in read_history(run_dir) if r["epoch"] > 0]
    final = config["final_eval"]
    return {"method": method, "flags": " ".join(extra) or "(defaults)", "wall_seconds": wall,
            "training_seconds": config["training_seconds"], "epochs_trained": len(history),
            "epoch_seconds": [r["seconds"] for r in history], "images_per_second": config.get("images_per_second"),
            "best_epoch": config["best_epoch"], "map_at_r": final["map_at_r"],
            "precision_at_1": final["precision_at_1"], "load_before": load, "load_after": os.getloadavg()[0],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stdout": proc.stdout[-1500:]}


def end_to_end(out: Path, runs: Path, methods: tuple[str, ...], steps: tuple[str, ...],
               old_src: Path | None = None) -> dict[str, Any]:
    """Whole default runs of each method with each step, one after the other, each in a fresh
    process; merged into ``out/results.json`` (a row per method and step). With ``old_src`` (the
    ``src`` folder of a checkout of :data:`OLD_COMMIT`) the old run is that code's own default run."""
    path = out / "results.json"
    res = json.loads(path.read_text()) if path.is_file() else {"machine": machine(), "runs": {}}
    res["machine"] = machine()
    for method in methods:
        for step in steps:
            name, extra = STEPS[step]
            src = old_src if step == "old" else None
            if src:
                extra = []
            print(f"[trainstep] fewshot train --method {method} {' '.join(extra)}{f' (code: {src})' if src else ''} ...",
                  file=sys.stderr, flush=True)
            row = train_run(method, extra, runs / f"{method}-{step}", src)
            row["code"] = f"fewshot at {OLD_COMMIT} (0.1.0)" if src else f"this checkout ({machine()['git_commit']})"
            res["runs"].setdefault(method, {})[name] = row
            write_json(path, res)
    return res


def _e2e_lines(e2e: dict[str, Any] | None) -> list[str]:
    if not e2e:
        return ["Whole runs: not measured yet (`python bench/train_step.py --end-to-end --out docs/results/trainspeed`).",
                ""]
    rows = []
    for method, pair in e2e["runs"].items():
        for name, r in pair.items():
            rows.append([method, name, fmt(r["wall_seconds"] / 60, 1), " / ".join(f"{s:.0f}" for s in r["epoch_seconds"]),
                         fmt(r.get("images_per_second"), 1), f"{r['best_epoch']} of {r['epochs_trained']}",
                         fmt(r["map_at_r"], 3), fmt(r["precision_at_1"], 3),
                         f"{r['load_before']:.1f}-{r['load_after']:.1f}", r.get("finished", "-")[:16]])
    m = e2e["machine"]
    text = "; ".join(f"{k}: **{v['speedup']:.2f}x** end to end ({v['per_epoch']:.2f}x per epoch), MAP@R "
                     f"{v['map_delta']:+.3f}" for k, v in headline_e2e(e2e).items())
    return [f"Whole default `fewshot train` runs on Grocery (seed 0, test classes), each in a fresh process, one "
            f"after the other, on {m['cpu']}, {m['usable_cpus']} CPUs, timed from outside (set-up, epochs, "
            "validation, final evaluation). The 0.1.0 rows ran fewshot 0.1.0 itself (a checkout of main at "
            f"{OLD_COMMIT}, `--old-src`) with its defaults: the batch in one forward, BatchNorm apart, the whole "
            "backbone trained, up to 4 epochs. Today's defaults train EfficientNet-Lite0's last 13 blocks (the stem "
            "and the 3 blocks at 1/2 and 1/4 resolution stay frozen), in slices with BatchNorm folded, and stop "
            "triplet after 3 epochs (every default run measured peaked by then). The 0.2.0 rows (slices, BatchNorm "
            "apart, whole backbone) are from the morning's run of the same benchmark. One seed each: float rounding "
            "alone moved test MAP@R by up to 0.03 between runs of the same seed.", "",
            table(["method", "step", "wall min", "epochs s", "images / s", "best epoch", "test MAP@R", "P@1",
                   "load 1 min", "finished"], rows), "",
            *[f"- {method}, {name}: {r['note']}" for method, pair in e2e["runs"].items() for name, r in pair.items()
              if r.get("note")], "", text, ""]


def headline_e2e(e2e: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per method with both runs: the end-to-end and per-epoch wall-time ratios 0.1.0 / today
    and the MAP@R change."""
    out: dict[str, dict[str, float]] = {}
    for method, pair in (e2e or {}).get("runs", {}).items():
        if OLD in pair and NEW in pair:
            old, new = pair[OLD], pair[NEW]
            out[method] = {"speedup": old["wall_seconds"] / new["wall_seconds"],
                           "per_epoch": median(old["epoch_seconds"]) / median(new["epoch_seconds"]),
                           "map_delta": new["map_at_r"] - old["map_at_r"]}
    return out
