"""Sec. 5: the paper's claims, each judged by a rule on our numbers (the judging layer).

Every verdict of the book comes from here: the chapters glue the :class:`Claim` objects of
their level (:func:`level_claims`) and the discussion shows all of them (:func:`all_claims`),
so a chapter and the discussion can never disagree. Intervals come from
:mod:`impact_core.stats` and name the unit they resample.

The rules (each tested on inputs that produce each of its outcomes):

* **change claims** ("X rises from dense to 70%") are judged on the effect of sparsity
  *beyond the pipeline*: the level minus the **control** (the dense model fine-tuned like a
  pruned model with nothing pruned, analysed with the pruned models' settings), paired over
  the same units. :func:`judge_change`: *reproduced* when that interval lies on the claimed
  side of 0; *explained by the pipeline* when the level differs from dense in the claimed
  direction but not from the control, or the control shows the effect too; *not reproduced*
  when the level-minus-dense interval lies inside +-margin (no relevant change) or on the
  other side; *inconclusive* otherwise (with the number of units that would decide).
* **no-change claims** ("selectivity shows no systematic change") are equivalence claims
  over a family of (block, level) comparisons of level minus control, Holm-corrected
  (:func:`judge_no_change`): *reproduced* when every comparison is equivalent within
  +-margin, *not reproduced* when any changes beyond the margin, else *inconclusive*.
* **circuit edges** can also be *explained by pruning alone*: when the sparse circuits
  have no fewer edges than the dense circuits' node sets counted on the pruned weights.
* **ablation to chance** is judged per model, against random node sets of the circuit's size.
* a stated **magnitude** ("2.5x", "96%") is judged as a magnitude (:func:`judge_magnitude`,
  :func:`judge_threshold`).
* **dose-response**: every change claim carries the slope of its metric against sparsity
  (control at 0, then every level) with an interval, read as growing, flat or reversed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import stats as S
from .stats import DOWN, EQUIVALENT, UNDECIDED, UP, Estimate

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
PIPELINE = "explained by the pipeline"
PRUNING = "explained by pruning alone"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PIPELINE, PRUNING)
LEVELS_OF_ANALYSIS = ("pruning", "neuron", "layer", "circuit", "model")


@dataclass
class Claim:
    """One claim of the paper and our verdict on it (a row of the discussion's table)."""

    id: str            # stable key: chapters glue ``claim_<id>_<field>`` (dots become underscores)
    level: str         # level of analysis
    claim: str
    paper: str         # the paper's number (DeiT-III B/16, ImageNet)
    ours: str          # our numbers, dense -> level
    effect: str        # the judged quantity with its interval and unit (level minus control where there is one)
    control: str       # what the control alone does (control minus dense), or n/a
    margin: str        # the smallest effect of interest
    verdict: str
    rule: str
    vs_dense: str = "n/a"  # level minus dense, beside the control's effect
    magnitude: str = "n/a"
    trend: str = "n/a"
    why: str = ""
    seeds: str = ""        # with several training seeds: for how many the claim holds on its own
    curve: list = field(default_factory=list, repr=False)  # [(label, sparsity, Estimate)] for figures

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("curve")
        return d

    @property
    def key(self) -> str:
        return "claim_" + self.id.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# rules: pure functions of intervals (tested on synthetic inputs)
# ---------------------------------------------------------------------------------------------
def _claimed(reading: str, expected: str) -> bool:
    return reading == (UP if expected == "+" else DOWN)


def _opposite(reading: str, expected: str) -> bool:
    return reading == (DOWN if expected == "+" else UP)


def judge_direction(effect: Estimate, expected: str, margin: float) -> tuple[str, str]:
    """A direction claim on one interval (no control available)."""
    r = S.side(effect, margin)
    if _claimed(r, expected):
        return REPRODUCED, "the interval lies on the claimed side of 0"
    if r == EQUIVALENT:
        return NOT_REPRODUCED, f"no change beyond +-{margin:g} (equivalent)"
    if _opposite(r, expected):
        return NOT_REPRODUCED, "it changes the other way"
    return INCONCLUSIVE, _needed(effect, margin)


def judge_change(effect: Estimate, control: Optional[Estimate], beyond_control: Optional[Estimate],
                 expected: str, margin: float) -> tuple[str, str]:
    """A change claim judged against the control (see the module docstring).

    ``effect``: level - dense; ``control``: control - dense; ``beyond_control``: level - control
    (all paired over the same units)."""
    if control is None or beyond_control is None:
        return judge_direction(effect, expected, margin)
    verdict, why = judge_direction(effect, expected, margin)
    if verdict == NOT_REPRODUCED:  # no relevant change from dense, or a change the other way
        return verdict, why
    r_ctl, r_beyond = S.side(control, margin), S.side(beyond_control, margin)
    if _claimed(r_beyond, expected):
        return REPRODUCED, "the level differs from the control in the claimed direction"
    if _claimed(r_ctl, expected):
        return PIPELINE, "the control (nothing pruned) shows the effect too"
    if verdict == REPRODUCED and r_beyond in (EQUIVALENT, UNDECIDED):
        return PIPELINE, "the level differs from dense but not from the control"
    if r_beyond == EQUIVALENT:
        return NOT_REPRODUCED, f"no change beyond the control (within +-{margin:g})"
    if _opposite(r_beyond, expected):
        return NOT_REPRODUCED, "beyond the control it changes the other way"
    return INCONCLUSIVE, _needed(beyond_control, margin)


def judge_pruning_only(verdict: str, beyond_counterfactual: Optional[Estimate], expected: str,
                       margin: float) -> tuple[str, Optional[str]]:
    """Downgrade a reproduced edge claim when pruning alone explains it: the sparse circuits
    have no fewer edges than the dense circuits' node sets counted on the pruned weights."""
    if verdict != REPRODUCED or beyond_counterfactual is None:
        return verdict, None
    if _claimed(S.side(beyond_counterfactual, margin), expected):
        return REPRODUCED, None
    return PRUNING, "the dense circuits counted on the pruned weights fall as far"


def judge_no_change(family: Sequence[Estimate], margin: float, alpha: float = 0.05) -> tuple[str, dict]:
    """An equivalence claim over a family of comparisons, Holm-corrected both ways."""
    fam = [e for e in family if e.distribution.size]
    if not fam:
        return INCONCLUSIVE, {"equivalent": 0, "changed": 0, "n": 0, "needed": None}
    eq = S.holm([S.equivalence_pvalue(e, margin) for e in fam], alpha)
    ch = S.holm([S.change_pvalue(e, margin) for e in fam], alpha)
    needed = [S.samples_needed(e, margin, "equivalence", family=len(fam)) for e, a, b in zip(fam, eq, ch)
              if not (a or b)]
    info = {"equivalent": int(eq.sum()), "changed": int(ch.sum()), "n": len(fam),
            "needed": max((x for x in needed if x), default=None)}
    if ch.any():
        return NOT_REPRODUCED, info
    if eq.all():
        return REPRODUCED, info
    return INCONCLUSIVE, info


def judge_threshold(est: Estimate, threshold: float) -> str:
    """"Above ``threshold``": reproduced when the whole interval is above it."""
    if not est.finite:
        return INCONCLUSIVE
    return REPRODUCED if est.low > threshold else NOT_REPRODUCED if est.high < threshold else INCONCLUSIVE


def judge_magnitude(est: Estimate, stated: float, tolerance: float) -> str:
    """A stated magnitude (a ratio or a difference): "matches" when our interval lies inside
    ``stated/(1+t) .. stated*(1+t)``, "differs" when it lies wholly outside, else "undecided"."""
    if not est.finite:
        return "undecided"
    lo, hi = sorted((stated / (1 + tolerance), stated * (1 + tolerance)))
    if lo <= est.low and est.high <= hi:
        return "matches"
    if est.high < lo or est.low > hi:
        return "differs"
    return "undecided"


def judge_chance(ablated_vs_chance: Estimate, random_gap: Optional[Estimate], margin: float) -> tuple[str, str]:
    """Ablation returns one-vs-rest accuracy to chance, and a random node set of the same size
    does not: ``ablated_vs_chance`` = ablated accuracy - 0.5; ``random_gap`` = accuracy with a
    random set ablated minus with the circuit ablated."""
    r = S.side(ablated_vs_chance, margin)
    if r in (UP, DOWN) and abs(ablated_vs_chance.value) > margin:
        return NOT_REPRODUCED, "ablated accuracy is away from chance"
    if random_gap is not None:
        g = S.side(random_gap, margin)
        if g in (EQUIVALENT, DOWN):
            return NOT_REPRODUCED, "random node sets of the same size do as well"
        if r == EQUIVALENT and g == UP:
            return REPRODUCED, "at chance, and below random node sets of the same size"
        return INCONCLUSIVE, _needed(random_gap if r == EQUIVALENT else ablated_vs_chance, margin)
    if r == EQUIVALENT:
        return REPRODUCED, "at chance (no random-set control)"
    return INCONCLUSIVE, _needed(ablated_vs_chance, margin)


def trend_reading(trend: Estimate, expected: str, margin: float, span: float) -> str:
    """Dose-response: the slope times the sparsity span read against the margin."""
    r = S.side(trend.scaled(span), margin)
    return {EQUIVALENT: "flat", UNDECIDED: "undecided"}.get(
        r, "grows with sparsity" if _claimed(r, expected) else "reverses with sparsity")


def _needed(est: Estimate, margin: float) -> str:
    n = S.samples_needed(est, margin)
    return f"undecided; about {n} {est.unit.split(' (')[0]} would decide" if n else "undecided"


# ---------------------------------------------------------------------------------------------
# building claims from per-unit arrays
# ---------------------------------------------------------------------------------------------
@dataclass
class Judge:
    """The settings every claim is judged with (``cfg.verdicts``) and the seed of the bootstrap."""

    margins: dict
    tolerance: float = 0.25
    n_resamples: int = 2000
    alpha: float = 0.05
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "Judge":
        v = cfg.verdicts
        return cls(dict(v.margins), v.magnitude_tolerance, v.n_resamples, v.alpha, cfg.seed)

    def diff(self, pairs, unit: str) -> Estimate:
        return S.mean_difference(pairs, unit, seed=self.seed, n_resamples=self.n_resamples)

    def ratio(self, pairs, unit: str) -> Estimate:
        return S.ratio_of_means(pairs, unit, seed=self.seed, n_resamples=self.n_resamples)

    def mean(self, samples, unit: str) -> Estimate:
        return S.mean(samples, unit, seed=self.seed, n_resamples=self.n_resamples)


def _arr(x) -> np.ndarray:
    return np.asarray(x.double().numpy() if hasattr(x, "double") else x, dtype=np.float64)


def change_claim(j: Judge, *, id: str, level: str, claim: str, paper: str, metric: str, expected: str,
                 dense: Sequence, at_level: Sequence, control: Optional[Sequence], unit: str, scale: float = 1.0,
                 fmt: str = ".3f", curve: Optional[dict] = None, counterfactual: Optional[Sequence] = None,
                 magnitude: Optional[tuple[str, float]] = None) -> Claim:
    """A change claim from per-unit arrays, one per training seed (``dense[g]``, ``at_level[g]``,
    ``control[g]``: the same units); ``curve``: {sparsity: per-seed arrays} for the trend
    (the control stands at sparsity 0); ``counterfactual``: the pruning-only arrays (edges)."""
    margin = j.margins[metric]
    eff = j.diff(list(zip(dense, at_level)), unit)
    ctl = j.diff(list(zip(dense, control)), unit) if control is not None else None
    beyond = j.diff(list(zip(control, at_level)), unit) if control is not None else None
    verdict, why = judge_change(eff, ctl, beyond, expected, margin)
    if counterfactual is not None:
        cf = j.diff(list(zip(counterfactual, at_level)), unit)
        verdict, why_cf = judge_pruning_only(verdict, cf, expected, margin)
        why = why_cf or why
    f = "+" + fmt
    d_mean = float(np.mean(np.concatenate([np.ravel(x) for x in dense]))) * scale
    l_mean = float(np.mean(np.concatenate([np.ravel(x) for x in at_level]))) * scale
    c = Claim(id=id, level=level, claim=claim, paper=paper, ours=f"{d_mean:{fmt}} -> {l_mean:{fmt}}",
              effect=(beyond or eff).scaled(scale).text(f), control=ctl.scaled(scale).text(f) if ctl else "n/a",
              margin=f"+-{margin * scale:g}", verdict=verdict, why=why, vs_dense=eff.scaled(scale).text(f),
              rule="judge_change: level minus control, paired" if ctl else "judge_direction: level minus dense, paired")
    if magnitude is not None:
        how, stated = magnitude
        if how == "ratio":  # "N x fewer": mean(dense) / mean(level)
            est = j.ratio(list(zip(dense, at_level)), unit)
            c.magnitude = f"{judge_magnitude(est, stated, j.tolerance)}: {est.text('.2f')} vs {stated:g}x"
        else:
            c.magnitude = f"{judge_magnitude(eff.scaled(scale), stated, j.tolerance)}: vs {stated:+g}"
    if curve:
        levels = sorted(curve)
        per_level = [curve[s] for s in levels]
        t = S.trend(levels, per_level, unit, seed=j.seed, n_resamples=j.n_resamples)
        c.trend = f"{trend_reading(t, expected, margin, max(levels) - min(levels))}: {t.scaled(scale).text(f)}"
        c.curve = [(s, j.mean(curve[s], unit).scaled(scale)) for s in levels]
    return c


def no_change_claim(j: Judge, *, id: str, level: str, claim: str, paper: str, metric: str,
                    comparisons: dict, unit: str) -> Claim:
    """``comparisons[(block, sparsity)] = (control arrays per seed, level arrays per seed)``."""
    margin = j.margins[metric]
    fam = {k: j.diff(list(zip(c, l)), unit) for k, (c, l) in comparisons.items()}
    verdict, info = judge_no_change(list(fam.values()), margin, j.alpha)
    needed = f"; about {info['needed']} {unit} would decide" if verdict == INCONCLUSIVE and info["needed"] else ""
    worst = max(fam.values(), key=lambda e: abs(e.value)) if fam else None
    return Claim(id=id, level=level, claim=claim, paper=paper,
                 ours=f"{info['equivalent']} of {info['n']} (block, level) comparisons equivalent, "
                      f"{info['changed']} changed",
                 effect=f"largest: {worst.text('+.3f')}" if worst else "n/a", control="see the chapter",
                 margin=f"+-{margin:g}", verdict=verdict,
                 why=f"Holm-corrected equivalence and change tests over {info['n']} comparisons{needed}",
                 rule="level minus control per (block, level), paired; judge_no_change")


def not_measured(id: str, level: str, claim: str, paper: str, why: str) -> Claim:
    return Claim(id=id, level=level, claim=claim, paper=paper, ours=why, effect="n/a", control="n/a",
                 margin="n/a", verdict=INCONCLUSIVE, rule="not measured", why=why)


# ---------------------------------------------------------------------------------------------
# the claims of each level; ``runs`` is one gathered dict per training seed (see gather_*)
# ---------------------------------------------------------------------------------------------
def pruning_claims(runs: list[dict], j: Judge) -> list[Claim]:
    """``runs[g] = {"accuracy": {(method, sparsity): accuracy dict}, "control": accuracy dict}``."""
    out = []
    acc0 = runs[0]["accuracy"]
    title = "Wanda at 70% keeps more than 96% of dense top-1"
    if ("wanda", 0.7) in acc0:
        pairs = [(_arr(r["accuracy"][("wanda", 0.7)]["correct"]), _arr(r["accuracy"][("wanda", 0.0)]["correct"]))
                 for r in runs]
        est = j.ratio(pairs, "images")
        ctl = j.ratio([(_arr(r["control"]["correct"]), _arr(r["accuracy"][("wanda", 0.0)]["correct"]))
                       for r in runs], "images") if runs[0].get("control") else None
        verdict = judge_threshold(est, 0.96)
        out.append(Claim(id="pruning.retained", level="pruning", claim=title, paper="96.1%",
                         ours=f"{est.value:.1%} of dense", effect=est.text(".4f"),
                         control=f"control / dense: {ctl.text('.4f')}" if ctl else "n/a", margin="threshold 0.96",
                         verdict=verdict, rule="ratio of top-1 (70% / dense) over images above 0.96; judge_threshold",
                         magnitude="the claim is the threshold",
                         why={REPRODUCED: "the whole interval is above 96%", NOT_REPRODUCED: "the whole interval "
                              "is below 96%"}.get(verdict, "the interval covers 96%")))
    else:
        out.append(not_measured("pruning.retained", "pruning", title, "96.1%", "70% not in this preset"))
    levels = sorted({s for _, s in acc0})
    hi = max(levels)
    if ("magnitude", hi) in acc0 and hi > 0:
        pairs = [(_arr(r["accuracy"][("magnitude", hi)]["correct"]), _arr(r["accuracy"][("wanda", hi)]["correct"]))
                 for r in runs]
        eff = j.diff(pairs, "images")
        verdict, why = judge_direction(eff, "+", j.margins["top1"])
        out.append(Claim(id="pruning.wanda_vs_magnitude", level="pruning",
                         claim=f"Wanda beats magnitude at the highest sparsity ({hi:.0%})", paper="+6.34 pts at 90%",
                         ours=f"{100 * eff.value:+.2f} pts", effect=eff.scaled(100).text("+.2f"), control="n/a",
                         margin=f"+-{100 * j.margins['top1']:g} pts", verdict=verdict, why=why,
                         rule="top-1 difference (Wanda - magnitude) over images; judge_direction",
                         magnitude=(f"{judge_magnitude(eff.scaled(100), 6.34, j.tolerance)}: vs +6.34 pts"
                                    if hi == 0.9 else "paper's level (90%) not in this preset")))
    return out


def neuron_claims(runs: list[dict], j: Judge, metrics=("selectivity", "label_entropy", "class_variance", "impact"),
                  kind: str = "neuron") -> list[Claim]:
    """``runs[g] = {"levels": {sparsity: neuron_metrics}, "control": neuron_metrics}``; metric
    arrays are (blocks, classes), held-out selection. Judged on level minus control per block."""
    names = {"selectivity": "selectivity", "label_entropy": "label entropy", "class_variance": "class variance",
             "impact": "mean-ablation impact"}
    out = []
    first = runs[0]
    levels = sorted(s for s in first["levels"] if s > 0)
    blocks = list(first["levels"][0.0]["blocks"])
    for metric in metrics:
        comparisons = {}
        for i, b in enumerate(blocks):
            for s in levels:
                comparisons[(b, s)] = ([_arr(r["control"][metric][i]) for r in runs],
                                       [_arr(r["levels"][s][metric][i]) for r in runs])
        c = no_change_claim(j, id=f"{kind}.{metric}", level=kind,
                            claim=f"{names[metric]} shows no systematic change with sparsity",
                            paper="no systematic change", metric=metric, comparisons=comparisons, unit="classes")
        dense_ctl = [j.diff([(_arr(r["levels"][0.0][metric][i]), _arr(r["control"][metric][i])) for r in runs],
                            "classes") for i in range(len(blocks))]
        c.control = "; ".join(f"block {b}: {e.text('+.3f')}" for b, e in zip(blocks, dense_ctl))
        out.append(c)
    return out


def layer_claims(runs: list[dict], j: Judge) -> list[Claim]:
    """``runs[g] = {"levels": {sparsity: [quality row per SAE seed]}, "control": [...]}``."""
    first = runs[0]
    levels = sorted(first["levels"])
    top = levels[-1]
    tag = f"dense to {top:.0%}"

    def per_seed(rows, key, scale=1.0):
        return np.array([row[key] * scale for row in rows], dtype=np.float64)

    def series(key, scale=1.0):
        curve = {s: [per_seed(r["levels"][s], key, scale) for r in runs] for s in levels if s > 0}
        curve[0.0] = [per_seed(r["control"], key, scale) for r in runs]
        return curve

    out = [change_claim(j, id="layer.nmse", level="layer", claim=f"SAE NMSE rises from {tag}",
                        paper="0.0075 -> 0.0594", metric="nmse", expected="+",
                        dense=[per_seed(r["levels"][0.0], "NMSE") for r in runs],
                        at_level=[per_seed(r["levels"][top], "NMSE") for r in runs],
                        control=[per_seed(r["control"], "NMSE") for r in runs], unit="SAE seeds", fmt=".4f",
                        curve=series("NMSE"))]
    out.append(change_claim(j, id="layer.dead", level="layer", claim=f"dead latents fall from {tag} (fraction of latents)",
                            paper="85.9 -> 68.3 (of 24,576)", metric="dead_fraction", expected="-",
                            dense=[per_seed(r["levels"][0.0], "dead %", 0.01) for r in runs],
                            at_level=[per_seed(r["levels"][top], "dead %", 0.01) for r in runs],
                            control=[per_seed(r["control"], "dead %", 0.01) for r in runs], unit="SAE seeds",
                            fmt=".4f", curve=series("dead %", 0.01)))
    if first.get("features") is not None:  # Fig. 3: the four metrics on SAE latents, per class
        def as_blocks(f):
            return {"blocks": [-1], **{m: _arr(f[m])[None] for m in ("selectivity", "label_entropy",
                                                                      "class_variance", "impact")}}
        feature_runs = [{"levels": {s: as_blocks(f) for s, f in r["features"]["levels"].items()},
                         "control": as_blocks(r["features"]["control"])} for r in runs]
        out += neuron_claims(feature_runs, j, kind="layer")
        for c in out[-4:]:
            c.claim = "SAE latents: " + c.claim
            c.paper = "not consistently more selective, monosemantic or class-consistent"
    return out


def circuit_claims(runs: list[dict], j: Judge) -> list[Claim]:
    """``runs[g] = {"levels": {s: circuit_results}, "control": circuit_results or None,
    "equal_k": circuits of the sparsest level at the dense k or None, "equal_k_control": the
    control's circuits at the dense k or None, "pruning_only": dict or None}``."""
    first = runs[0]
    levels = sorted(first["levels"])
    top = levels[-1]
    tag = f"dense to {top:.0%}"
    has_control = first.get("control") is not None

    def get(res, key):
        if key == "ncq_edges":  # the form the paper's tables print: Acc x (1 - edge size)
            return _arr(res["acc_circuit"]) * (1 - _arr(res["size_dense"]))
        return _arr(res[key])

    def arrays(key, which):
        if which == "control":
            return [get(r["control"], key) for r in runs] if has_control else None
        return [get(r["levels"][which], key) for r in runs]

    def curve(key):
        c = {s: arrays(key, s) for s in levels if s > 0}
        if has_control:
            c[0.0] = arrays(key, "control")
        return c

    common = dict(level="circuit", unit="classes")
    out = []
    cf = [_arr(r["pruning_only"]["size_dense"]) for r in runs] if first.get("pruning_only") else None
    out.append(change_claim(j, id="circuit.edges", claim=f"circuit edges fall from {tag} (% of dense edges)",
                            paper="32.4% -> 12.9% (2.5x fewer)", metric="edge_size", expected="-",
                            dense=arrays("size_dense", 0.0), at_level=arrays("size_dense", top),
                            control=arrays("size_dense", "control"), scale=100, fmt=".2f", curve=curve("size_dense"),
                            counterfactual=cf, magnitude=("ratio", 2.5), **common))
    out.append(change_claim(j, id="circuit.edges_remaining",
                            claim=f"circuit edges fall from {tag} as a share of the weights the model still has",
                            paper="32.4% -> 43.1% implied by Table 3 (rises)", metric="edge_size", expected="-",
                            dense=arrays("size_remaining", 0.0), at_level=arrays("size_remaining", top),
                            control=arrays("size_remaining", "control"), scale=100, fmt=".2f",
                            curve=curve("size_remaining"), **common))
    out.append(change_claim(j, id="circuit.nodes", claim=f"node fraction rises from {tag}", paper="29.0% -> 41.6%",
                            metric="node_fraction", expected="+", dense=arrays("node_fraction", 0.0),
                            at_level=arrays("node_fraction", top), control=arrays("node_fraction", "control"),
                            scale=100, fmt=".2f", curve=curve("node_fraction"), **common))
    if first.get("equal_k") is not None:
        out.append(change_claim(j, id="circuit.nodes_equal_k",
                                claim=f"node fraction rises from {tag} at the dense model's k",
                                paper="29.0% -> 40.0% (Table 7, k = 8e-5)", metric="node_fraction", expected="+",
                                dense=arrays("node_fraction", 0.0),
                                at_level=[_arr(r["equal_k"]["node_fraction"]) for r in runs],
                                control=([_arr(r["equal_k_control"]["node_fraction"]) for r in runs]
                                         if first.get("equal_k_control") is not None else None),
                                scale=100, fmt=".2f", **common))
    out.append(change_claim(j, id="circuit.ncq", claim=f"NCQ (Eq. 12, node form) rises from {tag}",
                            paper="0.602 -> 0.780", metric="ncq", expected="+", dense=arrays("ncq", 0.0),
                            at_level=arrays("ncq", top), control=arrays("ncq", "control"), curve=curve("ncq"),
                            **common))
    out.append(change_claim(j, id="circuit.ncq_edges",
                            claim=f"NCQ as the paper's tables print it, Acc x (1 - edge size), rises from {tag}",
                            paper="0.602 -> 0.780", metric="ncq", expected="+", dense=arrays("ncq_edges", 0.0),
                            at_level=arrays("ncq_edges", top), control=arrays("ncq_edges", "control"),
                            curve=curve("ncq_edges"), **common))
    if first.get("equal_k") is not None:
        out.append(change_claim(j, id="circuit.collapse",
                                claim=f"at {top:.0%}, the dense model's k lowers circuit accuracy (circuit collapse)",
                                paper="89.64% -> 83.03% (Table 7)", metric="circuit_accuracy", expected="-",
                                dense=arrays("acc_circuit", top), at_level=[_arr(r["equal_k"]["acc_circuit"]) for r in runs],
                                control=None, scale=100, fmt=".2f", **common))
    margin = j.margins["ablated_accuracy"]
    for s in levels:
        abl = [_arr(r["levels"][s]["acc_ablated"]) - 0.5 for r in runs]
        vs_chance = j.mean(abl, "classes")
        gap = None
        if "acc_random_ablated" in first["levels"][s]:
            gap = j.diff([(_arr(r["levels"][s]["acc_ablated"]), _arr(r["levels"][s]["acc_random_ablated"]).mean(-1))
                          for r in runs], "classes")
        verdict, why = judge_chance(vs_chance, gap, margin)
        faith = ""
        if "faithfulness" in first["levels"][s]:
            faith = f"; logit-difference faithfulness of the circuit {j.mean([_arr(r['levels'][s]['faithfulness']) for r in runs], 'classes').text('.2f')}"
        name = "dense" if s == 0 else f"{s:.0%}"
        out.append(Claim(id=f"circuit.ablation_{name.rstrip('%')}", level="circuit",
                         claim=f"ablating the circuit returns one-vs-rest accuracy to chance ({name})", paper="50%",
                         ours=f"{vs_chance.value + 0.5:.1%} ablated" + (
                             f", {gap.value + vs_chance.value + 0.5:.1%} with random sets of the same size" if gap else ""),
                         effect=f"ablated - 0.5: {vs_chance.text('+.3f')}" + (
                             f"; random - circuit ablated: {gap.text('+.3f')}" if gap else "") + faith,
                         control="random node sets (same size per site)" if gap else "n/a",
                         margin=f"+-{margin:g}", verdict=verdict, why=why, rule="judge_chance, per model"))
    return out


def model_claims(runs: list[dict], j: Judge, method: str = "chefer") -> list[Claim]:
    """``runs[g] = {"levels": {s: attribution_results}, "control": attribution_results or None}``.

    Judged on each map's AUC minus the random-order (random patch scores) AUC of the same
    model and substitute, per image, for every substitute (reference) computed."""
    first = runs[0]
    levels = sorted(first["levels"])
    has_control = first.get("control") is not None

    def scores(res):
        return res.get("scores") or {"primary": res["methods"]}

    refs = list(scores(first["levels"][0.0]))

    def gain(res, ref, metric):
        sc = scores(res)[ref]
        return _arr(sc[method][metric]) - _arr(sc["random"][metric])

    out = []
    light = [s for s in levels if 0 < s <= 0.3]
    targets = []
    if light:
        targets.append(("insertion", 0.3 if 0.3 in light else max(light), "+",
                        "insertion AUC improves at light sparsity (the paper's peak: 30%)", "0.600 -> 0.714 (30%)"))
    targets.append(("deletion", levels[-1], "-", f"deletion AUC improves (falls) at {levels[-1]:.0%}", "0.212 -> 0.175"))
    for metric, s, expected, title, paper in targets:
        for ref in refs:
            curve = {x: [gain(r["levels"][x], ref, metric) for r in runs] for x in levels if x > 0}
            if has_control:
                curve[0.0] = [gain(r["control"], ref, metric) for r in runs]
            raw = [float(np.mean(_arr(scores(r["levels"][x])[ref][method][metric]))) for r in runs[:1] for x in (0.0, s)]
            c = change_claim(j, id=f"model.{metric}_{ref}", level="model",
                             claim=f"{title}, above random order ({ref} substitute)", paper=paper, metric=metric,
                             expected=expected, dense=[gain(r["levels"][0.0], ref, metric) for r in runs],
                             at_level=[gain(r["levels"][s], ref, metric) for r in runs],
                             control=[gain(r["control"], ref, metric) for r in runs] if has_control else None,
                             unit="images", curve=curve)
            c.ours = f"AUC {raw[0]:.3f} -> {raw[1]:.3f}; above random: {c.ours}"
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# gathering the cached results (one dict per training seed) and the single entry points
# ---------------------------------------------------------------------------------------------
def analysis_levels(sparsities) -> list[float]:
    return [0.0] + sorted(float(s) for s in sparsities if s > 0)


def for_seed(cfg, seed: int):
    """The same configuration with another training seed (and its own cache entries)."""
    return dataclasses.replace(cfg, seed=seed)


def gather(cfg, level: str) -> dict:
    """Everything ``level``'s claims need, from the cached entry points (computed on first use)."""
    from . import pipeline
    from .pipeline import CONTROL

    if level == "pruning":
        acc = {(m, s): pipeline.accuracy(cfg, s, m) for m in cfg.pruning.methods
               for s in analysis_levels(cfg.pruning.sparsities)}
        return {"accuracy": acc, "control": pipeline.accuracy(cfg, 0.0, CONTROL)}
    if level == "neuron":
        from . import neuron
        return {"levels": {s: neuron.neuron_metrics(cfg, s) for s in analysis_levels(cfg.neuron.sparsities)},
                "control": neuron.neuron_metrics(cfg, 0.0, method=CONTROL)}
    if level == "layer":
        from . import sae
        from . import sae_features
        levels = analysis_levels(cfg.sae.sparsities)
        return {"levels": {s: sae.quality_over_seeds(cfg, s) for s in levels},
                "control": sae.quality_over_seeds(cfg, 0.0, method=CONTROL),
                "features": {"levels": {s: sae_features.sae_feature_metrics(cfg, s) for s in levels},
                             "control": sae_features.sae_feature_metrics(cfg, 0.0, method=CONTROL)}}
    if level == "circuit":
        from . import circuits
        levels = analysis_levels(cfg.circuit.sparsities)
        top = levels[-1]
        return {"levels": {s: circuits.circuit_results(cfg, s) for s in levels},
                "control": circuits.circuit_results(cfg, 0.0, method=CONTROL),
                "equal_k": circuits.circuit_results(cfg, top, k=cfg.circuit.k_dense) if top > 0 else None,
                "equal_k_control": circuits.circuit_results(cfg, 0.0, k=cfg.circuit.k_dense, method=CONTROL),
                "pruning_only": circuits.pruning_only_edges(cfg, top) if top > 0 else None}
    if level == "model":
        from . import perturbation
        return {"levels": {s: perturbation.attribution_results(cfg, s)
                           for s in analysis_levels(cfg.attribution.sparsities)},
                "control": perturbation.attribution_results(cfg, 0.0, method=CONTROL)}
    raise ValueError(f"unknown level of analysis {level!r}; known: {LEVELS_OF_ANALYSIS}")


CLAIMS = {"pruning": pruning_claims, "neuron": neuron_claims, "layer": layer_claims, "circuit": circuit_claims,
          "model": model_claims}


def judge(level: str, runs: list[dict], j: Judge) -> list[Claim]:
    return CLAIMS[level](runs, j)


def level_claims(cfg, level: str) -> list[Claim]:
    """The claims of one level of analysis, over every training seed of ``cfg`` (the same
    objects the discussion shows; chapters glue them with :func:`impact_core.notebook.glue_claims`)."""
    seeds = cfg.seeds or [cfg.seed]
    runs = [gather(for_seed(cfg, s), level) for s in seeds]
    claims = judge(level, runs, Judge.from_config(cfg))
    if len(seeds) > 1:  # per-seed verdicts as a column
        per_seed = [judge(level, [r], dataclasses.replace(Judge.from_config(cfg), seed=s)) for r, s in zip(runs, seeds)]
        for i, c in enumerate(claims):
            vs = [p[i].verdict for p in per_seed]
            c.seeds = f"{sum(v == c.verdict for v in vs)}/{len(vs)} seeds alone: {c.verdict}"
    return claims


def all_claims(cfg, levels: Sequence[str] = LEVELS_OF_ANALYSIS) -> list[Claim]:
    return [c for level in levels for c in level_claims(cfg, level)]


def verdict_counts(claims) -> dict[str, int]:
    counts = {v: 0 for v in VERDICTS}
    for c in claims:
        counts[c["verdict"] if isinstance(c, dict) else c.verdict] += 1
    return counts
