"""Open-set evaluation (fewshot.evaluation.openset): a case computed by hand, the reference
probe's numpy protocol on synthetic embeddings, the wiring into `fewshot evaluate` and the API."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import DataError, InputError
from fewshot.evaluation.openset import draw_known, evaluate_open_set, stats
from fewshot.evaluation.openset_report import render_open_set, summary_lines, write_open_set_plots

CLASSES = [f"a{i:02d}" for i in range(12)]


def test_the_draws_follow_the_reference_probe_rule():
    rng = np.random.default_rng(3)
    want = [sorted(rng.permutation(np.array(CLASSES))[:6]) for _ in range(4)]
    assert draw_known(CLASSES, 4, 3) == want
    assert draw_known(CLASSES, 1, 0) == [["a02", "a04", "a05", "a07", "a09", "a11"]]


def _unit(parts: dict[int, float], rest: int, dim: int) -> np.ndarray:
    """A unit vector with ``parts`` on basis directions and the remainder on direction ``rest``."""
    v = np.zeros(dim)
    for i, x in parts.items():
        v[i] = x
    v[rest] = np.sqrt(1.0 - (v ** 2).sum())
    return v


@pytest.fixture(scope="module")
def by_hand():
    """12 articles on orthogonal directions (two gallery photos each, exactly on it). Draw 1 of
    seed 0: known a02 a04 a05 a07 a09 a11, absent the others. Brands: B = {a02, a04, a00},
    D = {a05, a07, a01}, E = {a09, a11, a03}, U = {a06, a08, a10} (no known article).

    The catalogue's photos are orthogonal to the other articles, so every left-out score is 0 and
    the calibrated thresholds are the smallest float above 0 (accept any positive score)."""
    dim = 12 + 10
    known = [2, 4, 5, 7, 9, 11]
    brand = {0: "B", 2: "B", 4: "B", 1: "D", 5: "D", 7: "D", 3: "E", 9: "E", 11: "E", 6: "U", 8: "U", 10: "U"}
    gallery = np.repeat(np.eye(dim)[:12], 2, axis=0)
    g_labels = [CLASSES[i] for i in range(12) for _ in range(2)]
    g_groups = [brand[i] for i in range(12) for _ in range(2)]
    others = {k: -0.3 for k in known if k not in (2, 4)}
    queries = [  # (article, vector); the relative score (best - 0.5 second) in the comment
        (2, _unit({2: 0.9}, 12, dim)),                     # known 0.9, right
        (5, _unit({5: 0.6}, 13, dim)),                     # known 0.6, right
        (9, _unit({9: 0.3}, 14, dim)),                     # known 0.3, right
        (11, _unit({2: -0.2, 4: -0.2, **others}, 15, dim)),  # known -0.2 + 0.1 = -0.1, best a02: wrong
        (0, _unit({2: -0.1, 4: -0.1, **others}, 0, dim)),   # absent, brand B: -0.05; brand score -0.1 + 0.15 > 0
        (1, _unit({5: 0.5}, 1, dim)),                      # absent 0.5: a false accept
        (3, _unit({9: 0.2}, 3, dim)),                      # absent 0.2: a false accept
        (6, _unit({}, 6, dim)),                            # absent, brand U: 0, brand score 0
        (8, _unit({2: -0.1, 4: -0.1, **others}, 8, dim)),   # absent, brand U: -0.05, named B (wrong)
    ]
    q = np.stack([v for _, v in queries]).astype(np.float32)
    q_labels = [CLASSES[a] for a, _ in queries]
    q_groups = [brand[a] for a, _ in queries]
    return evaluate_open_set(q, q_labels, q_groups, gallery.astype(np.float32), g_labels, g_groups, CLASSES,
                             draws=1, seed=0)


def test_auroc_fpr_and_operating_point_by_hand(by_hand):
    r = by_hand
    assert r["draws"][0]["known"] == ["a02", "a04", "a05", "a07", "a09", "a11"]
    assert r["protocol"]["queries"] == 9 and r["protocol"]["known_per_draw"] == 6
    # relative: known 0.9 0.6 0.3 -0.1, absent -0.05 0.5 0.2 0 -0.05; pairs known > absent: 5 + 5 + 4 + 0 of 20
    assert r["scores"]["relative"]["auroc"]["mean"] == pytest.approx(14 / 20)
    assert r["scores"]["cosine"]["auroc"]["mean"] == pytest.approx(14 / 20)  # -0.2 / -0.1 instead of -0.1 / -0.05
    # 5% quantile of the known relative scores: -0.1 + 0.15 * 0.4 = -0.04; absent >= it: 0.5 0.2 0 -> 3 of 5
    assert r["scores"]["relative"]["fpr_at_95tpr"]["mean"] == pytest.approx(3 / 5)
    assert r["scores"]["knn1"]["auroc"]["mean"] == pytest.approx(14 / 20)  # the photos lie on the prototypes
    op = r["operating_point"]["relative"]
    assert 0 < op["threshold"]["mean"] < 1e-300  # every left-out score is 0: accept anything above it
    assert op["realised_far"]["mean"] == pytest.approx(2 / 5)  # the 0.5 and the 0.2
    assert op["known_accepted"]["mean"] == pytest.approx(3 / 4)
    assert op["known_accepted_right"]["mean"] == pytest.approx(3 / 4)
    assert op["catalogue_accepted"]["mean"] == pytest.approx(1.0)
    assert r["top1_known"]["mean"] == pytest.approx(3 / 4)


def test_brand_fallback_and_per_brand_by_hand(by_hand):
    op = by_hand["operating_point"]["relative"]
    # absent photos of known brands: a00 (named B, right), a01 and a03 (accepted as articles)
    assert op["brand_named"]["mean"] == pytest.approx(1 / 3)
    assert op["brand_precision"]["mean"] == pytest.approx(1.0)
    assert op["unknown_brand_named"]["mean"] == pytest.approx(1 / 2)  # a08 named B, a06 not
    assert op["pooled"] == {"absent_known_brand": 3, "named": 1, "named_right": 1, "absent_unknown_brand": 2,
                            "unknown_brand_named": 0.5, "brand_named": 1 / 3, "brand_precision": 1.0}
    b = by_hand["per_brand"]
    assert b["B"] == {"known_photos": 1, "absent_photos": 1, "auroc": 1.0, "auroc_draws": 1, "realised_far": 0.0,
                      "known_accepted_right": 1.0}
    assert b["D"]["auroc"] == 1.0 and b["D"]["realised_far"] == 1.0
    assert b["E"]["auroc"] == pytest.approx(0.5) and b["E"]["known_accepted_right"] == 0.5
    assert b["U"]["auroc"] is None and b["U"]["realised_far"] == 0.0 and b["U"]["known_photos"] == 0


def _clustered(seed: int = 0, classes: int = 16, dim: int = 24):
    """Gallery (train) and query (test) photos of ``classes`` articles in 4 brands around random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    names = [f"c{i:02d}" for i in range(classes)]

    def photos(n: int):
        lab = np.repeat(np.arange(classes), n)
        return (centres[lab] + rng.normal(scale=1.2, size=(len(lab), dim))).astype(np.float32), lab

    g, gl = photos(5)
    q, ql = photos(4)
    return (q, [names[i] for i in ql], [f"b{i % 4}" for i in ql], g, [names[i] for i in gl],
            [f"b{i % 4}" for i in gl], names)


def _probe(q, q_labels, g, g_labels, classes, draws, seed):
    """The reference probe (shared/tools/openset_probe.py), its numpy lines as they are."""
    def norm(x):
        x = x.astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    e_tr, y_tr, e_te, y_te = norm(g), np.array(g_labels), norm(q), np.array(q_labels)
    classes = np.array(classes)
    rng, rows = np.random.default_rng(seed), []
    for _ in range(draws):
        known = sorted(rng.permutation(classes)[: len(classes) // 2])
        protos = norm(np.stack([e_tr[y_tr == c].mean(0) for c in known]))
        s = e_te @ protos.T
        best, ranked = s.max(1), np.sort(s, 1)
        nearest = (e_te @ e_tr[np.isin(y_tr, known)].T).max(1)
        is_known = np.isin(y_te, known)
        top1 = np.array(known)[s.argmax(1)] == y_te
        rows.append((roc_auc_score(is_known, best), roc_auc_score(is_known, ranked[:, -1] - ranked[:, -2]),
                     roc_auc_score(is_known, nearest), (best[~is_known] >= np.quantile(best[is_known], 0.05)).mean(),
                     top1[is_known].mean()))
    return np.mean(rows, 0)


def test_it_reproduces_the_reference_probe():
    q, ql, qg, g, gl, gg, names = _clustered()
    r = evaluate_open_set(q, ql, qg, g, gl, gg, names, draws=5, seed=7)
    got = [r["scores"]["cosine"]["auroc"]["mean"], r["scores"]["margin"]["auroc"]["mean"],
           r["scores"]["knn1"]["auroc"]["mean"], r["scores"]["cosine"]["fpr_at_95tpr"]["mean"],
           r["top1_known"]["mean"]]
    np.testing.assert_allclose(got, _probe(q, ql, g, gl, names, 5, 7), atol=1e-6)
    per_draw = [d["auroc"]["relative"] for d in r["draws"]]
    assert r["scores"]["relative"]["auroc"]["mean"] == pytest.approx(np.mean(per_draw), abs=1e-5)
    assert r["scores"]["relative"]["auroc"]["sd"] == pytest.approx(np.std(per_draw), abs=1e-5)
    assert r["protocol"]["draws"] == 5 and len(r["draws"]) == 5
    grid = np.array(r["curves"]["fpr_grid"])
    for name in ("relative", "knn5"):
        roc, oscr = np.array(r["curves"]["roc"][name]), np.array(r["curves"]["oscr"][name])
        assert (np.diff(roc) >= -1e-9).all() and (oscr <= roc + 1e-9).all()  # CCR counts accepted AND right
        assert roc[-1] == pytest.approx(1.0) and oscr[-1] == pytest.approx(r["top1_known"]["mean"], abs=1e-4)
    assert grid[0] == 0.0 and grid[-1] == 1.0


def test_report_section_console_lines_and_plots(tmp_path):
    q, ql, qg, g, gl, gg, names = _clustered(1)
    r = evaluate_open_set(q, ql, qg, g, gl, gg, names, draws=2, seed=0, scores=["relative", "cosine", "knn1"])
    assert list(r["scores"]) == ["relative", "cosine", "knn1"] and list(r["operating_point"]) == ["relative", "cosine"]
    json.dumps(r, allow_nan=False)  # JSON-ready: no NaN
    text = "\n".join(render_open_set(r))
    assert "## Open set" in text and "| relative (default) |" in text and "![ROC](roc.png)" in text
    lines = summary_lines(r)
    assert len(lines) == 1 + 3 + 1 and "knn1" in lines[3] and "target 0.05" in lines[-1]
    paths = write_open_set_plots(r, tmp_path, "synthetic")
    assert sorted(p.name for p in paths) == ["open_set_scores.png", "oscr.png", "roc.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_bad_inputs_are_refused_with_a_fix():
    q, ql, qg, g, gl, gg, names = _clustered(2, classes=10)
    with pytest.raises(DataError, match="at least 12 articles") as e:
        evaluate_open_set(q, ql, qg, g, gl, gg, names)
    assert "fewshot split" in e.value.hint
    q, ql, qg, g, gl, gg, names = _clustered(2)
    with pytest.raises(InputError, match="unknown"):
        evaluate_open_set(q, ql, qg, g, gl, gg, names, scores=["relative", "nope"])
    with pytest.raises(InputError, match="target_far"):
        evaluate_open_set(q, ql, qg, g, gl, gg, names, target_far=1.5)
    assert stats([float("nan"), None])["mean"] is None


def test_the_cli_refuses_open_set_without_a_split_file(tmp_path):
    r = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path / "nowhere"), "--open-set", "--out",
                                 str(tmp_path / "ev")])
    assert r.exit_code == 1
    assert "--open-set needs a class-disjoint split" in r.output and "--split-file" in r.output
    assert not (tmp_path / "ev").exists()
    for extra in (["--target-far", "0.1"], ["--open-set-draws", "5"]):  # open-set options without --open-set
        r = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ev"),
                                     *extra])
        assert r.exit_code == 1 and f"{extra[0]} only apply" in r.output and "--open-set" in r.output


def _drawn_manifest(root, train: int = 3, test: int = 2):
    """12 drawn articles (4 colours x 3 shapes, brand = colour), ``train`` + ``test`` photos each."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    colours = {"Red": (200, 40, 40), "Blue": (40, 60, 200), "Green": (40, 170, 60), "Black": (20, 20, 20)}
    rows, labels = [], []
    for colour, rgb in colours.items():
        for shape in ("ball", "box", "bar"):
            label = f"{colour}-{shape}"
            labels.append(label)
            for i, split in enumerate(["train"] * train + ["test"] * test):
                img = Image.fromarray(rng.integers(150, 255, size=(40, 40, 3), dtype=np.uint8))
                x, y = (int(v) for v in rng.integers(4, 16, size=2))
                box = {"ball": (x, y, x + 20, y + 20), "box": (x, y, x + 18, y + 18), "bar": (x, y, x + 8, y + 22)}[shape]
                (ImageDraw.Draw(img).ellipse if shape == "ball" else ImageDraw.Draw(img).rectangle)(box, fill=rgb)
                path = root / split / label / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path, quality=90)
                rows.append((path.relative_to(root).as_posix(), label, colour, split))
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("path", "label", "group", "split"), *rows])
    return root / "manifest.csv", labels


def test_evaluate_open_set_through_the_api_writes_the_section_and_pngs(tmp_path, monkeypatch):
    import fewshot
    from fewshot.data.splits import ClassSplit

    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    manifest, labels = _drawn_manifest(tmp_path / "data")
    split = tmp_path / "split.json"
    ClassSplit(name="drawn", seed=0, train=[], val=[], test=sorted(labels)).save(split)
    model = fewshot.create_backbone("efficientnet_lite0", image_size=32)
    ds = fewshot.load_dataset(manifest)
    with pytest.raises(ValueError, match="split_file"):
        fewshot.evaluate(model, ds, open_set=True)
    m = fewshot.evaluate(model, ds, split_file=split, episodes=5, out=tmp_path / "ev", open_set=True,
                         open_set_draws=2, runtime="torch")
    section = m["open_set"]
    assert section["protocol"]["classes"] == 12 and section["protocol"]["queries"] == 24
    assert len(section["draws"]) == 2 and section["default_score"] == "relative"
    for s in section["scores"].values():
        assert 0.0 <= s["auroc"]["mean"] <= 1.0 and 0.0 <= s["fpr_at_95tpr"]["mean"] <= 1.0
    far = section["operating_point"]["relative"]["realised_far"]
    assert 0.0 <= far["min"] <= far["mean"] <= far["max"] <= 1.0
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["open_set"]["scores"].keys() == section["scores"].keys() and saved["config"]["open_set"] is True
    for name in ("roc.png", "oscr.png", "open_set_scores.png"):
        assert (tmp_path / "ev" / name).read_bytes()[:4] == b"\x89PNG"
    assert "## Open set" in (tmp_path / "ev" / "report.md").read_text()


def test_queries_that_are_copies_of_gallery_photos_are_counted_and_flagged(caplog):
    from types import SimpleNamespace

    from fewshot.evaluation.report import _trained_lines
    from fewshot.evaluation.run import warn_queries_in_gallery

    q = SimpleNamespace(digests=["a", "b", "c", None])
    g = SimpleNamespace(digests=["b", "c", "d", None])
    with caplog.at_level("WARNING", logger="fewshot"):
        assert warn_queries_in_gallery(q, g) == 2  # b and c; unknown digests never match
    assert "2 of the 4 queries are byte-identical copies of gallery photos" in caplog.text
    assert warn_queries_in_gallery(q, None) == 0 and warn_queries_in_gallery(SimpleNamespace(digests=[]), g) == 0
    assert _trained_lines({"queries_in_gallery": 2}) == [
        "- **OPTIMISTIC: 2 queries are byte-identical copies of gallery photos** (each finds its own copy)"]
    assert _trained_lines({"queries_in_gallery": 0, "trained_classes_evaluated": 0}) == []
