"""The HTTP service (fewshot.serve) on a small real Grocery index, through FastAPI's TestClient.

Covers classify, the catalogue thumbnails, enrol -> classify -> delete, persistence across a
restart, racing enrolments, a failure in the middle of a write, and every kind of bad input
(each answered with a 4xx JSON error and leaving the index folder byte-for-byte unchanged).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from PIL import Image  # noqa: E402

from fewshot.catalogue import load_index  # noqa: E402
from fewshot.catalogue.store import ENROLLED_DIR  # noqa: E402
from fewshot.serve.app import create_app  # noqa: E402

from serve_helpers import ARTICLES, NEW_ARTICLE, PHOTOS_PER_ARTICLE, authed, small_catalogue  # noqa: E402

N_IMAGES = len(ARTICLES) * PHOTOS_PER_ARTICLE


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def catalogue(grocery_root: Path, tmp_path_factory):
    return small_catalogue(grocery_root, tmp_path_factory)


@pytest.fixture(scope="module")
def client(catalogue):
    """A client over the shared index: only for requests that must not change it."""
    return authed(create_app(catalogue.index_dir, model=catalogue.model))


@pytest.fixture
def own_index(catalogue, tmp_path: Path) -> Path:
    """A private copy of the index folder, for tests that change it."""
    dst = tmp_path / "index"
    shutil.copytree(catalogue.index_dir, dst)
    return dst


def folder_digest(path: Path) -> str:
    """Hash of every file (relative name + bytes) under ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def photo(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width * 3 + 1))) + chunk(b"IEND", b""))


def assert_error(resp, status: int, code: str, *fragments: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == code, body
    for fragment in fragments:
        assert fragment.lower() in body["message"].lower(), body
    return body


# --------------------------------------------------------------------------- read-only API
def test_health_openapi_and_page(client, catalogue) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok"
    assert (h["articles"], h["images"], h["image_size"]) == (len(ARTICLES), N_IMAGES, 96)
    assert h["backbone"] == "efficientnet_lite0"
    schema = client.get("/openapi.json").json()
    for path in ("/classify", "/articles", "/articles/{label}", "/health", "/catalogue-image/{image_id}"):
        assert path in schema["paths"], path
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="classify-form"' in page.text and 'id="enrol-form"' in page.text
    assert client.get("/static/app.js").status_code == 200
    arts = client.get("/articles").json()
    assert arts["count"] == len(ARTICLES)
    assert {a["label"]: a["num_images"] for a in arts["articles"]} == {a: PHOTOS_PER_ARTICLE for a in ARTICLES}
    assert all(a["group"] == catalogue.groups[a["label"]] and not a["enrolled"] for a in arts["articles"])


def test_classify_held_out_photo(client, catalogue) -> None:
    query = catalogue.test["Granny-Smith"][0]
    resp = client.post("/classify", params={"top_k": 3}, files={"file": photo(query)})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    preds = body["predictions"]
    assert len(preds) == 3
    assert preds[0]["label"] == "Granny-Smith" and preds[0]["group"] == "Apple"
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    assert len({p["label"] for p in preds}) == 3
    assert len(body["neighbors"]) == 8 and body["neighbors"][0]["label"] == "Granny-Smith"
    # the article's thumbnail and every neighbour are served as images, from the index only
    for url in [preds[0]["image_url"]] + [n["image_url"] for n in body["neighbors"][:2]]:
        img = client.get(url)
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(img.content)).size) <= 160
    # nearest mode, top_k larger than the catalogue is clamped
    body = client.post("/classify", params={"top_k": 50, "mode": "nearest"},
                       files={"file": photo(query)}).json()
    assert len(body["predictions"]) == len(ARTICLES) and body["predictions"][0]["label"] == "Granny-Smith"


def test_upload_is_embedded_like_the_index(client, catalogue) -> None:
    """A catalogue photo sent as an upload finds itself with cosine ~1: same model, same preprocessing."""
    indexed = catalogue.train["Oatly-Oat-Milk"][0]
    body = client.post("/classify", files={"file": photo(indexed)}).json()
    top = body["neighbors"][0]
    assert top["name"] == indexed.name and top["score"] > 0.999  # a name, never a server path
    assert body["predictions"][0]["label"] == "Oatly-Oat-Milk"
    assert body["in_catalogue"] == [top["image_id"]]  # said, so the 1.0 is not mistaken for recognition
    held_out = client.post("/classify", files={"file": photo(catalogue.test["Oatly-Oat-Milk"][0])}).json()
    assert held_out["in_catalogue"] == []


def test_concurrent_requests_match_sequential_ones(client, catalogue) -> None:
    """Requests that arrive together share a forward pass; their answers do not change."""
    queries = [catalogue.test[a][1] for a in ARTICLES]
    sequential = [client.post("/classify", files={"file": photo(q)}).json()["predictions"] for q in queries]
    concurrent: dict[int, list] = {}
    barrier = threading.Barrier(len(queries))

    def go(i: int) -> None:
        barrier.wait()
        concurrent[i] = client.post("/classify", files={"file": photo(queries[i])}).json()["predictions"]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, preds in enumerate(sequential):
        assert [p["label"] for p in concurrent[i]] == [p["label"] for p in preds]
        assert all(abs(a["score"] - b["score"]) < 1e-3 for a, b in zip(concurrent[i], preds))


def test_catalogue_images_only_from_the_index(client) -> None:
    assert_error(client.get("/catalogue-image/0123456789abcdef"), 404, "unknown_image", "no catalogue image")
    for bad in ("..%2F..%2Fetc%2Fpasswd", "etc/passwd", "0123"):
        resp = client.get(f"/catalogue-image/{bad}")
        assert resp.status_code in (404, 422) and "root:" not in resp.text
    assert client.get("/catalogue-image/0123456789abcdef", params={"size": 10000}).status_code == 422


# --------------------------------------------------------------------------- bad input
BAD_UPLOADS = {
    "text": (("notes.txt", b"this is not a photo\n" * 50, "text/plain"), "not an image file"),
    "corrupt": None,  # filled in from a real JPEG below
    "empty": (("empty.jpg", b"", "image/jpeg"), "empty file"),
    "bomb": (("bomb.png", png_claiming(30000, 30000), "image/png"), "decompression bomb"),
}


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_classify_bad_upload(client, catalogue, kind: str) -> None:
    before = folder_digest(catalogue.index_dir)
    if kind == "corrupt":
        data = catalogue.train["Banana"][0].read_bytes()
        upload, fragment = ("cut.jpg", data[: len(data) // 3], "image/jpeg"), "truncated or corrupt"
    else:
        upload, fragment = BAD_UPLOADS[kind]
    body = assert_error(client.post("/classify", files={"file": upload}), 400, "unreadable_image",
                        f"cannot read image '{upload[0]}'", fragment)
    assert body["hint"]
    assert folder_digest(catalogue.index_dir) == before


def test_bomb_file_is_tiny(catalogue) -> None:
    assert len(png_claiming(30000, 30000)) < 100_000


def test_oversize_upload_refused_before_reading(client, catalogue) -> None:
    before = folder_digest(catalogue.index_dir)
    big = b"\xff\xd8" + b"\0" * (10 * 1024 * 1024 + 10)
    body = assert_error(client.post("/classify", files={"file": ("big.jpg", big, "image/jpeg")}),
                        413, "upload_too_large", "'big.jpg' is 10.0 MB", "limit of 10.0 MB per image")
    assert "--max-upload-mb" in body["hint"]
    # a request body declared larger than the limit is refused from its Content-Length alone
    huge = big + b"\0" * (1024 * 1024)
    assert_error(client.post("/classify", files={"file": ("huge.jpg", huge, "image/jpeg")}), 413,
                 "upload_too_large", "request body is 11.0 MB", "one photo of at most 10.0 MB")
    assert folder_digest(catalogue.index_dir) == before


def test_upload_limit_is_configurable_and_streamed(catalogue, own_index: Path) -> None:
    """Limit 10 kB: a photo above it (classify and enrol) and a streamed body (chunked, no Content-Length)."""
    client = authed(create_app(own_index, model=catalogue.model, max_upload_bytes=10_000))
    before = folder_digest(own_index)
    big_photo = next(p for p in catalogue.train["Watermelon"] if p.stat().st_size > 12_000)
    assert_error(client.post("/classify", files={"file": photo(big_photo)}), 413, "upload_too_large",
                 f"is {big_photo.stat().st_size / 1024:.0f} kB", "limit of 10 kB per image")
    boundary = "fewshotboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    chunks = [head] + [b"\0" * 8192] * 20 + [f"\r\n--{boundary}--\r\n".encode()]
    resp = client.post("/classify", content=iter(chunks),
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_error(resp, 413, "upload_too_large", "request body is more than")
    # enrolment: the request is under the enrolment limit, one photo is above the per-file limit
    resp = client.post("/articles", data={"label": "Big"}, files=[("files", photo(big_photo))])
    assert_error(resp, 413, "upload_too_large", big_photo.name, "per image")
    assert folder_digest(own_index) == before
    small = catalogue.train["Lemon"][0]
    if small.stat().st_size < 10_000:  # a photo under the limit still works
        assert client.post("/classify", files={"file": photo(small)}).status_code == 200


def test_classify_answers_unknown_below_the_threshold(client, catalogue) -> None:
    query = photo(catalogue.test["Granny-Smith"][0])
    auto = client.post("/classify", files={"file": query}).json()
    reject, answer = auto["reject"], auto["answer"]
    assert reject["reject"] == "auto" and reject["target_far"] == 0.05 and reject["open_score"] == "relative"
    assert answer["threshold"] == pytest.approx(reject["threshold"], abs=1e-6)
    top = [p["score"] for p in auto["predictions"][:2]]
    assert answer["score"] == pytest.approx(top[0] - 0.5 * top[1], abs=1e-5)
    assert answer["unknown"] == (answer["score"] < answer["threshold"])
    never = client.post("/classify", params={"reject": "5"}, files={"file": query}).json()
    assert never["answer"]["article"] == "unknown" and never["answer"]["unknown"] is True
    assert never["reject"] == {**never["reject"], "reject": "score", "threshold": 5.0, "target_far": None}
    assert never["predictions"][0]["label"] == "Granny-Smith"  # the nearest articles are still listed
    none = client.post("/classify", params={"reject": "none"}, files={"file": query}).json()
    assert none["answer"]["article"] == "Granny-Smith" and none["answer"]["threshold"] is None
    stricter = client.post("/classify", params={"target_far": 0.01}, files={"file": query}).json()
    assert stricter["reject"]["threshold"] >= reject["threshold"]
    cosine = client.post("/classify", params={"open_score": "cosine"}, files={"file": query}).json()
    assert cosine["answer"]["open_score"] == "cosine" and cosine["answer"]["score"] == pytest.approx(top[0], abs=1e-5)


@pytest.mark.parametrize("params,fragment", [
    ({"reject": "maybe"}, "reject"), ({"target_far": 0}, "target_far"), ({"target_far": 1.5}, "target_far"),
    ({"open_score": "energy"}, "open_score"),
])
def test_classify_bad_reject(client, catalogue, params, fragment) -> None:
    resp = client.post("/classify", params=params, files={"file": photo(catalogue.test["Lemon"][0])})
    assert resp.status_code == 422 and fragment in resp.text


@pytest.mark.parametrize("params,fragment", [
    ({"top_k": 0}, "top_k"), ({"top_k": "five"}, "top_k"), ({"mode": "magic"}, "mode"),
])
def test_classify_bad_parameters(client, catalogue, params, fragment) -> None:
    resp = client.post("/classify", params=params, files={"file": photo(catalogue.test["Lemon"][0])})
    assert_error(resp, 422, "invalid_request", fragment)


def test_classify_without_file(client) -> None:
    assert_error(client.post("/classify"), 422, "invalid_request", "file", "missing")
    assert_error(client.post("/classify", data={"other": "x"}), 422, "invalid_request", "file")


def test_delete_unknown_label(client, catalogue) -> None:
    before = folder_digest(catalogue.index_dir)
    body = assert_error(client.delete("/articles/No-Such-Article"), 404, "unknown_article", "No-Such-Article")
    assert "/articles" in body["hint"]
    assert folder_digest(catalogue.index_dir) == before


def test_bad_enrolments_change_nothing(client, catalogue) -> None:
    before = folder_digest(catalogue.index_dir)
    good = photo(catalogue.train[NEW_ARTICLE][0])
    assert_error(client.post("/articles", data={"label": "X", "group": "Y"}), 422, "empty_enrolment",
                 "no photos")
    assert_error(client.post("/articles", data={"label": "   "}, files=[("files", good)]), 422,
                 "empty_enrolment", "label is empty")
    assert_error(client.post("/articles", files=[("files", good)]), 422, "empty_enrolment", "label")
    assert_error(client.post("/articles", data={"label": "x" * 300}, files=[("files", good)]), 422,
                 "invalid_label", "characters")
    # one good photo and one bad one: nothing is enrolled
    body = assert_error(client.post("/articles", data={"label": NEW_ARTICLE},
                                    files=[("files", good), ("files", ("bad.jpg", b"garbage", "image/jpeg"))]),
                        400, "unreadable_image", "'bad.jpg'", "nothing was enrolled")
    assert body["files"] == [{"file": "bad.jpg", "message": body["files"][0]["message"]}]
    assert_error(client.post("/articles", data={"label": NEW_ARTICLE},
                             files=[("files", ("bomb.png", png_claiming(30000, 30000), "image/png"))]),
                 400, "unreadable_image", "decompression bomb")
    # an existing article with a different group
    assert_error(client.post("/articles", data={"label": "Banana", "group": "Dairy"}, files=[("files", good)]),
                 409, "group_conflict", "Banana")
    assert folder_digest(catalogue.index_dir) == before
    assert client.get("/health").json()["images"] == N_IMAGES


@pytest.mark.parametrize("field, value, fragment", [
    ("label", "\u200b", "no visible characters"), ("label", "\ufeff \u200b", "no visible characters"),
    ("label", "Oat\u202eMilk", "U+202E"), ("label", "\u2067Milk", "U+2067"), ("group", "\u200b", "group"),
    ("group", "Dairy\u202a", "U+202A"), ("label", "a\u2028b", "control characters"),
])
def test_invisible_and_bidi_labels_are_refused(client, catalogue, field, value, fragment) -> None:
    """Issue 27 item 10a: the service refuses what the Python API refuses (one validator)."""
    before = folder_digest(catalogue.index_dir)
    data = {"label": "Fine", "group": "Fine", field: value}
    body = assert_error(client.post("/articles", data=data, files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))]),
                        422, "invalid_label", fragment)
    assert body["hint"]
    assert folder_digest(catalogue.index_dir) == before


def test_unknown_endpoint_is_json(client) -> None:
    assert_error(client.get("/nope"), 404, "not_found", "/nope")


# --------------------------------------------------------------------------- enrol / delete
def test_enrol_classify_delete(catalogue, own_index: Path) -> None:
    client = authed(create_app(own_index, model=catalogue.model))
    query = photo(catalogue.test[NEW_ARTICLE][0])
    before = client.post("/classify", files={"file": query}).json()
    assert before["predictions"][0]["label"] != NEW_ARTICLE

    enrol = catalogue.train[NEW_ARTICLE][:4]
    resp = client.post("/articles", data={"label": NEW_ARTICLE, "group": "Melon"},
                       files=[("files", photo(p)) for p in enrol])
    assert resp.status_code == 201, resp.text
    body = resp.json()
    reject = body.pop("reject")
    assert body == {"label": NEW_ARTICLE, "group": "Melon", "created": True, "added": 4,
                    "num_images": 4, "articles": len(ARTICLES) + 1, "images": N_IMAGES + 4, "warnings": []}
    # calibrated again for the 7 articles: the threshold of the catalogue now on disk, used by the next classify
    from fewshot.catalogue.calibrate import calibrate

    now = calibrate(load_index(own_index))
    assert reject["reject"] == "auto" and reject["threshold"] == pytest.approx(now.threshold, abs=1e-6)
    assert now.num_absent == N_IMAGES + 4
    assert client.post("/classify", files={"file": query}).json()["reject"] == reject
    top = client.post("/classify", files={"file": query}).json()["predictions"][0]
    assert (top["label"], top["group"]) == (NEW_ARTICLE, "Melon")
    assert client.get(top["image_url"]).status_code == 200

    # on disk: the index references copies inside its own folder
    on_disk = load_index(own_index)
    assert NEW_ARTICLE in on_disk.articles and len(on_disk) == N_IMAGES + 4
    # stored relative to the index folder, so that the folder can move
    assert all(not Path(p).is_absolute() for p, lab in zip(on_disk.paths, on_disk.labels) if lab == NEW_ARTICLE)
    new_paths = [own_index / p for p, lab in zip(on_disk.paths, on_disk.labels) if lab == NEW_ARTICLE]
    assert all(p.is_file() and p.is_relative_to(own_index / ENROLLED_DIR) for p in new_paths)
    assert sorted(p.read_bytes() for p in new_paths) == sorted(p.read_bytes() for p in enrol)

    # a restarted service sees the enrolment; adding photos to an existing article works
    client.app.state.service.close()  # one writer per folder: stop it before the next
    client = authed(create_app(own_index, model=catalogue.model))
    assert client.post("/classify", files={"file": query}).json()["predictions"][0]["label"] == NEW_ARTICLE
    resp = client.post("/articles", data={"label": NEW_ARTICLE},
                       files=[("files", photo(catalogue.train[NEW_ARTICLE][4]))])
    assert resp.status_code == 201 and resp.json()["created"] is False and resp.json()["num_images"] == 5
    assert all(p.is_file() for p in new_paths)  # earlier photos survived the second rewrite

    resp = client.delete(f"/articles/{NEW_ARTICLE}")
    assert resp.status_code == 200
    assert resp.json() == {"deleted": NEW_ARTICLE, "images_removed": 5, "articles": len(ARTICLES),
                           "images": N_IMAGES}
    assert NEW_ARTICLE not in {a["label"] for a in client.get("/articles").json()["articles"]}
    assert client.post("/classify", files={"file": query}).json()["predictions"][0]["label"] != NEW_ARTICLE
    on_disk = load_index(own_index)
    assert NEW_ARTICLE not in on_disk.articles and len(on_disk) == N_IMAGES
    assert not any((own_index / ENROLLED_DIR).rglob("*.jpg"))
    assert_error(client.delete(f"/articles/{NEW_ARTICLE}"), 404, "unknown_article")


def test_labels_with_slashes_and_unicode(catalogue, own_index: Path) -> None:
    client = authed(create_app(own_index, model=catalogue.model))
    label = "Fruit/Pastèque 1kg"
    resp = client.post("/articles", data={"label": label}, files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))])
    assert resp.status_code == 201, resp.text
    assert resp.json()["group"] is None
    assert client.delete("/articles/Fruit/Past%C3%A8que%201kg").json()["deleted"] == label


def test_last_article_cannot_be_deleted(catalogue, own_index: Path) -> None:
    client = authed(create_app(own_index, model=catalogue.model))
    for label in ARTICLES[:-1]:
        assert client.delete(f"/articles/{label}").status_code == 200
    before = folder_digest(own_index)
    assert_error(client.delete(f"/articles/{ARTICLES[-1]}"), 409, "last_article")
    assert folder_digest(own_index) == before


def test_racing_enrolments_are_not_lost(catalogue, own_index: Path) -> None:
    """Four enrolments and some classifications at once: every enrolment is on disk afterwards."""
    client = authed(create_app(own_index, model=catalogue.model))
    photos = catalogue.train[NEW_ARTICLE]
    labels = [f"Race-{i}" for i in range(4)]
    barrier = threading.Barrier(len(labels) + 2)
    results: dict[str, int] = {}

    def enrol(i: int) -> None:
        files = [("files", photo(p)) for p in photos[2 * i: 2 * i + 2]]
        barrier.wait()
        results[labels[i]] = client.post("/articles", data={"label": labels[i], "group": "Race"},
                                         files=files).status_code

    def classify(j: int) -> None:
        barrier.wait()
        results[f"classify-{j}"] = client.post("/classify", files={"file": photo(photos[-1 - j])}).status_code

    threads = [threading.Thread(target=enrol, args=(i,)) for i in range(len(labels))]
    threads += [threading.Thread(target=classify, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {**{lab: 201 for lab in labels}, "classify-0": 200, "classify-1": 200}
    on_disk = load_index(own_index)
    assert set(labels) <= set(on_disk.articles)
    assert len(on_disk) == N_IMAGES + 2 * len(labels)
    assert all((own_index / p).is_file() for p in on_disk.paths)
    assert client.get("/health").json()["images"] == N_IMAGES + 2 * len(labels)


def test_failed_write_keeps_the_old_catalogue(catalogue, own_index: Path, monkeypatch) -> None:
    """A failure while the new folder is written (disk full, crash) leaves the previous one intact."""
    import fewshot.catalogue.store as store

    client = authed(create_app(own_index, model=catalogue.model), raise_server_exceptions=False)
    before = folder_digest(own_index)
    siblings = set(own_index.parent.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.shutil, "copyfile", disk_full)
    resp = client.post("/articles", data={"label": NEW_ARTICLE},
                       files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))])
    assert resp.status_code == 500 and resp.json()["error"] == "internal_error"
    assert folder_digest(own_index) == before
    assert set(own_index.parent.iterdir()) == siblings  # no half-written folder left behind
    assert client.get("/health").json()["images"] == N_IMAGES
    monkeypatch.undo()
    assert client.post("/articles", data={"label": NEW_ARTICLE},
                       files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))]).status_code == 201


# --------------------------------------------------------------------------- CLI
def test_cli_serve_registered_and_checks_its_index(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fewshot.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--index", "--host", "--port", "--max-upload-mb"):
        assert option in result.output
    result = runner.invoke(app, ["serve", "--index", str(tmp_path / "missing")])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1
    assert "does not exist" in output and "fewshot index" in output and "Traceback" not in output
    result = runner.invoke(app, ["serve", "--index", str(tmp_path), "--max-upload-mb", "0"])
    assert result.exit_code == 2 and "--max-upload-mb" in " ".join(result.output.split())


def test_enrolment_appends_to_the_journal_and_restart_compacts(catalogue, own_index: Path, monkeypatch) -> None:
    """An enrolment writes its photos and one journal entry with its own vectors; the index
    files are not rewritten. A restart with a long journal compacts the folder."""
    import fewshot.serve.app as serve_app
    from fewshot.catalogue.journal import Journal

    def base_files() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in own_index.iterdir()
                if p.is_file() and p.name != "audit.jsonl"}  # the audit log is appended to, by design

    before = base_files()
    client = authed(create_app(own_index, model=catalogue.model))
    photos = catalogue.train[NEW_ARTICLE][:2]
    resp = client.post("/articles", data={"label": NEW_ARTICLE}, files=[("files", photo(p)) for p in photos])
    assert resp.status_code == 201 and resp.json()["num_images"] == 2
    assert base_files() == before
    (entry,) = [p for _, p in Journal(own_index).sequence()]
    with np.load(entry) as z:
        assert z["vectors"].shape == (2, catalogue.model.dim)
    assert len(list((own_index / ENROLLED_DIR).rglob("*.jpg"))) == 2
    assert client.delete(f"/articles/{ARTICLES[0]}").status_code == 200
    assert len(Journal(own_index)) == 2 and base_files() == before

    monkeypatch.setattr(serve_app, "COMPACT_AFTER", 2)
    client.app.state.service.close()  # one writer per folder: stop it before the next
    again = authed(create_app(own_index, model=catalogue.model))
    assert not (own_index / "journal").exists() and base_files() != before
    health = again.get("/health").json()
    assert health["images"] == N_IMAGES + 2 - PHOTOS_PER_ARTICLE and health["articles"] == len(ARTICLES)
    on_disk = load_index(own_index)
    assert NEW_ARTICLE in on_disk.articles and ARTICLES[0] not in on_disk.articles
    assert all((own_index / p).is_file() for p in on_disk.article_paths(NEW_ARTICLE))


def test_a_moved_folder_keeps_its_enrolments_and_leftovers_are_cleaned(catalogue, own_index: Path, monkeypatch) -> None:
    """Enrolled photos are stored relative to the folder: after a move they are still served,
    and compaction (the service's or Catalogue.save's) keeps them. A start-up removes the files a
    crash left (temporary entries, unreferenced photos)."""
    import fewshot.serve.app as serve_app
    from fewshot.api import Catalogue

    client = authed(create_app(own_index, model=catalogue.model))
    photos = catalogue.train[NEW_ARTICLE][:2]
    assert client.post("/articles", data={"label": NEW_ARTICLE},
                       files=[("files", photo(p)) for p in photos]).status_code == 201
    moved = own_index.parent / "moved"
    own_index.rename(moved)
    (moved / "journal" / ".0000000009.123.tmp").write_bytes(b"half")
    stray = moved / ENROLLED_DIR / "x" / "orphan.jpg"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"never acknowledged")
    monkeypatch.setattr(serve_app, "COMPACT_AFTER", 1)
    client = authed(create_app(moved, model=catalogue.model))
    assert not stray.exists() and not (moved / "journal").exists()  # cleaned, then compacted
    art = next(a for a in client.get("/articles").json()["articles"] if a["label"] == NEW_ARTICLE)
    assert art["enrolled"] and art["num_images"] == 2
    assert client.get(art["image_url"]).status_code == 200
    # the Python API's save keeps the service's photos too
    cat = Catalogue.load(moved)
    client.app.state.service.close()  # one writer per folder: stop it before the next
    cat.save(moved, overwrite=True)
    assert len(list((moved / ENROLLED_DIR).rglob("*.jpg"))) == 2
    again = authed(create_app(moved, model=catalogue.model))
    assert again.get(art["image_url"]).status_code == 200


def test_a_catalogue_saved_to_another_folder_takes_its_enrolled_photos(catalogue, own_index: Path) -> None:
    """Catalogue.load(A).save(B): B holds the photos the service enrolled into A (linked or
    copied), serves them, and does not depend on A; A is left as it was."""
    from fewshot.api import Catalogue

    client = authed(create_app(own_index, model=catalogue.model))
    photos = catalogue.train[NEW_ARTICLE][:2]
    assert client.post("/articles", data={"label": NEW_ARTICLE},
                       files=[("files", photo(p)) for p in photos]).status_code == 201
    in_a = sorted(p.relative_to(own_index) for p in (own_index / ENROLLED_DIR).rglob("*.jpg"))
    assert len(in_a) == 2
    copy = own_index.parent / "copy"
    Catalogue.load(own_index).save(copy)
    assert sorted(p.relative_to(copy) for p in (copy / ENROLLED_DIR).rglob("*.jpg")) == in_a
    saved = load_index(copy).article_paths(NEW_ARTICLE)
    assert sorted(Path(p) for p in saved) == in_a  # relative to B, so B can move
    assert [(copy / p).read_bytes() for p in sorted(saved)] == [(own_index / p).read_bytes() for p in in_a]
    shutil.rmtree(own_index)  # B stands alone
    served = authed(create_app(copy, model=catalogue.model))
    art = next(a for a in served.get("/articles").json()["articles"] if a["label"] == NEW_ARTICLE)
    assert art["num_images"] == 2 and served.get(art["image_url"]).status_code == 200


def test_cli_serve_starts_and_answers(catalogue, own_index: Path) -> None:
    """`fewshot serve` itself (not only its argument checks): it announces the catalogue and
    answers /health."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "serve", "--index", str(own_index), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline and "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "fewshot serve exited"
            assert "Traceback" not in line, line
        assert f"serving {len(ARTICLES)} articles ({N_IMAGES} images, flat index)" in line
        for _ in range(100):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health["images"] == N_IMAGES and health["index_type"] == "flat"
    finally:
        proc.terminate()
        proc.wait(30)
