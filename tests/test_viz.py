"""The embedding map: a 2-D projection that keeps clusters apart, drawn as a PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fewshot.viz import MAP_MAX_POINTS, embedding_map, project_2d


def _clusters(n_per: int, k: int = 4, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    return x, [f"a{i}" for i in range(k) for _ in range(n_per)]


def test_projection_keeps_separated_clusters_apart():
    x, labels = _clusters(40)
    for method in ("tsne", "pca"):
        xy, how = project_2d(x, seed=0, method=method)
        assert xy.shape == (160, 2) and how == {"tsne": "t-SNE", "pca": "PCA"}[method]
        d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        nearest = d.argmin(1)
        purity = np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)])
        assert purity >= 0.95, (method, purity)


def test_embedding_map_png_samples_large_sets(tmp_path):
    x, labels = _clusters(MAP_MAX_POINTS // 2 + 10)  # 4 x 760 = 3,040 points: sampled to 1,500
    groups = [lab[:1] + str(int(lab[1]) % 2) for lab in labels]
    out = embedding_map(x, labels, groups, tmp_path / "map.png", title="test", names=3)
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] >= 500
    assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # dots in colours, not blank
