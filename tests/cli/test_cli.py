"""The CLI contract of issue 2, end to end on a small real Grocery subset (64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.metrics import retrieval_metrics

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def evaluated(small_manifest, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    r = run("evaluate", "--data", small_manifest, "--split", "test", "--image-size", "64", "--episodes", "200",
            "--queries", "2", "--seed", "3", "--out", out, "--cache-dir", cache, "--no-progress")
    return out, r.output


def test_evaluate_writes_contract_files(evaluated):
    out, output = evaluated
    m = json.loads((out / "metrics.json").read_text())
    for key in ("map", "map_at_r", "precision_at_1", "recall_at_k", "map_at_k", "num_queries",
                "num_skipped_queries", "episodes", "per_group", "config"):
        assert key in m
    assert set(m["recall_at_k"]) == {"1", "5", "10"} and set(m["map_at_k"]) == {"10"}
    assert m["num_queries"] == 24 and m["num_skipped_queries"] == 0
    assert set(m["episodes"]) == {"5way1shot", "5way5shot"}
    one = m["episodes"]["5way1shot"]
    assert 0.2 < one["accuracy"] <= 1.0 and one["ci95"] > 0
    # 5-shot + 2 queries needs 7 test photos per class; there are 4: reported, not crashed
    assert m["episodes"]["5way5shot"]["accuracy"] is None and "error" in m["episodes"]["5way5shot"]
    assert set(m["per_group"]) == {"Apple", "Banana", "Carrots", "Oatghurt", "Milk"}
    c = m["config"]
    assert c["model"]["backbone"]["name"] == "efficientnet_lite0" and c["image_size"] == 64
    assert c["seed"] == 3 and c["split"] == "test" and c["fewshot_version"]
    assert (out / "report.md").read_text().startswith("# Evaluation")
    png = (out / "retrieval_grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert f"mAP {m['map']:.4f}" in output


def test_evaluate_agrees_with_exported_embeddings(evaluated, small_manifest, cache, tmp_path):
    out, _ = evaluated
    m = json.loads((out / "metrics.json").read_text())
    for suffix in (".npz", ".safetensors"):
        f = tmp_path / f"emb{suffix}"
        run("embed", "--data", small_manifest, "--split", "test", "--image-size", "64", "--out", f,
            "--cache-dir", cache, "--no-progress")
        if suffix == ".npz":
            z = np.load(f)
            vectors, labels = z["embeddings"], list(z["labels"])
            assert len(z["paths"]) == 24 and set(z["groups"]) >= {"Apple"}
        else:
            from safetensors import safe_open

            with safe_open(str(f), "np") as fh:
                vectors = fh.get_tensor("embeddings")
                labels = json.loads(fh.metadata()["labels"])
        assert vectors.shape == (24, 1280)
        rep = retrieval_metrics(vectors, labels)
        assert rep.map == pytest.approx(m["map"], abs=1e-6)
        assert rep.precision_at_1 == pytest.approx(m["precision_at_1"], abs=1e-6)


def test_index_and_classify(small_manifest, cache, tmp_path):
    idx = tmp_path / "idx"
    r = run("index", "--data", small_manifest, "--split", "train", "--image-size", "64", "--out", idx,
            "--cache-dir", cache, "--no-progress")
    assert "indexed 36 images of 6 articles" in r.output
    meta = json.loads((idx / "meta.json").read_text())
    assert meta["config"]["image_size"] == 64 and meta["config"]["split"] == "train"
    root = small_manifest.parent
    query = root / "test" / "Banana" / "Banana" / "Banana_001.jpg"
    assert query.is_file()
    r = run("classify", "--index", idx, "--json", "--top-k", "3", "--cache-dir", cache, query)
    line = json.loads(r.output.strip().splitlines()[-1])
    assert line["image"] == str(query)
    assert [set(p) for p in line["predictions"]] == [{"label", "group", "score"}] * 3
    assert "Banana" in [p["label"] for p in line["predictions"]]  # 64 px: top-3, not always top-1
    groups = {p["label"]: p["group"] for p in line["predictions"]}
    assert groups["Banana"] == "Banana" and groups.get("Granny-Smith", "Apple") == "Apple"
    scores = [p["score"] for p in line["predictions"]]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    r = run("classify", "--index", idx, "--data", small_manifest, "--split", "test", "--summary-only",
            "--cache-dir", cache, "--mode", "nearest")
    top1 = float(r.output.split("top-1 accuracy ")[1].split()[0])
    assert top1 >= 0.7 and "(24 images, 6 articles, mode nearest)  catalogue images among them: 0" in r.output


def test_index_whiten_from_the_cli(small_manifest, cache, tmp_path):
    """--whiten keeps its fit in the index; classify whitens the queries by it (the scores are
    those the loaded index gives the model's embeddings); the check reads the model's embeddings."""
    from fewshot.catalogue import Catalogue

    idx = tmp_path / "idx"
    common = ["--data", small_manifest, "--split", "train", "--image-size", "64", "--cache-dir", cache, "--no-progress"]
    r = run("index", *common, "--out", idx, "--whiten")
    assert "indexed 36 images of 6 articles" in r.output and "(flat index, whitened)" in r.output
    assert json.loads((idx / "meta.json").read_text())["whitening"]["articles"] == 6
    query = small_manifest.parent / "test" / "Banana" / "Banana" / "Banana_001.jpg"
    line = json.loads(run("classify", "--index", idx, "--json", "--top-k", "2", "--cache-dir", cache,
                          query).output.strip().splitlines()[-1])
    cat = Catalogue.load(idx)
    want = cat.classify([query], top_k=2)[0]
    assert [(p["label"], round(p["score"], 4)) for p in line["predictions"]] == \
        [(p.label, round(p.score, 4)) for p in want.predictions]
    r = run("classify", "--index", idx, "--data", small_manifest, "--split", "train", "--summary-only",
            "--cache-dir", cache)  # the catalogue's own photos: the whitening was fitted on them
    assert "catalogue images among them: 36 (scored leave-one-out" in r.output and "OPTIMISTIC" in r.output
    assert "judge a whitened catalogue on photos that are not in it" in " ".join(r.output.split())
    lines = small_manifest.read_text().splitlines()
    firsts = [lines[0]] + [next(x for x in lines[1:] if f",{a}," in x) for a in ("Banana", "Carrots", "Pink-Lady")]
    singles = small_manifest.parent / "singles.csv"  # one photo an article: nothing to fit
    singles.write_text("\n".join(firsts) + "\n")
    r = run("index", "--data", singles, "--split", "train", "--out", tmp_path / "one", "--whiten", code=1)
    assert "error:" in r.output and "3 photos of 3 articles" in r.output and "--whiten" in r.output
    assert not (tmp_path / "one").exists()


def test_index_types_from_the_cli(small_manifest, cache, tmp_path):
    """--index-type hnsw builds, saves and classifies like flat; ivfpq on 36 images is refused
    before anything is embedded or written, with the fix."""
    flat, hnsw = tmp_path / "flat", tmp_path / "hnsw"
    common = ["--data", small_manifest, "--split", "train", "--image-size", "64", "--cache-dir", cache, "--no-progress"]
    run("index", *common, "--out", flat)
    r = run("index", *common, "--out", hnsw, "--index-type", "hnsw", "--ef-search", "16")
    assert "indexed 36 images of 6 articles" in r.output and "(hnsw index)" in r.output
    meta = json.loads((hnsw / "meta.json").read_text())
    assert meta["index_type"] == "hnsw" and meta["index"]["ef_search"] == 16 and (hnsw / "images.faiss").is_file()
    args = ["--data", small_manifest, "--split", "test", "--summary-only", "--cache-dir", cache, "--mode", "nearest"]
    a = run("classify", "--index", flat, *args).output.split("top-1 accuracy ")[1].split()[0]
    b = run("classify", "--index", hnsw, *args, "--ef-search", "32").output.split("top-1 accuracy ")[1].split()[0]
    assert a == b  # 36 images: the graph search is exact here
    r = run("index", *common, "--out", tmp_path / "ivf", "--index-type", "ivfpq", code=1)
    assert "needs at least 1,000 catalogue images" in r.output and "--index-type flat" in r.output
    assert not (tmp_path / "ivf").exists()
    r = run("index", *common, "--out", tmp_path / "bad", "--index-type", "flat", "--nlist", "64", code=2)
    said = " ".join(r.output.replace("│", " ").split())  # the usage error's box wraps lines
    assert "--nlist does not apply to --index-type flat (an option of ivfpq); options of flat: none" in said
    assert not (tmp_path / "bad").exists()
    r = run("index", *common, "--out", tmp_path / "bad", "--index-type", "annoy", code=1)
    assert "unknown index type 'annoy'" in r.output and not (tmp_path / "bad").exists()


def test_classify_bad_images_exit_1_but_classify_the_good(small_manifest, cache, tmp_path):
    idx = tmp_path / "idx"
    run("index", "--data", small_manifest, "--split", "train", "--image-size", "64", "--out", idx,
        "--cache-dir", cache, "--no-progress")
    good = small_manifest.parent / "test" / "Apple" / "Granny-Smith" / "Granny-Smith_001.jpg"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = run("classify", "--index", idx, "--cache-dir", cache, good, broken, tmp_path / "missing.jpg", code=1)
    assert f"{good}\t" in r.output
    assert f"{broken}: " in r.output and "missing.jpg: file not found" in r.output
    assert "2 of 3 image(s) could not be read" in r.output


def test_user_errors_are_messages_not_tracebacks(tmp_path, small_manifest):
    r = run("evaluate", "--data", tmp_path / "no-such-folder", "--out", tmp_path / "o", code=1)
    assert "error:" in r.output and "no-such-folder" in r.output
    bad_csv = tmp_path / "m.csv"
    bad_csv.write_text("file_name,brand\na.jpg,x\n")
    r = run("index", "--data", bad_csv, "--out", tmp_path / "i", code=1)
    assert "error:" in r.output and "label" in r.output
    r = run("classify", "--index", tmp_path / "no-index", small_manifest, code=1)
    assert "does not exist" in r.output and "fewshot index" in r.output
    r = run("evaluate", "--data", small_manifest, "--backbone", "resnet-nope", "--out", tmp_path / "o", code=1)
    assert "unknown backbone 'resnet-nope'" in r.output
    r = run("evaluate", "--data", small_manifest, "--model", tmp_path, "--out", tmp_path / "o", code=1)
    assert "config.json is missing" in r.output


def test_single_image_class_kept_in_gallery_not_a_query(small_manifest, cache, tmp_path):
    """One article with a single photo: its photo is not a query (counted), but it is still
    retrievable, so the other articles' numbers are computed over a gallery that includes it."""
    import csv

    rows = list(csv.reader(small_manifest.open()))
    header, body = rows[0], rows[1:]
    lonely = [r for r in body if r[1] == "Banana" and r[3] == "test"][:1]
    kept = [r for r in body if not (r[1] == "Banana" and r[3] == "test")] + lonely
    m = small_manifest.parent / "lonely.csv"
    with m.open("w", newline="") as fh:
        csv.writer(fh).writerows([header] + kept)
    out = tmp_path / "o"
    r = run("evaluate", "--data", m, "--split", "test", "--image-size", "64", "--episodes", "50",
            "--queries", "1", "--out", out, "--cache-dir", cache, "--no-progress")
    res = json.loads((out / "metrics.json").read_text())
    assert res["num_queries"] == 20 and res["num_skipped_queries"] == 1
    text = " ".join(r.output.split())
    assert "1 class(es) have no other image" in text and "not used as queries: Banana" in text
    assert text.count("have no other image") == 1
