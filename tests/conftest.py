"""Shared test fixtures: where the real data lives.

The shared data folder is found through ``FEWSHOT_SHARED`` (default: ``../shared`` beside the
repository root). Nothing from it is copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("FEWSHOT_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "data").is_dir():
        pytest.fail(f"shared data folder not found at {path}: set FEWSHOT_SHARED")
    return path


@pytest.fixture(scope="session")
def grocery_root(shared: Path) -> Path:
    return shared / "data" / "grocery-store-dataset"


@pytest.fixture(scope="session")
def omniglot_root(shared: Path) -> Path:
    return shared / "data" / "omniglot" / "images_background_small1"
