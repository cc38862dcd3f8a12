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


# ----------------------------------------------------------------- a run saves as it goes
_STALL_AFTER_SAVES = """
import os, sys, time
from pathlib import Path
import fewshot.embed as embed

embed.SAVE_ROWS = int(os.environ["SAVE_ROWS"])  # small saves, so a 60-image run saves several times
real, calls = embed._save_cache, []

def save_then_stall(cache):  # the test kills the process (SIGKILL) while it stalls here
    ok = real(cache)
    calls.append(1)
    if len(calls) == 3:
        Path(os.environ["READY"]).touch()
        time.sleep(120)
    return ok

embed._save_cache = save_then_stall
from fewshot.cli import main
sys.argv[0] = "fewshot"
sys.exit(main())
"""


def _embed_cmd(data, out) -> list[str]:
    return ["embed", "--data", str(data), "--out", str(out), "--image-size", "64", "--runtime", "torch",
            "--batch-size", "8", "--threads", "1", "--no-progress"]


def _env(cache, **extra) -> dict:
    import os
    from pathlib import Path

    src = str(Path(store.__file__).resolve().parents[2])  # this tree's src, first on the path
    return {**os.environ, "FEWSHOT_CACHE": str(cache), "PYTHONPATH": src, "PYTHONUNBUFFERED": "1",
            "COLUMNS": "1000", **extra}  # log lines unwrapped


def _vectors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))["embeddings"]


def test_a_killed_embedding_run_keeps_what_it_saved_and_a_rerun_continues(small_manifest, tmp_path):
    """``fewshot embed`` killed with SIGKILL right after its third save of 8 vectors (no
    ``finally`` runs) leaves 24 vectors in the store; the rerun says 24 of the 60 came from the
    cache, embeds the other 36 and writes the same vectors as an uninterrupted run. (Before,
    the store was written only at the end: a killed run kept nothing.)"""
    import signal
    import subprocess
    import sys
    import time

    cache, ready = tmp_path / "cache", tmp_path / "READY"
    killed = subprocess.Popen([sys.executable, "-c", _STALL_AFTER_SAVES, *_embed_cmd(small_manifest, tmp_path / "a.safetensors")],
                              env=_env(cache, SAVE_ROWS="8", READY=str(ready)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not ready.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    output = killed.communicate()[0].decode()
    assert ready.exists(), f"the run never saved three times before it ended:\n{output}"
    (folder,) = (cache / "embeddings").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 8] and not (tmp_path / "a.safetensors").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".lock", "manifest.json"] + [f"{s['name']}.{k}.npy" for s in manifest["shards"] for k in ("digests", "vectors")])

    rerun = subprocess.run([sys.executable, "-m", "fewshot", *_embed_cmd(small_manifest, tmp_path / "a.safetensors")],
                           env=_env(cache), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"24 of 60 images already in the embedding cache {folder}; embedding the other 36" in " ".join(
        rerun.stderr.split())
    straight = subprocess.run([sys.executable, "-m", "fewshot", *_embed_cmd(small_manifest, tmp_path / "b.safetensors")],
                              env=_env(tmp_path / "other-cache"), capture_output=True, text=True, timeout=120)
    assert straight.returncode == 0 and "already in the embedding cache" not in straight.stderr, straight.stderr
    a, b = _vectors(tmp_path / "a.safetensors"), _vectors(tmp_path / "b.safetensors")
    assert a.shape == (60, 1280) and np.array_equal(a, b)
    assert len(EmbeddingCache(cache / "embeddings", folder.name)) == 60


def test_periodic_saves_keep_the_number_of_shards_bounded(tmp_path):
    """30 saves of 10 vectors (one run saving as it goes): never more than MAX_SMALL_SHARDS
    shards (the small ones are merged), and every vector reads back as it was put."""
    from fewshot.embed import PeriodicSave

    c = EmbeddingCache(tmp_path, "k")
    saver = PeriodicSave(c, rows=10, seconds=1e9)
    most = 0
    for i in range(300):
        c.put(_digest(i), _vec(i))
        saver.added(1)
        most = max(most, len(_shard_files(tmp_path / "k")))
    assert saver.unsaved == 0 and most <= store.MAX_SMALL_SHARDS
    again = EmbeddingCache(tmp_path, "k")
    assert len(again) == 300 and all(np.array_equal(again.get(_digest(i)), _vec(i)) for i in range(300))


def test_periodic_save_by_time_and_an_unwritable_store_tried_once(tmp_path, monkeypatch, caplog):
    """A time limit of 0 s saves at every batch, a large one only at flush(); a store that cannot
    be written costs one warning and one attempt, not one per batch."""
    from fewshot.embed import PeriodicSave

    c = EmbeddingCache(tmp_path, "k")
    by_time = PeriodicSave(c, rows=10**9, seconds=0.0)
    c.put(_digest(1), _vec(1))
    by_time.added(1)
    assert len(EmbeddingCache(tmp_path, "k")) == 1
    later = PeriodicSave(c, rows=10**9, seconds=1e9)
    c.put(_digest(2), _vec(2))
    later.added(1)
    assert len(EmbeddingCache(tmp_path, "k")) == 1
    later.flush()
    assert len(EmbeddingCache(tmp_path, "k")) == 2
    tries = []

    def full_disk():
        tries.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(c, "save", full_disk)
    broken = PeriodicSave(c, rows=1)
    for i in range(3, 6):
        c.put(_digest(i), _vec(i))
        broken.added(1)
    broken.flush()
    assert len(tries) == 1 and not broken.writable and caplog.text.count("cannot write the embedding cache") == 1


def test_a_save_reads_only_the_shards_written_since(tmp_path, monkeypatch):
    """Saving as a run goes does not re-read the store each time: a save opens only the shards
    another process appended since (here one), not the ones this cache already holds."""
    a, b = EmbeddingCache(tmp_path, "k"), EmbeddingCache(tmp_path, "k")
    _fill(a, range(0, 5))
    a.save()
    _fill(b, range(100, 105))
    b.save()
    opened = []
    real = EmbeddingCache._open_shard
    monkeypatch.setattr(EmbeddingCache, "_open_shard", lambda self, name: opened.append(name) or real(self, name))
    for start in (5, 10, 15):
        _fill(a, range(start, start + 5))
        a.save()
    assert opened == [b._shards[-1].name]  # b's own shard (b holds a's first one too)
    assert len(a) == 25 and np.array_equal(a.get(_digest(102)), _vec(102))
    assert len(EmbeddingCache(tmp_path, "k")) == 25


def test_what_a_killed_save_left_is_removed_by_the_next_save(tmp_path):
    """A save killed between its shard and its manifest leaves an unnamed shard and temporary
    files; the next save removes them and keeps every named shard. With a manifest that cannot
    be read, nothing is removed."""
    c = EmbeddingCache(tmp_path, "k")
    _fill(c, range(5))
    c.save()
    folder = tmp_path / "k"
    named = set(_shard_files(folder))
    debris = ["shard-0123456789ab.vectors.npy", "shard-0123456789ab.digests.npy",
              ".shard-ba9876543210.vectors.npy.x1y2.tmp", ".manifest.json.q9w8.tmp"]
    for name in debris:
        (folder / name).write_bytes(b"left by a killed save")
    (folder / "notes.txt").write_text("not ours to judge")
    _fill(c, range(5, 8))
    c.save()
    left = {p.name for p in folder.iterdir()}
    assert not left & set(debris) and named <= left and "notes.txt" in left
    assert len(EmbeddingCache(tmp_path, "k")) == 8
    (folder / debris[0]).write_bytes(b"again")
    (folder / "manifest.json").write_text("{damaged")
    _fill(c, range(8, 9))
    c.save()
    assert (folder / debris[0]).exists() and all((folder / n).exists() for n in named)
