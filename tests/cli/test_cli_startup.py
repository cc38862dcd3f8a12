"""``fewshot --version`` and every ``--help`` start without the heavy modules (issue 32: a CLI
that starts at once). Asserted as an import fact in fresh processes, not as a time: the times
are measured apart (median of 5 fresh processes, in the issue's report)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
#: what no help and no --version may import: torch and what pulls it, the numeric stack, FAISS,
#: ONNX Runtime, plotting, the service
HEAVY = ("torch", "numpy", "faiss", "onnxruntime", "onnx", "sklearn", "scipy", "matplotlib", "pandas", "PIL",
         "pytorch_metric_learning", "safetensors", "fastapi", "uvicorn")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
           "COLUMNS": "100"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def _imported(importtime_log: str) -> set[str]:
    """Top-level names of the modules a ``python -X importtime`` run imported."""
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("argv", [["--version"], ["classify", "--help"]], ids=["version", "classify-help"])
def test_the_command_starts_without_heavy_modules(argv):
    """The issue's two measured commands, through ``python -m fewshot`` as a user runs them."""
    r = _run(["-X", "importtime", "-m", "fewshot", *argv])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("fewshot " in r.stdout) if argv == ["--version"] else ("Examples" in r.stdout and "--index" in r.stdout)
    imported = _imported(r.stderr)
    assert "typer" in imported and "fewshot" in imported  # the log was read
    assert sorted(imported & set(HEAVY)) == []


#: every help of the tree in one fresh process (the commands found by walking it), then the
#: modules it imported
_EVERY_HELP = """
import sys
import typer
from fewshot.cli import app

root = typer.main.get_command(app)
paths = []

def walk(cmd, path):
    paths.append(path)
    for name, sub in getattr(cmd, "commands", {}).items():
        walk(sub, [*path, name])

walk(root, [])
for path in paths:
    try:
        root.main([*path, "--help"], prog_name="fewshot", standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (path, exc.code)
print(len(paths), sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY)))
"""


def test_every_help_starts_without_heavy_modules():
    r = _run(["-c", f"HEAVY = {HEAVY!r}\n" + _EVERY_HELP])
    assert r.returncode == 0, r.stderr[-2000:]
    count, heavy = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 15  # the top level, 12 commands, datasets and its 2 sub-commands
    assert heavy == "[]"
