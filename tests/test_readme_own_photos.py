"""The "Train on your own photos" walkthrough of docs/guides/training.md (it was the README's),
run as written (commands parsed from the page) on a small Brand/Article/photo tree of real
Grocery photos: split -> train -> evaluate -> index -> classify (and serve's options)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: what the test adds to `fewshot train` so that it runs in seconds (the page's own options stay)
FAST_TRAIN = ["--epochs", "1", "--image-size", "64", "--test-image-size", "64", "--eval-episodes", "50", "--val-episodes", "30"]


def readme_commands() -> list[list[str]]:
    text = (REPO / "docs" / "guides" / "training.md").read_text(encoding="utf-8")
    section = text.split("## Train on your own photos", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines() if line.strip()]


def _fewshot(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from fewshot.cli import main; sys.argv[0] = 'fewshot'; main()"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def test_readme_walkthrough_on_a_folder_tree(brand_tree, grocery_root, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(brand_tree, work / "my-photos")
    new = work / "new-photos"
    new.mkdir()
    for article in ("Granny-Smith", "Oatly-Oat-Milk", "Red-Bell-Pepper"):
        src = sorted((grocery_root / "dataset" / "test").rglob(f"{article}_*.jpg"))[0]
        shutil.copyfile(src, new / src.name)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["fewshot", "split"], ["fewshot", "train"], ["fewshot", "evaluate"],
                                         ["fewshot", "index"], ["fewshot", "classify"], ["fewshot", "serve"]]
    outputs = []
    for cmd in commands:
        args = cmd[1:] + (FAST_TRAIN if cmd[1] == "train" else ["--help"] if cmd[1] == "serve" else [])
        res = _fewshot(args, work)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr[-3000:]}"
        outputs.append(res.stdout)
    split_out, train_out, eval_out, index_out, classify_out, serve_help = outputs
    assert "train    40 classes in 24 group(s)" in split_out and (work / "my-split.json").is_file()
    assert "test classes: mAP" in train_out and (work / "runs/my-model/model.safetensors").is_file()
    assert re.search(r"^mAP 0\.\d+  MAP@R 0\.\d+", eval_out, re.M)
    assert (work / "runs/my-eval/embedding_map.png").stat().st_size > 10_000
    assert "indexed 324 images of 81 articles" in index_out
    lines = [line for line in classify_out.splitlines() if line.startswith("new-photos/")]
    assert len(lines) == 3 and all("\t" in line for line in lines)
    # PATH, the answer (an article or unknown), the ranked articles
    top1 = {Path(line.split("\t")[0]).name.rsplit("_", 1)[0]: line.split("\t")[2].split(" (")[0] for line in lines}
    assert sum(a == b for a, b in top1.items()) >= 2, top1
    answers = [line.split("\t")[1] for line in lines]
    assert all(re.fullmatch(r"unknown( article, brand .+)? \(relative -?\d\.\d{3} < \d\.\d{3}\)", a) or a == t
               for a, t in zip(answers, [line.split("\t")[2].split(" (")[0] for line in lines])), answers
    assert "--index" in serve_help and "--port" in serve_help
