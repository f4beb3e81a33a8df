"""How much the pipeline's own noise moves each claim's metric: replicates of the control.

For replicates 0..R-1 of a preset, the control model (fine-tuned like a pruned one, nothing pruned)
and the dense model's analyses are computed with each replicate's seeds (calibration draw,
fine-tuning order, SAE seeds, circuit masks, random baselines, selection halves), and for every
metric a claim reads we record **control minus dense** per replicate: its mean over the claim's
units (classes, images, SAE seeds). The spread of that value over replicates is the run-to-run
noise that a single run per condition cannot see; the table sets it beside the one-run interval's
half-width and the claim's margin, and gives the half-width of the level-minus-control interval
that R replicates would have (``t_{R-1} sqrt(2) sd / sqrt(R)``: two independently replicated
conditions, the replicates as units).

    python benchmarks/replicate_spread.py --preset default --replicates 3 --jobs 2

Computes through the book's work plan (cached entries; a later build reuses them) and prints a
markdown table (``--out`` writes it too).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from impact_core import pipeline, stats  # noqa: E402
from impact_core.claims import as_array  # noqa: E402
from impact_core.config import load_config  # noqa: E402
from impact_core.cost import piece_seconds  # noqa: E402
from impact_core.levels import for_replicate, level_pieces  # noqa: E402
from impact_core.levels.circuit import circuit_results  # noqa: E402
from impact_core.levels.layer import quality_over_seeds  # noqa: E402
from impact_core.levels.model import attribution_results  # noqa: E402
from impact_core.levels.neuron import neuron_metrics  # noqa: E402
from impact_core.pipeline import CONTROL  # noqa: E402
from impact_core.schedule import Task, run_plan  # noqa: E402

LEVELS = ["pruning", "neuron", "layer", "circuit", "model"]


def tasks(cfg) -> list[Task]:
    """The plan's pieces of the dense model, the control and their analyses, every replicate."""
    keep = [p for p in level_pieces(cfg, LEVELS)
            if p.of[0] == 0 and (p.label == "dense model" or not p.model or p.of[1] == CONTROL)
            and p.per_replicate and "at the dense k" not in p.label and not p.label.startswith("circuits at k=")]
    seconds = piece_seconds(cfg, keep)
    out = [Task(p.label, piece=p, model=p.model, cost=seconds[p.label]) for p in keep]
    models = {t.piece.of: t.name for t in out if t.model}
    for t in out:
        if t.name != "dense model":
            t.needs.add(models.get(t.piece.of, "dense model") if not t.model else "dense model")
    return out


def per_replicate(cfg) -> dict[str, dict]:
    """``{metric: {"unit", "values": [control - dense per replicate], "half_width": one-run interval}}``."""
    out: dict[str, dict] = {}

    def add(name, unit, dense, control, margin_key):
        d = [as_array(x).ravel() for x in dense]
        c = [as_array(x).ravel() for x in control]
        rec = out.setdefault(name, {"unit": unit, "values": [], "half_width": None, "margin": margin_key})
        est = stats.mean_difference([(d[0], c[0])], unit)
        rec["values"].append(est.value)
        if rec["half_width"] is None:
            rec["half_width"] = est.half_width

    for r in range(cfg.replicates):
        c = for_replicate(cfg, r)
        add("top-1", "images", [pipeline.accuracy(c, 0.0)["correct"]], [pipeline.accuracy(c, 0.0, CONTROL)["correct"]],
            "top1")
        dense, ctl = circuit_results(c, 0.0), circuit_results(c, 0.0, method=CONTROL)
        for key, margin in (("node_fraction", "node_fraction"), ("size_dense", "edge_size"), ("ncq", "ncq"),
                            ("acc_ablated", "ablated_accuracy")):
            add(f"circuit {key}", "classes", [dense[key]], [ctl[key]], margin)
        qd, qc = quality_over_seeds(c, 0.0), quality_over_seeds(c, 0.0, method=CONTROL)
        add("SAE NMSE", "SAE seeds", [[q["NMSE"] for q in qd]], [[q["NMSE"] for q in qc]], "nmse")
        add("SAE dead fraction", "SAE seeds", [[q["dead %"] / 100 for q in qd]], [[q["dead %"] / 100 for q in qc]],
            "dead_fraction")
        nd, nc = neuron_metrics(c, 0.0), neuron_metrics(c, 0.0, method=CONTROL)
        for metric in ("selectivity", "label_entropy", "class_variance", "impact"):
            for i, b in enumerate(nd["blocks"]):
                add(f"neuron {metric}, block {b}", "classes", [nd[metric][i]], [nc[metric][i]], metric)
        ad, ac = attribution_results(c, 0.0), attribution_results(c, 0.0, method=CONTROL)
        ref = cfg.attribution.references[0]
        for metric in ("insertion", "deletion"):
            beyond = lambda res: as_array(res["scores"][ref]["chefer"][metric]) - as_array(  # noqa: E731
                res["scores"][ref]["random"][metric])
            add(f"attribution {metric} (Chefer - random, {ref})", "images", [beyond(ad)], [beyond(ac)], metric)
    return out


def table(cfg, values: dict[str, dict]) -> str:
    rows = ["| metric (control - dense) | unit | per replicate | sd over replicates | one-run 95% half-width "
            "| margin | level - control half-width, R = 3 / 5 / 8 |", "|---|---|---|---|---|---|---|"]
    for name, rec in values.items():
        v = np.asarray(rec["values"])
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        hw = [sps.t.ppf(0.975, r - 1) * math.sqrt(2) * sd / math.sqrt(r) for r in (3, 5, 8)]
        rows.append(f"| {name} | {rec['unit']} | {', '.join(f'{x:+.4f}' for x in v)} | {sd:.4f} | "
                    f"{rec['half_width']:.4f} | {cfg.verdicts.margins[rec['margin']]:g} | "
                    f"{' / '.join(f'{h:.4f}' for h in hw)} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--replicates", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cfg = load_config(a.preset, {"replicates": a.replicates})
    start = time.time()
    plan = tasks(cfg)
    print(f"{len(plan)} pieces on {a.jobs} process(es)", flush=True)
    run_plan(plan, a.jobs, a.preset, lambda chapter: 0.0, Path("_build/logs/replicate_spread"))
    print(f"computed in {time.time() - start:.0f} s", flush=True)
    text = table(cfg, per_replicate(cfg))
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
