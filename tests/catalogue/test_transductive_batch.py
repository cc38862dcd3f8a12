"""A batch of photos classified together (``classify --transductive paddle``): the batch's answer
first, the same answer as fewshot.methods.transductive.paddle on the prototypes, and the
combinations that are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.catalogue import check_transductive, classify_embedded
from fewshot.catalogue.reject import Rejector
from fewshot.errors import InputError
from fewshot.index import CatalogueIndex
from fewshot.methods.transductive import paddle


def _at(degrees) -> np.ndarray:
    d = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(d), np.sin(d)], axis=-1).astype(np.float32)


def _index() -> CatalogueIndex:
    """Four articles on the unit circle (one studio-like photo each, at 0, 50, 180 and 230 degrees)."""
    return CatalogueIndex.build(_at([0.0, 50.0, 180.0, 230.0]), list("abcd"), ["g1", "g1", "g2", "g2"],
                                [f"{x}.jpg" for x in "abcd"], digests=[f"d{x}" for x in "abcd"])


def _queries() -> np.ndarray:
    """Photos of articles a and c (around 20 and 200 degrees): the nearest prototype gives the
    ones past 25 degrees to b and past 205 to d."""
    around = 20 + 6 * np.random.default_rng(0).normal(size=12)
    return _at(np.concatenate([around, around + 180]))


def test_the_batch_answer_comes_first_and_is_paddles():
    index, q = _index(), _queries()
    truth = ["a"] * 12 + ["c"] * 12
    none = Rejector.for_index(index, "none")
    alone = classify_embedded(index, q, [None] * 24, [str(i) for i in range(24)], top_k=3, rejector=none)
    together = classify_embedded(index, q, [None] * 24, [str(i) for i in range(24)], top_k=3, rejector=none,
                                 transductive="paddle")
    first = [r.predictions[0].label for r in alone]
    assert sum(f == t for f, t in zip(first, truth)) == 20  # 4 photos go to the next article
    want = paddle(torch.from_numpy(_at([0.0, 50.0, 180.0, 230.0])), torch.arange(4), torch.from_numpy(q), 4)
    assert [r.predictions[0].label for r in together] == ["abcd"[i] for i in want.tolist()] == truth
    for r, cos in zip(together, q @ _at([0.0, 50.0, 180.0, 230.0]).T):
        assert len(r.predictions) == 3 and len({p.label for p in r.predictions}) == 3
        assert r.answer.article == r.predictions[0].label and r.answer.transductive == "paddle"
        assert r.answer.to_dict()["transductive"] == "paddle"
        assert all(p.score == pytest.approx(float(cos["abcd".index(p.label)]), abs=1e-6) for p in r.predictions)
    single = classify_embedded(index, q[14:15], [None], ["0"], top_k=3, rejector=none, transductive="paddle")
    assert single[0].predictions == alone[14].predictions  # a batch of one photo is that photo alone
    # one article's photos alone: each photo still gets it (no shift toward the catalogue's mean)
    one = classify_embedded(index, q[:12], [None] * 12, [str(i) for i in range(12)], rejector=none,
                            transductive="paddle")
    assert [r.predictions[0].label for r in one] == ["a"] * 12


def test_refused_combinations():
    index = _index()
    q = _queries()
    none, auto = Rejector.for_index(index, "none"), Rejector("relative", 0.3)
    with pytest.raises(InputError, match="bdcspn"):
        check_transductive("bdcspn", "prototype", none)
    with pytest.raises(InputError, match="prototype"):
        check_transductive("paddle", "nearest", none)
    with pytest.raises(InputError) as exc:
        classify_embedded(index, q, [None] * 24, [str(i) for i in range(24)], rejector=auto, transductive="paddle")
    assert "reject" in exc.value.hint
    # a query that is a catalogue image (same digest) would find itself
    with pytest.raises(InputError, match="1 of the 24 photos are catalogue images"):
        classify_embedded(index, q, ["da"] + [None] * 23, [str(i) for i in range(24)], rejector=none,
                          transductive="paddle")
    assert check_transductive("none", "nearest", auto) == "none"


def test_a_batch_too_large_to_hold_is_refused(monkeypatch):
    import fewshot.index.ranking as ranking

    monkeypatch.setattr(ranking, "TRANSDUCTIVE_MAX_CELLS", 50)  # 24 photos x 4 articles = 96 pairs
    index = _index()
    with pytest.raises(InputError, match="24 photos over 4 candidate articles is too large") as exc:
        classify_embedded(index, _queries(), [None] * 24, [str(i) for i in range(24)],
                          rejector=Rejector.for_index(index, "none"), transductive="paddle")
    assert "batches of at most 12" in exc.value.hint


def test_classify_cli_and_api_with_a_batch(drawn_tree, tmp_path):
    import json

    from typer.testing import CliRunner

    from fewshot.catalogue import Catalogue
    from fewshot.cli import app
    from tests.conftest import draw_tree

    runner = CliRunner()
    idx, cache = tmp_path / "idx", str(tmp_path / "cache")
    r = runner.invoke(app, ["index", "--data", str(drawn_tree), "--image-size", "64", "--out", str(idx),
                            "--cache-dir", cache, "--no-progress", "--runtime", "torch"])
    assert r.exit_code == 0, r.output
    new = draw_tree(tmp_path / "new", per_class=3, seed=1)  # new photos of the same articles
    args = ["classify", "--index", str(idx), "--cache-dir", cache, "--runtime", "torch", "--top-k", "3", str(new)]
    r = runner.invoke(app, args + ["--transductive", "paddle", "--reject", "none", "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    flat = lambda text: " ".join(text.split())  # noqa: E731 (the log wraps its lines)
    assert len(rows) == 18 and "transductive (paddle): the 18 readable photos were classified as one batch" in flat(r.stderr)
    assert all(row["answer"]["transductive"] == "paddle" for row in rows)
    assert all(row["answer"]["article"] == row["predictions"][0]["label"] for row in rows)
    text = runner.invoke(app, args + ["--transductive", "paddle", "--reject", "none"]).stdout.splitlines()
    assert [line.split("\t")[1] for line in text] == [row["answer"]["article"] for row in rows]
    r = runner.invoke(app, args + ["--transductive", "paddle", "--reject", "0.2"])  # a threshold: refused
    assert r.exit_code != 0 and "use --reject none" in r.stderr and "Python" not in r.stderr and not r.stdout
    r = runner.invoke(app, args + ["--transductive", "tim", "--reject", "none"])
    assert r.exit_code == 2 and "use none or paddle" in r.stderr
    r = runner.invoke(app, args + ["--transductive", "paddle"])  # --reject auto: refused, whatever it falls back to
    assert r.exit_code != 0 and "--reject none" in r.stderr and "reject:" not in r.stderr
    fresh = tmp_path / "fresh-cache"  # catalogue images are refused before anything is embedded
    catalogue_photo = sorted(drawn_tree.rglob("*.jpg"))[0]
    r = runner.invoke(app, ["classify", "--index", str(idx), "--cache-dir", str(fresh), "--runtime", "torch",
                            "--transductive", "paddle", "--reject", "none", str(catalogue_photo), str(new)])
    assert r.exit_code != 0 and "1 of the 19 photos are catalogue images" in flat(r.stderr)
    assert catalogue_photo.name in flat(r.stderr)
    assert not fresh.exists()
    one = sorted(new.rglob("*.jpg"))[0]
    r = runner.invoke(app, args[:-1] + ["--transductive", "paddle", "--reject", "none", str(one), str(one)])
    assert r.exit_code == 0 and "the 2 readable photos were classified as one batch" in flat(r.stderr)
    assert "1 of the 2 photos of the batch are copies of another of its photos" in flat(r.stderr)
    cat = Catalogue.load(idx, runtime="torch")
    photos = sorted(new.rglob("*.jpg"))
    said = cat.classify(photos, top_k=3, reject="none", transductive="paddle")
    assert [x.answer.article for x in said] == [row["answer"]["article"] for row in rows]
    with pytest.raises(InputError):
        cat.classify(photos, reject="auto", transductive="paddle")
