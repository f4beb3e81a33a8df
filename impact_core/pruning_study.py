"""Sec. 4.1 / Table 1: accuracy against sparsity for Wanda and magnitude pruning."""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from . import pipeline
from .config import Config
from .paper_values import PAPER_TABLE_1
from .pruning import layer_sparsity


def accuracy_table(cfg: Config) -> pd.DataFrame:
    """One row per (method, sparsity): top-1 / top-5 on the eval split (dense row shared)."""
    rows = []
    levels = [0.0] + list(cfg.pruning.sparsities)
    jobs = [(m, s) for m in cfg.pruning.methods for s in levels]
    for method, s in tqdm(jobs, desc="pruning levels"):
        acc = pipeline.accuracy(cfg, s, method)
        rows.append({"method": method, "sparsity": s, "top1": acc["top1"], "top5": acc["top5"]})
    return pd.DataFrame(rows)


def wide_table(acc: pd.DataFrame) -> pd.DataFrame:
    """Table 1 layout: rows (method, metric), columns sparsity."""
    long = acc.melt(id_vars=["method", "sparsity"], value_vars=["top1", "top5"], var_name="metric")
    wide = long.pivot_table(index=["method", "metric"], columns="sparsity", values="value")
    wide.columns = ["dense" if c == 0 else f"{c:g}" for c in wide.columns]
    return wide


def paper_table() -> pd.DataFrame:
    """The paper's Table 1 in the same layout."""
    rows = {}
    for method in ("magnitude", "wanda"):
        for metric in ("top1", "top5"):
            rows[(method, metric)] = PAPER_TABLE_1[method][metric]
    cols = ["dense" if s == 0 else f"{s:g}" for s in PAPER_TABLE_1["sparsity"]]
    df = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    df.index = pd.MultiIndex.from_tuples(df.index, names=["method", "metric"])
    return df


def sparsity_check(cfg: Config) -> pd.DataFrame:
    """Measured fraction of zero weights per block Linear of every pruned, fine-tuned model."""
    rows = []
    for method in cfg.pruning.methods:
        for s in cfg.pruning.sparsities:
            model = pipeline.pruned_model(cfg, s, method)
            for layer, measured in layer_sparsity(model).items():
                kind = layer.split(".")[-1]
                in_features = dict(model.named_modules())[layer].in_features
                expected = int(in_features * s) / in_features
                rows.append({"method": method, "target": s, "layer": layer, "kind": kind,
                             "expected": expected, "measured": measured})
    return pd.DataFrame(rows)


def control_check(cfg: Config, sparsity: float = 0.7, method: str = "wanda") -> pd.DataFrame:
    """The control model beside dense and a pruned model: nonzero block weights, fine-tuning
    steps and images, top-1 (the control must equal dense in nonzeros and the pruned model in
    fine-tuning)."""
    from .pruning import prunable_linears

    rows = {}
    kinds = [("dense", 0.0, "wanda"), ("control (dense, fine-tuned, nothing pruned)", 0.0, pipeline.CONTROL),
             (f"{method} {sparsity:.0%}", sparsity, method)]
    for label, s, m in kinds:
        model = pipeline.pruned_model(cfg, s, m)
        nonzero = sum(int((lin.weight != 0).sum()) for lin in prunable_linears(model).values())
        tuned = label != "dense"
        rows[label] = {"nonzero block weights": nonzero,
                       "fine-tuning steps": pipeline.finetune_steps(cfg, s, m) if tuned else 0,
                       "fine-tuning images": cfg.pruning.finetune_images if tuned else 0,
                       "top-1": pipeline.accuracy(cfg, s, m)["top1"]}
    return pd.DataFrame(rows).T
