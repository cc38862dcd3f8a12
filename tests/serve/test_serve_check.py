"""The service's enrol answer carries the catalogue check's warnings about the enrolled article
(fewshot.catalogue.check.check_article), naming photos as the service does, never by server paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fewshot.catalogue import load_index  # noqa: E402
from fewshot.catalogue.check import check_article  # noqa: E402
from fewshot.serve.app import create_app  # noqa: E402

from serve_helpers import NEW_ARTICLE, PHOTOS_PER_ARTICLE, authed, small_catalogue  # noqa: E402


def photo(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def test_enrolment_warns_of_the_enrolled_article_defects(grocery_root: Path, tmp_path_factory, tmp_path: Path):
    catalogue = small_catalogue(grocery_root, tmp_path_factory)
    own = tmp_path / "index"
    shutil.copytree(catalogue.index_dir, own)
    client = authed(create_app(own, model=catalogue.model))
    resp = client.post("/articles", data={"label": NEW_ARTICLE},
                       files=[("files", photo(p)) for p in catalogue.train[NEW_ARTICLE][:4]])
    assert resp.status_code == 201 and resp.json()["warnings"] == []  # a new, distinct article: nothing to say

    banana = catalogue.train["Banana"][:2]  # both in the catalogue already, under Banana
    resp = client.post("/articles", data={"label": "Banana-Again"}, files=[("files", photo(p)) for p in banana])
    assert resp.status_code == 201, resp.text
    warnings = resp.json()["warnings"]
    same = [w for w in warnings if w["kind"] == "same_photo"]
    assert len(same) == 2 and all(w["articles"] == ["Banana-Again", "Banana"] for w in same)
    assert all(w["message"] == f"the same photo ({w['images'][0]['name'].split('/')[-1]}) (identical file) is under "
               "'Banana-Again' and 'Banana'" for w in same)
    assert len({w["message"] for w in same}) == len(same)  # each names its photo
    shown = {i["name"] for w in same for i in w["images"]}
    assert {p.name for p in banana} <= shown and sum(n.startswith("enrolled/") for n in shown) == 2
    assert not any(Path(i["name"]).is_absolute() or str(grocery_root) in i["name"] for w in warnings for i in w["images"])
    assert all(i["image_url"].startswith("/catalogue-image/") for w in warnings for i in w["images"])
    # the same findings, with the same figures, as the check of the saved folder
    client.app.state.service.close()
    expected = check_article(load_index(own), "Banana-Again").findings
    assert [(w["kind"], w["articles"], w["figures"]) for w in warnings] == \
        [(f.kind, list(f.articles), f.figures) for f in expected]
    assert len(load_index(own)) == 6 * PHOTOS_PER_ARTICLE + 4 + 2


def test_a_single_photo_enrolment_says_so(grocery_root: Path, tmp_path_factory, tmp_path: Path):
    catalogue = small_catalogue(grocery_root, tmp_path_factory)
    own = tmp_path / "index"
    shutil.copytree(catalogue.index_dir, own)
    client = authed(create_app(own, model=catalogue.model))
    resp = client.post("/articles", data={"label": NEW_ARTICLE}, files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))])
    single = [w for w in resp.json()["warnings"] if w["kind"] == "single_photo"]
    assert single == [{"kind": "single_photo", "articles": [NEW_ARTICLE], "figures": {"photos": 1},
                       "message": f"'{NEW_ARTICLE}' has a single photo: add more (one photo is a poor prototype and "
                                  "cannot be checked)", "images": single[0]["images"]}]
    assert len(single[0]["images"]) == 1 and single[0]["images"][0]["name"].startswith("enrolled/")
    client.app.state.service.close()
