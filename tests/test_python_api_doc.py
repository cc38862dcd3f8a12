"""docs/python-api.md runs: its examples are doctests on the Grocery data in ../shared."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_python_api_page_runs(grocery_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the page names splits/grocery-unseen.json relative to the repository
    result = doctest.testfile(str(REPO / "docs" / "python-api.md"), module_relative=False,
                              globs={"GROCERY": str(grocery_root), "tmp": tmp_path},
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= 30
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of docs/python-api.md failed (see above)"
    assert os.environ.get("FEWSHOT_CACHE") is None or Path(os.environ["FEWSHOT_CACHE"]).exists()
