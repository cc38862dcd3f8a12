"""Pictures a person would rather see than numbers: retrieval grids and training curves (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .data.images import load_image  # noqa: E402
from .errors import ImageReadError  # noqa: E402
from .io import atomic_path  # noqa: E402


def _thumb(ax, path: str | Path, size: int = 160) -> None:
    try:
        img = load_image(path, target_size=size)
        img.thumbnail((size, size))
        ax.imshow(img)
    except ImageReadError:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(path)


def retrieval_grid(query_paths: Sequence[str | Path], query_labels: Sequence[str],
                   result_paths: Sequence[Sequence[str | Path]],
                   result_labels: Sequence[Sequence[str]], result_scores: Sequence[Sequence[float]],
                   out: str | Path, title: str = "") -> Path:
    """Draw one row per query: the query, then its top results framed green (same article) or red.

    Args:
        query_paths, query_labels: ``Q`` queries.
        result_paths, result_labels, result_scores: ``Q x k`` retrieved gallery items, best first.
        out: PNG file to write (atomically).
    """
    rows = len(query_paths)
    k = max((len(r) for r in result_paths), default=0)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.9 * (k + 1), 2.1 * rows), squeeze=False)
    for r in range(rows):
        ax = axes[r][0]
        _thumb(ax, query_paths[r])
        ax.set_title(f"query\n{query_labels[r][:22]}", fontsize=7)
        for s in ax.spines.values():
            s.set_edgecolor("black")
            s.set_linewidth(2)
        for c in range(k):
            ax = axes[r][c + 1]
            if c >= len(result_paths[r]):
                ax.axis("off")
                continue
            _thumb(ax, result_paths[r][c])
            ok = result_labels[r][c] == query_labels[r]
            colour = "#1a9850" if ok else "#d73027"
            for s in ax.spines.values():
                s.set_edgecolor(colour)
                s.set_linewidth(4)
            mark = "right" if ok else "wrong"
            ax.set_title(f"{c + 1}. {mark} {result_scores[r][c]:.2f}\n{result_labels[r][c][:22]}",
                         fontsize=7, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
    return _save(fig, out)


def training_curves(history: Sequence[dict], out: str | Path, x: str = "epoch",
                    loss_keys: Sequence[str] = ("train_loss",),
                    metric_keys: Sequence[str] = ("val_map", "val_map_at_r")) -> Path:
    """Loss (left) and validation metrics (right) against ``x``; rows are dicts per epoch/step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [h[x] for h in history]
    for ax, keys, title in ((axes[0], loss_keys, "training loss"), (axes[1], metric_keys, "validation")):
        for key in keys:
            ys = [h.get(key) for h in history]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=key)
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)
