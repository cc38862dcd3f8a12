"""The embeddings file of `fewshot embed` (fewshot.embed.export): written in either format,
recognised as ours, and anything else refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fewshot.data.records import Dataset, ImageRecord
from fewshot.embed import Embeddings
from fewshot.embed.export import check_embeddings_name, is_embeddings_file, save_embeddings
from fewshot.errors import DataError


def _embeddings() -> Embeddings:
    records = [ImageRecord(Path(f"/photos/{i}.jpg"), f"a{i % 2}", "g" if i else None) for i in range(3)]
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    return Embeddings(vectors, Dataset(records, name="toy"))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_written_files_are_recognised_and_hold_the_rows(tmp_path, suffix):
    out = tmp_path / f"emb{suffix}"
    check_embeddings_name(out)
    assert save_embeddings(out, _embeddings(), {"fewshot_version": "x"}) == (3, 4)
    assert is_embeddings_file(out)
    if suffix == ".npz":
        with np.load(out, allow_pickle=False) as z:
            vectors, labels, groups = z["embeddings"], list(z["labels"]), list(z["groups"])
        assert groups == ["", "g", "g"]
    else:
        vectors = load_file(str(out))["embeddings"]
        from safetensors import safe_open

        with safe_open(str(out), "np") as fh:
            meta = fh.metadata()
        labels = json.loads(meta["labels"])
        assert json.loads(meta["groups"]) == [None, "g", "g"]
    assert vectors.dtype == np.float32 and vectors.tolist() == _embeddings().vectors.tolist()
    assert labels == ["a0", "a1", "a0"]


def test_other_files_are_not_ours(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, embeddings=np.zeros((1, 2)))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert not is_embeddings_file(foreign) and not is_embeddings_file(other)
    assert not is_embeddings_file(tmp_path / "missing.safetensors")


def test_an_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown output format '.csv'") as info:
        check_embeddings_name(tmp_path / "emb.csv")
    assert ".safetensors" in info.value.hint
