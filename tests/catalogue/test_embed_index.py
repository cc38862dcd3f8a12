"""Backbones, cached embedding, the catalogue index: on real Grocery photos."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fewshot.backbones import Preprocess, create_backbone, list_backbones
from fewshot.data.loaders import load_dataset
from fewshot.embed import EmbeddingCache, embed_dataset, embed_paths
from fewshot.errors import BackboneError, CheckpointError, DataError, ImageReadError
from fewshot.catalogue import load_index, save_index
from fewshot.index import CatalogueIndex
from fewshot.metrics import retrieval_metrics


@pytest.fixture(scope="module")
def small(small_manifest):
    return load_dataset(small_manifest)


def test_registry_and_errors():
    assert {"efficientnet_lite0", "efficientnet_lite2"} <= set(list_backbones())
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        create_backbone("nope")
    with pytest.raises(BackboneError, match="optional package 'timm'") as exc:
        create_backbone("timm:resnet18")
    assert "pip install" in exc.value.hint


def test_preprocess_scales_to_minus_one_one():
    from PIL import Image

    img = Image.new("RGB", (300, 200), (255, 0, 128))
    x = Preprocess(image_size=32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)


def test_pretrained_weights_beat_random_weights(small, lite0_64, tmp_path):
    """The shipped ImageNet weights must be loaded: retrieval far above random init."""
    pre = embed_dataset(small, lite0_64, cache_dir=tmp_path, progress=False)
    rnd = embed_dataset(small, create_backbone("efficientnet_lite0", pretrained=False, image_size=64),
                        cache_dir=tmp_path, progress=False)
    assert pre.vectors.shape == (60, 1280) and pre.vectors.dtype == np.float32
    p = retrieval_metrics(pre.vectors, pre.labels)
    r = retrieval_metrics(rnd.vectors, rnd.labels)
    assert p.precision_at_1 >= 0.8
    assert p.map > r.map + 0.1


def test_cache_second_run_embeds_nothing(small, lite0_64, tmp_path, monkeypatch):
    first = embed_dataset(small, lite0_64, cache_dir=tmp_path, progress=False)
    assert first.num_cached == 0
    store = tmp_path / lite0_64.cache_key
    assert (store / "manifest.json").is_file() and len(EmbeddingCache(tmp_path, lite0_64.cache_key)) == 60

    def boom(*a, **k):
        raise AssertionError("the backbone must not run on a cached dataset")

    monkeypatch.setattr(lite0_64.model, "forward", boom)
    second = embed_dataset(small, lite0_64, cache_dir=tmp_path, progress=False)
    assert second.num_cached == 60
    np.testing.assert_array_equal(first.vectors, second.vectors)
    assert not list(tmp_path.glob("*.tmp")), "no temporary file may be left behind"


def test_cache_keyed_by_content_not_path(small, lite0_64, tmp_path):
    src = small.records[0].path
    copy = tmp_path / "renamed.jpg"
    shutil.copyfile(src, copy)
    cache = tmp_path / "cache"
    v1, ok1, _, c1 = embed_paths([src], lite0_64, cache_dir=cache, progress=False)
    v2, ok2, _, c2 = embed_paths([copy], lite0_64, cache_dir=cache, progress=False)
    assert (c1, c2) == (0, 1)
    np.testing.assert_array_equal(v1, v2)


def test_damaged_cache_is_rebuilt(small, lite0_64, tmp_path, caplog):
    (tmp_path / f"{lite0_64.cache_key}.npz").write_bytes(b"not a zip file")
    emb = embed_dataset(small.subset(range(3)), lite0_64, cache_dir=tmp_path, progress=False)
    assert emb.num_cached == 0 and len(emb.vectors) == 3
    assert "unreadable" in caplog.text
    assert len(EmbeddingCache(tmp_path, lite0_64.cache_key)) == 3
    assert not (tmp_path / f"{lite0_64.cache_key}.npz").exists()  # the damaged old file is gone: no warning next time


def _with_bad_files(small, tmp_path):
    from dataclasses import replace

    good = small.records[0]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    data = good.path.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad = [replace(good, path=tmp_path / n) for n in ("zero.jpg", "text.jpg", "truncated.jpg", "missing.jpg")]
    return replace(small, records=list(small.records[:5]) + bad)


def test_bad_images_skipped_with_warning_and_count(small, lite0_64, tmp_path, caplog):
    ds = _with_bad_files(small, tmp_path)
    emb = embed_dataset(ds, lite0_64, cache_dir=tmp_path / "c", progress=False)
    assert len(emb.vectors) == 5 and len(emb.dataset) == 5
    reasons = {p.name: r for p, r in emb.skipped}
    assert reasons["zero.jpg"] == "zero-byte file"
    assert reasons["missing.jpg"] == "file not found"
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "skipped 4 of 9 images" in caplog.text
    assert "zero.jpg" in caplog.text


def test_strict_turns_skips_into_an_error(small, lite0_64, tmp_path):
    ds = _with_bad_files(small, tmp_path)
    with pytest.raises(ImageReadError, match=r"zero.jpg: zero-byte file \(4 unreadable image\(s\) in all\)"):
        embed_dataset(ds, lite0_64, cache_dir=tmp_path / "c", strict=True, progress=False)


# --------------------------------------------------------------------------- index
def _toy_index() -> CatalogueIndex:
    v = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.8, 0.6], [0, 0, 1]], np.float32)
    return CatalogueIndex.build(v, ["a", "a", "b", "b", "c"], ["g1", "g1", "g2", "g2", None],
                                [f"img{i}.jpg" for i in range(5)], {"backbone": "toy"})


def test_index_prototype_and_nearest_scores_by_hand():
    idx = _toy_index()
    q = np.array([[0, 0.6, 0.8]], np.float32)
    # prototypes: a = norm(e1 + norm(0.9,0.1,0)); b = norm((0,1,0) + (0,0.8,0.6)) = (0, 1.8, 0.6)/|.|; c = e3
    b = np.array([0, 1.8, 0.6]) / np.linalg.norm([0, 1.8, 0.6])
    proto = idx.classify(q, top_k=3, mode="prototype")[0]
    assert [p.label for p in proto] == ["b", "c", "a"]
    assert proto[0].score == pytest.approx(float(b @ [0, 0.6, 0.8]), abs=1e-6)
    assert proto[0].group == "g2"
    near = idx.classify(q, top_k=3, mode="nearest")[0]
    # nearest image of b is (0, .8, .6): cos = .48 + .48 = .96; c: .8; a: (0.9,0.1,0)/|.| -> 0.066
    assert [p.label for p in near] == ["b", "c", "a"]
    assert near[0].score == pytest.approx(0.96, abs=1e-6)
    assert near[1].score == pytest.approx(0.8, abs=1e-6)
    hits = idx.search(q, k=2)[0]
    assert [h.path for h in hits] == ["img3.jpg", "img4.jpg"]


def test_index_add_remove_and_round_trip(tmp_path):
    idx = _toy_index()
    idx.add_article("d", "g3", np.array([[1, 1, 1]], np.float32), ["new.jpg"])
    assert idx.classify(np.array([[1, 1, 1]], np.float32), top_k=1)[0][0].label == "d"
    assert idx.remove_article("a") == 2
    with pytest.raises(KeyError):
        idx.remove_article("zzz")
    save_index(idx, tmp_path / "idx")
    back = load_index(tmp_path / "idx")
    # the last article takes the removed one's prototype row (swap-remove: one row written)
    assert back.labels == ["b", "b", "c", "d"] and back.articles == ["d", "b", "c"]
    np.testing.assert_allclose(back.image_vectors(), idx.image_vectors())
    assert back.config == {"backbone": "toy"}
    # overwriting keeps a complete folder and leaves no temporary folder behind
    save_index(back, tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_index_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_index(tmp_path / "nope")
    def damaged_then_missing(folder, name):  # a garbage file is "damaged", a missing one named
        (folder / name).write_bytes(b"garbage")
        with pytest.raises(CheckpointError, match="damaged"):
            load_index(folder)
        (folder / name).unlink()
        with pytest.raises(CheckpointError, match=f"{name} is missing"):
            load_index(folder)

    idx = _toy_index()
    damaged_then_missing(save_index(idx, tmp_path / "idx"), "vectors.npy")
    from fewshot.index import AnnConfig

    hnsw = CatalogueIndex.build(idx.image_vectors(), idx.labels, idx.groups, idx.paths, ann_config=AnnConfig("hnsw"))
    damaged_then_missing(save_index(hnsw, tmp_path / "hnsw"), "images.faiss")
    for name in ("vectors.npy", "prototype_sums.npy"):  # read on demand: a cut file is refused at load
        folder = save_index(hnsw, tmp_path / f"cut-{name}")
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:-7])
        with pytest.raises(CheckpointError, match=f"damaged: .*{name} is truncated"):
            load_index(folder)
    with pytest.raises(CheckpointError, match="dimension 2"):
        idx.classify(np.zeros((1, 2), np.float32))
    with pytest.raises(DataError, match="empty catalogue"):
        CatalogueIndex.build(np.zeros((0, 3), np.float32), [], [], [])


def test_index_save_crash_keeps_old_index(tmp_path, monkeypatch):
    idx = _toy_index()
    save_index(idx, tmp_path / "idx")
    idx.add_article("d", None, np.ones((1, 3), np.float32), ["d.jpg"])

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array_header_1_0", crash)
    with pytest.raises(OSError):
        save_index(idx, tmp_path / "idx")
    monkeypatch.undo()
    back = load_index(tmp_path / "idx")
    assert back.articles == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_index_recovered_after_crash_between_renames(tmp_path):
    import os

    idx = _toy_index()
    save_index(idx, tmp_path / "idx")
    os.replace(tmp_path / "idx", tmp_path / ".idx.old-12345")  # the state a crash would leave
    back = load_index(tmp_path / "idx")
    assert back.articles == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_index_searches_batches_on_the_blas_path_with_the_same_answers(monkeypatch):
    import faiss

    from fewshot.index import BLAS_MIN_QUERIES, CatalogueIndex

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 64)).astype(np.float32)
    labels = [f"a{i // 3}" for i in range(600)]
    index = CatalogueIndex.build(x, labels, [None] * 600, [f"p{i}" for i in range(600)])
    q = rng.standard_normal((8, 64)).astype(np.float32)

    seen = []
    real = faiss.knn

    def spy(queries, base, k, **kw):  # records the threshold FAISS sees during the search
        seen.append((len(queries), faiss.cvar.distance_compute_blas_threshold))
        return real(queries, base, k, **kw)

    before = faiss.cvar.distance_compute_blas_threshold
    monkeypatch.setattr(faiss, "knn", spy)
    batch = index.classify(q, top_k=3)
    single = [index.classify(q[i:i + 1], top_k=3)[0] for i in range(len(q))]
    assert faiss.cvar.distance_compute_blas_threshold == before  # restored
    assert seen[0] == (8, BLAS_MIN_QUERIES * 64) and 8 * 64 >= seen[0][1]  # BLAS for the batch
    assert seen[1] == (1, BLAS_MIN_QUERIES * 64) and 1 * 64 < seen[1][1]  # SIMD loop for one query
    # both paths give numpy's ranking of the normalised prototypes
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # prototype = mean of normalised images
    protos = np.stack([xn[i:i + 3].sum(0) for i in range(0, 600, 3)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    expected = [[f"a{j}" for j in np.argsort(-(qn[i] @ protos.T))[:3]] for i in range(len(q))]
    assert [[p.label for p in r] for r in batch] == expected
    assert [[p.label for p in r] for r in single] == expected


def test_nearest_mode_matches_brute_force_best_image_per_article():
    from fewshot.index import CatalogueIndex

    rng = np.random.default_rng(1)
    n, d = 900, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    art = rng.integers(1, 60, size=n)  # uneven articles, images of one article scattered
    q = rng.standard_normal((7, d)).astype(np.float32)
    art[:300] = 0  # 300 images of article a0 around query 0: its first 100 neighbours are all a0
    x[:300] = q[0] + 0.1 * rng.standard_normal((300, d)).astype(np.float32)
    index = CatalogueIndex.build(x, [f"a{a}" for a in art], [f"g{a % 3}" for a in art],
                                 [f"p{i}" for i in range(n)])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    for top_k in (1, 5, 40):  # query 0 at top_k 5 asks 100 images, all a0: the search widens to 400
        got = index.classify(q, top_k=top_k, mode="nearest")
        for i, preds in enumerate(got):
            sims = xn @ qn[i]
            best = {}
            for j in np.argsort(-sims, kind="stable"):
                best.setdefault(int(art[j]), float(sims[j]))
            expected = sorted(best.items(), key=lambda kv: -kv[1])[:top_k]
            assert [p.label for p in preds] == [f"a{a}" for a, _ in expected]
            assert [p.group for p in preds] == [f"g{a % 3}" for a, _ in expected]
            np.testing.assert_allclose([p.score for p in preds], [s for _, s in expected], atol=1e-5)


def test_preprocess_is_bit_identical_to_the_plain_float32_formula():
    """The fast channels-first path gives exactly ``(x / 255 - mean) / std`` in float32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for pre in (Preprocess(image_size=32), Preprocess(image_size=32, mean=(0.485, 0.456, 0.406),
                                                      std=(0.229, 0.224, 0.225))):
        plain = np.array(img.resize((32, 32), Image.BILINEAR), dtype=np.float32)
        plain = (plain / np.float32(255.0) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        got = pre(img)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert np.array_equal(got.numpy(), plain.transpose(2, 0, 1))
