"""Where a build's time went: per task (a piece or a chapter) and per kind of cached artefact.

``python -m impact_core profile [--out DIR] [--preset NAME]`` reads ``<DIR>/_build/timings.json``
(the wall time of every task of the work plan, written by the runner) and the metadata of the cache
entries the build computed (``seconds``, ``self_seconds`` and ``task``, recorded by
:meth:`impact_core.cache.ResultCache.get_or_compute`), and prints three markdown tables: the tasks
by wall time, the kinds of artefact by compute time (``self``: without the entries they were built
on), and the busiest (task, kind) pairs. ``docs/benchmarks.md`` keeps the default build's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def read_timings(out: Path) -> dict:
    """``<out>/_build/timings.json``: ``{"started", "jobs", "total", "tasks": {name: seconds}}``."""
    path = Path(out) / "_build" / "timings.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no build here (make book writes it)")
    return json.loads(path.read_text())


def computed_entries(cache_root: Path, since: str) -> pd.DataFrame:
    """One row per cache entry created at or after ``since`` (``%Y-%m-%dT%H:%M:%S``, as the metadata
    writes it): kind, task, seconds, self_seconds. Entries reused from an earlier build are not there."""
    rows = []
    for meta in Path(cache_root).glob("*/*.json"):
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("created", "") >= since and "seconds" in info:
            rows.append({"kind": info["kind"], "task": info.get("task") or "-", "seconds": info["seconds"],
                         "self_seconds": info["self_seconds"]})
    return pd.DataFrame(rows, columns=["kind", "task", "seconds", "self_seconds"])


def profile_tables(timings: dict, entries: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``tasks``: wall seconds per task, longest first; ``kinds``: count, self and total seconds per
    kind; ``pairs``: self seconds per (task, kind), the 15 largest."""
    tasks = pd.DataFrame(sorted(timings["tasks"].items(), key=lambda kv: -kv[1]), columns=["task", "seconds"])
    tasks["share of the slots"] = tasks.seconds / (timings["total"] * timings["jobs"])
    kinds = (entries.groupby("kind").agg(entries=("seconds", "size"), self_seconds=("self_seconds", "sum"),
                                         seconds=("seconds", "sum"))
             .sort_values("self_seconds", ascending=False).reset_index())
    pairs = (entries.groupby(["task", "kind"]).self_seconds.sum().sort_values(ascending=False).head(15)
             .reset_index())
    return {"tasks": tasks, "kinds": kinds, "pairs": pairs}


def markdown(timings: dict, tables: dict[str, pd.DataFrame]) -> str:
    busy = float(tables["tasks"].seconds.sum())
    head = (f"{len(timings['tasks'])} tasks on {timings['jobs']} process(es), started {timings['started']}: "
            f"{timings['total']:.0f} s wall, {busy:.0f} s of task time "
            f"({busy / (timings['total'] * timings['jobs']):.0%} of the slots busy)\n")
    parts = [head]
    for name, title in (("tasks", "Tasks by wall time"), ("kinds", "Cached artefacts by compute time"),
                        ("pairs", "Task and artefact, self seconds")):
        parts.append(f"\n{title}\n\n" + tables[name].to_markdown(index=False, floatfmt=".2f") + "\n")
    return "".join(parts)
