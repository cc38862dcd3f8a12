"""Training speed of the episodic methods on cached embeddings (not a timed test).

Target (issue 4): 1,000 training episodes of 5-way 5-shot prototypical-network training on cached
embeddings in under 10 s on 2 CPU cores. Also times MAML and first-order MAML per 1,000 episodes.

What is timed: exactly what the trainer runs per epoch, ``method.epoch_batches`` + the trainer's ``train_step``
(episode sampling, feature lookup, head forward / backward, Adam step) with the default head
(identity-initialised linear 1280 -> 1280 on centred features). Embedding, validation and
checkpointing are not included (the embeddings come from the on-disk cache).

Usage::

    python bench/train_speed_protonet.py                    # Grocery train classes (cached lite0, 224 px)
    python bench/train_speed_protonet.py --random           # random features of the same shape
    python bench/train_speed_protonet.py --threads 2 --episodes 1000 --maml-episodes 200

Prints one line per configuration and, with ``--json``, writes the numbers.

Measured on the 2-core development machine (torch 2.13 CPU, fused Adam): ProtoNet 7.4 s per
1,000 episodes with 2 threads, 8.1 s with 1 thread; MAML 7.6 s and FOMAML 6.0 s per 1,000
episodes (meta-batch 4, 5 inner steps). On a machine shared with other busy processes, 2 intra-op
threads spin-wait for each other and the same run can take 60 s (CPU time 63 s): compare the CPU
times, or use ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fewshot.methods import TrainData  # noqa: E402
from fewshot.training import make_config  # noqa: E402
from fewshot.training.optim import make_optimizer, train_step  # noqa: E402


def grocery_train_features(data: str, split_file: str, image_size: int) -> TrainData:
    """Cached lite0 embeddings of every photo of the split's train classes."""
    from fewshot.backbones import create_backbone
    from fewshot.data.loaders import load_dataset
    from fewshot.data.protocol import dataset_for
    from fewshot.data.splits import ClassSplit
    from fewshot.embed import embed_dataset

    ds = dataset_for(load_dataset(data), ClassSplit.load(split_file), "train")
    emb = embed_dataset(ds, create_backbone("efficientnet_lite0", image_size=image_size), progress=True)
    names = sorted(set(emb.labels))
    return TrainData(torch.from_numpy(emb.vectors), torch.tensor([names.index(l) for l in emb.labels]), names)


def random_features(n: int = 2640, classes: int = 40, dim: int = 1280, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n // classes)
    return TrainData(torch.randn(len(y), dim, generator=g), y, [str(i) for i in range(classes)])


def time_method(name: str, data: TrainData, episodes: int, queries: int, **over) -> dict:
    cfg = make_config(name, ways=5, shots=5, queries=queries, episodes_per_epoch=episodes, seed=0, **over)
    method = cfg.build_method(data.dim)
    method.head.set_centre(data.x)
    x = data.x
    method.bind(lambda idx: x[torch.from_numpy(idx)])
    opt = make_optimizer(method, cfg)
    method.train_mode(True)
    # warm-up (allocator, kernels), not timed
    for i, batch in enumerate(method.epoch_batches(data, np.random.default_rng(1))):
        train_step(method, batch, opt)
        if i >= 4:
            break
    done = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in method.epoch_batches(data, np.random.default_rng(0)):
        train_step(method, batch, opt)
        done += len(batch) if isinstance(batch, list) else 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"method": name, "episodes": done, "queries": queries, "seconds": round(seconds, 3),
            "seconds_per_1000_episodes": round(seconds / done * 1000, 2),
            "cpu_seconds_per_1000_episodes": round(cpu / done * 1000, 2),
            **{k: v for k, v in over.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/grocery-store-dataset"))
    ap.add_argument("--split-file", default=str(ROOT / "splits/grocery-unseen.json"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--random", action="store_true", help="random features instead of cached Grocery embeddings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=1000, help="ProtoNet episodes timed")
    ap.add_argument("--maml-episodes", type=int, default=200, help="MAML / FOMAML episodes timed (scaled to 1,000)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = random_features() if args.random else grocery_train_features(args.data, args.split_file, args.image_size)
    print(f"features: {'random' if args.random else 'Grocery train classes, cached lite0'} "
          f"{tuple(data.x.shape)}, {data.num_classes} classes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = [time_method("protonet", data, args.episodes, 5),
            time_method("protonet", data, args.episodes, 15)]
    for name in ("fomaml", "maml"):
        rows.append(time_method(name, data, args.maml_episodes, 5, inner_steps=5, meta_batch=4))
    for r in rows:
        extra = f", inner_steps {r['inner_steps']}, meta_batch {r['meta_batch']}" if "inner_steps" in r else ""
        print(f"{r['method']:>8}  5-way 5-shot {r['queries']:>2} queries{extra}: {r['episodes']} episodes in "
              f"{r['seconds']:.2f} s  ->  {r['seconds_per_1000_episodes']:.2f} s / 1,000 episodes "
              f"(CPU time {r['cpu_seconds_per_1000_episodes']:.2f} s)")
    target = rows[0]["seconds_per_1000_episodes"]
    print(f"ProtoNet target (< 10 s / 1,000 episodes, 5 queries): {'met' if target < 10 else 'NOT met'} ({target:.2f} s wall)")
    if os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes share the "
              "CPU, the wall times are inflated (compare the CPU times)")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "random": args.random, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
