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


def computed_entries(cache_root: Path, since: str, until: str = "~") -> pd.DataFrame:
    """One row per cache entry created at or after ``since`` and at or before ``until`` (``%Y-%m-%dT%H:%M:%S``,
    as the metadata writes it): kind, task, seconds, self_seconds. Entries reused from an earlier build are not
    there, nor those of a later build into the same cache (:func:`build_window`)."""
    rows = []
    for meta in Path(cache_root).glob("*/*.json"):
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if since <= info.get("created", "") <= until and "seconds" in info:
            rows.append({"kind": info["kind"], "task": info.get("task") or "-", "seconds": info["seconds"],
                         "self_seconds": info["self_seconds"]})
    return pd.DataFrame(rows, columns=["kind", "task", "seconds", "self_seconds"])


def build_window(timings: dict) -> tuple[str, str]:
    """``(since, until)`` of a build: its start and its start plus its wall time and a minute."""
    from datetime import datetime, timedelta

    start = datetime.strptime(timings["started"], "%Y-%m-%dT%H:%M:%S")
    end = start + timedelta(seconds=float(timings["total"]) + 60)
    return timings["started"], end.strftime("%Y-%m-%dT%H:%M:%S")


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


STAGE_KINDS = {
    "dense training": "dense_model", "trained-sparse training": "trained_sparse_model",
    "fine-tuning": "pruned_model", "Wanda calibration": "pruned_model", "evaluation": "accuracy",
    "dataset means": "site_means", "neuron attribution": "neuron_metrics", "neuron ablation": "neuron_metrics",
    "neuron gallery (book)": "neuron_gallery", "SAE activations": "sae_acts", "SAE activations (book)": "sae_acts",
    "SAE training": "sae", "SAE training (book)": "sae", "SAE features": "sae_features",
    "SAE gallery (book)": "sae_gallery", "circuit masks": "circuits", "circuit evaluation": "circuits",
    "circuit masks (k sweep, book)": "circuits", "circuit evaluation (k sweep, book)": "circuits",
    "attribution maps": "attribution_results", "insertion/deletion": "attribution_results",
    "held-out evaluation": "holdout_accuracy",
}
"""The kind of cached artefact each stage of :func:`impact_core.cost.stage_costs` computes: the unit at
which a build's measured time (the entries' ``self_seconds``) and the cost model's prediction meet."""


def against_cost(entries: pd.DataFrame, cfg, device) -> pd.DataFrame:
    """The cost model's predicted seconds (:func:`impact_core.cost.predict_seconds` on ``device``, summed
    over the stages of each artefact kind) beside the seconds the build's entries record (self, one
    process each), per kind and in total; ``predicted / measured``. Kinds the build reused from an
    earlier one have no measured time and are left out of the total."""
    from .cost import predict_seconds, stage_costs

    predicted: dict[str, float] = {}
    for stage in stage_costs(cfg):
        kind = STAGE_KINDS.get(stage.stage)
        if kind is None:
            raise KeyError(f"stage {stage.stage!r} has no artefact kind in profile.STAGE_KINDS")
        predicted[kind] = predicted.get(kind, 0.0) + predict_seconds(stage, device)
    measured = entries.groupby("kind").self_seconds.sum()
    rows = [{"kind": k, "measured_s": float(measured.get(k, float("nan"))), "predicted_s": p}
            for k, p in sorted(predicted.items(), key=lambda kv: -kv[1])]
    table = pd.DataFrame(rows)
    both = table.dropna()
    total = pd.DataFrame([{"kind": "total (kinds measured)", "measured_s": both.measured_s.sum(),
                           "predicted_s": both.predicted_s.sum()}])
    table = pd.concat([table, total], ignore_index=True)
    table["predicted / measured"] = table.predicted_s / table.measured_s
    return table
