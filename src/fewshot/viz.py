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
                    metric_keys: Sequence[str] = ("val_map", "val_map_at_r"),
                    metric_title: str = "validation") -> Path:
    """Loss (left) and validation metrics (right, titled ``metric_title``) against ``x``; rows
    are dicts per epoch/step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [h[x] for h in history]
    for ax, keys, title in ((axes[0], loss_keys, "training loss"), (axes[1], metric_keys, metric_title)):
        for key in keys:
            ys = [h.get(key) for h in history]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=key)
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


#: at most this many points go into the t-SNE of :func:`embedding_map` (a seeded sample beyond)
MAP_MAX_POINTS = 1500


def project_2d(vectors, seed: int = 0, method: str = "auto"):
    """2-D coordinates ``float [N, 2]`` of ``vectors float32 [N, D]`` (L2-normalised first):
    scikit-learn's t-SNE (van der Maaten and Hinton 2008) after a 50-d PCA, or PCA alone
    (``method="pca"``; ``"auto"`` = t-SNE up to :data:`MAP_MAX_POINTS` points, PCA above)."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "auto":
        method = "tsne" if len(x) <= MAP_MAX_POINTS else "pca"
    k = min(50, x.shape[1], len(x))
    reduced = PCA(n_components=k, random_state=seed).fit_transform(x) if k >= 2 else np.hstack([x, x])[:, :2]
    if method == "pca" or len(x) < 5:
        return reduced[:, :2], "PCA"
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(reduced), "t-SNE"


def embedding_map(vectors, labels: Sequence[str], groups: Sequence[str | None], out: str | Path, *,
                  title: str = "", seed: int = 0, names: int = 8) -> Path:
    """A 2-D map of embeddings as a PNG: one dot per image coloured by group (brand; by label
    when there are no groups), with the names of the ``names`` largest articles at their
    centre. More than :data:`MAP_MAX_POINTS` images: a seeded sample of that many."""
    import numpy as np

    n = len(labels)
    pick = np.arange(n)
    if n > MAP_MAX_POINTS:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=MAP_MAX_POINTS, replace=False))
    xy, how = project_2d(np.asarray(vectors)[pick], seed)
    labs = [labels[i] for i in pick]
    keys = [groups[i] if groups[i] is not None else labels[i] for i in pick]
    colour_of = {k: i for i, k in enumerate(sorted(set(keys)))}
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.scatter(xy[:, 0], xy[:, 1], s=9, c=[cmap(colour_of[k] % 20) for k in keys], alpha=0.8, linewidths=0)
    counts: dict[str, int] = {}
    for lab in labs:
        counts[lab] = counts.get(lab, 0) + 1
    for lab in sorted(counts, key=lambda a: (-counts[a], a))[:names]:
        at = np.median(xy[[i for i, x in enumerate(labs) if x == lab]], axis=0)
        ax.annotate(lab, at, fontsize=8, ha="center", bbox={"boxstyle": "round", "fc": "white", "alpha": 0.7, "lw": 0})
    ax.set_xticks([])
    ax.set_yticks([])
    sample = f", a sample of {len(pick)} of {n}" if len(pick) < n else ""
    ax.set_title(f"{title}\n{how} of {len(pick)} embeddings{sample}; colour = "
                 f"{'group' if any(g is not None for g in groups) else 'article'}", fontsize=9)
    return _save(fig, out)


def image_rows(rows: Sequence[tuple[str, Sequence[str | Path]]], out: str | Path, title: str = "",
               per_row: int = 6) -> Path:
    """Photos side by side as a PNG: one row per ``(caption, paths)`` (at most ``per_row``
    photos each; the caption over the row's first photo); unreadable photos say so."""
    k = max([1] + [min(len(paths), per_row) for _, paths in rows])
    fig, axes = plt.subplots(len(rows), k, figsize=(1.9 * k, 2.1 * len(rows)), squeeze=False)
    for r, (caption, paths) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            if c >= min(len(paths), per_row):
                ax.axis("off")
                continue
            _thumb(ax, paths[c])
            ax.set_title(caption[:48] if c == 0 else "", fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    return _save(fig, out)


def rate_curves(fpr_grid: Sequence[float], curves: dict[str, Sequence[float]], out: str | Path, *, ylabel: str,
                title: str = "", points: dict[str, tuple[float, float]] | None = None,
                highlight: str | None = None) -> Path:
    """Curves of a rate against the false-accept rate (ROC, OSCR) as a PNG, one line per name;
    ``points``: a marked operating point ``(fpr, rate)`` per name; ``highlight``: drawn thicker.

    Args:
        fpr_grid: the false-accept rates ``[T]`` every curve is given at.
        curves: name -> rates ``[T]``.
    """
    fig, ax = plt.subplots(figsize=(6.4, 5))
    cmap = plt.get_cmap("tab10")
    for i, (name, ys) in enumerate(curves.items()):
        colour = cmap(i % 10)
        ax.plot(fpr_grid, ys, color=colour, lw=2.6 if name == highlight else 1.4, label=name)
        if points and name in points:
            x, y = points[name]
            ax.plot([x], [y], marker="o", ms=7, color=colour, markeredgecolor="black")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false-accept rate (absent-article photos accepted)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def score_histogram(edges: Sequence[float], known: Sequence[int], absent: Sequence[int], out: str | Path, *,
                    threshold: float | None = None, threshold_range: tuple[float, float] | None = None,
                    xlabel: str = "score", title: str = "") -> Path:
    """Histograms of the scores of known and absent photos (counts on shared bins ``edges``
    ``[B + 1]``, ``known`` / ``absent`` ``[B]``) as a PNG, each scaled to its own total, with the
    ``threshold`` as a line and ``threshold_range`` (e.g. its min and max over draws) shaded."""
    import numpy as np

    e = np.asarray(edges, float)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for counts, label, colour in ((known, "known articles", "#1a9850"), (absent, "absent articles", "#d73027")):
        c = np.asarray(counts, float)
        ax.stairs(c / max(c.sum(), 1.0), e, fill=True, alpha=0.45, color=colour, label=f"{label} ({int(c.sum())})")
    if threshold_range is not None:
        ax.axvspan(*threshold_range, color="grey", alpha=0.2, label="threshold range")
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=1.5, label=f"calibrated threshold {threshold:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of photos")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)
