"""The package as a user gets it. ``python -m build`` makes a wheel and an sdist of the
repository; the wheel installs in a fresh virtual environment with constraints.txt (the versions
the project is tested with: torch 2.13.0, on this workplace a CPU wheel on disk), and there
``fewshot --version`` and the README's main job run as written (top-1 0.5988), with the ONNX
Runtime forward pass of the core install (no extra). A few minutes: marked slow."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _main_job(shared: Path) -> str:
    """The README's main-job line, with its ``../shared/data`` mirror made absolute."""
    lines = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.DOTALL).group(1).splitlines()
    job = lines[1]
    assert job.startswith("fewshot datasets fetch grocery --mirror ../shared/data && fewshot index")
    return job.replace("../shared/data", str(shared / "data"))


def _three_photos(shared: Path, into: Path) -> Path:
    for name in ("Granny-Smith_001.jpg", "Oatly-Oat-Milk_001.jpg", "Red-Bell-Pepper_001.jpg"):
        src = next((shared / "data" / "grocery-store-dataset" / "dataset" / "test").rglob(name))
        (into / name.split("_")[0]).mkdir(parents=True)
        shutil.copyfile(src, into / name.split("_")[0] / name)
    return into


def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_main_job(shared, tmp_path):
    pytest.importorskip("build", reason="the build package is not installed: it is in the dev extra")
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv must use the wheel, not src/
    dist, tree = tmp_path / "dist", tmp_path / "repo"  # built from a copy: the build writes *.egg-info beside src
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "site", "build", "dist",
                                                               "*.egg-info", "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "build", "--outdir", dist, tree], env=env, timeout=900)
    wheel, sdist = dist / f"fewshot-{version}-py3-none-any.whl", dist / f"fewshot-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
    assert {f"fewshot-{version}/src/fewshot/serve/static/index.html", f"fewshot-{version}/README.md"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], env=env, timeout=300)
    bin_dir = venv / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, "-c", REPO / "constraints.txt"], env=env, timeout=1800)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}
    assert _run([bin_dir / "fewshot", "--version"], env=env, cwd=tmp_path).stdout.strip() == f"fewshot {version}"
    where = _run([bin_dir / "python", "-c", "import fewshot, torch; print(fewshot.__file__, torch.__version__)"],
                 env=env, cwd=tmp_path).stdout
    assert where.startswith(str(venv)) and " 2.13.0" in where, where

    job = _run(["bash", "-c", _main_job(shared)], env=env, cwd=tmp_path, timeout=1800)
    assert "top-1 accuracy 0.5988" in job.stdout, job.stdout[-2000:]

    out = tmp_path / "three.safetensors"  # embedded afresh (own cache): the forward pass really runs
    _run([bin_dir / "fewshot", "embed", "--data", _three_photos(shared, tmp_path / "three"), "--out", out,
          "--runtime", "onnx", "--cache-dir", tmp_path / "cache", "--no-progress"], env=env, cwd=tmp_path, timeout=600)
    read = "import sys; from safetensors import safe_open; print(safe_open(sys.argv[1], 'np').metadata()['config'])"
    meta = _run([bin_dir / "python", "-c", read, out], env=env, cwd=tmp_path).stdout
    runtimes = json.loads(meta)["model"]["runtimes"]
    assert [(r["runtime"], r["notice"]) for r in runtimes] == [("onnx", None)], runtimes
