"""Large-catalogue index: ivfpq / hnsw types, the sharded IVF build, tombstones, and enrolment
that touches only its article (journal entries instead of folder rewrites)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from fewshot.cli.common import show_flags
from fewshot.errors import CheckpointError, DataError
from fewshot.catalogue.journal import Change, Journal
from fewshot.catalogue.store import append_change, load_index, save_index
from fewshot.index import AnnConfig, CatalogueIndex
from fewshot.index import ann
from fewshot.index.kinds import base as kinds_base


def clustered(n_articles: int, per: int, dim: int = 32, noise: float = 0.35, seed: int = 0):
    """``per`` noisy views of ``n_articles`` random unit centres, plus one fresh query each."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_articles, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per, axis=0) + noise / np.sqrt(dim) * rng.standard_normal((n_articles * per, dim)).astype(np.float32)
    q = centres + noise / np.sqrt(dim) * rng.standard_normal(centres.shape).astype(np.float32)
    labels = [f"a{i // per}" for i in range(len(x))]
    return x, labels, q


def build(kind: str, x, labels, **kw) -> CatalogueIndex:
    return CatalogueIndex.build(x, labels, [None] * len(x), [f"p{i}.jpg" for i in range(len(x))],
                                digests=[f"d{i}" for i in range(len(x))], ann_config=AnnConfig(kind, **kw))


@pytest.fixture(scope="module")
def data():
    return clustered(600, 5)  # 3,000 images of 600 articles


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_indexes_save_load_and_classify_like_flat(tmp_path, data, kind):
    x, labels, q = data
    flat, approx = build("flat", x, labels), build(kind, x, labels)
    assert approx.ann.kind == kind and approx.image_index.ntotal == len(x)
    exact = [r[0].label for r in flat.classify(q, top_k=1, mode="nearest")]
    got = [r[0].label for r in approx.classify(q, top_k=1, mode="nearest")]
    truth = [f"a{i}" for i in range(len(q))]
    assert np.mean(np.array(exact) == truth) > 0.97
    assert np.mean(np.array(got) == np.array(exact)) >= 0.97
    # ivfpq re-ranks its shortlist with the exact vectors: the scores are exact cosines
    s_flat = [r[0].score for r in flat.search(q, k=1)]
    s_approx = [r[0].score for r in approx.search(q, k=1)]
    agree = np.array([a[0].path == b[0].path for a, b in zip(flat.search(q, 1), approx.search(q, 1))])
    assert agree.mean() > 0.95
    np.testing.assert_allclose(np.array(s_approx)[agree], np.array(s_flat)[agree], atol=1e-5)
    save_index(approx, tmp_path / kind)
    back = load_index(tmp_path / kind)
    assert back.ann == approx.ann and (tmp_path / kind / "images.faiss").is_file()
    assert [r[0].label for r in back.classify(q, top_k=1, mode="nearest")] == got
    assert [r[0].label for r in back.classify(q, top_k=1)] == [r[0].label for r in flat.classify(q, top_k=1)]


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_prototype_search_matches_the_exact_scan(tmp_path, data, kind):
    """An approximate index keeps its prototypes on disk and ranks the articles of its nearest
    images by their exact prototype cosine: nearly always the flat scan's best article, most
    of its top 5 (ivfpq's probed lists miss some far articles), and every score exact; also
    after a reload."""
    from fewshot.index.vectors import OnDemandPrototypes, RowFile

    x, labels, q = data
    flat = build("flat", x, labels)
    approx = build(kind, x, labels)
    save_index(approx, tmp_path / kind)
    back = load_index(tmp_path / kind)
    assert isinstance(back._protos, OnDemandPrototypes) and isinstance(back._protos.base, RowFile)
    assert back._protos._changed == {}  # nothing but the counts in memory
    exact = flat.classify(q, top_k=5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cosine = qn @ flat.prototypes.T  # [Q, C], articles in flat.articles order
    row = {a: i for i, a in enumerate(flat.articles)}
    for index in (approx, back):
        got = index.classify(q, top_k=5)
        assert np.mean([a[0].label == b[0].label for a, b in zip(exact, got)]) >= 0.97
        overlap = np.mean([len({p.label for p in a} & {p.label for p in b}) / 5 for a, b in zip(exact, got)])
        assert overlap >= (0.9 if kind == "ivfpq" else 0.99)
        for i, preds in enumerate(got):
            assert len(preds) == 5
            np.testing.assert_allclose([p.score for p in preds], cosine[i, [row[p.label] for p in preds]], atol=1e-5)
            assert [p.score for p in preds] == sorted((p.score for p in preds), reverse=True)
    np.testing.assert_allclose(back.prototypes, flat.prototypes, atol=1e-6)
    # one query at a time gives what the batch gives
    assert [r[0].label for r in back.classify(q[:20], top_k=1)] == [back.classify(v, top_k=1)[0][0].label for v in q[:20]]


def test_approximate_indexes_classify_real_grocery_photos_like_flat(grocery_root, tmp_path):
    """The main job (Grocery train photos as the catalogue, test photos classified by
    prototype) gives the same top-1 and top-5 answers with ivfpq and hnsw as with flat."""
    from fewshot.backbones import create_backbone
    from fewshot.data.loaders import load_dataset
    from fewshot.embed import embed_dataset

    backbone = create_backbone("efficientnet_lite0")
    cache = tmp_path / "cache"
    train = embed_dataset(load_dataset(grocery_root, split="train"), backbone, cache_dir=cache, progress=False)
    test = embed_dataset(load_dataset(grocery_root, split="test"), backbone, cache_dir=cache, progress=False)
    paths = [str(p) for p in train.dataset.paths]
    answers = {}
    for kind in ("flat", "ivfpq", "hnsw"):
        index = CatalogueIndex.build(train.vectors, list(train.labels), list(train.groups), paths,
                                     ann_config=AnnConfig(kind))
        answers[kind] = [[p.label for p in row] for row in index.classify(test.vectors, top_k=5)]
    truth = list(test.labels)
    top1 = np.mean([row[0] == t for row, t in zip(answers["flat"], truth)])
    assert round(float(top1), 4) == 0.5988  # the README's main job
    top5 = {k: np.mean([t in row for row, t in zip(rows, truth)]) for k, rows in answers.items()}
    assert round(float(top5["flat"]), 4) == 0.9151
    for kind in ("ivfpq", "hnsw"):
        assert [r[0] for r in answers[kind]] == [r[0] for r in answers["flat"]], kind
        assert top5[kind] == top5["flat"], kind
        overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(answers[kind], answers["flat"])])
        assert overlap >= 0.99, kind


def test_row_file_reads_rows_in_any_order_like_the_array(tmp_path):
    """RowFile sorts the rows it is asked for into file order itself (its callers do not)."""
    from fewshot.index.vectors import RowFile

    a = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    rows = RowFile(tmp_path / "a.npy")
    for idx in ([3, 1, 2, 2, 49, 0, 10, 11, 12], [], [7], slice(5, 9)):
        np.testing.assert_array_equal(rows[idx], a[idx])


def test_on_demand_prototypes_follow_every_change_like_the_in_memory_ones():
    """The same add / update / swap-remove sequence on both prototype stores gives the same rows."""
    from fewshot.index.vectors import OnDemandPrototypes, Prototypes

    rng = np.random.default_rng(3)
    sums = rng.standard_normal((6, 8)).astype(np.float32)
    counts = np.arange(1, 7)
    mem, disk = Prototypes(8), OnDemandPrototypes(sums.copy(), counts)
    mem.extend(sums, counts)
    new, delta = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    for store in (mem, disk):
        store.append(new, 2)
        store.update(1, delta, 3)
        store.swap_remove(0)   # row 6 (the new one) moves to 0
        store.swap_remove(5)   # the last row is removed itself
    assert len(mem) == len(disk) == 5
    np.testing.assert_array_equal(disk.counts.view, mem.counts.view)
    np.testing.assert_allclose(disk.sums(0, 5), mem.sums(0, 5), atol=1e-5)
    np.testing.assert_allclose(disk.normed_rows(np.arange(5)), mem.normed_rows(np.arange(5)), atol=1e-6)
    np.testing.assert_allclose(disk.sum_of(0), new, atol=1e-6)
    np.testing.assert_allclose(disk.sum_of(1), sums[1] + delta, atol=1e-5)
    assert np.array_equal(disk.base, sums)  # the saved rows are never written


def test_recall_grows_with_nprobe(data):
    x, labels, q = data
    index = build("ivfpq", x, labels, rerank=0)
    flat = build("flat", x, labels)
    truth = np.array([[n.path for n in r] for r in flat.search(q, 10)])

    def recall(nprobe: int) -> float:
        got = [[n.path for n in r] for r in index.with_search(nprobe=nprobe).search(q, 10)]
        return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)]))

    low, high = recall(1), recall(index.ann.options.nlist)
    assert low < high and high > 0.6


def test_sharded_ivf_build_equals_one_pass(data, monkeypatch):
    x, labels, _ = data
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    config = ann.resolve(AnnConfig("ivfpq"), len(x), x.shape[1])
    monkeypatch.setattr(kinds_base, "SHARD_ROWS", 700)  # 5 shards, built independently, then merged
    sharded = ann.build(config, xn)
    one = config.index_kind.create(x.shape[1], lambda rows: xn[rows], len(x))  # one unsharded index
    one.add(xn)
    assert sharded.ntotal == one.ntotal == len(x)
    qs = xn[::37]
    params = faiss.SearchParametersIVF(nprobe=8)
    d1, i1 = ann._raw_search(sharded, qs, 5, params)
    d2, i2 = ann._raw_search(one, qs, 5, params)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)


def test_index_type_choices_and_errors():
    assert ann.resolve(AnnConfig("auto"), 10_000, 64).kind == "flat"
    assert ann.resolve(AnnConfig("auto"), ann.AUTO_FLAT_MAX, 1280).kind == "ivfpq"
    big = ann.resolve(AnnConfig("ivfpq"), 1_000_000, 1280)
    assert (big.options.nlist, big.options.m) == (1024, 64) and 1280 % big.options.m == 0
    with pytest.raises(DataError, match="at least 1,000"):
        ann.resolve(AnnConfig("ivfpq"), 500, 64)
    with pytest.raises(DataError, match="unknown index type"):
        ann.resolve(AnnConfig("annoy"), 500, 64)
    # library errors name the option (and list it in .options); the CLI shows its flag (show_flags)
    with pytest.raises(DataError, match="option m = 7 does not divide the embedding dimension 64") as err:
        ann.resolve(AnnConfig("ivfpq", m=7), 5000, 64)
    assert "m = 8 / 16 / 32 / 64" in err.value.hint and "--" not in str(err.value) and err.value.options == ("m",)
    shown = show_flags(err.value, {"m": "--pq-m"})
    assert shown.message.startswith("--pq-m 7 does not divide the embedding dimension 64")
    assert "--pq-m 8 / 16 / 32 / 64" in shown.hint
    with pytest.raises(DataError, match="option nlist = 5000 is too many cells for 5,000 images") as err:
        ann.resolve(AnnConfig("ivfpq", nlist=5000), 5000, 64)
    assert "nlist = 128 or fewer" in err.value.hint and "--" not in str(err.value)
    assert "--nlist 128 or fewer" in show_flags(err.value).hint


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_removed_images_are_tombstones_never_returned(tmp_path, data, kind):
    x, labels, q = data
    index = build(kind, x, labels)
    assert index.search(q[:1], 1)[0][0].label == "a0"
    assert index.remove_article("a0") == 5
    assert index.num_tombstones == 5 and len(index) == len(x) - 5
    hits = index.search(q[:1], 50)[0]
    assert hits and all(h.label != "a0" for h in hits)
    assert all(p.label != "a0" for p in index.classify(q[:1], top_k=5, mode="nearest")[0])
    assert all(p.label != "a0" for p in index.classify(q[:1], top_k=5)[0])
    # a new article after the removal gets fresh ids and is found
    index.add_article("new", None, q[:1] * 3, ["new.jpg"], ["dn"])
    assert index.search(q[:1], 1)[0][0].label == "new"
    save_index(index, tmp_path / "i")
    back = load_index(tmp_path / "i")
    assert back.search(q[:1], 1)[0][0].label == "new" and len(back) == len(x) - 4
    assert all(h.label != "a0" for h in back.search(q[:1], 50)[0])
    # ivfpq and flat drop their tombstones at compaction; FAISS cannot remove from an HNSW graph
    assert back.num_tombstones == (5 if kind == "hnsw" else 0)
    assert back.find_images(["dn", "d7", "d0"]) == [[len(back) - 1], [2], []]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_enrol_and_delete_touch_only_the_article(tmp_path):
    """On a 20,000-image index an enrolment writes one journal entry holding its own 5 rows and
    changes one prototype row; the base files are not rewritten."""
    x, labels, q = clustered(4000, 5, dim=64, seed=1)
    index = build("ivfpq", x, labels)
    folder = save_index(index, tmp_path / "idx")
    base = {p.name: _digest(p) for p in folder.iterdir() if p.is_file()}
    protos = index.prototypes.copy()

    new = clustered(1, 5, dim=64, seed=9)[0]
    entry = append_change(index, folder, Change("add", "fresh", "g", new, [f"f{i}.jpg" for i in range(5)], [None] * 5))
    with np.load(entry) as z:
        assert z["vectors"].shape == (5, 64)  # the rows written: the article's own
    assert {p.name: _digest(p) for p in folder.iterdir() if p.is_file()} == base
    after = index.prototypes
    assert after.shape[0] == protos.shape[0] + 1
    np.testing.assert_array_equal(after[:-1], protos)  # no other article's prototype changed

    # more photos of an existing article: one prototype row changes
    extra = clustered(1, 2, dim=64, seed=10)[0]
    more = append_change(index, folder, Change("add", "a3", None, extra, ["m0.jpg", "m1.jpg"], [None, None]))
    changed = np.flatnonzero(np.any(index.prototypes[:-1] != protos, axis=1))
    assert changed.tolist() == [3] and np.load(more)["vectors"].shape == (2, 64)

    before = index.prototypes.copy()
    gone = append_change(index, folder, Change("remove", "a10"))
    assert np.load(gone)["vectors"].size == 0
    changed = np.flatnonzero(np.any(index.prototypes != before[:-1], axis=1))
    assert changed.tolist() == [10]  # the last article moved into the removed one's row
    assert {p.name: _digest(p) for p in folder.iterdir() if p.is_file()} == base
    assert len(Journal(folder)) == 3

    back = load_index(folder)  # base + journal replay
    assert back.labels == index.labels and back.articles == index.articles
    np.testing.assert_allclose(back.prototypes, index.prototypes, atol=1e-6)
    assert back.search(new[:1], 1)[0][0].label == "fresh"


def test_a_crash_mid_append_loses_no_acknowledged_change(tmp_path, data, monkeypatch):
    x, labels, q = data
    index = build("flat", x, labels)
    folder = save_index(index, tmp_path / "idx")
    append_change(index, folder, Change("add", "kept", None, q[:1], ["k.jpg"], [None]))  # acknowledged

    real = os.link

    def crash(src, dst):
        if str(dst).endswith(".npz"):
            raise OSError(5, "Input/output error")  # the machine dies before the entry is published
        return real(src, dst)

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError):
        append_change(index, folder, Change("add", "lost", None, q[1:2], ["l.jpg"], [None]))
    monkeypatch.undo()
    assert "lost" not in index.articles  # not applied in memory either
    back = load_index(folder)
    assert "kept" in back.articles and "lost" not in back.articles
    assert len(back) == len(x) + 1
    # a damaged entry is a clear error naming the file, never a silent skip
    Journal(folder).sequence()[-1][1].write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="journal entry .*0000000001.npz is damaged: it is not the .npz") as err:
        load_index(folder)
    assert "pickle" not in str(err.value)  # numpy's wording about pickled data would mislead


def test_save_compacts_the_journal(tmp_path, data):
    x, labels, q = data
    index = build("flat", x, labels)
    folder = save_index(index, tmp_path / "idx")
    append_change(index, folder, Change("add", "n", None, q[:2], ["n0.jpg", "n1.jpg"], [None, None]))
    save_index(index, folder)
    assert not (folder / "journal").exists()
    back = load_index(folder)
    assert back.num_images("n") == 2 and len(back) == len(x) + 2


def test_format_1_folders_still_load(tmp_path, data):
    import json

    x, labels, q = data
    index = build("flat", x[:50], labels[:50])
    old = tmp_path / "v1"
    old.mkdir()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(index.image_vectors())
    faiss.write_index(flat, str(old / "images.faiss"))
    faiss.write_index(flat, str(old / "prototypes.faiss"))
    meta = {"format_version": 1, "fewshot_version": "0.1.0", "dim": x.shape[1], "config": {},
            "labels": labels[:50], "groups": [None] * 50, "paths": [f"p{i}.jpg" for i in range(50)]}
    (old / "meta.json").write_text(json.dumps(meta))
    back = load_index(old)
    assert back.ann.kind == "flat" and back.digests == [None] * 50
    assert [r[0].label for r in back.classify(q[:10])] == [r[0].label for r in index.classify(q[:10])]


def test_an_absolute_enrolled_path_of_an_old_folder_becomes_relative_in_a_new_one(tmp_path, data):
    """An index folder of before 2026-12 stored an enrolled photo as an absolute path under its
    own ``enrolled/``: saved elsewhere, the photo is carried and referenced as ``enrolled/...``."""
    from fewshot.catalogue.store import ENROLLED_DIR

    x, labels, _ = data
    old = save_index(build("flat", x[:10], labels[:10]), tmp_path / "old")
    photo = (tmp_path / "old" / ENROLLED_DIR / "a" / "p.jpg").resolve()
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"jpeg bytes")
    index = load_index(old)
    index.paths[3] = str(photo)
    save_index(index, tmp_path / "new")
    again = load_index(tmp_path / "new")
    assert again.paths[3] == f"{ENROLLED_DIR}/a/p.jpg" and again.paths[4] == "p4.jpg"
    assert (tmp_path / "new" / again.paths[3]).read_bytes() == b"jpeg bytes" and photo.is_file()
