"""A tiny real subset of the Grocery Store Dataset for training tests (CSV manifest + class split).

Whole coarse classes are taken from the committed protocol ``splits/grocery-unseen.json``, a few
photos each, so that a run takes seconds at 64 px on 2 CPU cores.
"""

from __future__ import annotations

import atexit
import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fewshot.data.loaders import load_dataset
from fewshot.data.splits import ClassSplit

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = REPO_ROOT / "splits" / "grocery-unseen.json"


def make_tiny_grocery(grocery_root: Path, folder: Path, *, train_classes: int = 6, val_classes: int = 5,
                      test_classes: int = 3, train_images: int = 8, query_images: int = 4) -> tuple[Path, Path]:
    """Write ``folder/tiny.csv`` (path,label,group,split) and ``folder/tiny-split.json``.

    Per class: ``train_images`` photos of Grocery's train image split and ``query_images`` of
    its test split (val split where a class has none). Classes are the first ones (sorted) of
    each part of the committed protocol.

    Returns:
        ``(manifest, split_file)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    protocol = ClassSplit.load(PROTOCOL)
    ds = load_dataset(grocery_root)
    parts = {"train": protocol.train[:train_classes], "val": protocol.val[:val_classes],
             "test": protocol.test[:test_classes]}
    rows = []
    for classes in parts.values():
        for label in classes:
            recs = [r for r in ds.records if r.label == label]
            tr = [r for r in recs if r.split == "train"][:train_images]
            q = [r for r in recs if r.split == "test"] or [r for r in recs if r.split == "val"]
            rows += [(r, "train") for r in tr] + [(r, "test") for r in q[:query_images]]
    manifest = folder / "tiny.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        for r, split in rows:
            w.writerow([str(r.path), r.label, r.group, split])
    split = ClassSplit(name="tiny-grocery", seed=0, train=sorted(parts["train"]), val=sorted(parts["val"]),
                       test=sorted(parts["test"]), dataset="tiny")
    split_file = split.save(folder / "tiny-split.json")
    return manifest, split_file


_SHARED: dict[str, str] = {}


def shared_tiny_grocery(grocery_root: Path) -> dict[str, str]:
    """One tiny subset (and one embedding cache) per test session, shared by the test modules.

    Returns:
        ``{"data": manifest, "split_file": ..., "cache_dir": ...}`` (a temporary folder removed
        at exit).
    """
    if not _SHARED:
        folder = Path(tempfile.mkdtemp(prefix="fewshot-tiny-grocery-"))
        atexit.register(shutil.rmtree, folder, True)
        manifest, split_file = make_tiny_grocery(grocery_root, folder)
        _SHARED.update(data=str(manifest), split_file=str(split_file), cache_dir=str(folder / "cache"))
    return dict(_SHARED)


def nuisance_toy(n_classes: int, per_class: int, seed: int, dim: int = 16, *, noise: float = 1.0,
                 evenly_spaced: bool = True, signal: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy episodic features: float32 ``[n_classes * per_class, dim]`` and int64 labels.

    Class means lie on the unit circle in the first 2 dimensions (tight clusters, std 0.05);
    the other ``dim - 2`` carry strong Gaussian noise (std ``noise``), so nearest prototype on
    the raw features is poor and a learned linear map separates the classes. The angles are
    evenly spaced with one random offset, or (``evenly_spaced=False``) drawn uniformly.
    With ``signal > 2`` the means are random unit vectors in the first ``signal`` dimensions
    instead (room for many classes far apart, as a proxy loss wants) and the other
    ``dim - signal`` carry the noise.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(n_classes, dim)
    if signal > 2:
        means[:, :signal] = torch.nn.functional.normalize(torch.randn(n_classes, signal, generator=g), dim=1)
    else:
        if evenly_spaced:
            angles = torch.arange(n_classes) * (2 * np.pi / n_classes) + torch.rand(1, generator=g)
        else:
            angles = torch.rand(n_classes, generator=g) * 2 * np.pi
        means[:, 0], means[:, 1] = angles.cos(), angles.sin()
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[y] + 0.05 * torch.randn(len(y), dim, generator=g)
    x[:, max(2, signal):] += noise * torch.randn(len(y), dim - max(2, signal), generator=g)
    return x, y


def toy_shapes(root, size: int = 28, per_class: int = 10):
    """24 articles: 8 colours x 3 shapes on a light noisy background."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "black": (20, 20, 20),
               "yellow": (230, 200, 20), "magenta": (200, 40, 200), "cyan": (40, 200, 210),
               "orange": (240, 130, 20)}
    rng = np.random.default_rng(0)
    for cname, rgb in colours.items():
        for shape in ("disc", "square", "bar"):
            folder = root / f"{cname}-{shape}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(200, 255, size=(size, size, 3), dtype=np.uint8))
                d = ImageDraw.Draw(img)
                r = int(rng.integers(6, 10))
                cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
                if shape == "disc":
                    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
                elif shape == "square":
                    d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=rgb)
                else:
                    d.rectangle((cx - r, cy - 2, cx + r, cy + 2), fill=rgb)
                img.save(folder / f"{i:02d}.png")
    return root


def toy_conv4_protonet(tmp_path, **kw) -> dict:
    """make_config arguments of a conv4 protonet run from scratch on the toy shapes (14 train,
    5 val, the rest test classes): 2 epochs of 10 three-way one-shot episodes; ``kw`` adds to or
    replaces them (seconds on 2 CPU cores, no shared data)."""
    from fewshot.data.splits import ClassSplit

    root = toy_shapes(tmp_path / "toy")
    classes = sorted(p.name for p in root.iterdir())
    split = ClassSplit(name="toy", seed=0, train=classes[:14], val=classes[14:19], test=classes[19:], dataset="toy")
    split_file = split.save(tmp_path / "toy-split.json")
    args = dict(data=str(root), split_file=str(split_file), backbone="conv4", pretrained=False, fine_tune="all",
                image_size=28, augment="none", ways=3, shots=1, queries=3, episodes=20, episodes_per_epoch=10,
                progress=False, cache_dir=str(tmp_path / "cache"), final_eval="none")
    return {**args, **kw}
