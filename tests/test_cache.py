import json

import pytest
import torch

from impact_core.cache import VERSIONS, CacheError, ResultCache, artefact

artefact("thing", 1)  # the kind these tests store


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


def test_every_kind_is_declared_with_a_version(tmp_path):
    """A key needs the kind's code version: an undeclared kind is an error, and the version is
    part of the key (a bump gives another key), so older code's entries are never served."""
    cache = ResultCache(tmp_path)
    with pytest.raises(KeyError, match="not declared"):
        cache.key("never_declared", {"x": 1})
    with pytest.raises(ValueError, match="declared twice"):
        artefact("thing", 2)
    before = cache.key("thing", {"x": 1})
    VERSIONS["thing"] = 2
    try:
        assert cache.key("thing", {"x": 1}) != before
    finally:
        VERSIONS["thing"] = 1


def test_a_version_bump_recomputes_its_entries_and_those_built_on_them(tiny_fmnist, tmp_path, monkeypatch, caplog):
    """Bumping one kind's version recomputes that kind's entries and the entries built on them
    (their inputs hold its key), and reuses everything else."""
    import logging

    from conftest import tiny_config
    from impact_core import pipeline
    from impact_core.levels.neuron import neuron_metrics

    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16, "sparsities": [0.5]},
                      data={"eval_images": 20},
                      neuron={"blocks": [11], "top_k": 2, "images": 20, "validation_units": 1, "validation_images": 10})

    def build():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="impact_core"):
            pipeline.accuracy(cfg, 0.0)
            pipeline.accuracy(cfg, 0.5)
            neuron_metrics(cfg, 0.0)
        computed = {r.getMessage().split()[2].split("/")[0] for r in caplog.records
                    if r.getMessage().startswith("cache: computing")}
        reused = {r.getMessage().split()[2].split("/")[0] for r in caplog.records
                  if r.getMessage().startswith("cache: reusing")}
        return computed, reused

    computed, _ = build()
    assert computed == {"dense_model", "pruned_model", "accuracy", "site_means", "neuron_metrics"}
    assert build()[0] == set()  # everything reused

    monkeypatch.setitem(VERSIONS, "site_means", VERSIONS["site_means"] + 1)
    computed, reused = build()
    assert computed == {"site_means", "neuron_metrics"}  # the means and what mean-ablates with them
    assert {"dense_model", "accuracy"} <= reused

    monkeypatch.setitem(VERSIONS, "pruned_model", VERSIONS["pruned_model"] + 1)
    computed, reused = build()
    assert computed == {"pruned_model", "accuracy"}  # the 50% model and its accuracy; dense's all reused
    assert {"dense_model", "neuron_metrics"} <= reused  # dense and its neuron metrics


WORKER = """
import sys, time
from impact_core.cache import ResultCache, artefact
artefact("thing", 1)
def compute():
    with open(sys.argv[2], "a") as f:
        f.write("computed\\n")
    time.sleep(1.0)
    return {"who": sys.argv[3]}
print(ResultCache(sys.argv[1]).get_or_compute("thing", {"x": 1}, compute)["who"])
"""


def test_two_processes_compute_an_entry_once(tmp_path):
    """The second process waits for the first one's lock, then loads what it stored."""
    import subprocess
    import sys

    from impact_core.config import REPO_ROOT

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    calls = tmp_path / "calls.txt"
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(calls), name],
                              stdout=subprocess.PIPE, text=True, env=env) for name in ("first", "second")]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert calls.read_text() == "computed\n"  # one computation
    assert outs[0] == outs[1] and outs[0] in ("first", "second")  # both got the stored value


def test_metadata_records_the_time_of_the_computation_and_its_task(tmp_path, monkeypatch):
    """``seconds`` includes the entries computed on the way; ``self_seconds`` leaves them out."""
    import time

    monkeypatch.setenv("IMPACT_TASK", "circuits, 70%")
    cache = ResultCache(tmp_path)

    def inner():
        time.sleep(0.3)
        return 1

    def outer():
        value = cache.get_or_compute("thing", {"x": "inner"}, inner)
        time.sleep(0.05)
        return value + 1

    assert cache.get_or_compute("thing", {"x": "outer"}, outer) == 2
    meta = {x: json.loads(cache.paths("thing", cache.key("thing", {"x": x}))[1].read_text()) for x in ("inner", "outer")}
    assert meta["inner"]["seconds"] >= 0.3 and meta["inner"]["self_seconds"] == pytest.approx(meta["inner"]["seconds"])
    assert meta["outer"]["seconds"] >= meta["inner"]["seconds"] + 0.05
    assert meta["outer"]["self_seconds"] == pytest.approx(meta["outer"]["seconds"] - meta["inner"]["seconds"], abs=0.01)
    assert meta["outer"]["task"] == "circuits, 70%" and meta["outer"]["threads"] >= 1
