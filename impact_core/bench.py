"""``make bench``: every fast path against its reference, on the same inputs, in one run.

Benchmarks live in ``benchmarks/bench_*.py``; each module defines
``benchmarks(device: str) -> list[dict]`` built with :func:`entry`. The runner prints
a table and writes ``benchmarks/latest.json``: a list of
``{name, reference_s, fast_s, ratio, device, config}``.
Targets are checked here (``target`` field, a minimum ratio), never by a timed test.
"""
from __future__ import annotations

import importlib.util
import json
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import REPO_ROOT

BENCH_DIR = REPO_ROOT / "benchmarks"


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeat`` calls after ``warmup`` calls (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def entry(name: str, reference_s: float, fast_s: float, device: str, config: dict,
          target: Optional[float] = None, unit: str = "s") -> dict:
    """One measurement. ``ratio = reference_s / fast_s``; ``target`` is the minimum ratio wanted."""
    ratio = reference_s / fast_s if fast_s > 0 else float("inf")
    out = {"name": name, "reference_s": reference_s, "fast_s": fast_s, "ratio": ratio,
           "device": device_name(device), "config": config}
    if target is not None:
        out["target"] = target
        out["meets_target"] = bool(ratio >= target)
    if unit != "s":
        out["unit"] = unit
    return out


def discover() -> list[Path]:
    return sorted(BENCH_DIR.glob("bench_*.py"))


def run_all(device: str = "cpu", only: Optional[str] = None, out: Optional[Path] = None) -> list[dict]:
    results = []
    for path in discover():
        if only and only not in path.stem:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {path.name}", flush=True)
        for item in module.benchmarks(device):
            item["bench"] = path.stem
            results.append(item)
            print(format_row(item), flush=True)
    out = out or BENCH_DIR / "latest.json"
    if only and out.exists():  # a partial run replaces its own rows and keeps the others
        ran = {r["bench"] for r in results}
        results = [r for r in json.loads(out.read_text()) if r.get("bench") not in ran] + results
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")
    print_table(results)
    return results


def format_row(r: dict) -> str:
    mark = "" if "target" not in r else ("  ok" if r["meets_target"] else f"  BELOW TARGET {r['target']}")
    unit = r.get("unit", "s")
    return (f"{r['name']:<48} ref {r['reference_s']:>10.4g}{unit}  fast {r['fast_s']:>10.4g}{unit}  "
            f"ratio {r['ratio']:>8.2f}{mark}")


def print_table(results: list[dict]) -> None:
    print("\n" + "-" * 100)
    for r in results:
        print(format_row(r))
    print("-" * 100)
