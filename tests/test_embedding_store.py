"""The embedding store: append-only shards, a manifest, memory-mapped reads, the old .npz
format migrated, concurrent writers merged, small shards compacted, crashes harmless."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from fewshot.embed import cache as store
from fewshot.embed.cache import EmbeddingCache


def _vec(i: int, dim: int = 8) -> np.ndarray:
    return np.full(dim, float(i), np.float32)


def _digest(i: int) -> str:
    return f"{i:064x}"


def _fill(c: EmbeddingCache, ids) -> None:
    for i in ids:
        c.put(_digest(i), _vec(i))


def _shard_files(folder):
    return sorted(p.name for p in folder.glob("shard-*.vectors.npy"))


def test_a_save_writes_only_the_new_vectors(tmp_path):
    c = EmbeddingCache(tmp_path, "k")
    _fill(c, range(100))
    c.save()
    first = _shard_files(tmp_path / "k")
    assert len(first) == 1
    before = {p: (tmp_path / "k" / p).stat().st_mtime_ns for p in first}
    c2 = EmbeddingCache(tmp_path, "k")
    _fill(c2, range(95, 110))  # 5 known, 10 new
    c2.save()
    files = _shard_files(tmp_path / "k")
    assert len(files) == 2 and {p: (tmp_path / "k" / p).stat().st_mtime_ns for p in first} == before
    new = [p for p in files if p not in first][0]
    assert np.load(tmp_path / "k" / new).shape == (10, 8)  # only the 10 new rows were written
    c3 = EmbeddingCache(tmp_path, "k")
    assert len(c3) == 110 and np.array_equal(c3.get(_digest(42)), _vec(42)) and c3.get(_digest(500)) is None
    assert isinstance(c3._shards[0].vectors, np.memmap)  # read memory-mapped
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["dim"] == 8 and sum(s["rows"] for s in manifest["shards"]) == 110


def test_an_old_npz_cache_is_read_then_migrated(tmp_path):
    digests = np.array([_digest(i).encode() for i in range(5)], dtype="S64")
    np.savez(tmp_path / "k.npz", digests=digests, vectors=np.stack([_vec(i) for i in range(5)]))
    c = EmbeddingCache(tmp_path, "k")
    assert len(c) == 5 and np.array_equal(c.get(_digest(3)), _vec(3))
    c.put(_digest(9), _vec(9))
    c.save()
    assert not (tmp_path / "k.npz").exists()
    again = EmbeddingCache(tmp_path, "k")
    assert len(again) == 6 and np.array_equal(again.get(_digest(3)), _vec(3))


def test_concurrent_writers_keep_each_others_vectors(tmp_path):
    errors = []

    def writer(offset: int) -> None:
        try:
            for rnd in range(5):
                c = EmbeddingCache(tmp_path, "k")
                _fill(c, range(offset + rnd * 10, offset + rnd * 10 + 10))
                c.save()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 1000, 2000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    c = EmbeddingCache(tmp_path, "k")
    assert len(c) == 150
    assert all(np.array_equal(c.get(_digest(o + i)), _vec(o + i)) for o in (0, 1000, 2000) for i in range(50))


def test_small_shards_are_compacted(tmp_path):
    for i in range(store.MAX_SMALL_SHARDS + 1):
        c = EmbeddingCache(tmp_path, "k")
        c.put(_digest(i), _vec(i))
        c.save()
    files = _shard_files(tmp_path / "k")
    assert len(files) == 1  # nine one-row shards became one
    c = EmbeddingCache(tmp_path, "k")
    assert len(c) == store.MAX_SMALL_SHARDS + 1 and np.array_equal(c.get(_digest(4)), _vec(4))


def test_large_saves_are_split_into_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_ROWS", 40)
    c = EmbeddingCache(tmp_path, "k")
    _fill(c, range(100))
    c.save()
    sizes = sorted(len(np.load(p)) for p in (tmp_path / "k").glob("shard-*.digests.npy"))
    assert sizes == [20, 40, 40]


def test_a_crash_mid_save_keeps_the_previous_store(tmp_path, monkeypatch):
    c = EmbeddingCache(tmp_path, "k")
    _fill(c, range(10))
    c.save()

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    c2 = EmbeddingCache(tmp_path, "k")
    _fill(c2, range(10, 20))
    monkeypatch.setattr(store, "atomic_write_json", crash)
    with pytest.raises(OSError):
        c2.save()
    monkeypatch.undo()
    again = EmbeddingCache(tmp_path, "k")
    assert len(again) == 10 and np.array_equal(again.get(_digest(7)), _vec(7))
    assert not list((tmp_path / "k").glob("*.tmp"))


def test_damaged_manifest_and_shards_are_reported_and_rebuilt(tmp_path, caplog):
    c = EmbeddingCache(tmp_path, "k")
    _fill(c, range(10))
    c.save()
    shard = _shard_files(tmp_path / "k")[0]
    (tmp_path / "k" / shard).write_bytes(b"garbage")
    again = EmbeddingCache(tmp_path, "k")
    assert len(again) == 0 and "unreadable" in caplog.text
    _fill(again, range(3))
    again.save()  # the damaged shard is dropped from the manifest
    assert len(EmbeddingCache(tmp_path, "k")) == 3
    (tmp_path / "k" / "manifest.json").write_text("[]")
    assert len(EmbeddingCache(tmp_path, "k")) == 0
