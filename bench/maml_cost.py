"""Time and memory of one MAML meta-batch, by what the inner loop adapts and by order.

One meta-batch = ``--meta-batch`` 5-way 1-shot tasks with 5 queries per class, ``--inner-steps``
inner steps, then the outer Adam step, on random images (the cost does not depend on the
pixels). Each setting runs in its own child process, which reports the median wall time of
``--repeats`` meta-batches (after one warm-up) and its peak resident memory (VmHWM), so the
memory figures are each setting's own.

    python bench/maml_cost.py --out docs/results/finetune/maml_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import child_threads, emit, median, peak_rss, run_child, write_json  # noqa: E402

SETTINGS = [("conv4", 28, "head", False), ("conv4", 28, "tail", False), ("conv4", 28, "all", True),
            ("conv4", 28, "all", False), ("efficientnet_lite0", 112, "head", False),
            ("efficientnet_lite0", 112, "all", True), ("efficientnet_lite0", 112, "all", False)]


def measure(backbone: str, size: int, inner: str, first_order: bool, repeats: int, meta_batch: int,
            steps: int) -> dict:
    """In a child: median seconds per meta-batch and peak memory of one setting."""
    import numpy as np
    import torch

    from fewshot.backbones import create_backbone
    from fewshot.data.episodes import Episode
    from fewshot.training import make_config
    from fewshot.training.optim import make_optimizer, train_step
    from fewshot.methods.maml import FOMAML, MAML
    from fewshot.training.finetune import select_trainable

    torch.manual_seed(0)
    scratch = backbone == "conv4"
    bb = create_backbone(backbone, pretrained=not scratch, image_size=size)
    cls = FOMAML if first_order else MAML
    cfg = make_config(cls.name, fine_tune="all", pretrained=not scratch, ways=5, shots=1, queries=5,
                      inner_params=inner, inner_steps=steps, meta_batch=meta_batch)
    m = cfg.build_method(bb.dim)
    m.backbone, m.backbone_params = bb.model, select_trainable(bb, "all")
    images = torch.randn(30, 3, size, size)
    m.bind(lambda idx: bb.model(images[idx]), lambda idx: images[idx])
    ep = Episode(classes=list("abcde"), support_idx=np.arange(5), support_y=np.arange(5),
                 query_idx=np.arange(5, 30), query_y=np.repeat(np.arange(5), 5))
    opt = make_optimizer(m, cfg)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        train_step(m, [ep] * meta_batch, opt)
        if i:
            times.append(time.perf_counter() - t0)
    return {"seconds_per_meta_batch": median(times), "peak_rss_bytes": peak_rss()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results/finetune/maml_cost.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_threads()
        bb, size, inner, fo = args.child
        emit(measure(bb, int(size), inner, fo == "1", args.repeats, args.meta_batch, args.inner_steps))
        return
    rows = []
    for bb, size, inner, fo in SETTINGS:
        r = run_child("maml_cost", ["--child", bb, str(size), inner, "1" if fo else "0", "--repeats",
                                    str(args.repeats), "--meta-batch", str(args.meta_batch), "--inner-steps",
                                    str(args.inner_steps)], timeout=900)
        row = {"backbone": bb, "image_size": size, "inner_params": inner,
               "order": "first (fomaml)" if fo else "second (maml)", **r}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(args.out, {"meta_batch": args.meta_batch, "inner_steps": args.inner_steps, "ways": 5, "shots": 1,
                          "queries": 5, "rows": rows})


if __name__ == "__main__":
    main()
