"""``fewshot.index`` loads FAISS and NumPy on first use (issue 32), and every name it exported
before that change still imports from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: the names ``from fewshot.index import ...`` gave at fewshot 0.1.0 (bfa2033)
NAMES_OF_0_1_0 = ("AnnConfig", "BLAS_MIN_QUERIES", "CatalogueIndex", "INDEX_TYPES", "MODES", "Neighbor", "Prediction",
                  "Ranking", "check_classify", "faiss_blas_setting", "Growable", "OnDemandPrototypes", "Prototypes",
                  "VectorStore", "l2_normalize", "normalized_copy", "ann")


@pytest.mark.parametrize("name", NAMES_OF_0_1_0)
def test_every_name_of_0_1_0_still_imports(name):
    import fewshot.index

    assert getattr(fewshot.index, name) is not None


def test_unknown_name_is_an_attribute_error():
    import fewshot.index

    with pytest.raises(AttributeError, match="no_such_name"):
        fewshot.index.no_such_name  # noqa: B018


def test_importing_the_package_loads_no_faiss():
    code = "import sys, fewshot.index; print('faiss' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
