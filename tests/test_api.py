"""The Python API's edges on drawn photos (no ../shared): bad images, refused outputs, a
catalogue that survives save/load and gives the same answers."""

from __future__ import annotations

import numpy as np
import pytest

import fewshot
from fewshot.errors import DataError, FewshotError, ImageReadError


@pytest.fixture(scope="module")
def catalogue(drawn_tree):
    model = fewshot.create_backbone("efficientnet_lite0", image_size=64)
    return fewshot.Catalogue.build(model, fewshot.load_dataset(drawn_tree), runtime="torch")


def test_bad_images_are_clear_errors(catalogue, tmp_path):
    with pytest.raises(DataError, match="dtype float64"):
        catalogue.classify([np.zeros((8, 8, 3))])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        catalogue.classify([bad])
    with pytest.raises(ImageReadError):
        catalogue.add("New", [bad])
    assert "New" not in catalogue.articles
    with pytest.raises(DataError, match="no images given"):
        catalogue.add("New", [])


def test_grey_arrays_paths_and_save_load_agree(catalogue, drawn_tree, tmp_path):
    from PIL import Image

    photo = sorted(drawn_tree.rglob("*.jpg"))[0]
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    by_path = catalogue.classify([photo], top_k=2)[0]
    by_array = catalogue.classify([rgb], top_k=2)[0]
    assert by_path.in_catalogue and not by_array.in_catalogue  # a path is recognised as a catalogue image
    assert catalogue.classify([rgb[..., 0]], top_k=1)[0].predictions  # grey [H, W] works
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FewshotError):
        catalogue.save(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    folder = catalogue.save(tmp_path / "idx")
    with pytest.raises(FewshotError) as err:  # the hint names the Python argument, not the CLI flag
        catalogue.save(folder)
    assert "pass overwrite=True to replace it" in str(err.value) and "--" not in str(err.value)
    again = fewshot.Catalogue.load(folder, runtime="torch")
    a = catalogue.classify([rgb], top_k=3)[0].predictions
    b = again.classify([rgb], top_k=3)[0].predictions
    assert [p.label for p in a] == [p.label for p in b]
    assert [p.score for p in a] == pytest.approx([p.score for p in b], abs=1e-5)
