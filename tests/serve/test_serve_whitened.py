"""The service on a whitened catalogue (``fewshot index --whiten``): a query and an enrolment are
whitened by the index's own fit, a restart replays the enrolment alike, and the answer's scores
are those of the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fewshot.catalogue import build_index, load_index  # noqa: E402
from fewshot.catalogue.inputs import embed_images  # noqa: E402
from fewshot.serve.app import create_app  # noqa: E402

from serve_helpers import ARTICLES, IMAGE_SIZE, NEW_ARTICLE, PHOTOS_PER_ARTICLE, authed, small_catalogue  # noqa: E402


@pytest.fixture(scope="module")
def whitened(grocery_root: Path, tmp_path_factory):
    """The small service catalogue, indexed with ``whiten=True``."""
    from fewshot.embed.options import EmbedOptions

    small = small_catalogue(grocery_root, tmp_path_factory)
    out = tmp_path_factory.mktemp("whitened") / "index"
    opts = EmbedOptions(image_size=IMAGE_SIZE, cache_dir=str(small.index_dir.parent / "cache"), progress=False)
    build_index(str(small.index_dir.parent / "catalogue.csv"), out, embed=opts, model=small.model, whiten=True)
    return small, out


def _photo(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def test_classify_and_enrol_through_the_whitening(whitened) -> None:
    small, folder = whitened
    index = load_index(folder)
    assert index.whitening is not None and index.whitening.photos == len(ARTICLES) * PHOTOS_PER_ARTICLE
    client = authed(create_app(folder, model=small.model))
    assert client.get("/health").json()["whitened"] is True
    query = small.test[NEW_ARTICLE][0]
    raw, _, _ = embed_images(small.model, [query], runtime="auto")
    want = index.classify(raw, top_k=3)[0]  # the index whitens the model's embedding
    y = index.whitening.apply(raw)
    assert want[0].score == pytest.approx(float((y @ index.prototypes.T).max()), abs=1e-5)
    got = client.post("/classify", files={"file": _photo(query)}).json()
    assert [(p["label"], round(p["score"], 4)) for p in got["predictions"][:3]] == \
        [(p.label, round(p.score, 4)) for p in want]

    enrol = small.train[NEW_ARTICLE][:4]
    resp = client.post("/articles", data={"label": NEW_ARTICLE, "group": "Melon"},
                       files=[("files", _photo(p)) for p in enrol])
    assert resp.status_code == 201, resp.text
    assert resp.json()["reject"]["reject"] == "auto"
    top = client.post("/classify", files={"file": _photo(query)}).json()["predictions"][0]
    assert top["label"] == NEW_ARTICLE
    live = client.app.state.service.catalogue.index
    stored = live.vector_rows(len(live) - 4, len(live))
    enrolled_raw, _, _ = embed_images(small.model, enrol, runtime="auto")
    np.testing.assert_allclose(stored, index.whitening.apply(enrolled_raw), atol=1e-5)
    client.app.state.service.close()
    replayed = load_index(folder)  # the journal holds the model's embeddings, whitened on replay
    np.testing.assert_allclose(replayed.vector_rows(len(replayed) - 4, len(replayed)), stored, atol=1e-6)
    again = authed(create_app(folder, model=small.model))
    assert again.post("/classify", files={"file": _photo(query)}).json()["predictions"][0]["label"] == NEW_ARTICLE
    again.app.state.service.close()
