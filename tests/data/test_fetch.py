"""Dataset fetching: loopback HTTP downloads (resume, errors), mirrors, resolve_data, the CLI.

The archives are built at test time from a real subset of ``../shared/data`` and served by a
small Range-capable HTTP server on 127.0.0.1; nothing here reaches the internet.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewshot.cli import datasets as datasets_cli
from fewshot.data import fetch
from fewshot.data.fetch import archive as fetch_archive
from fewshot.data.fetch import download as fetch_download
from fewshot.data.fetch import (
    MARKER_NAME,
    DatasetInfo,
    fetch_dataset,
    get_dataset_info,
    is_verified,
    list_datasets,
    resolve_data,
    tree_digest,
)
from fewshot.errors import DataError

TOP = "GroceryStoreDataset-master"


# ------------------------------------------------------------------------------------ server


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.cut_next: int | None = None  # cut the next response after this many body bytes
        self.ignore_range = False
        self.redirects: dict[str, str] = {}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        state: _State = self.server.state  # type: ignore[attr-defined]
        state.requests.append((self.path, dict(self.headers)))
        if self.path in state.redirects:  # like GitHub's archive -> codeload redirect
            self.send_response(302)
            self.send_header("Location", state.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not state.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/zip")
        self.send_header("ETag", '"v1"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if state.cut_next is not None:
            cut, state.cut_next = state.cut_next, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    httpd.state.base = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No user data root, mirror or proxy leaks into the tests."""
    for var in ("FEWSHOT_DATA", "FEWSHOT_DATASETS_MIRROR", "http_proxy", "HTTP_PROXY",
                "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(time, "sleep", lambda s: None)


# ----------------------------------------------------------------------------- test archive


def _expected_digest(folder: Path) -> str:
    """The tree digest, computed independently of fewshot.data.fetch."""
    lines = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            lines.append((rel.as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()))
    return hashlib.sha256(
        "".join(f"{h}  {r}\n" for r, h in sorted(lines)).encode()
    ).hexdigest()


@pytest.fixture()
def tiny(tmp_path_factory, grocery_root):
    """A small real subset of the Grocery Store Dataset, as a folder and as a zip archive."""
    src = tmp_path_factory.mktemp("tiny") / TOP
    (src / "dataset").mkdir(parents=True)
    shutil.copy(grocery_root / "README.md", src / "README.md")
    shutil.copy(grocery_root / "LICENSE", src / "LICENSE")
    jpgs = sorted((grocery_root / "dataset" / "train").rglob("*.jpg"))[:4]
    assert len(jpgs) == 4
    for jpg in jpgs:
        rel = jpg.relative_to(grocery_root)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(jpg, src / rel)
    (src / ".gitattributes").write_text("*.jpg binary\n")  # hidden: not part of the dataset
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{TOP}/", "")
        for p in sorted(src.rglob("*")):
            zf.write(p, f"{TOP}/{p.relative_to(src).as_posix()}")
    archive = buf.getvalue()
    digest = _expected_digest(src)
    return {"src": src, "archive": archive, "digest": digest, "n_files": 6}


def _info(url: str, digest: str, **kw) -> DatasetInfo:
    return DatasetInfo(
        name="tinygrocery",
        title="tiny grocery subset",
        url=url,
        archive_format="zip",
        licence="MIT",
        size_bytes=100_000,
        citation="test",
        homepage="http://127.0.0.1/",
        subdir=TOP,
        tree_sha256=digest,
        mirror_subpath="tiny/grocery",
        **kw,
    )


@pytest.fixture()
def served(server, tiny):
    server.files["/master.zip"] = tiny["archive"]
    return _info(server.base + "/master.zip", tiny["digest"])


def _leftovers(root: Path, name: str = "tinygrocery") -> list[str]:
    """Entries of ``root`` other than a finished dataset folder."""
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != name)


def _range_requests(server) -> list[str]:
    return [h.get("Range") for _, h in server.requests if h.get("Range")]


# ------------------------------------------------------------------------------------ digests


def test_tree_digest_definition_skips_hidden_files(tiny):
    assert tree_digest(tiny["src"]) == tiny["digest"]
    (tiny["src"] / ".DS_Store").write_bytes(b"junk")
    (tiny["src"] / MARKER_NAME).write_text("{}")
    assert tree_digest(tiny["src"]) == tiny["digest"]
    (tiny["src"] / "LICENSE").write_text("changed")
    assert tree_digest(tiny["src"]) != tiny["digest"]


def test_pinned_digests_match_shared_data(shared):
    for info in list_datasets():
        folder = shared / "data" / info.mirror_path
        assert tree_digest(folder) == info.tree_sha256, info.name
        assert fetch.count_files(folder) == info.file_count


def test_registry():
    names = [i.name for i in list_datasets()]
    assert {"grocery", "omniglot"} <= set(names)
    g = get_dataset_info("grocery")
    assert g.url == "https://github.com/marcusklasson/GroceryStoreDataset/archive/refs/heads/master.zip"
    assert g.subdir == "GroceryStoreDataset-master" and g.licence == "MIT"
    assert g.mirror_path == "grocery-store-dataset"
    assert get_dataset_info("omniglot").mirror_path == "omniglot/images_background_small1"
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        fetch_dataset("nope")


# ------------------------------------------------------------------------------------ HTTP


def test_fetch_over_http_then_not_again(tmp_path, server, served, tiny):
    root = tmp_path / "data"
    dest = fetch_dataset(served, root=root, progress=False)
    assert dest == root / "tinygrocery"
    assert tree_digest(dest) == tiny["digest"]
    assert (dest / "README.md").is_file() and not (dest / ".gitattributes").exists()
    assert dest.stat().st_mode & 0o755 == 0o755  # not mkdtemp's 0700
    marker = json.loads((dest / MARKER_NAME).read_text())
    assert marker["tree_sha256"] == tiny["digest"] and marker["file_count"] == tiny["n_files"]
    assert _leftovers(root) == []  # no .downloads, no temporary folders
    assert len(server.requests) == 1
    ua = server.requests[0][1].get("User-Agent", "")
    assert ua.startswith("fewshot")

    # already present and verified: no request, cheap or full verification
    assert fetch_dataset(served, root=root, progress=False) == dest
    assert fetch_dataset(served, root=root, progress=False, verify=True) == dest
    assert len(server.requests) == 1

    # force: fetched again and replaced (a file the user added is never deleted: see below)
    (dest / "LICENSE").write_text("edited")
    assert fetch_dataset(served, root=root, progress=False, force=True) == dest
    assert len(server.requests) == 2 and (dest / "LICENSE").read_text() != "edited"
    assert _leftovers(root) == []


def test_registered_name_and_progress_bar(tmp_path, served, monkeypatch):
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "envroot"))
    fetch.register_dataset(served)
    try:
        dest = fetch_dataset("tinygrocery")  # default root from $FEWSHOT_DATA, progress on
        assert dest == tmp_path / "envroot" / "tinygrocery"
        assert resolve_data("tinygrocery") == dest
    finally:
        fetch.unregister_dataset("tinygrocery")


def test_checksum_mismatch_leaves_nothing(tmp_path, served):
    root = tmp_path / "data"
    bad = replace(served, tree_sha256="0" * 64)
    with pytest.raises(DataError, match="checksum mismatch") as err:
        fetch_dataset(bad, root=root, progress=False)
    assert "tinygrocery" in str(err.value) and "nothing was installed" in str(err.value)
    assert not (root / "tinygrocery").exists()
    assert _leftovers(root) == []


def test_pinned_archive_sha256(tmp_path, served, tiny):
    good = replace(served, archive_sha256=hashlib.sha256(tiny["archive"]).hexdigest())
    assert fetch_dataset(good, root=tmp_path / "a", progress=False).is_dir()
    bad = replace(served, archive_sha256="f" * 64)
    with pytest.raises(DataError, match="checksum mismatch for the archive") as err:
        fetch_dataset(bad, root=tmp_path / "b", progress=False)
    assert served.url in str(err.value)
    assert _leftovers(tmp_path / "b") == [] and not (tmp_path / "b" / "tinygrocery").exists()


def test_interrupted_download_then_resume(tmp_path, server, served, tiny):
    root = tmp_path / "data"
    server.cut_next = 3000
    with pytest.raises(DataError, match="interrupted") as err:
        fetch_dataset(served, root=root, progress=False, retries=0)
    assert "run the same command again to resume" in str(err.value)
    part = root / ".downloads" / "tinygrocery.part"
    assert part.stat().st_size == 3000
    assert not (root / "tinygrocery").exists()
    assert _leftovers(root) == [".downloads"]  # only the partial download, for resuming

    dest = fetch_dataset(served, root=root, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    assert _range_requests(server) == ["bytes=3000-"]
    assert server.requests[-1][1].get("If-Range") == '"v1"'
    assert _leftovers(root) == []


def test_interrupted_download_resumes_within_one_call(tmp_path, server, served, tiny):
    server.cut_next = 1234
    dest = fetch_dataset(served, root=tmp_path, progress=False, retries=1)
    assert tree_digest(dest) == tiny["digest"]
    assert _range_requests(server) == ["bytes=1234-"]


def test_redirect_then_resume(tmp_path, server, served, tiny):
    server.redirects["/archive/master.zip"] = "/master.zip"
    info = replace(served, url=server.base + "/archive/master.zip")
    server.cut_next = 5000
    with pytest.raises(DataError, match="interrupted"):
        fetch_dataset(info, root=tmp_path, progress=False, retries=0)
    dest = fetch_dataset(info, root=tmp_path, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    assert [p for p, _ in server.requests] == ["/archive/master.zip", "/master.zip"] * 2
    assert _range_requests(server) == ["bytes=5000-", "bytes=5000-"]  # kept across redirect


def test_server_ignoring_range_restarts(tmp_path, server, served, tiny):
    server.cut_next = 2000
    with pytest.raises(DataError, match="interrupted"):
        fetch_dataset(served, root=tmp_path, progress=False, retries=0)
    server.ignore_range = True
    dest = fetch_dataset(served, root=tmp_path, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    assert _range_requests(server) == ["bytes=2000-"]  # asked, got 200, restarted cleanly


def test_complete_part_file_is_not_downloaded_again(tmp_path, server, served, tiny):
    downloads = tmp_path / ".downloads"
    downloads.mkdir()
    (downloads / "tinygrocery.part").write_bytes(tiny["archive"])
    (downloads / "tinygrocery.part.json").write_text(json.dumps({"url": served.url}))
    dest = fetch_dataset(served, root=tmp_path, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    assert _range_requests(server) == [f"bytes={len(tiny['archive'])}-"]  # answered 416
    assert _leftovers(tmp_path) == []


def test_part_file_of_another_url_is_discarded(tmp_path, server, served, tiny):
    downloads = tmp_path / ".downloads"
    downloads.mkdir()
    (downloads / "tinygrocery.part").write_bytes(b"x" * 500)
    (downloads / "tinygrocery.part.json").write_text(json.dumps({"url": "http://old/url.zip"}))
    dest = fetch_dataset(served, root=tmp_path, progress=False)
    assert tree_digest(dest) == tiny["digest"] and _range_requests(server) == []


def test_truncated_archive(tmp_path, server, served, tiny):
    server.files["/master.zip"] = tiny["archive"][: len(tiny["archive"]) // 2]
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        fetch_dataset(served, root=tmp_path, progress=False)
    assert "run the command again" in str(err.value)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "tinygrocery").exists()


def test_unsafe_archive_member_is_refused(tmp_path, server, served):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{TOP}/README.md", "hi")
        zf.writestr(f"{TOP}/../../evil.txt", "x")
    server.files["/master.zip"] = buf.getvalue()
    with pytest.raises(DataError, match="outside the extraction folder"):
        fetch_dataset(served, root=tmp_path / "r", progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert _leftovers(tmp_path / "r") == []


def test_no_network(tmp_path, tiny):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = _info(f"http://127.0.0.1:{port}/master.zip", tiny["digest"])
    root = tmp_path / "data"
    with pytest.raises(DataError, match="cannot download dataset 'tinygrocery'") as err:
        fetch_dataset(info, root=root, progress=False)
    msg = str(err.value)
    assert info.url in msg and "--mirror" in msg and "internet connection" in msg
    assert not root.exists()  # the root it created is removed again


def test_http_error(tmp_path, server, tiny):
    info = _info(server.base + "/missing.zip", tiny["digest"])
    with pytest.raises(DataError, match="HTTP 404") as err:
        fetch_dataset(info, root=tmp_path, progress=False)
    assert info.url in str(err.value)
    assert _leftovers(tmp_path) == []


def test_root_not_writable(tmp_path, served, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="is not a writable folder") as err:
        fetch_dataset(served, root=blocker / "data", progress=False)
    assert "root=DIR" in str(err.value) and "--" not in err.value.hint and err.value.options == ("root",)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(DataError, match="is not a writable folder.*Permission denied"):
        fetch_dataset(served, root=tmp_path / "ro", progress=False)


def _enospc_open(match: str):
    real_open = open

    class _Full(io.RawIOBase):
        def __init__(self, fh):
            self.fh = fh

        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.fh.close()
            super().close()

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode or "a" in mode:
            if re.search(match, os.path.basename(os.path.dirname(str(path)))) or re.search(
                match, os.path.basename(str(path))
            ):
                return _Full(fh)
        return fh

    return fake_open


def test_disk_full_while_extracting_keeps_only_the_archive(tmp_path, server, served, tiny,
                                                            monkeypatch):
    monkeypatch.setattr(fetch_archive, "open", _enospc_open(r"^\.tinygrocery\.|^dataset$|^" + TOP),
                        raising=False)
    with pytest.raises(DataError, match="no space left on device") as err:
        fetch_dataset(served, root=tmp_path, progress=False)
    assert "root=DIR" in str(err.value) and "--" not in err.value.hint and err.value.options == ("root",)
    assert not (tmp_path / "tinygrocery").exists()
    assert _leftovers(tmp_path) == [".downloads"]  # the complete archive, kept for a rerun
    monkeypatch.undo()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    dest = fetch_dataset(served, root=tmp_path, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    assert len(server.requests) == 2 and _range_requests(server)  # 416: nothing re-downloaded


def test_disk_full_while_downloading(tmp_path, served, monkeypatch):
    monkeypatch.setattr(fetch_download, "open", _enospc_open(r"\.part$"), raising=False)
    with pytest.raises(DataError, match="no space left on device"):
        fetch_dataset(served, root=tmp_path, progress=False)
    assert not (tmp_path / "tinygrocery").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".downloads"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stale_temporary_folder_is_cleaned(tmp_path, served):
    stale = tmp_path / f".tinygrocery.{2**30}.abc.tmp"
    (stale / "dataset").mkdir(parents=True)
    fetch_dataset(served, root=tmp_path, progress=False)
    assert not stale.exists()


def test_existing_folder_without_marker(tmp_path, server, served, tiny):
    dest = tmp_path / "tinygrocery"
    shutil.copytree(tiny["src"], dest)  # the right content, put there by hand
    assert fetch_dataset(served, root=tmp_path, progress=False) == dest
    assert (dest / MARKER_NAME).is_file() and server.requests == []

    other = tmp_path / "other"
    (other / "tinygrocery").mkdir(parents=True)
    (other / "tinygrocery" / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not fetched by fewshot"):
        fetch_dataset(served, root=other, progress=False)
    with pytest.raises(DataError, match="replaces only a copy that fewshot fetched"):
        fetch_dataset(served, root=other, progress=False, force=True)  # --force never deletes a user's folder
    assert (other / "tinygrocery" / "mine.txt").is_file()


def test_damaged_verified_copy_is_fetched_again(tmp_path, server, served, tiny):
    dest = fetch_dataset(served, root=tmp_path, progress=False)
    (dest / "LICENSE").unlink()
    assert not is_verified(dest, served)
    fetch_dataset(served, root=tmp_path, progress=False)
    assert len(server.requests) == 2 and tree_digest(dest) == tiny["digest"]


def test_a_users_files_in_a_fetched_copy_are_never_deleted(tmp_path, server, served, tiny):
    dest = fetch_dataset(served, root=tmp_path, progress=False)
    (dest / "my-annotations.csv").write_text("mine")  # the copy no longer verifies
    for force in (False, True):
        with pytest.raises(DataError, match="not part of the dataset .my-annotations.csv."):
            fetch_dataset(served, root=tmp_path, progress=False, force=force)
        assert (dest / "my-annotations.csv").read_text() == "mine"
    (dest / "my-annotations.csv").unlink()
    assert fetch_dataset(served, root=tmp_path, progress=False) == dest and tree_digest(dest) == tiny["digest"]


# ------------------------------------------------------------------------------------ mirror


def test_mirror_real_omniglot(tmp_path, omniglot_root, monkeypatch):
    mirror = omniglot_root.parents[1]  # ../shared/data
    root = tmp_path / "data"
    dest = fetch_dataset("omniglot", root=root, mirror=mirror, progress=False)
    assert dest == root / "omniglot"
    info = get_dataset_info("omniglot")
    assert tree_digest(dest) == info.tree_sha256
    assert json.loads((dest / MARKER_NAME).read_text())["source"] == str(omniglot_root)
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(
        p.name for p in omniglot_root.iterdir() if p.is_dir()
    )
    assert _leftovers(root, "omniglot") == []
    assert is_verified(dest, info, full=True)

    # the environment variables do the same for the default root
    monkeypatch.setenv("FEWSHOT_DATA", str(root))
    monkeypatch.setenv("FEWSHOT_DATASETS_MIRROR", str(mirror))
    assert fetch_dataset("omniglot", progress=False) == dest
    assert resolve_data("omniglot") == dest


def test_mirror_archive_file_and_folder(tmp_path, tiny):
    info = _info("https://example.invalid/master.zip", tiny["digest"])
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tinygrocery.zip").write_bytes(tiny["archive"])
    dest = fetch_dataset(info, root=tmp_path / "a", mirror=mirror, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    # an archive file given directly, here a tar.gz without the top folder's usual name
    tgz = tmp_path / "copy.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tiny["src"], arcname="somewhere")
    dest = fetch_dataset(info, root=tmp_path / "b", mirror=tgz, progress=False)
    assert tree_digest(dest) == tiny["digest"]
    # a folder holding mirror_subpath
    (mirror / "tiny").mkdir()
    shutil.copytree(tiny["src"], mirror / "tiny" / "grocery")
    (mirror / "tinygrocery.zip").unlink()
    dest = fetch_dataset(info, root=tmp_path / "c", mirror=mirror, progress=False)
    assert tree_digest(dest) == tiny["digest"]


def test_mirror_errors(tmp_path, tiny):
    info = _info("https://example.invalid/master.zip", tiny["digest"])
    with pytest.raises(DataError, match="not found in mirror") as err:
        fetch_dataset(info, root=tmp_path / "r", mirror=tmp_path, progress=False)
    assert "tiny/grocery" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        fetch_dataset(info, root=tmp_path / "r", mirror=tmp_path / "nowhere", progress=False)

    # a modified mirror copy: checksum mismatch, nothing installed, mirror untouched
    mirror = tmp_path / "mirror"
    shutil.copytree(tiny["src"], mirror / "tinygrocery")
    (mirror / "tinygrocery" / "README.md").write_text("edited")
    with pytest.raises(DataError, match="checksum mismatch") as err:
        fetch_dataset(info, root=tmp_path / "r", mirror=mirror, progress=False)
    assert str(mirror / "tinygrocery") in str(err.value)
    assert _leftovers(tmp_path / "r") == [] and not (tmp_path / "r" / "tinygrocery").exists()

    # a truncated tar.gz in the mirror
    tgz = tmp_path / "tiny.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tiny["src"], arcname=TOP)
    tgz.write_bytes(tgz.read_bytes()[:-4000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        fetch_dataset(info, root=tmp_path / "r", mirror=tgz, progress=False)
    assert _leftovers(tmp_path / "r") == []


# ------------------------------------------------------------------------------ resolve_data


def test_resolve_data(tmp_path, omniglot_root, monkeypatch):
    assert resolve_data(omniglot_root) == omniglot_root
    assert resolve_data(str(tmp_path)) == tmp_path
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        resolve_data("grocery")
    msg = str(err.value)
    assert "dataset 'grocery' is not downloaded" in msg
    assert "fewshot datasets fetch grocery" in msg and "--mirror PATH" in msg
    with pytest.raises(DataError, match="no such file or folder: nope/missing"):
        resolve_data("nope/missing")
    dest = fetch_dataset("omniglot", mirror=omniglot_root.parents[1], progress=False)
    assert resolve_data("omniglot") == dest
    assert resolve_data("omniglot", root=tmp_path / "data") == dest


# ------------------------------------------------------------------------------------ CLI


def test_cli_list():
    result = CliRunner().invoke(datasets_cli.app, ["list"])
    assert result.exit_code == 0, result.output
    for text in ("grocery", "omniglot", "MIT", "Klasson", "Lake", "not fetched"):
        assert text in result.output


def test_cli_fetch_with_mirror(tmp_path, omniglot_root):
    runner = CliRunner()
    args = ["fetch", "omniglot", "--root", str(tmp_path), "--mirror", str(omniglot_root.parents[1])]
    result = runner.invoke(datasets_cli.app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "omniglot")
    assert is_verified(tmp_path / "omniglot", get_dataset_info("omniglot"))
    listed = runner.invoke(datasets_cli.app, ["list", "--root", str(tmp_path)])
    assert "fetched" in listed.output


def test_cli_fetch_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        datasets_cli.app, ["fetch", "omniglot", "--root", str(tmp_path), "--mirror",
                           str(tmp_path / "nowhere")]
    )
    assert result.exit_code == 1
    assert "error: mirror" in result.output and "Traceback" not in result.output
    result = runner.invoke(datasets_cli.app, ["fetch", "nope", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "error: unknown dataset 'nope'" in result.output


def test_unsafe_tar_member_is_refused_by_tarfiles_data_filter(tmp_path):
    from fewshot.data import fetch as fetch_mod

    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("top/README.md", b"hi"), ("top/../../evil.txt", b"x")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError, match="unsafe to extract"):
        fetch_mod._extract(archive, dest, fetch_mod.get_dataset_info("omniglot"), "tar", progress=False)
    assert not (tmp_path / "evil.txt").exists()
