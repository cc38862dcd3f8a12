"""Training throughput: the fine-tuning step of fewshot 0.1.0 (main at 7f58e0a: the 64-image batch
in one forward) against today's (the forward in slices of ``micro_batch`` images, each eval-mode
BatchNorm folded into its convolution, one backward),
side by side in one process, with a breakdown of the step and the CPU's float32 GEMM ceiling.

What is timed is exactly what ``fewshot train`` runs per step with its defaults (triplet,
``--fine-tune all``, EfficientNet-Lite0 at 224 px, Grocery's train classes of
``splits/grocery-unseen.json``, seed 0): :func:`fewshot.training.optim.train_step` on the
trainer's own batches (augmentation from the decoded images, forward, loss and mining,
backward, Adam). Contenders run in interleaved rounds (the order rotates), medians reported.
Other settings measured the same way: slices of 4 and 16, bfloat16 autocast (where the CPU has
AVX512-BF16 or AMX), and channels-last weights.

``--end-to-end`` runs whole default ``fewshot train`` jobs (triplet and protonet) of 0.1.0
(``--old-src``: a checkout of main at 7f58e0a; else today's code with 0.1.0's settings) and of
today, one after the other in fresh processes, and
writes ``docs/results/trainspeed/results.json``, which the ``trainstep`` part of
``bench/run_all.py`` reads (it does not retrain: about 40 minutes on 2 quiet cores).
``--compile`` times ``torch.compile`` of the backbone (-> ``compile.json`` beside it).

usage::

    python bench/train_step.py                      # the step comparison, printed as JSON
    git worktree add /tmp/fewshot-0.1.0 7f58e0a
    python bench/train_step.py --end-to-end --old-src /tmp/fewshot-0.1.0/src --out docs/results/trainspeed
    python bench/train_step.py --compile --out docs/results/trainspeed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import (ROOT, Context, fmt, grocery_root, interleaved, machine, median, paired_ratios, pyplot,
                          save_chart, table, timed, verdict, write_json)
from bench.train_runs import GROCERY_SPLIT, NEW, OLD, OLD_COMMIT, _e2e_lines, end_to_end, headline_e2e

GOAL_SPEEDUP = 2.0  # issue 31: the default fewshot train at least 2x faster end to end
RESULTS = ROOT / "docs" / "results" / "trainspeed" / "results.json"
COMPILE = RESULTS.parent / "compile.json"  # bench/train_step.py --compile
#: today's step without the folding and the frozen stem, as fewshot 0.2.0 ran it
MID = "slices, BatchNorm apart (0.2.0)"
ALL = "whole backbone"
PHASES = ("augment", "forward", "loss", "backward", "update")


def build(quick: bool, work: Path):
    """The default triplet fine-tuning set-up on Grocery (64 px and few images with ``quick``)."""
    from fewshot.training import make_config
    from fewshot.training.setup import build_setup

    # the whole backbone in the optimizer: each contender then sets what trains (select_trainable)
    cfg = make_config("triplet", data=str(grocery_root()), split_file=str(GROCERY_SPLIT), out=str(work / "run"),
                      seed=0, progress=False, fine_tune="all", **({"image_size": 64} if quick else {}))
    return cfg, build_setup(cfg)


def default_fine_tune() -> str:
    """What today's default ``fewshot train`` fine-tunes (Lite0: ``last:13``)."""
    from fewshot.training import make_config

    return make_config("triplet").fine_tune


def _batches(setup, n: int) -> Callable[[], Any]:
    """A function giving the trainer's batches of epoch 1 in turn (cycling)."""
    rng = np.random.default_rng(0)
    batches = list(setup.method.epoch_batches(setup.data.train, rng))[:n]
    state = {"i": 0}

    def next_batch():
        state["i"] += 1
        return batches[state["i"] % len(batches)]
    return next_batch


def bf16_ok() -> bool:
    """Whether this CPU runs bfloat16 matrix kernels natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def contender(ft, slices: int | None, fold: bool, fine_tune: str) -> None:
    """Set the trainer's step up as one contender runs it: forward slices, folded BatchNorm or
    not, which of the backbone trains."""
    from fewshot.training.finetune import select_trainable

    ft.micro_batch, ft.fold_pairs = slices, ft.backbone.conv_bn_pairs() if fold else []
    select_trainable(ft.backbone, fine_tune)


def step_fn(setup, next_batch, slices: int | None, fold: bool = True, bf16: bool = False,
            channels_last_weights: bool = False, fine_tune: str | None = None):
    """One trainer step (:func:`train_step`) with the forward in slices of ``slices`` images, the
    BatchNorms folded into their convolutions when ``fold``, training ``fine_tune`` of the
    backbone (``None``: today's default)."""
    import torch

    from fewshot.training.optim import train_step

    fine_tune = fine_tune or default_fine_tune()
    ft, model = setup.ft, setup.ft.backbone.model

    def run() -> None:
        contender(ft, slices, fold, fine_tune)
        if channels_last_weights:
            model.to(memory_format=torch.channels_last)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            train_step(setup.method, next_batch(), setup.optimizer)
        if channels_last_weights:
            model.to(memory_format=torch.contiguous_format)
    return run


def breakdown(setup, next_batch, slices: int | None, rounds: int, fold: bool, fine_tune: str) -> dict[str, float]:
    """Median seconds of each phase of a step: augment (inputs), forward, loss (and mining),
    backward, update (Adam)."""
    method, ft, opt = setup.method, setup.ft, setup.optimizer
    contender(ft, slices, fold, fine_tune)
    seen: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(rounds):
        batch = next_batch()
        idx = method.items(batch)
        opt.zero_grad(set_to_none=True)
        t_aug, x = timed(lambda: ft.inputs(idx))
        t_fwd, z = timed(lambda: ft.forward(x))
        t_loss, loss = timed(lambda: method.loss_from(method.embed(z), batch))
        t_bwd, _ = timed(loss.backward)
        t_upd, _ = timed(opt.step)
        for p, t in zip(PHASES, (t_aug, t_fwd, t_loss, t_bwd, t_upd)):
            seen[p].append(t)
    return {p: median(v) for p, v in seen.items()}


def ceiling(setup, slices: int, size: int, threads: int) -> dict[str, float]:
    """GFLOP of forward + backward per training image and the float32 GEMM rate of 2048 x 2048
    matrix products on ``threads`` threads. The backward is taken as twice the forward (the usual
    estimate: a gradient for the input and one for the weights), the forward counted by
    ``torch.utils.flop_counter``, whose backward formula counts a depthwise convolution as a
    dense one (32 GFLOP per Lite0 image at 224 px instead of about 2.3)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ft = setup.ft
    x = torch.zeros(slices, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ft.backbone.model(x)
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    gemm = 2 * a.shape[0] ** 3 / median([timed(lambda: torch.mm(a, a))[0] for _ in range(5)]) / 1e9
    total = counter.get_total_flops()
    return {"gflop_per_image": 3 * total / 1e9 / slices, "gemm_gflops": gemm,
            "gflop_per_image_default": (total + 2 * _tail_flops(ft.backbone, counter)) / 1e9 / slices}


def _tail_flops(backbone, counter) -> int:
    """Forward FLOPs of the modules today's default fine-tunes (counted per module by
    ``counter``): a frozen part costs its forward and no backward."""
    from fewshot.training.finetune import trainable_modules

    names = {mod: name for name, mod in backbone.model.named_modules()}
    counts = counter.get_flop_counts()
    root = type(backbone.model).__name__
    return sum(sum(counts.get(f"{root}.{names[m]}", {}).values())
               for m in trainable_modules(backbone, default_fine_tune()))


def run(quick: bool, ctx: Context) -> dict[str, Any]:
    import torch

    from fewshot.training.validate import validate_epoch

    rounds, others = (2, 1) if quick else (5, 2)
    threads = ctx.threads or torch.get_num_threads()
    cfg, setup = build(quick, ctx.work_dir / "trainstep")
    setup.method.train_mode(True)
    setup.ft.train_mode(True)
    new = setup.ft.micro_batch
    next_batch = _batches(setup, 12)
    batch_images = len(setup.method.items(next_batch()))
    main = interleaved({OLD: step_fn(setup, next_batch, None, fold=False, fine_tune="all"),
                        NEW: step_fn(setup, next_batch, new)}, rounds)
    variants = {MID: step_fn(setup, next_batch, new, fold=False, fine_tune="all"),
                f"slices, BatchNorm folded, {ALL}": step_fn(setup, next_batch, new, fine_tune="all")}
    variants.update({f"slices of {n}": step_fn(setup, next_batch, n) for n in (4, 16) if n != new})
    if bf16_ok():
        variants[f"slices of {new}, bfloat16 autocast"] = step_fn(setup, next_batch, new, bf16=True)
    variants[f"slices of {new}, channels-last weights"] = step_fn(setup, next_batch, new, channels_last_weights=True)
    side = interleaved({NEW: step_fn(setup, next_batch, new), **variants}, others)
    t_val, _ = timed(lambda: validate_epoch(setup.method, setup.data, cfg, setup.ft, 1))
    res = {"threads": threads, "batch_images": batch_images, "micro_batch": new, "rounds": rounds,
           "image_size": cfg.image_size, "train_images": len(setup.data.train),
           "steps_per_epoch": setup.method.steps_per_epoch(setup.data.train), "validation_seconds": t_val,
           "step_seconds": {k: median(v) for k, v in main.items()},
           "speedup": median(paired_ratios(main[OLD], main[NEW])),
           "variants": {k: median(v) for k, v in side.items()}, "variant_rounds": others,
           "fine_tune": default_fine_tune(),
           "breakdown": {OLD: breakdown(setup, next_batch, None, 2 if quick else 3, fold=False, fine_tune="all"),
                         NEW: breakdown(setup, next_batch, new, 2 if quick else 3, fold=True,
                                        fine_tune=default_fine_tune())},
           "ceiling": ceiling(setup, min(new or 8, 8), cfg.image_size, threads)}
    res["end_to_end"] = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not quick else None
    res["compile"] = json.loads(COMPILE.read_text()) if COMPILE.is_file() and not quick else None
    return res


def _gflop(res: dict[str, Any], name: str) -> float:
    """GFLOP of one training image of a contender: the whole backbone's forward and backward, or
    for today's step the forward plus the backward of the fine-tuned blocks only."""
    c = res["ceiling"]
    return c.get("gflop_per_image_default", c["gflop_per_image"]) if name == NEW else c["gflop_per_image"]


def images_per_second(res: dict[str, Any], name: str) -> float:
    return res["batch_images"] / res["step_seconds"][name]


def epoch_seconds(res: dict[str, Any], name: str) -> float:
    """An epoch's steps at the measured median step time, plus one validation."""
    return res["steps_per_epoch"] * res["step_seconds"][name] + res["validation_seconds"]


def compiled(rounds: int = 3) -> dict[str, Any]:
    """``torch.compile`` of the backbone (inductor) for training: its compile time (the first
    step) and its step time against eager, interleaved, both in slices of the default size."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        cfg, setup = build(False, Path(tmp))
        setup.method.train_mode(True)
        setup.ft.train_mode(True)
        next_batch, new = _batches(setup, 12), setup.ft.micro_batch
        eager = setup.ft.backbone.model
        fast = torch.compile(eager)
        eager_step = step_fn(setup, next_batch, new)

        def swap(model):
            setup.ft.backbone.model = model
        swap(fast)
        t_compile, _ = timed(step_fn(setup, next_batch, new))

        def run_compiled():
            swap(fast)
            step_fn(setup, next_batch, new)()
            swap(eager)
        swap(eager)
        times = interleaved({"eager": eager_step, "compiled": run_compiled}, rounds)
    return {"first_step_seconds": t_compile, "rounds": rounds, "micro_batch": new,
            "step_seconds": {k: median(v) for k, v in times.items()},
            "speedup": median(paired_ratios(times["eager"], times["compiled"])), "machine": machine()}


# --------------------------------------------------------------------------- report
def section(res: dict[str, Any], ctx: Context) -> str:
    c = res["ceiling"]
    lines = ["## 11. Training throughput", "",
             f"The default `fewshot train` step (triplet, EfficientNet-Lite0 at {res['image_size']} px, batches of "
             f"{res['batch_images']} Grocery train photos, Adam), {res['threads']} threads: fewshot 0.1.0's step (the "
             "batch in one forward, BatchNorm apart, the whole backbone trained) against today's (the forward in "
             f"slices of {res['micro_batch']} images, each BatchNorm folded into its convolution, `--fine-tune "
             f"{res.get('fine_tune', 'all')}`: the stem and the first 3 blocks frozen), {res['rounds']} interleaved "
             "rounds, medians. Forward + backward of one image through the whole backbone is about "
             f"{c['gflop_per_image']:.2f} GFLOP (three times the forward's, which `torch.utils.flop_counter` counts; "
             "its count of the backward treats depthwise convolutions as dense); with the frozen stem, "
             f"{c.get('gflop_per_image_default', c['gflop_per_image']):.2f} GFLOP (no backward through the frozen "
             f"blocks). A float32 2048 x 2048 matrix product here reaches {c['gemm_gflops']:.0f} GFLOP/s, the "
             "ceiling below.", ""]
    rows = []
    for name in (OLD, NEW):
        ips = images_per_second(res, name)
        rows.append([name, fmt(res["step_seconds"][name], 2), fmt(1000 / ips, 1), fmt(ips, 1),
                     f"{ips * _gflop(res, name) / c['gemm_gflops']:.0%}", fmt(epoch_seconds(res, name), 0)])
    lines += [table(["step", "s / step", "ms / image", "images / s", "share of the GEMM ceiling",
                     f"epoch s ({res['steps_per_epoch']} steps + validation)"], rows), "",
              f"Speed-up of the step: **{res['speedup']:.2f}x** (median of the paired rounds). Validation of one "
              f"epoch (ONNX Runtime, val queries and gallery, episodes): {res['validation_seconds']:.1f} s.", ""]
    lines += _breakdown_lines(res) + _variant_lines(res) + _e2e_lines(res.get("end_to_end"))
    lines.append(f"![training step](bench/{_chart(res, ctx)})")
    return "\n".join(lines)


def _breakdown_lines(res: dict[str, Any]) -> list[str]:
    b = res["breakdown"]
    rows = [[p, fmt(b[OLD][p], 3), fmt(b[NEW][p], 3)] for p in PHASES]
    rows.append(["all", fmt(sum(b[OLD].values()), 2), fmt(sum(b[NEW].values()), 2)])
    share = b[NEW]["augment"] / sum(b[NEW].values())
    return ["Where a step's time goes (seconds, median of a few steps each):", "",
            table(["phase", OLD, NEW], rows), "",
            f"Augmentation (random resized crop, flip, colour jitter on the decoded uint8 images held in memory "
            f"since the run started) is {share:.0%} of today's step, so data-loading workers cannot buy much on "
            f"2 cores and stay off; the rest is the backbone's forward and backward.", ""]


def _variant_lines(res: dict[str, Any]) -> list[str]:
    v = res["variants"]
    base = v[NEW]
    rows = [[name, fmt(t, 2), fmt(t / res["batch_images"] * 1000, 1), f"{base / t:.2f}x"] for name, t in v.items()]
    lines = [f"Other settings, each against today's default in {res['variant_rounds']} interleaved rounds (kept only "
             "where faster):", "", table(["setting", "s / step", "ms / image", "speed vs default"], rows), ""]
    c = res.get("compile")
    if c:
        lines += [f"`torch.compile` of the backbone (inductor; `python bench/train_step.py --compile`, {c['rounds']} "
                  f"interleaved rounds against eager, both in slices of {c['micro_batch']}, on {c['machine']['cpu']}): "
                  f"the first step (compiling) took {c['first_step_seconds']:.0f} s, then a step "
                  f"{c['step_seconds']['compiled']:.2f} s against {c['step_seconds']['eager']:.2f} s eager "
                  f"(**{c['speedup']:.2f}x**).", ""]
    return lines


def goal_rows(res: dict[str, Any]) -> list[list[str]]:
    """The goals table's rows of this part."""
    rows = [["Training step: today's vs 0.1.0's (interleaved)", f">= {GOAL_SPEEDUP:.0f}x", f"{res['speedup']:.2f}x",
             verdict(res["speedup"] >= GOAL_SPEEDUP)]]
    for method, h in headline_e2e(res.get("end_to_end")).items():
        ok = h["speedup"] >= GOAL_SPEEDUP and h["map_delta"] >= -0.01
        rows.append([f"Default `fewshot train --method {method}` end to end, MAP@R within 0.01",
                     f">= {GOAL_SPEEDUP:.0f}x", f"{h['speedup']:.2f}x, MAP@R {h['map_delta']:+.3f}", verdict(ok)])
    return rows


def _chart(res: dict[str, Any], ctx: Context) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    n = res["batch_images"]
    left = {OLD: 0.0, NEW: 0.0}
    for phase in PHASES:
        widths = [res["breakdown"][k][phase] / n * 1000 for k in (OLD, NEW)]
        ax.barh([OLD, NEW], widths, left=[left[OLD], left[NEW]], label=phase)
        left = {k: left[k] + w for k, w in zip((OLD, NEW), widths)}
    ax.set_xlabel("ms per training image")
    ax.set_title("Fine-tuning step of EfficientNet-Lite0, by phase")
    ax.legend(fontsize=8, ncol=5, loc="lower center", bbox_to_anchor=(0.5, -0.55))
    return save_chart(fig, ctx.chart_dir / "train_step.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 px, 2 rounds: a smoke run")
    ap.add_argument("--end-to-end", action="store_true", help="whole fewshot train runs instead of the step")
    ap.add_argument("--out", type=Path, default=RESULTS.parent, help="folder of results.json (--end-to-end)")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/fewshot-trainspeed"), help="run folders (--end-to-end)")
    ap.add_argument("--methods", default="triplet,protonet")
    ap.add_argument("--steps", default="old,new", help="which whole runs (--end-to-end): old, new or both")
    ap.add_argument("--old-src", type=Path, default=None,
                    help=f"--end-to-end: the src folder of a checkout of {OLD_COMMIT} (git worktree add DIR {OLD_COMMIT}); "
                         "its default run is the old one (else today's code with 0.1.0's settings)")
    ap.add_argument("--compile", action="store_true", help="time torch.compile of the backbone instead (-> OUT/compile.json)")
    args = ap.parse_args()
    if args.compile:
        res = compiled()
        write_json(args.out / "compile.json", res)
        print(json.dumps(res, indent=1, default=float))
        return 0
    if args.end_to_end:
        res = end_to_end(args.out, args.runs, tuple(args.methods.split(",")), tuple(args.steps.split(",")),
                         args.old_src)
        print(json.dumps(headline_e2e(res), indent=1))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.quick, Context(out_dir=Path(tmp), work_dir=Path(tmp), quick=args.quick))
    print(json.dumps({k: v for k, v in res.items() if k != "end_to_end"}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
