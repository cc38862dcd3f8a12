"""One image is one line (issue 27, item 10b): a newline, tab or other control character in a
file name or an article label is printed escaped by ``fewshot classify``, in its results and in
its ``error: PATH: reason`` lines; ``--json`` lines stay one line each and give the names back
exactly. Drawn photos at 64 px, no ../shared."""

from __future__ import annotations

import json
import re
import shutil

from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.cli.common import json_line, one_line

runner = CliRunner()
ODD_ARTICLE = "Odd\nBall\tX"  # a folder name with a newline and a tab: a label


def test_one_line_and_json_line():
    assert one_line("shelf/a\nb\tc\r\x1b[31m\u2028\u202ed.jpg") == "shelf/a\\nb\\tc\\r\\x1b[31m\\u2028\\u202ed.jpg"
    assert one_line("Café 1kg/ü.jpg") == "Café 1kg/ü.jpg"  # ordinary text is left alone
    line = json_line({"image": "a\nb\u2028c\u2029d\x85e.jpg", "label": "Café"})
    assert len(line.splitlines()) == 1 and "Café" in line
    assert json.loads(line) == {"image": "a\nb\u2028c\u2029d\x85e.jpg", "label": "Café"}


def test_classify_prints_one_line_per_image(drawn_tree, tmp_path):
    data = tmp_path / "photos"
    shutil.copytree(drawn_tree, data)
    (data / "Red-Ball").rename(data / ODD_ARTICLE)
    idx = tmp_path / "idx"
    r = runner.invoke(app, ["index", "--data", str(data), "--image-size", "64", "--out", str(idx),
                            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--runtime", "torch"])
    assert r.exit_code == 0, r.output
    queries = tmp_path / "queries"
    queries.mkdir()
    odd = queries / "new\nline\tname.jpg"
    shutil.copyfile(data / ODD_ARTICLE / "Red-Ball_00.jpg", odd)
    plain = queries / "plain.jpg"
    shutil.copyfile(data / "Blue-Box" / "Blue-Box_01.jpg", plain)
    broken = queries / "bro\nken.jpg"
    broken.write_bytes(b"not an image")
    args = ["classify", "--index", str(idx), "--top-k", "6", "--cache-dir", str(tmp_path / "cache"),
            "--runtime", "torch", str(odd), str(plain), str(broken)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 2, lines
    for line in lines:  # PATH, answer, predictions[, the catalogue-copy note]: the tabs are the columns
        assert line.split("\t")[3:] == ["[catalogue image: own copy left out]"]  # both are catalogue copies
    assert lines[0].startswith(one_line(odd) + "\t") and "new\\nline\\tname.jpg" in lines[0]
    assert lines[1].startswith(f"{plain}\t")
    assert all("Odd\\nBall\\tX (" in line for line in lines)  # the label, escaped, among the top 6
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in r.stderr.splitlines() if "bro" in line]  # the broken name: one line
    assert len(errors) == 1 and "bro\\nken.jpg: " in errors[0]
    r = runner.invoke(app, args + ["--json"])
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(odd), str(plain), str(broken)]  # exact names back
    assert ODD_ARTICLE in [p["label"] for p in rows[0]["predictions"]]
    auto = [row["answer"] for row in rows[:2]]
    assert all(a["unknown"] == (a["score"] < a["threshold"]) and a["target_far"] == 0.05 for a in auto)
    def column(a: dict) -> str:  # the answer, and for an unknown one its score and the threshold it missed
        if not a["unknown"]:
            return one_line(a["article"])
        said = f"unknown article, brand {a['brand']}" if a.get("brand") else "unknown"
        return f"{one_line(said)} ({a['open_score']} {a['score']:.3f} < {a['threshold']:.3f})"

    assert [line.split("\t")[1] for line in lines] == [column(a) for a in auto]
    # a threshold no score reaches: every photo is unknown, its nearest articles still listed
    r = runner.invoke(app, args[:-1] + ["--reject", "5"])
    said = [line.split("\t")[1] for line in r.stdout.splitlines()]  # the score and the threshold it missed
    assert len(said) == 2 and all(re.fullmatch(r"unknown \(relative -?\d\.\d{3} < 5\.000\)", a) for a in said), said
    assert "a threshold given by hand" in r.stderr
    r = runner.invoke(app, args[:-1] + ["--reject", "none"])  # the answer column is the best article
    none_lines = r.stdout.splitlines()
    assert [len(line.split("\t")) for line in none_lines] == [len(line.split("\t")) for line in lines]
    assert [line.split("\t")[1] for line in none_lines] == [one_line(row["predictions"][0]["label"]) for row in rows[:2]]
    r = runner.invoke(app, args[:-1] + ["--reject", "maybe"])
    assert r.exit_code != 0 and "--reject" in r.stderr and "not auto, none or a score" in r.stderr
    r = runner.invoke(app, args[:-1] + ["--open-score", "energy"])
    assert r.exit_code != 0 and "--open-score" in r.stderr and "relative" in r.stderr
