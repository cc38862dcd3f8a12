"""``fewshot check`` end to end (report folder, exit code, refusals) and the check at the end of
``fewshot index``, on the planted catalogue of tests/check_helpers.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from check_helpers import COPY, IMAGE_SIZE, planted_catalogues
from fewshot.catalogue.check_report import is_check_dir
from fewshot.cli import app

runner = CliRunner()


def run(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def flat(text: str) -> str:
    """The output with the warnings' wrapped lines joined (single spaces)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def catalogues(grocery_root: Path, tmp_path_factory):
    return planted_catalogues(grocery_root, tmp_path_factory)


def test_check_writes_its_report_and_exits_0_with_warnings(catalogues, tmp_path: Path):
    out = tmp_path / "report"
    r = run("check", "--index", catalogues.planted, "--out", out)
    assert "likely_mislabel      1" in r.output and "same_photo           1" in r.output
    assert re.search(r"WARNING likely mislabels: 1 \(a photo \(Carrots_\w+\.jpg\) of 'Aubergine' is nearer to "
                     r"'Carrots' \(cosine 0\.790\)", flat(r.output)), flat(r.output)
    doc = json.loads((out / "check.json").read_text())
    assert is_check_dir(out) and doc["format"] == "fewshot.check" and doc["config"]["fewshot_version"]
    assert doc["counts"] == {"same_photo": 1, "near_duplicate": 4, "likely_mislabel": 1, "confusable_articles": 1,
                             "single_photo": 0}
    assert doc["levels"] == {"duplicate_cosine": 0.97, "mislabel_margin": 0.15, "confusable_cosine": 0.95,
                             "confusable_share": 0.25, "min_confusions": 2}
    twins = [f for f in doc["findings"] if f["kind"] == "confusable_articles"][0]
    assert twins["articles"] == ["Granny-Smith", COPY] and twins["figures"]["confusions"] == 8
    assert twins["figures"]["prototype_cosine"] > 0.99
    mis = [f for f in doc["findings"] if f["kind"] == "likely_mislabel"][0]
    assert mis["images"] == [str(catalogues.swapped)] and mis["figures"]["margin"] > 0.3
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "figures").iterdir())
    assert pngs == sorted(f["figure"] for f in doc["findings"]) and len(pngs) == 7
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (out / "check.md").read_text()
    assert "| likely mislabels | 1 |" in md and "Aubergine / Carrots" in md and "cosine >= 0.97" in md

    run("check", "--index", catalogues.planted, "--out", out, code=1)  # an earlier check: --overwrite
    run("check", "--index", catalogues.planted, "--out", out, "--overwrite", "--max-figures", "2")
    assert len(list((out / "figures").iterdir())) == 2


def test_a_clean_catalogue_gives_nothing_and_the_default_out_is_beside_the_index(catalogues, tmp_path: Path):
    index = tmp_path / "clean"
    import shutil

    shutil.copytree(catalogues.clean, index)
    r = run("check", "--index", index)
    doc = json.loads((tmp_path / "clean-check" / "check.json").read_text())
    assert doc["findings"] == [] and set(doc["counts"].values()) == {0}
    assert "Nothing found" in (tmp_path / "clean-check" / "check.md").read_text() and "WARNING" not in r.output
    assert "wrote " in r.output and "clean-check/check.json" in r.output


def test_the_default_out_of_index_dot_is_beside_it(catalogues, tmp_path: Path, monkeypatch):
    import shutil

    shutil.copytree(catalogues.clean, tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    run("check", "--index", ".")
    assert json.loads((tmp_path / "here-check" / "check.json").read_text())["findings"] == []


def test_check_refuses_what_it_may_not_write_or_read(catalogues, tmp_path: Path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    r = run("check", "--index", catalogues.planted, "--out", foreign, code=1)
    assert "not a fewshot check" in r.output and (foreign / "mine.txt").read_text() == "keep me"
    r = run("check", "--index", catalogues.planted, "--out", catalogues.planted / "report", code=1)
    assert "inside" in r.output
    r = run("check", "--index", tmp_path / "nowhere", "--out", tmp_path / "r", code=1)
    assert "error:" in r.output and not (tmp_path / "r").exists()
    r = run("check", "--index", catalogues.planted, "--out", tmp_path / "r", "--duplicate-cosine", "1.5", code=1)
    assert "--duplicate-cosine" in r.output and not (tmp_path / "r").exists()


def test_index_warns_of_the_defects_it_finds(catalogues, tmp_path: Path):
    r = run("index", "--data", catalogues.manifest, "--out", tmp_path / "idx", "--image-size", IMAGE_SIZE,
            "--cache-dir", catalogues.cache, "--no-progress")
    out = flat(r.output)
    for line in ("same photo under two articles: 1", "near-duplicate photos: 4", "likely mislabels: 1",
                 "confusable articles: 1 ('Granny-Smith' and 'Granny-Smith-Copy' are hard to tell apart: "
                 "prototype cosine 0.999, 8 of 8 photos taken for the other"):
        assert f"WARNING catalogue check: {line}" in out
    assert "single-photo" not in out and "fewshot check --index" in out and not (tmp_path / "idx-check").exists()
    r = run("index", "--data", catalogues.manifest, "--out", tmp_path / "idx", "--image-size", IMAGE_SIZE,
            "--cache-dir", catalogues.cache, "--no-progress", "--overwrite", "--no-check")
    assert "catalogue check" not in r.output
