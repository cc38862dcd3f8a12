"""Every registered index kind builds, saves, loads, enrols and classifies; a new kind is one file
(docs/ARCHITECTURE.md, "How to add an index kind"); indexes written before index kinds had their
own options still load."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import textwrap

import numpy as np
import pytest

from fewshot.errors import DataError, InputError
from fewshot.catalogue.journal import Change
from fewshot.catalogue.store import append_change, load_index, save_index
from fewshot.index import AnnConfig, CatalogueIndex, ann
from fewshot.index.kinds import INDEX_KINDS, get_kind, list_kinds

DIM = 32


def clustered(n_articles: int, per: int, noise: float = 0.25, seed: int = 0):
    """``per`` noisy views of ``n_articles`` random unit centres, plus one fresh query each."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_articles, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per, axis=0) + noise / np.sqrt(DIM) * rng.standard_normal((n_articles * per, DIM)).astype(np.float32)
    q = centres + noise / np.sqrt(DIM) * rng.standard_normal(centres.shape).astype(np.float32)
    return x, [f"a{i // per}" for i in range(len(x))], q


@pytest.fixture(scope="module")
def data():
    return clustered(300, 4)  # 1,200 images: enough for IVF-PQ's quantizers


def build(kind: str, x, labels) -> CatalogueIndex:
    return CatalogueIndex.build(x, labels, [f"g{lab[1:3]}" for lab in labels], [f"p{i}.jpg" for i in range(len(x))],
                                digests=[f"d{i}" for i in range(len(x))], ann_config=AnnConfig(kind))


@pytest.fixture(scope="module")
def flat_answers(data):
    x, labels, q = data
    flat = build("flat", x, labels)
    return ([r[0].label for r in flat.classify(q, top_k=1)], [r[0].label for r in flat.classify(q, 1, "nearest")],
            [r[0].path for r in flat.search(q, 1)])


def exercise(kind: str, data, flat_answers, tmp_path) -> CatalogueIndex:
    """Build, compare with flat, save, load, enrol, journal, reload: what every kind must do."""
    x, labels, q = data
    index = build(kind, x, labels)
    assert index.ann.kind == kind and index.image_index.ntotal == len(x)
    truth = [f"a{i}" for i in range(len(q))]
    protos, nearest, paths = flat_answers
    assert protos == truth  # an easy set: flat is always right ...
    got = [r[0].label for r in index.classify(q, top_k=1)]
    assert got == protos, kind  # ... and every kind agrees with it
    assert np.mean(np.array([r[0].label for r in index.classify(q, 1, "nearest")]) == nearest) >= 0.99
    assert np.mean(np.array([r[0].path for r in index.search(q, 1)]) == paths) >= 0.97

    folder = save_index(index, tmp_path / kind)
    back = load_index(folder)
    assert back.ann == index.ann and json.loads((folder / "meta.json").read_text())["index"]["kind"] == kind
    assert [r[0].label for r in back.classify(q, top_k=1)] == got

    rng = np.random.default_rng(7)  # a new article far from the others: its own photos find it
    centre = rng.standard_normal(DIM).astype(np.float32)
    new = centre + 0.05 * rng.standard_normal((5, DIM)).astype(np.float32)
    back.add_article("new", "gnew", new[:3], ["n0.jpg", "n1.jpg", "n2.jpg"])
    append_change(back, folder, Change("add", "new", "gnew", new[3:], ["n3.jpg", "n4.jpg"], [None, None]))
    assert back.num_images("new") == 5 and len(back) == len(x) + 5
    for row in back.classify(new, top_k=2):
        assert row[0].label == "new" and row[0].score > 0.95 and row[0].group == "gnew" and row[1].score < 0.8
    assert {n[0].path for n in back.search(new, 1)} <= {f"n{i}.jpg" for i in range(5)}
    assert back.remove_article("a0") == 4 and back.num_tombstones == 4
    assert all(n.label != "a0" for row in back.search(q[:1], 20) for n in row)  # tombstones are never returned
    save_index(back, folder)
    again = load_index(folder)
    assert again.classify(new[:1], top_k=1)[0][0].label == "new" and not again.has_article("a0")
    assert [r[0].label for r in again.classify(q[1:], top_k=1)] == protos[1:]
    return again


@pytest.mark.parametrize("kind", list_kinds())
def test_every_kind_builds_saves_loads_enrols_and_classifies(kind, data, flat_answers, tmp_path):
    again = exercise(kind, data, flat_answers, tmp_path)
    assert again.ann.index_kind.saves_index == (tmp_path / kind / "images.faiss").is_file()


def test_approximate_kinds_search_with_their_query_time_options(data, caplog):
    x, labels, _ = data
    for kind in list_kinds():
        index = build(kind, x, labels)
        for name in get_kind(kind).search_options:
            value = 3 if getattr(index.ann.options, name) != 3 else 4
            assert getattr(index.with_search(**{name: value}).ann.options, name) == value
            with pytest.raises(ValueError, match=f"option {name} = 0"):
                index.with_search(**{name: 0})
        others = {n for k in list_kinds() if k != kind for n in get_kind(k).search_options} - set(get_kind(kind).search_options)
        before = index.ann
        with caplog.at_level(logging.WARNING, logger="fewshot"):
            for name in sorted(others):
                caplog.clear()
                index.with_search(**{name: 5})
                assert f"{name} applies to" in caplog.text and f"this one is {kind}, so it is ignored" in caplog.text
        assert index.ann == before
    with pytest.raises(InputError, match="not a query-time index option"):
        index.with_search(rerank=2)


def test_option_errors_name_the_option_and_the_kind():
    with pytest.raises(InputError, match="nlist is not an option of index kind 'flat'") as err:
        AnnConfig("flat", nlist=64)
    assert err.value.hint == "its options: none"
    with pytest.raises(InputError, match="option ef_search = 0: index kind 'hnsw' needs at least 1"):
        AnnConfig("hnsw", ef_search=0)
    with pytest.raises(InputError, match="unknown index option bogus"):
        AnnConfig("auto", bogus=1)
    with pytest.raises(DataError, match="unknown index type 'annoy'") as err:
        AnnConfig("annoy")
    assert "flat, hnsw, ivfpq" in err.value.hint and "auto" in err.value.hint
    assert ann.INDEX_TYPES == ("auto", *list_kinds())
    # auto takes any kind's options; the chosen kind keeps its own
    chosen = ann.resolve(AnnConfig("auto", nlist=8, ef_search=16), 5000, DIM)
    assert chosen == AnnConfig("flat") and ann.resolve(chosen, 5000, DIM) == chosen
    big = ann.resolve(AnnConfig("auto", nlist=64, ef_search=16), ann.AUTO_FLAT_MAX, DIM)
    assert big.kind == "ivfpq" and big.options.nlist == 64 and ann.resolve(big, ann.AUTO_FLAT_MAX, DIM) == big


#: ``meta.json``'s ``index`` as fewshot wrote it before each kind had its own options: every
#: kind's parameters (as in the README's main job indexes; ivfpq resolved for 1,200 images)
OLD_FORMAT = {
    "flat": {"kind": "flat", "nlist": None, "m": None, "train_size": None, "nprobe": None, "rerank": 4,
             "hnsw_m": 32, "ef_construction": 40, "ef_search": 64, "seed": 0},
    "ivfpq": {"kind": "ivfpq", "nlist": 30, "m": 32, "train_size": 1200, "nprobe": 16, "rerank": 4,
              "hnsw_m": 32, "ef_construction": 40, "ef_search": 64, "seed": 0},
    "hnsw": {"kind": "hnsw", "nlist": None, "m": None, "train_size": None, "nprobe": None, "rerank": 4,
             "hnsw_m": 32, "ef_construction": 40, "ef_search": 64, "seed": 0},
}


def test_index_metadata_of_the_old_format_loads_unchanged(data, tmp_path):
    assert AnnConfig.from_dict(OLD_FORMAT["flat"]) == AnnConfig("flat") == AnnConfig.from_dict(None)
    x, labels, q = data
    changed = {"ivfpq": {"nprobe": 30}, "hnsw": {"ef_search": 16}}  # stored values are read, not defaulted
    for kind, old in OLD_FORMAT.items():
        own = {"kind", *get_kind(kind).Config.__dataclass_fields__}
        index = build(kind, x, labels)
        folder = save_index(index, tmp_path / kind)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["index"] == {k: v for k, v in old.items() if k in own}  # the same keys, less other kinds' ones
        meta["index"] = {**old, **changed.get(kind, {})}  # the folder as the old version wrote it
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        back = load_index(folder)
        assert back.ann.to_dict() == {k: v for k, v in meta["index"].items() if k in own}
        assert [r[0].label for r in back.classify(q, top_k=1)] == [r[0].label for r in index.classify(q, top_k=1)]
    assert back.ann.options.ef_search == 16


TOY_KIND = '''
from dataclasses import dataclass

import faiss
import numpy as np

from fewshot.index.kinds import IndexKind, register_kind
from fewshot.options import option

QTYPES = {4: faiss.ScalarQuantizer.QT_4bit, 6: faiss.ScalarQuantizer.QT_6bit, 8: faiss.ScalarQuantizer.QT_8bit}


@dataclass(frozen=True)
class ScalarOptions:
    bits: int = option(8, "Bits per dimension of the codes.", choices=(4, 6, 8))
    rerank: int = option(4, "The rerank x k best candidates are re-scored exactly (0: off).", min=0)


@register_kind("toy-sq")
class ToyScalar(IndexKind):
    name = "toy-sq"
    summary = "Toy: scalar-quantised codes, scanned in full, the best re-ranked exactly"
    Config = ScalarOptions

    def create(self, dim, sample=None, n=0):
        index = faiss.IndexScalarQuantizer(dim, QTYPES[self.opts.bits], faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(sample(np.arange(n)), dtype=np.float32))
        return index

    def shortlist(self, k):
        return k * self.opts.rerank or k
'''


def test_add_an_index_kind_as_one_file(data, flat_answers, tmp_path):
    """docs/ARCHITECTURE.md, "How to add an index kind": the file above and nothing else."""
    from fewshot.cli.kinds import index_config, kind_flags

    path = tmp_path / "toy_sq.py"
    path.write_text(textwrap.dedent(TOY_KIND))
    spec = importlib.util.spec_from_file_location("toy_sq", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_sq"] = module
    try:
        spec.loader.exec_module(module)
        assert "toy-sq" in list_kinds() and "toy-sq" in ann.INDEX_TYPES
        again = exercise("toy-sq", data, flat_answers, tmp_path)
        assert again.ann == AnnConfig("toy-sq", bits=8, rerank=4) and (tmp_path / "toy-sq" / "images.faiss").is_file()
        with pytest.raises(InputError, match="unknown option bits = 5"):
            AnnConfig("toy-sq", bits=5)
        flags = kind_flags()  # what the next `fewshot index --help` shows, in a panel "toy-sq options"
        assert flags["bits"].flag == "--bits" and flags["bits"].panel == "toy-sq options"
        assert flags["rerank"].kinds == ["ivfpq", "toy-sq"]  # one flag serves every kind with that option
        assert index_config("toy-sq", {"bits": 4}) == AnnConfig("toy-sq", bits=4)
    finally:
        INDEX_KINDS.remove("toy-sq")
        sys.modules.pop("toy_sq", None)
