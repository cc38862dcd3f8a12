"""``fewshot index`` / ``classify`` flags generated from each index kind's options: one help panel
per kind, another kind's flag refused, and library errors re-worded with the flag."""

from __future__ import annotations

from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.index.kinds import ivfpq

runner = CliRunner()


def said(*args, code: int) -> str:
    """The command's output as one line (rich boxes and wrapping removed)."""
    r = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    return " ".join(r.output.replace("│", " ").split())


def test_help_shows_each_kinds_options_from_its_declaration():
    text = said("index", "--help", code=0)
    for panel, flags in (("ivfpq options", ["--nlist", "--pq-m", "--train-size", "--nprobe", "--rerank", "--index-seed"]),
                         ("hnsw options", ["--hnsw-m", "--ef-construction", "--ef-search"])):
        part = text.split(panel)[1].split("╰")[0]
        assert all(flag in part for flag in flags), (panel, part)
    assert "Bytes per image (PQ sub-quantizers; must divide the dimension" in text  # the option's own help
    assert "Candidates explored per query, stored as the query-time default; classify can override. Default 64." in text
    assert "ivfpq: approximate, compressed" in text and "auto = flat below 200,000 images, else ivfpq." in text
    text = said("classify", "--help", code=0)
    assert "--nprobe" in text.split("ivfpq options")[1] and "--ef-search" in text.split("hnsw options")[1]
    assert "--nlist" not in text and "Default: the index's own." in text


def test_another_kinds_flag_is_a_usage_error_naming_the_kinds_own(tmp_path):
    text = said("index", "--data", "x.csv", "--out", tmp_path / "i", "--index-type", "hnsw", "--nlist", "4",
                "--pq-m", "8", code=2)
    assert ("--nlist, --pq-m do not apply to --index-type hnsw (an option of ivfpq); options of hnsw: "
            "--ef-construction, --ef-search, --hnsw-m") in text
    text = said("index", "--data", "x.csv", "--out", tmp_path / "i", "--index-type", "annoy", code=1)
    assert "unknown index type 'annoy'" in text and "fix: use --index-type auto|flat|hnsw|ivfpq" in text
    assert not (tmp_path / "i").exists()


def test_library_option_errors_reach_the_cli_with_the_flag(small_manifest, tmp_path, monkeypatch):
    """The library says ``m = 7`` / ``nlist = 5`` / ``index_type='ivfpq'``; the CLI says the flags."""
    common = ["index", "--data", small_manifest, "--split", "train", "--image-size", "64", "--no-progress",
              "--cache-dir", tmp_path / "cache", "--out", tmp_path / "idx", "--index-type", "ivfpq"]
    text = said(*common, code=1)
    assert "error: --index-type ivfpq needs at least 1,000 catalogue images" in text
    assert "fix: use --index-type flat (exact, and fast at this size) or auto" in text
    monkeypatch.setattr(ivfpq, "MIN_IVFPQ_IMAGES", 10)  # so that the next checks are reached on 36 images
    text = said(*common, "--pq-m", "7", code=1)
    assert "error: --pq-m 7 does not divide the embedding dimension 1280" in text
    assert "fix: use a divisor of 1280, e.g. --pq-m 8 / 16 / 32 / 64 / 128" in text
    text = said(*common, "--nlist", "5", code=1)
    assert "error: --nlist 5 is too many cells for 36 images" in text and "use --nlist 1 or fewer" in text
    assert not (tmp_path / "idx").exists()


def test_classify_passes_query_time_options_to_the_index(small_manifest, tmp_path):
    kind = "flat"
    common = ["--data", small_manifest, "--image-size", "64", "--no-progress", "--cache-dir", tmp_path / "cache"]
    said("index", *common, "--split", "train", "--out", tmp_path / "idx", "--index-type", kind, code=0)
    text = said("classify", "--index", tmp_path / "idx", "--data", small_manifest, "--split", "test", "--summary-only",
                "--cache-dir", tmp_path / "cache", "--nprobe", "4", "--ef-search", "8", code=0)
    assert f"nprobe applies to an ivfpq index; this one is {kind}, so it is ignored" in text
    assert f"ef_search applies to an hnsw index; this one is {kind}, so it is ignored" in text
    assert "top-1 accuracy" in text
    text = said("classify", "--index", tmp_path / "idx", "--data", small_manifest, "--nprobe", "0", code=2)
    assert "Invalid value for '--nprobe'" in text
