import json

import pytest
import torch

from impact_core.cache import CacheError, ResultCache


def test_compute_once_then_reuse(tmp_path):
    cache = ResultCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(5.0), "n": 3}

    a = cache.get_or_compute("thing", {"x": 1}, compute)
    b = cache.get_or_compute("thing", {"x": 1}, compute)
    assert len(calls) == 1 and torch.equal(a["w"], b["w"]) and b["n"] == 3
    cache.get_or_compute("thing", {"x": 2}, compute)  # other inputs, other key
    assert len(calls) == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_payload_is_recomputed(tmp_path):
    cache = ResultCache(tmp_path)
    cache.get_or_compute("thing", {"x": 1}, lambda: torch.ones(3))
    key = cache.key("thing", {"x": 1})
    payload, meta = cache.paths("thing", key)
    payload.write_bytes(payload.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CacheError, match="checksum"):
        cache.load("thing", key)
    value = cache.get_or_compute("thing", {"x": 1}, lambda: torch.zeros(3))
    assert torch.equal(value, torch.zeros(3))
    assert json.loads(meta.read_text())["inputs"] == {"x": 1}


def test_partial_entry_is_not_loaded(tmp_path):
    cache = ResultCache(tmp_path)
    cache.get_or_compute("thing", {"x": 1}, lambda: torch.ones(3))
    key = cache.key("thing", {"x": 1})
    payload, meta = cache.paths("thing", key)
    meta.unlink()  # as if the process died between the two renames
    with pytest.raises(CacheError, match="partial"):
        cache.load("thing", key)
    assert torch.equal(cache.get_or_compute("thing", {"x": 1}, lambda: torch.full((3,), 7.0)), torch.full((3,), 7.0))


def test_failed_compute_leaves_nothing(tmp_path):
    cache = ResultCache(tmp_path)

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("thing", {"x": 1}, boom)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path)

    def bad_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", bad_save)
    with pytest.raises(OSError):
        cache.get_or_compute("thing", {"x": 1}, lambda: torch.ones(2))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_stale_temporaries_are_cleaned_but_not_a_write_in_progress(tmp_path):
    """A write killed mid-way leaves ``.<name>.<pid>.<random>.tmp``; the next computation of
    that kind removes it when its writer is gone, and leaves a live writer's file alone."""
    import os
    import subprocess
    import sys
    import time

    from impact_core.cache import ResultCache

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    folder = tmp_path / "thing"
    folder.mkdir()
    killed = folder / f".abc.pt.{dead}.x1y2.tmp"
    live = folder / f".def.pt.{os.getpid()}.z3w4.tmp"
    recent = folder / f".ghi.pt.{dead}.q5r6.tmp"  # writer gone, but touched a moment ago: kept for now
    for f in (killed, live, recent):
        f.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(killed, (old, old))
    os.utime(live, (old, old))
    cache = ResultCache(tmp_path)
    assert cache.get_or_compute("thing", {"a": 1}, lambda: {"x": 1}) == {"x": 1}
    assert not killed.exists() and live.exists() and recent.exists()
    assert set(folder.glob(f".*.{os.getpid()}.*.tmp")) == {live}  # this entry's own writes were renamed away
    assert len(list(folder.glob("*.json"))) == 1
