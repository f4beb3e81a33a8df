"""Pruning level (Sec. 4.1, Table 1): accuracy against sparsity for every pruning method.

The models themselves are cached by :mod:`impact_core.pipeline`; this module tabulates them and
judges the paper's two accuracy claims (:func:`pruning_claims`).
"""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from .. import pipeline
from ..claims import (REPRODUCED, NOT_REPRODUCED, Claim, Judge, as_array, judge_direction, judge_magnitude,
                      judge_threshold, not_measured)
from ..config import Config
from ..methods.pruning import layer_sparsity, prunable_linears
from ..paper_values import PAPER_TABLE_1
from ..pipeline import CONTROL
from . import Level, Piece, register_level, with_dense


def accuracy_table(cfg: Config) -> pd.DataFrame:
    """One row per (method, sparsity): top-1 / top-5 on the eval split (dense row shared)."""
    rows = []
    sparsities = [0.0] + list(cfg.pruning.sparsities)
    jobs = [(m, s) for m in cfg.pruning.methods for s in sparsities]
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
    rows = {}
    kinds = [("dense", 0.0, "wanda"), (pipeline.CONTROL_ROW, 0.0, pipeline.CONTROL),
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
def pruning_claims(runs: list[dict], j: Judge) -> list[Claim]:
    """``runs[g] = {"accuracy": {(method, sparsity): accuracy dict}, "control": accuracy dict}``."""
    out = []
    acc0 = runs[0]["accuracy"]
    title = "Wanda at 70% keeps more than 96% of dense top-1"
    if ("wanda", 0.7) in acc0:
        pairs = [(as_array(r["accuracy"][("wanda", 0.7)]["correct"]), as_array(r["accuracy"][("wanda", 0.0)]["correct"]))
                 for r in runs]
        est = j.ratio(pairs, "images")
        ctl = j.ratio([(as_array(r["control"]["correct"]), as_array(r["accuracy"][("wanda", 0.0)]["correct"]))
                       for r in runs], "images") if runs[0].get("control") else None
        verdict = judge_threshold(est, 0.96)
        out.append(Claim(id="pruning.retained", level="pruning", claim=title, paper="96.1%",
                         ours=f"{est.value:.1%} of dense", effect=est.text(".4f"),
                         control=f"control / dense: {ctl.text('.4f')}" if ctl else "n/a", margin="threshold 0.96",
                         verdict=verdict, rule="ratio of top-1 (70% / dense) over images above 0.96; judge_threshold",
                         magnitude="the claim is the threshold",
                         why={REPRODUCED: "the whole interval is above 96%", NOT_REPRODUCED: "the whole interval "
                              "is below 96%"}.get(verdict, "the interval covers 96%"),
                         # the forest plot: the ratio's distance from the threshold, on top-1's margin
                         estimate=est.shifted(-0.96), margin_value=j.margins["top1"], expected="+"))
    else:
        out.append(not_measured("pruning.retained", "pruning", title, "96.1%", "70% not in this preset"))
    sparsities = sorted({s for _, s in acc0})
    hi = max(sparsities)
    if ("magnitude", hi) in acc0 and hi > 0:
        pairs = [(as_array(r["accuracy"][("magnitude", hi)]["correct"]), as_array(r["accuracy"][("wanda", hi)]["correct"]))
                 for r in runs]
        eff = j.diff(pairs, "images")
        verdict, why = judge_direction(eff, "+", j.margins["top1"])
        out.append(Claim(id="pruning.wanda_vs_magnitude", level="pruning",
                         claim=f"Wanda beats magnitude at the highest sparsity ({hi:.0%})", paper="+6.34 pts at 90%",
                         ours=f"{100 * eff.value:+.2f} pts", effect=eff.scaled(100).text("+.2f"), control="n/a",
                         margin=f"+-{100 * j.margins['top1']:g} pts", verdict=verdict, why=why,
                         rule="top-1 difference (Wanda - magnitude) over images; judge_direction",
                         magnitude=(f"{judge_magnitude(eff.scaled(100), 6.34, j.tolerance)}: vs +6.34 pts"
                                    if hi == 0.9 else "paper's level (90%) not in this preset"),
                         estimate=eff, margin_value=j.margins["top1"], expected="+"))
    return out


def claim_models(cfg) -> set[tuple[str, float]]:
    """The (method, sparsity) models :func:`pruning_claims` reads: dense, Wanda at 70% and both
    methods at the highest sparsity (the other rows feed only Table 1, shown for replicate 0)."""
    hi = max(with_dense(cfg.pruning.sparsities))
    return {("wanda", 0.0), ("wanda", 0.7), *((m, hi) for m in cfg.pruning.methods)} & set(
        (m, s) for m in cfg.pruning.methods for s in with_dense(cfg.pruning.sparsities))


def gather(cfg) -> dict:
    """``{"accuracy": {(method, sparsity): accuracy}, "control": the control's accuracy}``: every model
    in replicate 0, the models the claims read (:func:`claim_models`) in the others."""
    wanted = None if cfg.replicate == 0 else claim_models(cfg)
    acc = {(m, s): pipeline.accuracy(cfg, s, m) for m in cfg.pruning.methods
           for s in with_dense(cfg.pruning.sparsities) if wanted is None or (m, s) in wanted}
    return {"accuracy": acc, "control": pipeline.accuracy(cfg, 0.0, CONTROL)}


def built_model(cfg, sparsity: float, method: str = "wanda") -> None:
    """A model of the plan (cached), with its top-1 when :func:`gather` reads it: every model of replicate 0
    (Table 1), the control and the claims' models (:func:`claim_models`) in the other replicates, whose
    other models are analysed but never evaluated."""
    if cfg.replicate == 0 or method == CONTROL or (method, float(sparsity)) in claim_models(cfg):
        pipeline.accuracy(cfg, sparsity, method)
    else:
        pipeline.pruned_model(cfg, sparsity, method)


def pieces(cfg) -> list[Piece]:
    """The dense model with its accuracy, then every pruned model and the control with theirs (one piece
    each; all models, so they come before any analysis and the chapters do not wait for a last small one),
    and the held-out top-1 of the dense checkpoints the matched-accuracy control picks from (a model piece
    too: it starts right after the dense model)."""
    out = [Piece("dense model", pipeline.accuracy, (0.0,), model=True)]
    read = claim_models(cfg) | {("wanda", float(s)) for lv in ("neuron", "sae", "circuit", "attribution")
                                for s in getattr(cfg, lv).sparsities}
    for m in cfg.pruning.methods:
        out += [Piece(f"model {pipeline.model_label(s, m)}", built_model, (s, m), of=(s, m), model=True,
                      per_replicate=(m, float(s)) in read)
                for s in sorted(cfg.pruning.sparsities) if s > 0]
    out.append(Piece("model control", pipeline.accuracy, (0.0, CONTROL), of=(0.0, CONTROL), model=True))
    if pipeline.matched_control(cfg):  # the matched-accuracy control's candidates, once for every replicate
        out.append(Piece("held-out top-1, dense checkpoints", pipeline.checkpoint_accuracies,
                         of=(0.0, pipeline.CHECKPOINTS), model=True))
    return out


register_level(Level(
    name="pruning", title="Pruning", section="pruning", gather=gather, claims=pruning_claims,
    chapter="book/chapters/01_pruning", parameters={"sparsity": "pruning.sparsities", "methods": "pruning.methods"},
    pieces=pieces))
