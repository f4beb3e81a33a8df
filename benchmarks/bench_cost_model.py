"""The cost model against the last build: its prediction of every artefact kind's compute time beside what
the build's own cache entries record (``python -m impact_core profile --against-cost``, docs/cost_model.md).

Reads ``_build/timings.json`` of the last ``make book`` in this checkout (``IMPACT_BUILD`` names another
build folder) and the cache entries that build created; calibrates this machine as the build ran
(:func:`impact_core.cost.calibrate_cpu_loaded`: the build's processes busy at once; run ``make bench`` on a
machine doing nothing else). Two entries per kind and for the total, each with target 0.7:
``measured / predicted`` and ``predicted / measured``, so that both meet it exactly when the prediction is
within [0.7, 1.43] of the measurement (the issue's "within 30%"). No build here: no entries. CPU only (the
GPU terms are vendor sheets, docs/cost_model.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from impact_core import profile
from impact_core.bench import entry
from impact_core.config import REPO_ROOT, load_config

TARGET = 0.7


def benchmarks(device: str) -> list[dict]:
    if device != "cpu":
        return []
    out_dir = Path(os.environ.get("IMPACT_BUILD", REPO_ROOT))
    try:
        timings = profile.read_timings(out_dir)
    except FileNotFoundError as err:
        print(f"bench_cost_model: {err}; nothing to compare")
        return []
    from impact_core.cost import calibrate_cpu_loaded

    cfg = load_config(timings["preset"])
    entries = profile.computed_entries(cfg.cache_path, *profile.build_window(timings))
    if entries.empty:
        print(f"bench_cost_model: the cache {cfg.cache_path} holds no entry of the build of {timings['started']}")
        return []
    device_ = calibrate_cpu_loaded(cfg.model, processes=timings["jobs"], threads=cfg.cpu_threads)
    table = profile.against_cost(entries, cfg, device_).dropna()
    out = []
    for row in table.itertuples():
        config = {"preset": timings["preset"], "build": timings["started"], "kind": row.kind,
                  "calibration": device_.note}
        out.append(entry(f"cost model, {row.kind}: measured / predicted", row.measured_s, row.predicted_s, "cpu",
                         config, target=TARGET))
        out.append(entry(f"cost model, {row.kind}: predicted / measured", row.predicted_s, row.measured_s, "cpu",
                         config, target=TARGET))
    return out
