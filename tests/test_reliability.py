"""Issue 11: no command loses a user's data or reports a result that is not true.

One test (or a few) per defect of the issue, on small real Grocery subsets at 64 px. Each
failed on fewshot 0.1.0.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import CheckpointError, FewshotError
from fewshot.catalogue import load_index
from fewshot.index import CatalogueIndex
from fewshot.training import config_keys, make_config
from fewshot.training import staging_dir, train

from train_helpers import shared_tiny_grocery

runner = CliRunner()
TINY = dict(image_size=64, fine_tune="none", batch_size=16, m_per_class=4, lr=1e-3, ways=3, shots=2, queries=2,
            val_episodes=20, eval_episodes=20, progress=False, final_eval="none", epochs=1, patience=0)


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(grocery_root, tmp_path_factory):
    return {**shared_tiny_grocery(grocery_root), "folder": tmp_path_factory.mktemp("reliability")}


def _cfg(tiny, out, method="triplet", **kw):
    args = dict(TINY, data=tiny["data"], split_file=tiny["split_file"], cache_dir=tiny["cache_dir"], out=str(out))
    args.update(kw)
    keys = config_keys(method)  # the shared settings hold the siamese batch options too
    return make_config(method, **{k: v for k, v in args.items() if k in keys or k in kw})


@pytest.fixture(scope="module")
def photo_tree(drawn_tree) -> Path:
    """A plain folder tree ``root/<article>/<photo>.jpg`` (no image splits): 6 articles x 6."""
    return drawn_tree


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tiny):
    out = tiny["folder"] / "good-run"
    train(_cfg(tiny, out))
    return out


# --------------------------------------------------------------------------- 1. index --out
def test_index_never_deletes_the_data_or_a_foreign_folder(photo_tree, cache, tmp_path):
    before = _files(photo_tree)
    r = run("index", "--data", photo_tree, "--out", photo_tree, "--image-size", "64", "--cache-dir", cache,
            "--no-progress", "--overwrite", code=1)
    assert str(photo_tree) in flat(r) and "data" in flat(r)
    assert _files(photo_tree) == before  # every photo is still there
    r = run("index", "--data", photo_tree, "--out", photo_tree / "Banana", "--image-size", "64", code=1)
    assert _files(photo_tree) == before
    r = run("index", "--data", photo_tree, "--out", photo_tree.parent, "--image-size", "64", "--overwrite", code=1)
    assert _files(photo_tree) == before
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    r = run("index", "--data", photo_tree, "--out", foreign, "--image-size", "64", "--overwrite", code=1)
    assert "is not a fewshot index" in flat(r) and (foreign / "todo.txt").read_text() == "keep me"
    a_file = tmp_path / "report.pdf"
    a_file.write_bytes(b"%PDF")
    run("index", "--data", photo_tree, "--out", a_file, "--image-size", "64", code=1)
    assert a_file.read_bytes() == b"%PDF"


def test_index_replaces_an_index_only_with_overwrite(photo_tree, cache, tmp_path):
    out = tmp_path / "my-index"
    common = ("--image-size", "64", "--cache-dir", cache, "--no-progress")
    r = run("index", "--data", photo_tree, "--out", out, *common)  # the README's example: no --split
    assert "indexed 36 images of 6 articles" in r.output
    r = run("index", "--data", photo_tree, "--out", out, *common, code=1)
    assert "already holds a fewshot index" in flat(r) and "--overwrite" in flat(r)
    run("index", "--data", photo_tree, "--out", out, *common, "--overwrite")
    assert load_index(out).config["split"] == "all"


def test_index_refuses_a_folder_holding_csv_images(small_manifest, cache):
    folder = small_manifest.parent / "train"  # holds the manifest's train photos
    before = _files(folder)
    r = run("index", "--data", small_manifest, "--out", folder, "--image-size", "64", "--overwrite", code=1)
    assert "holds the input image" in flat(r)
    assert _files(folder) == before


def test_embed_and_evaluate_never_overwrite_other_files(small_manifest, cache, tmp_path):
    target = tmp_path / "vectors.npz"
    np.savez(target, mine=np.arange(3))
    r = run("embed", "--data", small_manifest, "--out", target, "--image-size", "64", "--overwrite", code=1)
    assert "not a fewshot embeddings file" in flat(r)
    assert np.load(target)["mine"].tolist() == [0, 1, 2]
    out = tmp_path / "emb.npz"
    common = ("--data", small_manifest, "--split", "all", "--image-size", "64", "--cache-dir", cache, "--no-progress")
    run("embed", *common, "--out", out)  # --split all works in embed too
    assert len(np.load(out)["paths"]) == 60
    r = run("embed", *common, "--out", out, code=1)
    assert "--overwrite" in flat(r)
    run("embed", *common, "--out", out, "--overwrite")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("mine")
    run("evaluate", *common, "--out", notes, "--episodes", "30", code=1)
    assert (notes / "report.md").read_text() == "mine"


# --------------------------------------------------------------------------- 2-3. train --overwrite, --model
def test_failed_overwrite_keeps_the_previous_good_run(tiny, trained_run):
    before = _files(trained_run)
    r = run("train", "--method", "triplet", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"],
            "--out", trained_run, "--overwrite", "--image-size", "64", "--batch-size", "64", "--cache-dir", tiny["cache_dir"],
            "--no-progress", code=1)
    assert "batch size 64 needs 16 classes" in flat(r)
    assert _files(trained_run) == before  # not replaced by an untrained epoch-0 model
    assert not staging_dir(trained_run).exists()
    assert json.loads((trained_run / "config.json").read_text())["complete"] is True


def test_train_never_replaces_a_foreign_folder(tiny, tmp_path):
    foreign = tmp_path / "holiday-photos"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"jpeg")
    r = run("train", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"], "--out", foreign, "--overwrite",
            "--image-size", "64", "--cache-dir", tiny["cache_dir"], "--no-progress", code=1)
    assert "not a fewshot training run" in flat(r)
    assert (foreign / "beach.jpg").read_bytes() == b"jpeg"


def test_an_incomplete_run_is_refused_as_a_model(tiny, small_manifest, tmp_path):
    out = tmp_path / "interrupted"

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny, out, epochs=3), on_epoch_end=stop)
    partial = staging_dir(out)
    assert (partial / "model.safetensors").is_file() and not out.exists()
    for cmd in (("evaluate", "--data", small_manifest, "--out", tmp_path / "e"),
                ("index", "--data", small_manifest, "--out", tmp_path / "i")):
        r = run(*cmd, "--model", partial, code=1)
        assert "not a completed training run" in flat(r) and "--resume" in flat(r)
    # a run folder of fewshot 0.1.0 whose training did not finish (no epochs_run) is refused too
    cfg = json.loads((partial / "config.json").read_text())
    cfg.pop("complete")
    (partial / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a completed"):
        from fewshot.methods.runs import load_run

        load_run(partial)


# --------------------------------------------------------------------------- 4. index pins the model
def test_index_refuses_a_retrained_model(tiny, tmp_path):
    run_dir = tmp_path / "run"
    mlp = {"kind": "mlp", "hidden_dim": 64, "out_dim": 32}  # randomly initialised: the seed changes it
    train(_cfg(tiny, run_dir, head=mlp))
    idx = tmp_path / "idx"
    run("index", "--data", tiny["data"], "--split", "train", "--model", run_dir, "--out", idx,
        "--cache-dir", tiny["cache_dir"], "--no-progress")
    assert load_index(idx).config["model_digest"]
    photo = next(Path(p) for p in load_index(idx).paths)
    run("classify", "--index", idx, photo, "--cache-dir", tiny["cache_dir"])
    train(_cfg(tiny, run_dir, head=mlp, seed=1, overwrite=True))  # the run changes behind the index
    r = run("classify", "--index", idx, photo, "--cache-dir", tiny["cache_dir"], code=1)
    text = flat(r)
    assert "has changed since it was built" in text and "--overwrite" in text and str(idx) in text


# --------------------------------------------------------------------------- 5. queries that are catalogue images
def _loo_expectations(index: CatalogueIndex) -> tuple[float, float]:
    """Hand-computed leave-one-out top-1 (nearest image, prototype) of each catalogue image."""
    v = index.image_vectors()
    labels = np.array(index.labels)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    nearest = float(np.mean(labels[sims.argmax(1)] == labels))
    arts = sorted(set(index.labels))
    sums = {a: v[labels == a].sum(0) for a in arts}
    hits = 0
    for i in range(len(v)):
        scores = {}
        for a in arts:
            s = sums[a] - (v[i] if labels[i] == a else 0)
            if np.linalg.norm(s) > 0:
                scores[a] = float(v[i] @ (s / np.linalg.norm(s)))
        hits += max(scores, key=scores.get) == labels[i]
    return nearest, hits / len(v)


def test_classify_catalogue_images_leave_one_out(small_manifest, cache, tmp_path):
    idx = tmp_path / "idx"
    common = ("--cache-dir", cache, "--no-progress")
    run("index", "--data", small_manifest, "--split", "train", "--image-size", "64", "--out", idx, *common)
    nearest, prototype = _loo_expectations(load_index(idx))
    for mode, expected in (("nearest", nearest), ("prototype", prototype)):
        r = run("classify", "--index", idx, "--data", small_manifest, "--split", "train", "--summary-only",
                "--mode", mode, *common)
        top1 = float(r.output.split("top-1 accuracy ")[1].split()[0])
        assert top1 == pytest.approx(expected, abs=1e-4) and top1 < 1.0  # was 1.0000: each found itself
        assert "catalogue images among them: 36 (scored leave-one-out" in flat(r)
        assert "36 of 36 photos are catalogue images" in flat(r) and "WARNING" in r.output
    photo = load_index(idx).paths[0]
    line = json.loads(run("classify", "--index", idx, "--json", photo, *common).stdout.strip().splitlines()[-1])
    assert line["in_catalogue"] is True and line["predictions"][0]["score"] < 0.9999


def test_leave_one_out_drops_an_article_left_with_no_image():
    v = np.eye(3, dtype=np.float32)
    index = CatalogueIndex.build(v, ["a", "b", "b"], [None] * 3, ["x", "y", "z"], digests=["d0", "d1", "d2"])
    assert index.find_images(["d0", "zz", None]) == [[0], [], []]
    for mode in ("prototype", "nearest"):
        preds = index.classify(v[:1], top_k=2, mode=mode, exclude=[[0]])[0]
        assert [p.label for p in preds] == ["b"]
    with pytest.raises(ValueError):
        index.classify(v[:1], top_k=0)


# --------------------------------------------------------------------------- 6. training that cannot learn
def _one_photo_per_class(tiny, folder: Path) -> Path:
    rows = list(csv.DictReader(open(tiny["data"])))
    seen, kept = set(), []
    split = json.loads(Path(tiny["split_file"]).read_text())
    for row in rows:
        if row["label"] in split["train"]:
            if row["label"] in seen:
                continue
            seen.add(row["label"])
        kept.append(row)
    out = folder / "one-per-class.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    return out


def test_training_that_cannot_learn_is_refused_up_front(tiny, tmp_path):
    data = _one_photo_per_class(tiny, tmp_path)
    out = tmp_path / "never"
    r = run("train", "--fine-tune", "none", "--data", data, "--split-file", tiny["split_file"], "--method", "triplet", "--out", out,
            "--image-size", "64", "--batch-size", "16", "--cache-dir", tiny["cache_dir"], "--no-progress", code=1)
    assert "positive pairs" in flat(r) and "0 of 6 train classes" in flat(r)
    assert not out.exists() and not staging_dir(out).exists()
    r = run("train", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"], "--method", "protonet",
            "--ways", "1", "--out", out, code=2)
    assert "--ways" in flat(r)
    with pytest.raises(FewshotError, match="ways = 1: the training loop needs at least 2"):  # its declared min
        train(_cfg(tiny, out, method="protonet", ways=1))
    with pytest.raises(FewshotError, match="cannot make 3-way 10-shot"):
        train(_cfg(tiny, out, method="protonet", shots=10, queries=4))  # 12 photos per train class
    assert not out.exists() and not staging_dir(out).exists()


def test_a_one_class_val_part_is_refused(tiny, tmp_path):
    split = json.loads(Path(tiny["split_file"]).read_text())
    split["test"] = split["test"] + split["val"][1:]
    split["val"] = split["val"][:1]
    split_file = tmp_path / "one-val.json"
    split_file.write_text(json.dumps(split))
    with pytest.raises(FewshotError, match="validation would be meaningless") as err:
        train(_cfg(tiny, tmp_path / "r", split_file=str(split_file)))
    assert "1.0 by construction" in err.value.message


def test_class_warnings_once_with_labels(caplog):
    import logging

    from fewshot.methods import TrainData

    y = torch.tensor([0] * 6 + [1] * 6 + [2] * 2 + [3] * 6)
    data = TrainData(x=torch.randn(len(y), 8), y=y, label_names=["Granny-Smith", "Pink-Lady", "Banana", "Carrots"])
    method = make_config("protonet", ways=3, shots=2, queries=2, episodes_per_epoch=3).build_method(8)
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        for epoch in range(3):
            list(method.epoch_batches(data, np.random.default_rng(epoch)))
    messages = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(messages) == 1 and messages[0].endswith(": Banana")


# --------------------------------------------------------------------------- 7-10. numbers and summaries
def test_few_episodes_give_no_confidence_interval(small_manifest, cache, tmp_path):
    from fewshot.metrics import MIN_EPISODES_FOR_CI, episodic_accuracy

    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    y = [i % 4 for i in range(40)]
    assert episodic_accuracy(x, y, n_way=2, k_shot=1, n_query=2, episodes=MIN_EPISODES_FOR_CI - 1).ci95 is None
    assert episodic_accuracy(x, y, n_way=2, k_shot=1, n_query=2, episodes=MIN_EPISODES_FOR_CI).ci95 > 0
    out = tmp_path / "e"
    r = run("evaluate", "--data", small_manifest, "--split", "test", "--image-size", "64", "--episodes", "1",
            "--queries", "2", "--out", out, "--cache-dir", cache, "--no-progress")
    assert "5way1shot: " in r.output and "95% CI n/a: 1 episodes" in r.output and "+- 0.0000" not in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["episodes"]["5way1shot"]["ci95"] is None and "n/a" in (out / "report.md").read_text()


def test_one_image_per_class_is_a_clear_error(small_manifest, cache, tmp_path):
    rows = list(csv.DictReader(small_manifest.open()))
    one = {}
    for row in rows:
        one.setdefault(row["label"], row)
    data = small_manifest.parent / "one-each.csv"
    with data.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(one.values())
    out = tmp_path / "e"
    r = run("evaluate", "--data", data, "--image-size", "64", "--out", out, "--cache-dir", cache, code=1)
    assert "no 'test' split" in flat(r) and "--split all" in flat(r)  # this manifest's photos are all 'train'
    r = run("evaluate", "--data", data, "--split", "all", "--image-size", "64", "--out", out, "--cache-dir", cache,
            code=1)
    assert "has a relevant item" in flat(r) and not out.exists()
    single = small_manifest.parent / "single-class.csv"
    with single.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r_ for r_ in rows if r_["label"] == "Banana"])
    r = run("evaluate", "--data", single, "--split", "all", "--image-size", "64", "--out", out, "--cache-dir", cache,
            code=1)
    assert "1.0 by construction" in flat(r) and not out.exists()


TRAIN = ("train", "--fine-tune", "none", "--data", "{tdata}", "--split-file", "{split}", "--out", "{tmp}/t")
EVAL = ("evaluate", "--data", "{data}", "--out", "{tmp}/e")
BAD_INVOCATIONS = [
    ("classify", "--index", "{idx}", "--top-k", "0", "{photo}"),
    ("classify", "--index", "{idx}", "--top-k", "-3", "{photo}"),
    ("classify", "--index", "{idx}", "--mode", "fastest", "{photo}"),
    ("classify", "--index", "{idx}", "--split", "test", "{photo}"),
    (*EVAL, "--episodes", "0"),
    (*EVAL, "--queries", "0"),
    (*EVAL, "--seed", "-1"),
    (*TRAIN, "--seed", "-5"),
    (*TRAIN, "--fine-tune", "some"),
    (*TRAIN, "--fine-tune", "last:0"),
    (*TRAIN, "--fine-tune", "last:999"),
    (*TRAIN, "--backbone-lr", "1e-3"),
    (*TRAIN, "--bn", "train"),
    (*TRAIN, "--augment", "none"),
    (*TRAIN, "--warmup-steps", "5"),
    (*TRAIN, "--fine-tune", "last:2", "--bn", "sometimes"),
    (*TRAIN, "--fine-tune", "last:2", "--augment", "heavy"),
    (*TRAIN, "--fine-tune", "last:2", "--backbone-lr", "-1"),
    (*TRAIN, "--fine-tune", "last:2", "--warmup-steps", "-1"),
    (*TRAIN, "--from-scratch"),
    (*TRAIN, "--backbone", "conv4", "--image-size", "28"),
    (*TRAIN, "--method", "maml", "--inner-params", "all"),
    (*TRAIN, "--method", "maml", "--inner-params", "everything"),
    (*TRAIN, "--ways", "1"),
    ("datasets", "fetch", "grocery", "--root", "{tmp}", "--force", "--mirror", "{tmp}/no-mirror"),
    (*EVAL, "--image-size", "0"),
    (*EVAL, "--batch-size", "0"),
    (*EVAL, "--workers", "-1"),
    (*EVAL, "--split", "holiday"),
    (*EVAL, "--group-from", "brand"),
    ("evaluate", "--data", "{tmp}/nothing-here", "--out", "{tmp}/e"),
    (*EVAL, "--split-file", "{tmp}/missing.json"),
    (*EVAL, "--backbone", "timm:resnet18"),
    ("index", "--data", "{data}", "--out", "{tmp}/i", "--catalogue", "studio"),
    ("index", "--data", "{data}", "--out", "{data}"),
    ("embed", "--data", "{data}", "--out", "{tmp}/x.txt"),
    (*TRAIN, "--shots", "0"),
    (*TRAIN, "--method", "protonet", "--episodes", "0"),
    (*TRAIN, "--method", "maml", "--opt", "inner_lr=-1"),
    (*TRAIN, "--inner-lr", "0.3"),
    (*TRAIN, "--queries", "0"),
    (*TRAIN, "--lr", "0"),
    (*TRAIN, "--lr", "-1e-3"),
    (*TRAIN, "--epochs", "-1"),
    (*TRAIN, "--batch-size", "0"),
    (*TRAIN, "--device", "tpu"),
    (*TRAIN, "--method", "siamese"),
    (*TRAIN, "--method", "triplet", "--fine-tune", "all"),  # its batch of 16 articles x 4 photos: more than the tiny data holds
    (*TRAIN, "--miner", "easy"),
    (*TRAIN, "--head", "{{bad json"),
    (*TRAIN, "--head", '{{"kind": "weird"}}'),
    (*TRAIN, "--head", '{{"kind": "linear", "out_dim": -5}}'),
    (*TRAIN, "--head", '{{"kind": "mlp", "depth": 3}}'),
    ("index", "--data", "{data}", "--out", "{tmp}/i", "--catalogue", "iconic", "--split", "test"),
    (*TRAIN, "--split", "holdout"),
    ("train", "--data", "{tdata}", "--split-file", "{data}", "--out", "{tmp}/t"),
    ("serve", "--index", "{idx}", "--port", "0"),
    ("serve", "--index", "{idx}", "--port", "70000"),
    ("serve", "--index", "{tmp}/no-index"),
    ("datasets", "fetch", "imagenet"),
    ("index", "--data", "{data}", "--out", "{tmp}/a-file.txt/sub"),
    ("embed", "--data", "{data}", "--out", "{tmp}/a-file.txt/e.npz"),
    (*EVAL[:-1], "{tmp}/a-file.txt/sub"),
    (*TRAIN[:-1], "{tmp}/a-file.txt/sub"),
    ("embed", "--data", "{data}", "--out", "{tmp}/c.npz", "--cache-dir", "{tmp}/a-file.txt"),
    (*EVAL, "--backbone", "timm:"),
    (*TRAIN, "--seed", str(2**64)),
    (*EVAL, "--image-size", "16"),
    (*TRAIN, "--margin", "inf"),
    ("classify", "--index", "{idx}", "--data", "{data}", "{photo}"),
    ("classify", "--index", "{tmp}/a-file.txt", "{photo}"),
    ("classify", "--index", "{tmp}", "{photo}"),
]


def test_bad_invocations_are_messages_never_tracebacks(small_manifest, cache, tiny, tmp_path):
    idx = tmp_path / "idx"
    run("index", "--data", small_manifest, "--split", "train", "--image-size", "64", "--out", idx,
        "--cache-dir", cache, "--no-progress")
    photo = load_index(idx).paths[0]
    fill = {"idx": idx, "photo": photo, "data": small_manifest, "tmp": tmp_path, "tdata": tiny["data"],
            "split": tiny["split_file"]}
    (tmp_path / "a-file.txt").write_text("not a folder")
    for args in BAD_INVOCATIONS:
        argv = [a.format(**{k: str(v) for k, v in fill.items()}) for a in args]
        result = runner.invoke(app, argv + (["--cache-dir", str(cache)] if argv[0] in ("evaluate", "index") else []))
        assert result.exit_code in (1, 2), (" ".join(argv[8:]), result.exit_code, result.output[-300:])
        assert result.exception is None or isinstance(result.exception, SystemExit), (argv, repr(result.exception))
        assert "Traceback" not in result.output, argv
        assert "error" in result.output.lower() or "invalid" in result.output.lower(), (argv, result.output)
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()
    assert (tmp_path / "a-file.txt").read_text() == "not a folder"


def test_hints_keep_brackets_and_name_only_options_that_exist(small_manifest, tmp_path):
    r = run("evaluate", "--data", small_manifest, "--backbone", "timm:resnet18", "--out", tmp_path / "e", code=1)
    assert "fewshot[timm]" in flat(r)  # rich markup used to eat "[timm]"
    import re

    import typer

    options: set[str] = set()

    def collect(cmd):
        for p in getattr(cmd, "params", []):
            options.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            collect(sub)

    collect(typer.main.get_command(app))
    package = Path(__file__).resolve().parents[1] / "src" / "fewshot"
    named = set()
    for path in package.rglob("*.py"):
        for text in re.findall(r"hint=\(?\s*f?\"([^\"]*)\"", path.read_text(encoding="utf-8")):
            named.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))
    assert named, "the scan found no hints: the check would prove nothing"
    assert named <= options, f"hints name options that do not exist: {sorted(named - options)}"


# --------------------------------------------------------------------------- 11, 14. own data, notices
def test_own_folder_tree_and_jfif_photos_end_to_end(photo_tree, cache, tmp_path):
    jfif = tmp_path / "shop"
    for p in photo_tree.rglob("*.jpg"):
        dst = jfif / p.parent.name / (p.stem + ".jfif")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    common = ("--image-size", "64", "--cache-dir", cache, "--no-progress")
    r = run("index", "--data", jfif, "--out", tmp_path / "idx", *common)
    assert "indexed 36 images of 6 articles" in r.output  # .jfif folders were reported empty
    r = run("evaluate", "--data", jfif, "--out", tmp_path / "e", "--episodes", "30", *common)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["config"]["split"] == "all"


def test_default_split_of_a_dataset_with_splits_is_unchanged(grocery_root):
    from fewshot.data import load_dataset
    from fewshot.data.protocol import load_data

    for default in ("train", "test"):
        a = load_data(str(grocery_root), None, default_split=default)
        b = load_dataset(grocery_root, split=default)
        assert a.paths == b.paths and a.labels == b.labels and a.split == default


def test_image_size_with_a_model_is_reported(trained_run, small_manifest, tiny, tmp_path):
    r = run("embed", "--data", small_manifest, "--model", trained_run, "--image-size", "96",
            "--out", tmp_path / "e.npz", "--cache-dir", tiny["cache_dir"], "--no-progress")
    assert "--image-size 96 ignored" in flat(r) and "64 px" in flat(r)


# --------------------------------------------------------------------------- 13. serve
def test_serve_on_a_busy_port_is_a_clear_error(small_manifest, cache, tmp_path):
    from fewshot.cli.serve import bind_socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        r = run("serve", "--index", tmp_path / "whatever", "--port", port, code=1)
        assert f"port {port} on 127.0.0.1 is already in use" in flat(r) and "--port" in flat(r)
        assert "serving" not in r.output  # nothing announced before the port was bound
    finally:
        busy.close()
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


# --------------------------------------------------------------------------- README and docs
def test_readme_classify_your_own_photos_works_as_written(photo_tree, cache, tmp_path, monkeypatch):
    """The "Classify your own photos" commands of docs/guides/your-data.md (they were the
    README's), on a plain folder tree, exactly as written (only PATH and the photo names filled in)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "your-data.md").read_text(encoding="utf-8")
    block = readme.split("## Classify your own photos", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("fewshot ")]
    assert len(commands) == 4
    photos = tmp_path / "photos"
    photos.mkdir()
    tree_photos = sorted(photo_tree.rglob("*.jpg"))
    for p in tree_photos[:3]:
        shutil.copyfile(p, photos / p.name)
    shutil.copyfile(tree_photos[5], tmp_path / "photo1.jpg")
    shutil.copyfile(tree_photos[9], tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSHOT_CACHE", str(cache))
    outputs = []
    for command in commands:
        argv = [str(photo_tree) if a == "PATH" else a for a in shlex.split(command)[1:]]
        outputs.append(run(*argv).output)
    assert "indexed 36 images of 6 articles into my-index" in outputs[0]
    assert len(re.findall(r"^\S+\.jpg\t", outputs[1], flags=re.M)) == 4  # photo1.jpg + the 3 in photos/
    line = json.loads([x for x in outputs[2].splitlines() if x.startswith("{")][-1])
    assert len(line["predictions"]) == 3 and line["in_catalogue"] is True  # photo.jpg is a catalogue photo


# --------------------------------------------------------------------------- found by trying to break it
def test_symlinks_do_not_get_past_the_data_check(photo_tree, cache, tmp_path):
    link = tmp_path / "LINK"
    link.symlink_to(photo_tree, target_is_directory=True)
    before = _files(photo_tree)
    common = ("--image-size", "64", "--cache-dir", cache, "--no-progress")
    r = run("index", "--data", photo_tree, "--out", link / "idx", *common, code=1)
    assert "inside (or contain) the input data folder" in flat(r)
    run("index", "--data", link, "--out", photo_tree / "idx", *common, code=1)
    run("evaluate", "--data", photo_tree, "--out", link / "ev", *common, code=1)
    assert _files(photo_tree) == before


def test_overwrite_never_deletes_files_fewshot_did_not_write(photo_tree, cache, tmp_path):
    common = ("--image-size", "64", "--cache-dir", cache, "--no-progress")
    idx = tmp_path / "idx"
    run("index", "--data", photo_tree, "--out", idx, *common)
    (idx / "my-notes.txt").write_text("important")
    r = run("index", "--data", photo_tree, "--out", idx, *common, "--overwrite", code=1)
    assert "files fewshot did not write (my-notes.txt)" in flat(r) and (idx / "my-notes.txt").is_file()
    ev = tmp_path / "ev"
    run("evaluate", "--data", photo_tree, "--out", ev, "--episodes", "30", *common)
    (ev / "analysis.md").write_text("mine")
    run("evaluate", "--data", photo_tree, "--out", ev, "--episodes", "30", *common, "--overwrite", code=1)
    assert (ev / "analysis.md").read_text() == "mine"
    fake = tmp_path / "other"
    fake.mkdir()
    (fake / "meta.json").write_text('{"format_version": 3}')  # looks like an index, is not one
    (fake / "data.bin").write_bytes(b"precious")
    run("index", "--data", photo_tree, "--out", fake, *common, "--overwrite", code=1)
    assert (fake / "data.bin").read_bytes() == b"precious"
    import os

    assert oct(os.stat(idx).st_mode & 0o777) != oct(0o700)  # an index folder gets the usual permissions


def test_a_folder_with_a_checkpoint_is_not_taken_for_a_run(tiny, tmp_path):
    proj = tmp_path / "myproj"
    (proj / "code").mkdir(parents=True)
    torch.save({"epoch": 3}, proj / "checkpoint.pt")
    (proj / "code" / "train.py").write_text("print('mine')")
    r = run("train", "--fine-tune", "none", "--data", tiny["data"], "--split-file", tiny["split_file"], "--out", proj, "--overwrite",
            "--image-size", "64", "--cache-dir", tiny["cache_dir"], "--no-progress", code=1)
    assert "not a fewshot training run" in flat(r) and (proj / "code" / "train.py").is_file()


def test_a_foreign_safetensors_file_is_not_replaced(small_manifest, tmp_path):
    from safetensors.numpy import load_file, save_file

    mine = tmp_path / "mine.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(mine), metadata={"config": "{}"})
    run("embed", "--data", small_manifest, "--out", mine, "--overwrite", "--image-size", "64", code=1)
    assert load_file(str(mine))["w"].tolist() == [1.0, 1.0, 1.0]


def test_classify_does_not_count_queries_that_cannot_be_right(drawn_tree, cache, tmp_path):
    common = ("--image-size", "64", "--cache-dir", cache, "--no-progress")
    one = tmp_path / "one"
    for cls in ("Red-Ball", "Blue-Box"):
        (one / cls).mkdir(parents=True)
        shutil.copyfile(sorted((drawn_tree / cls).glob("*.jpg"))[0], one / cls / "a.jpg")
    idx = tmp_path / "idx"
    run("index", "--data", one, "--out", idx, *common)
    run_opts = ("--cache-dir", cache, "--no-progress")
    r = run("classify", "--index", idx, "--data", one, "--summary-only", *run_opts, code=1)
    assert "no image of" in flat(r) and "can be scored" in flat(r)  # was "top-1 accuracy 0.0000"
    r = run("classify", "--index", idx, "--data", drawn_tree, "--summary-only", "--json", *run_opts)
    summary = json.loads(r.stdout.strip().splitlines()[-1])["summary"]  # --json: the summary is JSON too
    assert summary["num_images"] == 10 and summary["num_not_in_catalogue"] == 24
    assert summary["num_no_other_image"] == 2 and "26 image(s) not scored" in flat(r)


def test_an_interrupted_evaluation_write_is_put_right_by_the_next(small_manifest, cache, tmp_path):
    """A writer killed between replace_dir's two renames leaves the previous result at
    ``.OUT.old-PID`` and its unfinished folder at ``.OUT.XXXXXXXX.tmp``: the next evaluate into the
    same --out moves the previous result back (and so refuses it without --overwrite), and
    removes the unfinished folder; nothing else beside --out is touched."""
    out = tmp_path / "e"
    args = ["evaluate", "--data", small_manifest, "--split", "test", "--image-size", "64", "--episodes", "1",
            "--queries", "2", "--cache-dir", cache, "--no-progress"]
    run(*args, "--out", out)
    before = (out / "metrics.json").read_bytes()
    os.replace(out, tmp_path / ".e.old-4242")
    (tmp_path / ".e.ab12CD_x.tmp").mkdir()
    (tmp_path / ".e.ab12CD_x.tmp" / "metrics.json").write_text("{}")
    (tmp_path / ".e.mine.tmp").mkdir()  # not a name atomic_dir gives: left alone
    r = run(*args, "--out", out, code=1)
    assert "already exists" in r.output or "--overwrite" in r.output
    assert (out / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".e.mine.tmp", "e"]
