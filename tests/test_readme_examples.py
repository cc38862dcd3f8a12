"""The README's examples print what the README shows. The main job builds the Grocery index
(`runs/grocery-index`); then each example of "What it does" runs as written, in a folder with
`photos/` (the three Grocery test photos the README names) and `splits/`, and every line of the
output block after it (but `...`) must be a line of what its commands printed. Not run here:
`train` (minutes; its output is dated in the README, and tests/test_readme_own_photos.py runs
the walkthrough) and `serve` (it runs until stopped; tests/serve/ start the service)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: commands whose examples this test does not run (see the docstring)
NOT_RUN = {"train", "split", "serve"}
PHOTOS = ("Granny-Smith_001.jpg", "Oatly-Oat-Milk_001.jpg", "Red-Bell-Pepper_001.jpg")

pytestmark = pytest.mark.slow


def readme_examples() -> list[tuple[list[str], list[str]]]:
    """(shell lines, the output lines shown after them) of each example of "What it does"."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## What it does", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"```bash\n(.*?)```\s*```\n(.*?)```", section, re.DOTALL)
    return [(cmds.strip().splitlines(), out.strip().splitlines()) for cmds, out in pairs]


def _fewshot(line: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = "import sys; from fewshot.cli import main; sys.argv[0] = 'fewshot'; main()"
    res = subprocess.run([sys.executable, "-c", code, *shlex.split(line)[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, f"{line}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_readme_examples_print_what_the_readme_shows(shared, tmp_path):
    examples = readme_examples()
    assert len(examples) >= 6
    test_photos = shared / "data" / "grocery-store-dataset" / "dataset" / "test"
    (tmp_path / "photos").mkdir()
    for name in PHOTOS:
        shutil.copyfile(next(test_photos.rglob(name)), tmp_path / "photos" / name)
    shutil.copytree(REPO / "splits", tmp_path / "splits")
    setup = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.DOTALL).group(1)
    for command in setup.splitlines()[1].replace("../shared/data", str(shared / "data")).split(" && "):
        _fewshot(command, tmp_path)  # the main job: runs/grocery-index
    ran = 0
    for commands, shown in examples:
        if any(shlex.split(c)[1] in NOT_RUN for c in commands):
            continue
        printed = set()
        for command in commands:
            printed |= set(_fewshot(command, tmp_path).splitlines())
        missing = [line for line in shown if line.strip() != "..." and line not in printed]
        assert not missing, f"{commands} did not print:\n" + "\n".join(missing)
        ran += 1
    assert ran >= 4
