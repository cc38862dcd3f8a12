"""The documentation site builds with ``mkdocs build --strict`` (mkdocs.yml): a broken link or
anchor, a page missing from the navigation, a docstring reference that does not resolve or a
command-line reference that cannot be generated fails the test suite. mkdocs and its plugins
are in the dev extra (``pip install -e ".[dev]" -c constraints.txt``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason='mkdocs is not installed: it is in the dev extra (pip install -e ".[dev]" -c constraints.txt)')
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: it is in the dev extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
                           "--site-dir", str(site)], check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def test_the_site_builds_strictly_with_both_references(tmp_path):
    from typer.main import get_command

    from fewshot.cli import app

    res = build(REPO, tmp_path / "site")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    commands = sorted(get_command(app).commands)
    assert len(commands) >= 10
    missing = [c for c in commands if f"fewshot {c}</code>" not in cli]
    assert not missing, f"commands missing from the CLI reference: {missing}"
    assert "--target-far" in cli and "--index-type" in cli
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("fewshot.api.load_dataset", "fewshot.catalogue.Catalogue.classify", "fewshot.training.make_config"):
        assert f'id="{name}"' in api, name
    changelog = (tmp_path / "site" / "changelog" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<h2[^>]*>0\.2\.0", changelog)


def test_a_broken_link_fails_the_build(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    for name in ("src", "scripts", "CHANGELOG.md"):
        (root / name).symlink_to(REPO / name)
    page = root / "docs" / "guides" / "open-set.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n", encoding="utf-8")
    res = build(root, tmp_path / "site")
    assert res.returncode != 0 and "no-such-page.md" in res.stdout + res.stderr
