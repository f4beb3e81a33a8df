"""The book's work plan: the levels' pieces and the chapters, on ``--jobs`` processes.

``make book`` used to run whole chapters side by side, and a chapter computed everything it showed;
the two cores then idled while one long chapter (or the dense training) ran alone. The plan breaks
the work into the levels' :class:`~impact_core.levels.Piece` objects (one cached entry point for one
model each: a model, one model's circuits, one SAE sweep row) and the chapters, and runs them as
tasks on ``jobs`` slots:

* a piece runs in a worker process of its own (spawned once per slot, ``cpu_threads`` torch
  threads); a chapter runs with papermill, as before, and reads its pieces from the cache;
* a task starts when what it needs is done: an analysis after the model it analyses (a pruned
  model after the dense one; the matched-accuracy control's analyses after the held-out top-1 of the
  dense checkpoints, computed once for every replicate), a chapter after its level's pieces and those of the levels it comes
  after, the chapters of no level (the discussion) after every level's pieces. A chapter never waits
  for another chapter: chapters read only the cache (a chapter writes nothing another reads), so the
  last chapters of a build run side by side instead of one after another;
* of the ready tasks, models go first (the dense and the trained-sparse models start together),
  then the longest, so the last task to end is a short one. A piece's length is the cost model's
  prediction of its stages (:func:`impact_core.cost.piece_seconds`): the plan and the cost model read
  one description of the work, the pieces the levels declare.

The order changes the wall time, never a number: every piece is a cached entry point, the cache's
locks keep two processes from computing the same entry, and every computation runs on the same
number of threads whichever slot it lands on (:func:`impact_core.pipeline.use_cpu_threads`).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("impact_core")


class TaskError(RuntimeError):
    """A piece or a chapter of the plan failed."""

CHAPTER_COST = 40.0
"""Rough seconds of a chapter whose pieces are cached (kernel start, tables, figures, galleries)."""


@dataclass
class Task:
    """A piece (``piece`` set) or a chapter (``chapter`` set), and the names of the tasks it needs."""

    name: str
    needs: set[str] = field(default_factory=set)
    piece: object = None
    chapter: Optional[str] = None
    model: bool = False
    cost: float = CHAPTER_COST


def slug(text: str) -> str:
    """A file name for a task's log: ``SAE sweep, dense cls k=16 x4`` -> ``SAE-sweep-dense-cls-k-16-x4``."""
    return re.sub(r"[^A-Za-z0-9.%]+", "-", text).strip("-").replace("%", "pct")


def plan(cfg, chapters: list[str]) -> list[Task]:
    """The tasks of a build of ``chapters`` (``_toc.yml`` paths) on ``cfg``: the pieces of their levels,
    then the chapters, each with what it needs (see the module docstring)."""
    from .cost import piece_seconds
    from .levels import get_level, level_of_chapter, level_pieces
    from .pipeline import CHECKPOINTS, MATCHED, RANDOM_WEIGHTS, TRAINED_SPARSE

    selected = [lv.name for lv in map(level_of_chapter, chapters) if lv is not None]
    by_level = {name: [p.label for p in level_pieces(cfg, [name])] for name in selected}
    pieces = level_pieces(cfg, selected)
    seconds = piece_seconds(cfg, pieces)
    tasks = [Task(p.label, piece=p, model=p.model, cost=seconds[p.label]) for p in pieces]
    models = {t.piece.of: t.name for t in tasks if t.model}
    dense = models.get((0.0, "wanda"))
    for t in tasks:
        if t.piece is None:
            continue
        of = t.piece.of
        if t.model:
            if dense and t.name != dense and of[1] != TRAINED_SPARSE:
                t.needs.add(dense)  # a pruned model (or the control) starts from the dense one
        elif of in models:
            t.needs.add(models[of])
        elif dense and of[1] not in (TRAINED_SPARSE, RANDOM_WEIGHTS):  # those start from no dense model
            t.needs.add(dense)
        if not t.model and of[1] == MATCHED and (of[0], "wanda", *of[2:]) in models:
            t.needs.add(models[(of[0], "wanda", *of[2:])])  # its checkpoint is chosen by that model's accuracy
        if of[1] == MATCHED and (0.0, CHECKPOINTS) in models:
            t.needs.add(models[(0.0, CHECKPOINTS)])  # ... among the checkpoints' held-out top-1, computed once

    def results_of(names) -> set[str]:
        """The tasks that leave the results of levels ``names`` in the cache: their pieces, or the chapter
        of a level that declares none (it computes everything itself)."""
        return {n for name in names if name in by_level
                for n in (by_level[name] if get_level(name).pieces is not None else [get_level(name).chapter])}

    for chapter in chapters:
        level = level_of_chapter(chapter)
        if level is not None:
            tasks.append(Task(chapter, needs=results_of([level.name, *level.after]) - {chapter}, chapter=chapter))
    for chapter in chapters:  # chapters of no level (the discussion) read every level
        if level_of_chapter(chapter) is None:
            tasks.append(Task(chapter, needs=results_of(selected), chapter=chapter))
    return tasks


def ready_order(task: Task) -> tuple:
    """Of the tasks ready to start: models first, then the longest."""
    return (not task.model, -task.cost, task.name)


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
_WORKER_CFG: dict = {}


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A worker's watchdog thread: end the worker once the plan's process is gone (killed, say, by ``kill``
    or a closed terminal), which would otherwise leave it finishing its piece and then waiting for work
    forever, holding its memory. A piece cut short leaves nothing in the cache: an entry is written whole
    (a temporary file, then a rename) and the entry's lock goes with the process."""
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


def _start_worker(preset: str, counter) -> None:
    """Worker process start: load the preset once, set its torch threads; on a machine with several
    GPUs, worker i computes on GPU ``i mod count`` (a config that names no GPU index), so the pieces
    of ``make book JOBS=8`` on an 8-GPU node (SAE sweeps, circuit k sweeps) spread over the GPUs.
    A watchdog ends the worker when the plan's process ends (:func:`_exit_with_parent`)."""
    import threading

    import torch

    from .config import load_config, resolve_device
    from .pipeline import preflight

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()
    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    cfg = load_config(preset)
    preflight(cfg)
    device = resolve_device(cfg)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())
    _WORKER_CFG["cfg"] = cfg


def run_piece(piece, log_path: str) -> float:
    """In a worker: ``piece.run(cfg)`` with the cache's log and the progress bars in ``log_path``;
    returns seconds. ``$IMPACT_TASK`` names the piece in the metadata of what it caches."""
    from .pipeline import use_cpu_threads

    cfg = _WORKER_CFG["cfg"]
    use_cpu_threads(cfg)
    os.environ["IMPACT_TASK"] = piece.label
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("[impact] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    start = time.time()
    try:
        with open(log_path, "a") as stream, contextlib.redirect_stderr(stream):
            piece.run(cfg)
    finally:
        log.removeHandler(handler)
        handler.close()
    return time.time() - start


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s"


def progress_line(done: int, total: int, elapsed: float, left: Optional[float]) -> str:
    """``[impact] 12/73 done, 4 min 10 s elapsed, about 21 min 05 s left`` (``left``: None when unknown)."""
    tail = f", about {_clock(left)} left" if left is not None else ""
    return f"[impact] {done}/{total} done, {_clock(elapsed)} elapsed{tail}"


def time_left(pending: list[Task], running: dict, started_at: dict, estimate: dict[str, float], jobs: int,
              now: float) -> float:
    """Seconds left, spread over ``jobs`` slots: each pending task's estimate (the last build's seconds for
    it, else its ``cost``), plus what a running task has left of its own."""
    guess = lambda t: estimate.get(t.name, t.cost)  # noqa: E731
    work = sum(guess(t) for t in pending)
    work += sum(max(0.0, guess(t) - (now - started_at[t.name])) for t in running.values())
    return work / max(1, jobs)


def run_plan(tasks: list[Task], jobs: int, preset: str, run_chapter: Callable[[str], float], log_dir: Path,
             say: Callable[[str], None] = print, estimate: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Run ``tasks`` on ``jobs`` slots (see the module docstring); returns seconds per task.

    ``run_chapter(chapter) -> seconds`` executes one chapter. A failed task stops the plan: the
    running tasks finish, nothing new starts, and the error is raised. After every task a progress
    line says how many are done, the time elapsed and an estimate of the time left
    (:func:`time_left`; ``estimate``: seconds per task name from the last build, else ``Task.cost``)."""
    names = {t.name for t in tasks}
    unknown = {n for t in tasks for n in t.needs} - names
    if unknown:
        raise ValueError(f"tasks need unknown tasks: {sorted(unknown)}")
    piece_logs = log_dir / "pieces"
    piece_logs.mkdir(parents=True, exist_ok=True)
    jobs = max(1, jobs)
    pending = list(tasks)
    done: set[str] = set()
    running: dict[Future, Task] = {}
    timings: dict[str, float] = {}
    started_at: dict[str, float] = {}
    estimate = estimate or {}
    begin = time.time()
    error: Optional[BaseException] = None
    has_pieces = any(t.piece is not None for t in tasks)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state inherited
    workers = (ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                                   initargs=(preset, context.Value("i", 0))) if has_pieces else contextlib.nullcontext())
    with workers as pool, ThreadPoolExecutor(jobs) as chapters:
        while pending or running:
            ready = sorted((t for t in pending if t.needs <= done), key=ready_order)
            while error is None and ready and len(running) < jobs:
                task = ready.pop(0)
                pending.remove(task)
                if task.piece is not None:
                    future = pool.submit(run_piece, task.piece, str(piece_logs / f"{slug(task.name)}.log"))
                else:
                    future = chapters.submit(run_chapter, task.chapter)
                running[future] = task
                started_at[task.name] = time.time()
            if not running:
                if error is None and pending:
                    raise ValueError(f"tasks that can never start: {[t.name for t in pending]}")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                try:
                    timings[task.name] = future.result()
                except BaseException as err:  # noqa: BLE001 - re-raised once the running tasks end
                    if task.piece is not None and not isinstance(err, TaskError):
                        err = TaskError(f"piece {task.name!r} failed: {err.__class__.__name__}: {err}\n"
                                        f"(log: {piece_logs / (slug(task.name) + '.log')})")
                    error = error or err
                    say(f"[impact]   {task.name}: FAILED ({err.__class__.__name__})")
                    continue
                done.add(task.name)
                say(f"[impact]   {task.name}: {timings[task.name]:.0f} s")
                now = time.time()
                say(progress_line(len(done), len(tasks), now - begin,
                                  time_left(pending, running, started_at, estimate, jobs, now)))
    if error is not None:
        raise error
    return timings
