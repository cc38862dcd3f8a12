"""The index folder's store: durable photo writes rolled back on failure, leftovers of a crash
removed, the journal replayed and compacted, a stale save refused. No model: toy vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fewshot.catalogue.store as store
from fewshot.catalogue.journal import Change, Journal
from fewshot.catalogue.store import (ENROLLED_DIR, UPLOAD_DIR, append_change, drop_leftovers, enrolled_articles,
                                     enrolled_name, load_index, remove_written, save_index, write_durably)
from fewshot.errors import CheckpointError
from fewshot.index import CatalogueIndex


def _index() -> CatalogueIndex:
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]
    return CatalogueIndex.build(x, ["a", "a", "b", "c"], [None, None, "g", "g"], ["a0.jpg", "a1.jpg", "b.jpg", "c.jpg"])


def _photo(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def test_durable_photos_then_entry_and_all_rolled_back_when_the_entry_fails(tmp_path: Path, monkeypatch) -> None:
    folder = save_index(_index(), tmp_path / "idx")
    index = load_index(folder)
    srcs = [_photo(tmp_path / "up", f"{i}.jpg", bytes([i]) * 100) for i in range(2)]
    new = [(s, folder / enrolled_name("New", ".jpg")) for s in srcs]
    change = Change("add", "New", None, np.eye(4, dtype=np.float32)[[3, 3]], [d.relative_to(folder).as_posix()
                                                                            for _, d in new], [None, None])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Journal, "append", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_durably(folder, new, lambda: append_change(index, folder, change))
    assert not (folder / ENROLLED_DIR).exists() and not index.has_article("New")  # nothing changed
    monkeypatch.undo()
    write_durably(folder, new, lambda: append_change(index, folder, change))
    assert [d.read_bytes() for _, d in new] == [s.read_bytes() for s in srcs]
    assert not list((folder / ENROLLED_DIR).rglob(".*.tmp"))
    back = load_index(folder)  # base + the journal entry
    assert back.num_images("New") == 2 and back.article_paths("New") == change.paths
    (art,) = enrolled_articles(back, folder)
    assert art.label == "New" and art.files == [d for _, d in new]


def test_a_failed_photo_copy_removes_the_photos_already_stored(tmp_path: Path, monkeypatch) -> None:
    folder = save_index(_index(), tmp_path / "idx")
    srcs = [_photo(tmp_path / "up", f"{i}.jpg", b"x" * 10) for i in range(3)]
    new = [(s, folder / enrolled_name("New", ".jpg")) for s in srcs]
    real, calls = store.shutil.copyfile, []

    def second_fails(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "copyfile", second_fails)
    appended = []
    with pytest.raises(OSError, match="Input/output"):
        write_durably(folder, new, lambda: appended.append(1))
    assert not appended and not (folder / ENROLLED_DIR).exists() and len(calls) == 2


def test_remove_written_prunes_empty_folders_up_to_the_index_folder(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    keep = _photo(folder / ENROLLED_DIR / "x", "keep.jpg", b"1")
    gone = _photo(folder / ENROLLED_DIR / "y" / "z", "gone.jpg", b"2")
    remove_written(folder, gone)
    assert not (folder / ENROLLED_DIR / "y").exists() and keep.is_file() and folder.is_dir()


def test_leftovers_of_a_crash_are_dropped(tmp_path: Path) -> None:
    index = _index()
    index.paths[3] = f"{ENROLLED_DIR}/c/kept.jpg"
    folder = save_index(index, tmp_path / "idx")
    _photo(folder / ENROLLED_DIR / "c", "kept.jpg", b"k")  # an acknowledged enrolment's photo
    index = load_index(folder)
    _photo(folder / "journal", ".0000000007.99.tmp", b"half")
    _photo(folder / ENROLLED_DIR / "d", "orphan.jpg", b"never acknowledged")
    _photo(folder / UPLOAD_DIR / "enrol-x", "upload-0", b"partial")
    assert drop_leftovers(index, folder) == 3
    assert not (folder / UPLOAD_DIR).exists() and not (folder / ENROLLED_DIR / "d").exists()
    assert (folder / ENROLLED_DIR / "c" / "kept.jpg").is_file() and not list((folder / "journal").glob(".*"))


def test_the_journal_is_replayed_compacted_and_a_stale_save_refused(tmp_path: Path) -> None:
    folder = save_index(_index(), tmp_path / "idx")
    index, other = load_index(folder), load_index(folder)
    append_change(index, folder, Change("remove", "b"))
    assert len(Journal(folder)) == 1 and load_index(folder).articles == ["a", "c"]
    with pytest.raises(CheckpointError, match="has changed since"):
        save_index(other, folder)  # would undo the removal
    save_index(index, folder)  # in step with the folder: compacts
    assert len(Journal(folder)) == 0 and load_index(folder).articles == ["a", "c"]
