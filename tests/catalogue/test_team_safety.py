"""Safe to run for a team: one writer per index folder, enrolments kept by a rebuild, the
export, tokens, origins, host names, the audit log, and no server path in any response."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fewshot.errors import FolderBusyError
from fewshot.catalogue.journal import Change, Journal
from fewshot.catalogue.store import ENROLLED_DIR, UPLOAD_DIR, append_change, load_index, save_index
from fewshot.io import lock_file, writer_lock

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from fewshot.serve.app import create_app  # noqa: E402
from fewshot.serve.security import Access, token_id  # noqa: E402
from serve_helpers import ARTICLES, NEW_ARTICLE, authed, small_catalogue  # noqa: E402

TOKEN = "team-safety-token-0123456789abcdef"
HOLD = "import sys, time; from fewshot.io import writer_lock\nwith writer_lock(sys.argv[1], 'a test holder'):\n" \
       "    print('held', flush=True); time.sleep(120)"


@pytest.fixture(scope="module")
def catalogue(grocery_root: Path, tmp_path_factory):
    return small_catalogue(grocery_root, tmp_path_factory)


@pytest.fixture
def own_index(catalogue, tmp_path: Path) -> Path:
    dst = tmp_path / "index"
    shutil.copytree(catalogue.index_dir, dst)
    return dst


def photo(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


# --------------------------------------------------------------------------- the writer lock
def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_at_once_and_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    proc = _holder(folder)
    try:
        with pytest.raises(FolderBusyError) as err:  # refused, not waited for (the holder sleeps 120 s)
            with writer_lock(folder, "fewshot index"):
                pass
        assert f"PID {proc.pid}" in err.value.message and "a test holder" in err.value.message
        assert err.value.holder["pid"] == proc.pid and "stop that process" in err.value.hint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with writer_lock(folder, "fewshot index"):  # the OS let go of the dead holder's lock
        assert lock_file(folder).is_file()
    assert not lock_file(folder).exists()  # and the holder cleans up after itself


def test_the_lock_is_reentrant_for_its_owner_only(tmp_path: Path) -> None:
    owner = object()
    with writer_lock(tmp_path / "idx", "fewshot serve", owner=owner):
        with writer_lock(tmp_path / "idx", "compaction", owner=owner):
            pass
        with pytest.raises(FolderBusyError, match="this same process"):
            with writer_lock(tmp_path / "idx", "Catalogue.save", owner=object()):
                pass
        with pytest.raises(FolderBusyError):
            with writer_lock(tmp_path / "idx", "a one-off write"):
                pass


def test_a_journal_entry_is_never_replaced(tmp_path: Path, monkeypatch) -> None:
    """Two writers that both saw entry 1 as the last one (the race that lost enrolments) each
    get an entry of their own."""
    first = Journal(tmp_path)
    first.append(Change("add", "a", None, np.ones((1, 4), np.float32), ["a.jpg"], [None]))
    stale = first.sequence()
    first.append(Change("add", "b", None, np.ones((1, 4), np.float32), ["b.jpg"], [None]))
    second = Journal(tmp_path)
    monkeypatch.setattr(second, "sequence", lambda: stale)
    second.append(Change("add", "c", None, np.ones((1, 4), np.float32), ["c.jpg"], [None]))
    assert [c.label for c in Journal(tmp_path).read()] == ["a", "b", "c"]
    assert not list((tmp_path / "journal").glob(".*"))


# --------------------------------------------------------------------------- two services, one folder
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(index: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "FEWSHOT_API_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "fewshot", "serve", "--index", str(index), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_ready(proc: subprocess.Popen, port: int) -> None:
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail("fewshot serve did not start")


@pytest.mark.slow
def test_two_services_on_one_folder_the_second_is_refused_and_no_enrolment_is_lost(catalogue, own_index,
                                                                                   tmp_path: Path) -> None:
    import httpx

    port = _free_port()
    first = _serve(own_index, port)
    try:
        _wait_ready(first, port)
        second = _serve(own_index, _free_port())
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 1 and "Traceback" not in out
        assert f"being written by PID {first.pid}" in out and "fewshot serve" in out, out
        # fewshot index --overwrite is refused as well; classify (a reader) works meanwhile
        rebuild = subprocess.run([sys.executable, "-m", "fewshot", "index", "--data", str(catalogue.index_dir.parent
                                  / "catalogue.csv"), "--out", str(own_index), "--overwrite", "--image-size", "96"],
                                 capture_output=True, text=True, timeout=300)
        assert rebuild.returncode == 1 and f"PID {first.pid}" in rebuild.stderr + rebuild.stdout
        read = subprocess.run([sys.executable, "-m", "fewshot", "classify", "--index", str(own_index),
                               str(catalogue.test["Banana"][0])], capture_output=True, text=True, timeout=300)
        assert read.returncode == 0 and "\tBanana (" in read.stdout, read.stdout + read.stderr

        def enrol(n: int) -> int:
            files = [("files", photo(catalogue.train[NEW_ARTICLE][n % 4]))]
            return httpx.post(f"http://127.0.0.1:{port}/articles", data={"label": f"Team-{n:02d}"}, files=files,
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120).status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(enrol, range(15)))
        assert codes == [201] * 15
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: nothing is flushed on the way out
        first.wait(30)
    port = _free_port()
    again = _serve(own_index, port)
    try:
        _wait_ready(again, port)
        labels = {a["label"] for a in httpx.get(f"http://127.0.0.1:{port}/articles").json()["articles"]}
    finally:
        again.terminate()
        again.wait(30)
    assert {f"Team-{n:02d}" for n in range(15)} <= labels and set(ARTICLES) <= labels


# --------------------------------------------------------------------------- rebuild keeps enrolments; export
def _enrol(index: Path, model, label: str, photos: list[Path], group: str | None = None) -> None:
    app = create_app(index, model=model)
    data = {"label": label} if group is None else {"label": label, "group": group}
    assert authed(app).post("/articles", data=data, files=[("files", photo(p)) for p in photos]).status_code == 201
    app.state.service.close()


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from fewshot.cli import app as cli

    return CliRunner().invoke(cli, args)


def test_index_overwrite_keeps_the_enrolled_articles(catalogue, own_index: Path) -> None:
    """Rebuilding a served index folder (the hint `classify` gives for a retrained model) keeps
    the articles enrolled through the service, their photos and their groups."""
    _enrol(own_index, catalogue.model, NEW_ARTICLE, catalogue.train[NEW_ARTICLE][:3], group="Melon")
    _enrol(own_index, catalogue.model, "Banana", catalogue.train[NEW_ARTICLE][3:4])  # a photo added to a data article
    photos = sorted(p.relative_to(own_index) for p in (own_index / ENROLLED_DIR).rglob("*.jpg"))
    assert len(photos) == 4
    manifest = catalogue.index_dir.parent / "catalogue.csv"
    res = _cli(["index", "--data", str(manifest), "--out", str(own_index), "--overwrite", "--image-size", "96",
                "--cache-dir", str(catalogue.index_dir.parent / "cache"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "kept 4 photos of 2 article(s) enrolled through the service" in res.output
    back = load_index(own_index)
    assert "neither in the data nor enrolled" not in res.output  # nothing dropped
    assert back.num_images(NEW_ARTICLE) == 3 and back.article_group(NEW_ARTICLE) == "Melon"
    assert back.num_images("Banana") == 5 and not (own_index / "journal").exists()
    assert sorted(Path(p) for p in back.paths if p.startswith(ENROLLED_DIR)) == photos
    assert all((own_index / p).is_file() for p in photos)
    assert [e["action"] for e in map(json.loads, (own_index / "audit.jsonl").read_text().splitlines())] == \
        ["enrol", "enrol"]  # the audit log survives the rebuild


def test_export_writes_a_tree_that_index_reads_back(catalogue, own_index: Path, tmp_path: Path) -> None:
    from fewshot.data import load_dataset

    _enrol(own_index, catalogue.model, NEW_ARTICLE, catalogue.train[NEW_ARTICLE][:2], group="Melon")
    out = tmp_path / "export"
    res = _cli(["export", "--index", str(own_index), "--out", str(out)])
    assert res.exit_code == 0, res.output
    printed = res.output
    assert f"exported {len(ARTICLES) * 4 + 2} photos of {len(ARTICLES) + 1} articles" in printed
    assert f"fewshot index --data {out / 'manifest.csv'}" in printed
    index = load_index(own_index)
    for data in (out / "manifest.csv", out):  # the manifest and the folder tree alike
        ds = load_dataset(data)
        assert sorted(ds.labels) == sorted(index.labels)
        assert {r.label: r.group for r in ds} == {a: index.article_group(a) for a in index.articles}
    again = subprocess.run([sys.executable, "-m", "fewshot", "export", "--index", str(own_index), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--overwrite" in again.stderr + again.stdout  # never replaced unasked
    assert _cli(["export", "--index", str(own_index), "--out", str(out), "--overwrite"]).exit_code == 0
    added = next(out.glob("*/*/")) / "my-new-photo.jpg"  # a user adds a photo to the export
    shutil.copyfile(catalogue.test["Banana"][0], added)
    (out / "Extra-Article").mkdir()
    res = _cli(["export", "--index", str(own_index), "--out", str(out), "--overwrite"])
    assert res.exit_code == 1 and "also files fewshot did not write there" in res.output
    assert f"{added.relative_to(out).as_posix()}" in " ".join(res.output.split()) and "Extra-Article/" in res.output
    assert added.is_file()


# --------------------------------------------------------------------------- tokens, origins, hosts, audit
def _app(index: Path, model, **access):
    return create_app(index, model=model, access=Access(**{"write_token": TOKEN, **access}))


def test_changes_need_the_write_token_and_are_audited(catalogue, own_index: Path) -> None:
    app = _app(own_index, catalogue.model)
    client = TestClient(app)
    files = [("files", photo(catalogue.train[NEW_ARTICLE][0]))]
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        resp = client.post("/articles", data={"label": "X"}, files=files, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert client.delete("/articles/Banana", headers=headers).status_code == 401
    assert len(client.get("/articles").json()["articles"]) == len(ARTICLES)  # reads are open without a read token
    assert client.post("/classify", files={"file": photo(catalogue.test["Banana"][0])}).status_code == 200
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/articles", data={"label": NEW_ARTICLE}, files=files, headers=ok).status_code == 201
    assert client.delete("/articles/Banana", headers=ok).status_code == 200
    entries = [json.loads(line) for line in (own_index / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["label"], e["token"]) for e in entries] == \
        [("enrol", NEW_ARTICLE, token_id(TOKEN)), ("delete", "Banana", token_id(TOKEN))]
    assert entries[0]["images"] == 1 and entries[0]["created"] is True and entries[0]["client"]
    assert TOKEN not in (own_index / "audit.jsonl").read_text()
    app.state.service.close()


def test_a_read_token_guards_reads(catalogue, own_index: Path) -> None:
    read = "read-only-token-0123456789abcdef"
    app = _app(own_index, catalogue.model, read_token=read)
    client = TestClient(app)
    assert client.get("/articles").status_code == 401
    assert client.get("/").status_code == 200  # the page itself asks for the token
    as_reader = {"Authorization": f"Bearer {read}"}
    assert client.get("/articles", headers=as_reader).status_code == 200
    assert client.post("/articles", data={"label": "X"}, headers=as_reader,
                       files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))]).status_code == 401
    assert client.get("/articles", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    app.state.service.close()


def test_foreign_origins_and_host_names_are_refused(catalogue, own_index: Path) -> None:
    app = _app(own_index, catalogue.model, allowed_hosts=("127.0.0.1", "localhost"),
               allowed_origins=("https://shop.example.com",))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    ok = {"Authorization": f"Bearer {TOKEN}"}
    files = [("files", photo(catalogue.train[NEW_ARTICLE][0]))]
    evil = client.post("/articles", data={"label": "X"}, files=files,
                       headers={**ok, "Origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"] == "cross_origin"
    assert client.get("/articles", headers={"Origin": "null"}).status_code == 403
    rebound = client.get("/articles", headers={"Host": "attacker.example"})
    assert rebound.status_code == 400 and rebound.json()["error"] == "unknown_host"
    assert "--allowed-host attacker.example" in rebound.json()["hint"]
    for address in ("192.0.2.7:8000", "0.0.0.0:8000", "[2001:db8::1]:8000"):  # an address cannot be rebound
        assert client.get("/articles", headers={"Host": address}).status_code == 200, address
    same = client.get("/articles", headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 200
    pre = client.options("/articles", headers={"Origin": "https://shop.example.com",
                                               "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://shop.example.com"
    listed = client.get("/articles", headers={"Origin": "https://shop.example.com"})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "https://shop.example.com"
    app.state.service.close()


def test_no_response_shows_a_server_path(catalogue, own_index: Path) -> None:
    app = create_app(own_index, model=catalogue.model)
    client = authed(app)
    bodies = [client.get("/health").text, client.get("/articles").text,
              client.post("/articles", data={"label": NEW_ARTICLE},
                          files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))]).text,
              client.post("/classify?neighbors=30", files={"file": photo(catalogue.train["Banana"][0])}).text,
              client.delete(f"/articles/{NEW_ARTICLE}").text, client.get("/catalogue-image/0123456789abcdef").text]
    secrets_ = [str(own_index), str(catalogue.index_dir.parent), str(Path(catalogue.train["Banana"][0]).parent),
                os.path.expanduser("~")]
    for body in bodies:
        assert not any(s in body for s in secrets_), body
    health = json.loads(bodies[0])
    assert health["index"] == own_index.name and "model_dir" not in health and health["writes_need_token"]
    neighbor = json.loads(bodies[3])["neighbors"][0]
    assert neighbor["name"] == Path(catalogue.train["Banana"][0]).name and "path" not in neighbor
    app.state.service.close()


def test_uploads_in_progress_stay_in_the_index_folder_and_leftovers_go_at_start(catalogue, own_index: Path,
                                                                               monkeypatch) -> None:
    """What a killed request leaves is inside INDEX_DIR/.uploads (not the system's temporary
    folder, where nobody would clean it), and a restarted service removes it."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(own_index.parent / "system-tmp"))
    (own_index.parent / "system-tmp").mkdir()
    app = create_app(own_index, model=catalogue.model)
    seen: list[Path] = []
    real = app.state.service.receive_upload

    def spy(upload, tmpdir, n):
        seen.append(Path(tmpdir))
        return real(upload, tmpdir, n)

    monkeypatch.setattr(app.state.service, "receive_upload", spy)
    assert authed(app).post("/articles", data={"label": NEW_ARTICLE},
                            files=[("files", photo(catalogue.train[NEW_ARTICLE][0]))]).status_code == 201
    assert seen and seen[0].parent == own_index / UPLOAD_DIR
    assert not list((own_index.parent / "system-tmp").iterdir())
    app.state.service.close()
    left = own_index / UPLOAD_DIR / "enrol-killed" / "upload-0"  # what kill -9 mid-request leaves
    left.parent.mkdir(parents=True)
    left.write_bytes(b"partial")
    create_app(own_index, model=catalogue.model).state.service.close()
    assert not (own_index / UPLOAD_DIR).exists()


def test_cli_serve_refuses_open_writes_off_loopback(catalogue, tmp_path: Path) -> None:
    res = _cli(["serve", "--index", str(catalogue.index_dir), "--no-token", "--host", "0.0.0.0"])
    assert res.exit_code == 1 and "--no-token with --host 0.0.0.0" in res.output and "Traceback" not in res.output
    empty = tmp_path / "token.txt"
    empty.write_text("\n")
    res = _cli(["serve", "--index", str(catalogue.index_dir), "--token-file", str(empty)])
    assert res.exit_code == 1 and f"--token-file {empty} is empty" in res.output
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    res = _cli(["serve", "--index", str(catalogue.index_dir), "--token-file", str(short)])
    assert res.exit_code == 1 and "at least 16 printable ASCII characters" in res.output
    res = _cli(["serve", "--index", str(catalogue.index_dir), "--allow-origin", "evil.example/"])
    assert res.exit_code == 1 and "is not an origin" in res.output


def test_a_second_train_into_the_same_run_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        res = _cli(["train", "--data", str(tmp_path / "photos"), "--split-file", str(tmp_path / "split.json"),
                    "--out", str(run)])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert res.exit_code == 1 and f"being written by PID {proc.pid}" in res.output, res.output
    assert not run.exists()


def test_a_journal_on_a_file_system_without_hard_links_still_appends(tmp_path: Path, monkeypatch) -> None:
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    journal = Journal(tmp_path)
    for label in "ab":
        journal.append(Change("add", label, None, np.ones((1, 4), np.float32), [f"{label}.jpg"], [None]))
    assert [c.label for c in journal.read()] == ["a", "b"] and not list((tmp_path / "journal").glob(".*"))


def test_labels_are_found_as_they_were_stored_and_tokens_are_ascii(catalogue, own_index: Path) -> None:
    """DELETE and Catalogue.remove find a label written in another Unicode form or with spaces,
    as the enrolment stored it; a token that an HTTP header cannot carry is refused at start;
    thumbnails behind a read token are not for shared caches."""
    from fewshot.errors import FewshotError

    with pytest.raises(FewshotError, match="printable ASCII"):
        Access(write_token="pässwörd-0123456789abc")
    app = _app(own_index, catalogue.model, read_token="read-only-token-0123456789abcdef")
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    files = [("files", photo(catalogue.train[NEW_ARTICLE][0]))]
    assert client.post("/articles", data={"label": " Cafe\u0301 "}, files=files).json()["label"] == "Caf\u00e9"
    assert client.delete("/articles/Cafe%CC%81%20").status_code == 200
    art = client.get("/articles").json()["articles"][0]
    assert client.get(art["image_url"]).headers["cache-control"] == "private, max-age=600"
    app.state.service.close()


def test_json_lines_stay_utf8_for_a_file_name_that_is_not():
    from fewshot.cli.common import json_line, one_line

    name = "shelf-\udcff\udcfe.jpg"  # how Python reads the bytes ff fe of a file name
    line = json_line({"image": name})
    assert json.loads(line.encode("utf-8"))["image"] == name
    assert one_line(name) == "shelf-\\udcff\\udcfe.jpg"


def test_a_rebuild_says_which_articles_of_the_old_index_it_lacks(catalogue, own_index: Path, tmp_path: Path,
                                                                 caplog) -> None:
    """An article added with the Python API from photos elsewhere on disk is neither in --data
    nor in enrolled/: a rebuild from the data cannot keep it, and says so by name."""
    from fewshot.api import Catalogue

    cat = Catalogue.load(own_index)
    cat.add("Api-Article", [str(p) for p in catalogue.train[NEW_ARTICLE][:2]])
    cat.save(own_index, overwrite=True)
    manifest = catalogue.index_dir.parent / "catalogue.csv"
    res = _cli(["index", "--data", str(manifest), "--out", str(own_index), "--overwrite", "--image-size", "96",
                "--cache-dir", str(catalogue.index_dir.parent / "cache"), "--no-progress"])
    assert res.exit_code == 0, res.output
    said = " ".join((res.output + caplog.text).split())
    assert "1 article(s) of the index being replaced are neither in the data nor enrolled" in said
    assert "Api-Article" in said
    assert load_index(own_index).config["dropped_articles"] == {"count": 1, "first": ["Api-Article"]}


def test_saving_a_stale_catalogue_over_its_folder_is_refused(catalogue, own_index: Path) -> None:
    """Catalogue.load(X), then a service enrols into X, then the catalogue is saved back onto X:
    that save would drop the service's article and delete its photos. It is refused; loading
    again and saving works, and the catalogue's own appends stay in step with the folder."""
    from fewshot.api import Catalogue
    from fewshot.errors import CheckpointError

    stale = Catalogue.load(own_index)
    _enrol(own_index, catalogue.model, NEW_ARTICLE, catalogue.train[NEW_ARTICLE][:2])
    stale.add("Api-Article", [str(catalogue.train["Banana"][5])])
    with pytest.raises(CheckpointError, match="has changed since this catalogue was loaded"):
        stale.save(own_index, overwrite=True)
    assert load_index(own_index).num_images(NEW_ARTICLE) == 2
    assert len(list((own_index / ENROLLED_DIR).rglob("*.jpg"))) == 2
    fresh = Catalogue.load(own_index)
    fresh.add("Api-Article", [str(catalogue.train["Banana"][5])])
    fresh.save(own_index, overwrite=True)
    back = load_index(own_index)
    assert back.num_images(NEW_ARTICLE) == 2 and back.has_article("Api-Article")
    # the index's own journal appends keep it in step: a later save is not refused
    idx = load_index(own_index)
    append_change(idx, own_index, Change("remove", "Api-Article"))
    save_index(idx, own_index)


def test_read_only_service_classifies_beside_a_writer_and_writes_nothing(catalogue, own_index: Path,
                                                                         tmp_path: Path) -> None:
    """--read-only takes no lock (so it runs beside the folder's writer, or on a read-only
    volume), refuses changes with 403 and writes nothing beside or inside the index."""
    writer = create_app(own_index, model=catalogue.model)
    before = sorted(str(p.relative_to(own_index.parent)) for p in own_index.parent.rglob("*"))
    app = create_app(own_index, model=catalogue.model, read_only=True)
    client = authed(app)
    assert client.get("/health").json()["read_only"] is True
    assert client.post("/classify", files={"file": photo(catalogue.test["Banana"][0])}).json()[
        "predictions"][0]["label"] == "Banana"
    refused = client.post("/articles", data={"label": "X"}, files=[("files", photo(catalogue.train["Banana"][0]))])
    assert refused.status_code == 403 and refused.json()["error"] == "read_only"
    assert client.delete("/articles/Banana").status_code == 403
    app.state.service.close()
    assert sorted(str(p.relative_to(own_index.parent)) for p in own_index.parent.rglob("*")) == before
    writer.state.service.close()
    # a mistyped --index is named as missing, and no folder is made for it
    with pytest.raises(Exception, match="typo"):
        create_app(tmp_path / "typo" / "deeper" / "idx", model=catalogue.model)
    assert not (tmp_path / "typo").exists()


def test_bad_allowed_hosts_and_dot_labels_are_refused(catalogue, own_index: Path) -> None:
    for name in ("proxy.example.org:8443", "https://proxy.example.org", "*evil"):
        res = _cli(["serve", "--index", str(catalogue.index_dir), "--allowed-host", name])
        assert res.exit_code == 1 and "is not a host name" in res.output, (name, res.output)
    app = create_app(own_index, model=catalogue.model)
    for label in (".", ".."):
        resp = authed(app).post("/articles", data={"label": label}, files=[("files", photo(catalogue.train["Banana"][0]))])
        assert resp.status_code == 422 and resp.json()["error"] == "invalid_label"
    app.state.service.close()


def test_images_added_from_memory_are_kept_as_files(catalogue, own_index: Path, tmp_path: Path) -> None:
    """Catalogue.add of arrays / PIL images: the saved folder holds them as PNG files under
    enrolled/, so the service shows them, export copies them and a rebuild keeps them."""
    from PIL import Image

    from fewshot.api import Catalogue

    cat = Catalogue.load(own_index)
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in catalogue.train[NEW_ARTICLE][:2]]
    cat.add("From-Memory", [pixels[0], Image.fromarray(pixels[1])])
    cat.save(own_index, overwrite=True)
    saved = load_index(own_index).article_paths("From-Memory")
    assert len(saved) == 2 and all(p.startswith(f"{ENROLLED_DIR}/") and p.endswith(".png") for p in saved)
    assert [np.asarray(Image.open(own_index / p)).tolist() == px.tolist() for p, px in zip(saved, pixels)] == [True] * 2
    app = create_app(own_index, model=catalogue.model)
    client = authed(app)
    art = next(a for a in client.get("/articles").json()["articles"] if a["label"] == "From-Memory")
    assert art["enrolled"] and client.get(art["image_url"]).status_code == 200
    app.state.service.close()
    res = _cli(["export", "--index", str(own_index), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0 and "not on disk" not in res.output, res.output


def test_a_missing_index_beside_an_unwritable_parent_is_named_as_missing(tmp_path: Path, monkeypatch) -> None:
    """Loading a folder that is missing, beside leftovers of a save, where no lock file can be
    made (a read-only parent): the answer is the missing index, not the lock file."""
    import fewshot.io
    from fewshot.errors import CheckpointError, FewshotError

    (tmp_path / ".idx.lock").write_text("{}")

    def no_lock(real, what):
        raise FewshotError(f"cannot write beside {real}")

    monkeypatch.setattr(fewshot.io, "_take", no_lock)
    with pytest.raises(CheckpointError) as err:
        load_index(tmp_path / "idx")
    assert "cannot write beside" not in str(err.value)
