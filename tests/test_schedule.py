"""The work plan of ``make book``: pieces and chapters as tasks, what each waits for, the order in
which ready tasks start, failures, and the same numbers whichever process computes a piece."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from impact_core import cost, levels, pipeline
from impact_core.config import load_config
from impact_core.runner import toc_chapters
from impact_core.schedule import Task, TaskError, plan, ready_order, run_plan


def test_the_plan_waits_for_models_and_levels():
    cfg = load_config("default")
    tasks = {t.name: t for t in plan(cfg, toc_chapters())}
    assert tasks["dense model"].needs == set() and tasks["dense model"].model
    assert tasks["model trained sparse 70%"].needs == set()  # trained from scratch: starts beside the dense model
    assert tasks["model 70%"].needs == {"dense model"} and tasks["model magnitude 90%"].needs == {"dense model"}
    assert tasks["circuits, 70%"].needs == {"model 70%"}
    assert tasks["circuits, trained sparse 70%"].needs == {"model trained sparse 70%"}
    assert tasks["attribution, control"].needs == {"model control"}
    assert tasks["neuron metrics, dense"].needs == {"dense model"}
    neuron = tasks["book/chapters/02_neuron"].needs
    assert {"neuron metrics, 70%", "neuron metrics, control", "dense model", "model magnitude 90%"} <= neuron
    assert not any(n.startswith("circuits") for n in neuron)
    # the chapter after every level waits for their pieces; the discussion for every piece
    sparse = tasks["book/chapters/06_sparse_training"].needs
    assert {"circuits, 70%", "neuron metrics, 70%", "attribution, trained sparse 70%"} <= sparse
    pieces = {n for n, t in tasks.items() if t.piece is not None}
    assert tasks["book/chapters/07_discussion"].needs == pieces
    # ... and no chapter waits for another: they read only the cache, so the last ones run side by side
    assert not any(t.needs - pieces for t in tasks.values())
    # the probe's own SAE is not trained twice (once by the model's piece, once by the sweep)
    assert not [n for n in tasks if n.startswith("SAE sweep, dense cls k=16 x8")]
    # no piece is declared twice
    labels = [p.label for p in levels.level_pieces(cfg, levels.level_names())]
    assert len(labels) == len(set(labels))


def _toy_entry(cfg, sparsity, method="wanda"):
    """A stand-in entry point (never run: the test only plans)."""


@pytest.fixture(autouse=True)
def _toy_work():
    """The toy pieces' work for the cost model the plan orders by: none (a new kind of piece declares its work)."""
    cost.register_piece_work(_toy_entry, lambda book, chapter, piece: None)
    yield
    cost._PIECE_WORK.pop(_toy_entry, None)


def test_the_plan_orders_pieces_by_the_cost_model():
    """A piece's length is the cost model's prediction of its stages (one description of the work): the
    trainings above a model's circuits above its neuron metrics, a displayed model's attribution above a
    claims-only one's; a piece the cost model cannot describe stops the plan before any compute."""
    cfg = load_config("default")
    tasks = {t.name: t for t in plan(cfg, toc_chapters())}
    pieces = [t.piece for t in tasks.values() if t.piece is not None]
    assert {n: t.cost for n, t in tasks.items() if t.piece is not None} == cost.piece_seconds(cfg, pieces)
    c = {n: t.cost for n, t in tasks.items()}
    assert c["dense model"] > c["circuits, 70%"] > c["neuron metrics, 70%"] > 0
    assert c["model trained sparse 70%"] > c["circuits, 70%"]
    assert c["attribution, 70%"] > c["attribution, 70%, replicate 1"] > 0  # the displayed methods on 128 images
    assert c["model 70%"] > 0 and c["model 70%, replicate 1"] > 0
    odd = levels.Piece("an odd piece", print, (0.0,))
    level = levels.Level("toy_odd", "toy_odd", "neuron", gather=lambda cfg: {}, claims=lambda runs, judge: [],
                         chapter="toy/toy_odd", pieces=lambda cfg: [odd])
    levels.register_level(level)
    try:
        with pytest.raises(KeyError, match="an odd piece"):
            plan(cfg, ["toy/toy_odd"])
    finally:
        levels.unregister_level("toy_odd")


def test_a_piece_two_levels_declare_is_planned_once_and_awaited_by_both():
    """Pieces are named by their label: a piece two levels declare is one task, and both chapters
    wait for it; the same label for two different calls is a declaration error."""
    shared = levels.Piece("toy shared", _toy_entry, (0.5,), of=(0.5, "wanda"))
    own = levels.Piece("toy own", _toy_entry, (0.7,), of=(0.7, "wanda"))
    clash = levels.Piece("toy shared", _toy_entry, (0.9,), of=(0.9, "wanda"))

    def toy(name, pieces):
        return levels.Level(name, name, "neuron", gather=lambda cfg: {}, claims=lambda runs, judge: [],
                            chapter=f"toy/{name}", pieces=lambda cfg: pieces)

    cfg = load_config("smoke")
    levels.register_level(toy("toy_a", [shared]))
    levels.register_level(toy("toy_b", [shared, own]))
    try:
        tasks = plan(cfg, ["toy/toy_a", "toy/toy_b"])
        assert [t.name for t in tasks] == ["toy shared", "toy own", "toy/toy_a", "toy/toy_b"]
        by_name = {t.name: t for t in tasks}
        assert by_name["toy/toy_a"].needs == {"toy shared"}
        assert by_name["toy/toy_b"].needs == {"toy shared", "toy own"}
        levels.register_level(toy("toy_c", [clash]))
        with pytest.raises(ValueError, match="'toy shared' is declared twice for different calls"):
            plan(cfg, ["toy/toy_a", "toy/toy_c"])
    finally:
        for name in ("toy_a", "toy_b", "toy_c"):
            if name in levels.level_names():
                levels.unregister_level(name)


def test_a_chapter_waits_for_a_level_without_pieces_by_its_chapter():
    """A level that declares no pieces computes in its chapter; a chapter after it waits for that chapter."""
    own = levels.Piece("toy own", _toy_entry, (0.7,), of=(0.7, "wanda"))
    first = levels.Level("toy_first", "toy_first", "neuron", gather=lambda cfg: {}, claims=lambda runs, judge: [],
                         chapter="toy/toy_first", pieces=None)
    then = levels.Level("toy_then", "toy_then", "neuron", gather=lambda cfg: {}, claims=lambda runs, judge: [],
                        chapter="toy/toy_then", pieces=lambda cfg: [own], after=("toy_first",))
    levels.register_level(first)
    levels.register_level(then)
    try:
        tasks = {t.name: t for t in plan(load_config("smoke"), ["toy/toy_first", "toy/toy_then"])}
        assert tasks["toy/toy_first"].needs == set()
        assert tasks["toy/toy_then"].needs == {"toy own", "toy/toy_first"}
    finally:
        for name in ("toy_then", "toy_first"):
            levels.unregister_level(name)


def test_models_start_first_then_the_longest():
    tasks = [Task("short", cost=1), Task("long", cost=50), Task("model", model=True, cost=5), Task("mid", cost=10)]
    assert [t.name for t in sorted(tasks, key=ready_order)] == ["model", "long", "mid", "short"]


def _recorder(durations: dict, fail: str | None = None):
    """A ``run_chapter`` that sleeps ``durations[name]``, records start/end and the concurrency."""
    events, lock, state = [], threading.Lock(), {"running": 0, "most": 0}

    def run(name):
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            events.append(("start", name))
        time.sleep(durations[name])
        with lock:
            state["running"] -= 1
            events.append(("end", name))
        if name == fail:
            raise RuntimeError(f"{name} broke")
        return durations[name]

    return run, events, state


def test_run_plan_respects_needs_and_slots(tmp_path):
    tasks = [Task("a", chapter="a", cost=3), Task("b", chapter="b", needs={"a"}), Task("c", chapter="c", cost=2),
             Task("d", chapter="d", needs={"b", "c"})]
    run, events, state = _recorder({"a": 0.2, "b": 0.05, "c": 0.05, "d": 0.01})
    timings = run_plan(tasks, 2, "smoke", run, tmp_path, say=lambda line: None)
    assert set(timings) == {"a", "b", "c", "d"}
    order = [name for what, name in events if what == "start"]
    assert order[:2] == ["a", "c"]  # the longest ready first
    assert events.index(("end", "a")) < events.index(("start", "b"))
    assert events.index(("end", "b")) < events.index(("start", "d")) and events.index(("end", "c")) < events.index(
        ("start", "d"))
    assert state["most"] == 2


def test_progress_lines_count_tasks_and_estimate_the_time_left(tmp_path):
    """After every task: done of total, elapsed, and the time left from the last build's seconds per task
    (else the tasks' costs), spread over the slots."""
    from impact_core.schedule import progress_line, time_left

    tasks = [Task("a", chapter="a", cost=100), Task("b", chapter="b", needs={"a"}, cost=100)]
    run, _, _ = _recorder({"a": 0.01, "b": 0.01})
    lines = []
    run_plan(tasks, 1, "smoke", run, tmp_path, say=lines.append, estimate={"b": 60.0})
    progress = [line for line in lines if "done" in line]
    assert progress[0].startswith("[impact] 1/2 done, 0 min 00 s elapsed, about 1 min 00 s left")  # b: last build's 60 s
    assert progress[-1].startswith("[impact] 2/2 done") and progress[-1].endswith("about 0 min 00 s left")
    # running tasks count what they have left; pending ones their estimate or cost; two slots halve it
    running = {object(): Task("r", cost=50)}
    assert time_left([Task("p", cost=30)], running, {"r": 0.0}, {}, 2, now=20.0) == pytest.approx((30 + 30) / 2)
    assert progress_line(3, 9, 3725, None) == "[impact] 3/9 done, 1 h 02 min elapsed"


def test_a_failed_task_stops_the_plan(tmp_path):
    tasks = [Task("a", chapter="a"), Task("b", chapter="b", needs={"a"})]
    run, events, _ = _recorder({"a": 0.01, "b": 0.01}, fail="a")
    with pytest.raises(RuntimeError, match="a broke"):
        run_plan(tasks, 2, "smoke", run, tmp_path, say=lambda line: None)
    assert ("start", "b") not in events
    with pytest.raises(ValueError, match="unknown tasks"):
        run_plan([Task("x", chapter="x", needs={"nope"})], 1, "smoke", run, tmp_path, say=lambda line: None)
    with pytest.raises(ValueError, match="never start"):
        run_plan([Task("x", chapter="x", needs={"y"}), Task("y", chapter="y", needs={"x"})], 1, "smoke", run,
                 tmp_path, say=lambda line: None)


def test_a_failed_piece_names_itself_and_its_log(tmp_path, monkeypatch):
    """A piece runs in a worker process; its error comes back naming the piece and its log file."""
    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    piece = levels.Piece("bad piece", pipeline.accuracy, (0.5, "no_such_method"), of=(0.5, "no_such_method"))
    with pytest.raises(TaskError, match=r"piece 'bad piece' failed: ValueError: unknown pruning method[\s\S]*bad-piece"):
        run_plan([Task("bad piece", piece=piece)], 1, "smoke", lambda c: 0.0, tmp_path, say=lambda line: None)


def _sleeping_piece(cfg, seconds: float, pid_file: str) -> None:
    """A piece that records its process and sleeps (run in a worker by the test below)."""
    import os

    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def test_a_killed_plan_takes_its_workers_with_it(tmp_path):
    """``kill`` of the plan's process ends its workers too (their watchdog), instead of leaving them running
    their piece and then waiting forever."""
    import os
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "worker.pid"
    script = (
        "from pathlib import Path\n"
        "from impact_core import levels\n"
        "from impact_core.schedule import Task, run_plan\n"
        "from tests.test_schedule import _sleeping_piece\n"
        f"piece = levels.Piece('sleeper', _sleeping_piece, (120.0, {str(pid_file)!r}))\n"
        f"run_plan([Task('sleeper', piece=piece)], 1, 'smoke', lambda c: 0.0, Path({str(tmp_path)!r}), say=print)\n")
    root = Path(__file__).resolve().parents[1]
    plan_process = subprocess.Popen([sys.executable, "-c", script], cwd=root,
                                    env={**os.environ, "PYTHONPATH": str(root), "IMPACT_CACHE": str(tmp_path / "cache")})
    try:
        deadline = time.time() + 120
        while not pid_file.exists() and time.time() < deadline and plan_process.poll() is None:
            time.sleep(0.2)
        assert pid_file.exists(), "the piece never started"
        worker = int(pid_file.read_text())
        os.kill(worker, 0)  # running
        plan_process.send_signal(signal.SIGKILL)
        plan_process.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the worker outlived the plan's process by 20 s")
    finally:
        if plan_process.poll() is None:
            plan_process.kill()


def test_pieces_computed_by_the_book_equal_those_computed_here(smoke_book, tmp_path, monkeypatch):
    """The smoke book computed its models in worker processes, two at a time; the same entries
    computed again in this process, from an empty cache, are equal bit for bit."""
    cfg = load_config("smoke")
    built = pipeline.cache_for(cfg)
    key = built.key(pipeline.PRUNED_MODEL, pipeline.pruned_inputs(cfg, 0.7, "wanda"))
    by_the_book = built.load(pipeline.PRUNED_MODEL, key)["state"]
    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)  # whatever this process had: the config's cpu_threads applies
    here = pipeline.pruned_model(cfg, 0.7).state_dict()
    assert torch.get_num_threads() == cfg.cpu_threads
    assert by_the_book.keys() == here.keys()
    assert all(torch.equal(by_the_book[k], here[k]) for k in here)


def test_the_profile_reads_the_build_and_what_it_cached(tmp_path):
    """Tasks by wall time and artefacts by self seconds, from timings.json and the cache's metadata;
    entries created before the build (reused, not computed) are left out."""
    from impact_core.cache import ResultCache, artefact
    from impact_core.profile import computed_entries, markdown, profile_tables

    artefact("thing", 1)
    cache = ResultCache(tmp_path / "cache")
    cache.save("thing", "old", 1, {}, {"seconds": 99.0, "self_seconds": 99.0})
    meta = cache.paths("thing", "old")[1]
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "created": "2000-01-01T00:00:00"}))  # from an earlier build
    for key, task, sec, own in (("a", "circuits, 70%", 30.0, 20.0), ("b", "circuits, 70%", 10.0, 10.0),
                                ("c", "book/chapters/02_neuron", 2.0, 2.0)):
        cache.save("thing", key, 1, {}, {"seconds": sec, "self_seconds": own})
        m = cache.paths("thing", key)[1]
        m.write_text(json.dumps({**json.loads(m.read_text()), "task": task}))
    timings = {"started": "2001-01-01T00:00:00", "jobs": 2, "total": 40.0,
               "tasks": {"circuits, 70%": 31.0, "book/chapters/02_neuron": 9.0, "dense model": 35.0}}
    entries = computed_entries(tmp_path / "cache", timings["started"])
    assert len(entries) == 3 and entries.self_seconds.sum() == 32.0
    tables = profile_tables(timings, entries)
    assert list(tables["tasks"].task) == ["dense model", "circuits, 70%", "book/chapters/02_neuron"]
    assert tables["kinds"].iloc[0].to_dict() == {"kind": "thing", "entries": 3, "self_seconds": 32.0, "seconds": 42.0}
    assert tables["pairs"].iloc[0].self_seconds == 30.0
    text = markdown(timings, tables)
    assert "40 s wall, 75 s of task time (94% of the slots busy)" in text and "| dense model" in text
