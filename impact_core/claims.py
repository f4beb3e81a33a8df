"""Sec. 5: the paper's claims, each judged by a rule on our numbers (the judging layer).

Every verdict of the book comes from these rules: each level of :mod:`impact_core.levels`
builds its :class:`Claim` objects with them, the chapters glue their level's
(:func:`impact_core.levels.level_claims`) and the discussion shows all of them
(:func:`impact_core.levels.all_claims`), so a chapter and the discussion can never disagree. Intervals come from
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
* **two models compared** (beyond the paper: a model trained sparse against Wanda, 2:4 against
  unstructured; :func:`comparison_claim`): B minus A paired over the same units, judged with
  :func:`judge_direction`; over several blocks with :func:`judge_direction_family` (Holm).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

from . import stats as S
from .stats import DOWN, EQUIVALENT, SMALL_DOWN, SMALL_UP, UP, Estimate

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
SMALL = "shown but small"  # the change is shown to exist and shown smaller than the margin
PIPELINE = "explained by the pipeline"
PRUNING = "explained by pruning alone"
METRIC_BLIND = "metric blind"  # "no change", on a metric that cannot tell the trained model from random weights
ACCURACY = "explained by accuracy"  # the change is as large in a dense model of the level's accuracy
VERDICTS = (REPRODUCED, SMALL, NOT_REPRODUCED, INCONCLUSIVE, PIPELINE, PRUNING, ACCURACY, METRIC_BLIND)
SEES, BLIND = "sees", "blind"  # readings of the metric-sensitivity check (judge_sensitivity)
BEYOND_ACCURACY, FOLLOWS_ACCURACY = "beyond accuracy", "follows accuracy"  # readings of judge_matched


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
    sensitivity: str = ""  # trained dense minus random weights on the claim's metric (judge_sensitivity)
    accuracy: str = ""     # level minus the matched-accuracy dense model (judge_matched)
    cascade: str = ""      # the sensitivity check against the top j blocks re-initialised, per j (config.cascade)
    family: str = ""       # the claim this one is a variant of (per sparsity, substitute, ...); default: its id
    curve: list = field(default_factory=list, repr=False)  # [(label, sparsity, Estimate)] for figures
    # the numbers behind ``effect`` / ``control`` / ``margin`` for the forest plot (unscaled: the margin's units)
    estimate: Optional[Estimate] = field(default=None, repr=False)          # the judged quantity
    control_estimate: Optional[Estimate] = field(default=None, repr=False)  # control minus dense
    margin_value: Optional[float] = field(default=None, repr=False)
    expected: str = field(default="", repr=False)  # the claimed side: "+", "-", or "0" (no change, chance)

    NUMERIC = ("curve", "estimate", "control_estimate", "margin_value", "expected")

    def __post_init__(self):
        self.family = self.family or self.id

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in self.NUMERIC:
            d.pop(name)
        return d

    @property
    def key(self) -> str:
        return "claim_" + self.id.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# rules: pure functions of intervals (tested on synthetic inputs)
# ---------------------------------------------------------------------------------------------
def _claimed(reading: str, expected: str) -> bool:
    """Shown on the claimed side of 0 and not shown smaller than the margin."""
    return reading == (UP if expected == "+" else DOWN)


def _claimed_small(reading: str, expected: str) -> bool:
    """Shown on the claimed side of 0 and shown smaller than the margin."""
    return reading == (SMALL_UP if expected == "+" else SMALL_DOWN)


def _shown_claimed(reading: str, expected: str) -> bool:
    return _claimed(reading, expected) or _claimed_small(reading, expected)


def _opposite(reading: str, expected: str) -> bool:
    """Shown on the other side of 0 (whatever its size)."""
    return reading in ((DOWN, SMALL_DOWN) if expected == "+" else (UP, SMALL_UP))


def judge_direction(effect: Estimate, expected: str, margin: float) -> tuple[str, str]:
    """A direction claim on one interval (no control available)."""
    r = S.side(effect, margin)
    if _claimed(r, expected):
        return REPRODUCED, "the interval lies on the claimed side of 0"
    if _claimed_small(r, expected):
        return SMALL, f"a change on the claimed side, shown smaller than the margin (+-{margin:g})"
    if r == EQUIVALENT:
        return NOT_REPRODUCED, f"no change beyond +-{margin:g} (equivalent)"
    if _opposite(r, expected):
        return NOT_REPRODUCED, "it changes the other way"
    return INCONCLUSIVE, _needed(effect, margin)


def judge_change(effect: Estimate, control: Optional[Estimate], beyond_control: Optional[Estimate],
                 expected: str, margin: float) -> tuple[str, str]:
    """A change claim judged against the control; every label needs the evidence it names.

    ``effect``: level - dense; ``control``: control - dense; ``beyond_control``: level - control
    (all paired over the same units). In order:

    * *not reproduced*: the level is shown equivalent to dense, or shown to change the other way
      (against dense or beyond the control), or shown equivalent to the control while the control
      itself is not shown to carry the effect;
    * *explained by the pipeline*: the control's effect is shown on the claimed side **and** the
      level is shown equivalent to the control;
    * *reproduced*: the change is shown against dense **and** beyond the control, on the claimed
      side, and neither is shown smaller than the margin;
    * *shown but small*: both are shown on the claimed side and one of them is shown smaller than
      the margin (so a more precise interval never turns "reproduced" into "not reproduced");
    * *inconclusive* otherwise, with the units that would decide."""
    if control is None or beyond_control is None:
        return judge_direction(effect, expected, margin)
    r_eff, r_ctl, r_beyond = (S.side(e, margin) for e in (effect, control, beyond_control))
    if r_eff == EQUIVALENT:
        return NOT_REPRODUCED, f"no change from dense beyond +-{margin:g} (equivalent)"
    if _opposite(r_eff, expected):
        return NOT_REPRODUCED, "it changes the other way from dense"
    if _opposite(r_beyond, expected):
        return NOT_REPRODUCED, "beyond the control it changes the other way"
    if r_beyond == EQUIVALENT:
        if _shown_claimed(r_ctl, expected):
            return PIPELINE, "the control (nothing pruned) shows the effect, and the level is equivalent to it"
        return NOT_REPRODUCED, f"no change beyond the control (within +-{margin:g})"
    if _shown_claimed(r_eff, expected) and _shown_claimed(r_beyond, expected):
        if _claimed(r_eff, expected) and _claimed(r_beyond, expected):
            return REPRODUCED, "the level differs from dense and from the control in the claimed direction"
        return SMALL, (f"the change is shown against dense and beyond the control, and shown smaller than "
                       f"the margin (+-{margin:g})")
    undecided = beyond_control if not _shown_claimed(r_beyond, expected) else effect
    return INCONCLUSIVE, _needed(undecided, margin)


def judge_pruning_only(verdict: str, beyond_counterfactual: Optional[Estimate], expected: str,
                       margin: float) -> tuple[str, Optional[str]]:
    """Can pruning alone explain a reproduced edge claim? ``beyond_counterfactual``: the sparse
    circuits minus the dense circuits' node sets counted on the pruned weights.

    Stays *reproduced* when the sparse circuits are shown beyond the counterfactual on the claimed
    side; *explained by pruning alone* when they are shown equivalent to it, or shown on its other
    side (pruning alone removes more); *inconclusive* when that comparison is undecided."""
    if verdict not in (REPRODUCED, SMALL) or beyond_counterfactual is None:
        return verdict, None
    r = S.side(beyond_counterfactual, margin)
    if _shown_claimed(r, expected):
        return verdict, None
    if r == EQUIVALENT:
        return PRUNING, "the dense circuits counted on the pruned weights fall as far (equivalent)"
    if _opposite(r, expected):
        return PRUNING, "the dense circuits counted on the pruned weights fall further"
    return INCONCLUSIVE, ("the edges fall, but whether pruning alone explains it is undecided; "
                          + _needed(beyond_counterfactual, margin))


def judge_no_change(family: Sequence[Estimate], margin: float, alpha: float = S.ALPHA) -> tuple[str, dict]:
    """An equivalence claim over a family of comparisons.

    *reproduced* when **every** comparison's interval lies inside +-margin (an intersection-union
    test: no correction); *not reproduced* when **any** lies wholly beyond the margin (Holm over
    :func:`impact_core.stats.p_beyond`); *inconclusive* otherwise."""
    fam = [e for e in family if e.finite]
    if not fam:
        return INCONCLUSIVE, {"equivalent": 0, "changed": 0, "n": 0, "needed": None}
    eq = np.array([S.p_equivalent(e, margin) < alpha for e in fam])
    ch = S.holm([S.p_beyond(e, margin) for e in fam], alpha)
    needed = [S.samples_needed(e, margin, "equivalence") for e, a, b in zip(fam, eq, ch) if not (a or b)]
    info = {"equivalent": int(eq.sum()), "changed": int(ch.sum()), "n": len(fam),
            "needed": max((x for x in needed if x), default=None)}
    if ch.any():
        return NOT_REPRODUCED, info
    if eq.all():
        return REPRODUCED, info
    return INCONCLUSIVE, info


def judge_threshold(est: Estimate, threshold: float) -> str:
    """"Above ``threshold``": reproduced when the whole interval is above it, not reproduced when
    the whole interval is below it."""
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
    random set ablated minus with the circuit ablated.

    *reproduced* needs the ablated accuracy shown within +-margin of chance **and** the random
    sets shown to keep more accuracy (``random_gap`` on the + side, not small); without random
    sets, the equivalence alone (the claim as the paper states it). *not reproduced*
    when the ablated accuracy is shown beyond the margin from chance, or random sets are shown to
    do as well (equivalent) or better."""
    at_chance = S.p_equivalent(ablated_vs_chance, margin) < S.ALPHA
    if S.p_beyond(ablated_vs_chance, margin) < S.ALPHA:
        return NOT_REPRODUCED, "ablated accuracy is shown away from chance beyond the margin"
    if random_gap is None:
        if at_chance:
            return REPRODUCED, "shown at chance (no random-set control)"
        return INCONCLUSIVE, _needed(ablated_vs_chance, margin)
    g = S.side(random_gap, margin)
    if g in (EQUIVALENT, DOWN, SMALL_DOWN):
        return NOT_REPRODUCED, "random node sets of the same size do as well"
    if at_chance and g == UP:
        return REPRODUCED, "at chance, and below random node sets of the same size"
    return INCONCLUSIVE, _needed(random_gap if at_chance else ablated_vs_chance, margin)


def trend_reading(trend: Estimate, expected: str, margin: float, span: float) -> str:
    """Dose-response: the slope times the sparsity span read against the margin."""
    r = S.side(trend.scaled(span), margin)
    if _shown_claimed(r, expected):
        return "grows with sparsity" if _claimed(r, expected) else "grows with sparsity, less than the margin"
    if _opposite(r, expected):
        return "reverses with sparsity"
    return {EQUIVALENT: "flat"}.get(r, "undecided")


def _needed(est: Estimate, margin: float) -> str:
    """What would decide an undecided interval: more of its units (t quantiles, same spread). Classes
    are every class of the data set, so more of them is no option: the text says so and points to
    the units that can grow (replicates of the pipeline, or training seeds)."""
    n = S.samples_needed(est, margin)
    unit = S.unit_name(est)
    if not n:
        return "undecided"
    if unit == "classes":
        return (f"undecided; it would take about {n} classes at this spread, more than the {est.n} evaluated: "
                f"replicates of the pipeline (preset key replicates) or training seeds are the units that can grow")
    return f"undecided; about {n} {unit} would decide"


# ---------------------------------------------------------------------------------------------
# building claims from per-unit arrays
# ---------------------------------------------------------------------------------------------
@dataclass
class Judge:
    """The settings every claim is judged with (``cfg.verdicts``) and the design of the runs.

    A level's claims receive one array (or tuple of paired arrays) per run; ``per_group``
    consecutive runs form one group (a training seed's replicates, pooled), and ``groups`` names
    what several groups are: "training seeds" or "replicates" of the pipeline. Several groups are
    the units of every interval (:mod:`impact_core.stats`); one group's units are its own."""

    margins: dict
    tolerance: float = 0.25
    groups: str = "training seeds"
    per_group: int = 1

    @classmethod
    def from_config(cls, cfg) -> "Judge":
        v = cfg.verdicts
        return cls(dict(v.margins), v.magnitude_tolerance)

    def nested(self, seeds: int, runs_per_seed: int) -> "Judge":
        """The judge of ``seeds`` training seeds with ``runs_per_seed`` replicates each, runs seed-major:
        several seeds are the groups (each pools its replicates); one seed's replicates are the groups."""
        if seeds > 1:
            return replace(self, groups="training seeds", per_group=runs_per_seed)
        return replace(self, groups="replicates" if runs_per_seed > 1 else self.groups, per_group=1)

    def pool(self, runs: Sequence) -> list:
        """One entry per group: the runs of a group concatenated (paired tuples stay paired)."""
        runs = list(runs)
        if self.per_group == 1:
            return runs
        flat = lambda xs: np.concatenate([as_array(x).ravel() for x in xs])  # noqa: E731
        out = []
        for i in range(0, len(runs), self.per_group):
            block = runs[i:i + self.per_group]
            out.append(tuple(flat([b[j] for b in block]) for j in range(len(block[0])))
                       if isinstance(block[0], tuple) else flat(block))
        return out

    def diff(self, pairs, unit: str) -> Estimate:
        return S.mean_difference(self.pool(pairs), unit, groups=self.groups)

    def ratio(self, pairs, unit: str) -> Estimate:
        return S.ratio_of_means(self.pool(pairs), unit, groups=self.groups)

    def mean(self, samples, unit: str) -> Estimate:
        return S.mean(self.pool(samples), unit, groups=self.groups)


def as_array(x) -> np.ndarray:
    """A tensor or array-like as float64 NumPy (what the statistics take)."""
    return np.asarray(x.double().numpy() if hasattr(x, "double") else x, dtype=np.float64)


def change_claim(j: Judge, *, id: str, level: str, claim: str, paper: str, metric: str, expected: str,
                 dense: Sequence, at_level: Sequence, control: Optional[Sequence], unit: str, scale: float = 1.0,
                 fmt: str = ".3f", curve: Optional[dict] = None, counterfactual: Optional[Sequence] = None,
                 magnitude: Optional[tuple[str, float]] = None, random_weights: Optional[Sequence] = None,
                 matched: Optional[Sequence] = None, family: str = "") -> Claim:
    """A change claim from per-unit arrays, one per training seed (``dense[g]``, ``at_level[g]``,
    ``control[g]``: the same units); ``curve``: {sparsity: per-seed arrays} for the trend
    (the control stands at sparsity 0); ``counterfactual``: the pruning-only arrays (edges);
    ``random_weights``: the random-weights model's arrays (the metric-sensitivity check,
    :func:`with_sensitivity`: "not reproduced" for no change from dense on a blind metric reads "metric blind");
    ``matched``: the matched-accuracy dense model's arrays at the claim's level (:func:`with_matched`:
    "reproduced" for a change as large in that model reads "explained by accuracy")."""
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
              rule="judge_change: level minus control, paired" if ctl else "judge_direction: level minus dense, paired",
              estimate=beyond or eff, control_estimate=ctl, margin_value=margin, expected=expected, family=family)
    if random_weights is not None:
        with_sensitivity(j, c, {"dense": (random_weights, dense)}, margin, unit,
                         no_change=verdict == NOT_REPRODUCED and why.startswith("no change"), scale=scale, fmt=fmt)
    if matched is not None:
        with_matched(j, c, matched, at_level, margin, unit, expected, scale, fmt)
    if magnitude is not None:
        how, stated = magnitude
        if how == "ratio":  # "N x fewer": mean(dense) / mean(level)
            est = j.ratio(list(zip(dense, at_level)), unit)
            c.magnitude = f"{judge_magnitude(est, stated, j.tolerance)}: {est.text('.2f')} vs {stated:g}x"
        else:
            c.magnitude = f"{judge_magnitude(eff.scaled(scale), stated, j.tolerance)}: vs {stated:+g}"
    if curve:
        levels = sorted(curve)
        per_level = [j.pool(curve[s]) for s in levels]
        t = S.trend(levels, per_level, unit, groups=j.groups)
        c.trend = f"{trend_reading(t, expected, margin, max(levels) - min(levels))}: {t.scaled(scale).text(f)}"
        c.curve = [(s, j.mean(curve[s], unit).scaled(scale)) for s in levels]
    return c


def no_change_claim(j: Judge, *, id: str, level: str, claim: str, paper: str, metric: str,
                    comparisons: dict, unit: str, sensitivity: Optional[dict] = None) -> Claim:
    """``comparisons[(block, sparsity)] = (control arrays per seed, level arrays per seed)``;
    ``sensitivity[block] = (random-weights arrays per seed, dense arrays per seed)``: the metric-sensitivity
    check (:func:`judge_sensitivity`), which turns a "no change" shown on a blind metric into
    :data:`METRIC_BLIND`."""
    margin = j.margins[metric]
    fam = {k: j.diff(list(zip(c, l)), unit) for k, (c, l) in comparisons.items()}
    verdict, info = judge_no_change(list(fam.values()), margin)
    needed = (f"; about {info['needed']} {S.unit_name(next(iter(fam.values())))} would decide"
              if verdict == INCONCLUSIVE and info["needed"] else "")
    worst = max(fam.values(), key=lambda e: abs(e.value)) if fam else None
    c = Claim(id=id, level=level, claim=claim, paper=paper,
              ours=f"{info['equivalent']} of {info['n']} (block, level) comparisons equivalent, "
                   f"{info['changed']} changed",
              effect=f"largest: {worst.text('+.3f')}" if worst else "n/a", control="see the chapter",
              margin=f"+-{margin:g}", verdict=verdict,
              why=f"Holm-corrected equivalence and change tests over {info['n']} comparisons{needed}",
              rule="level minus control per (block, level), paired; judge_no_change",
              estimate=worst, margin_value=margin, expected="0")
    if sensitivity:
        with_sensitivity(j, c, sensitivity, margin, unit, no_change=verdict == REPRODUCED)
    return c


def with_sensitivity(j: Judge, c: Claim, sensitivity: dict, margin: float, unit: str, no_change: bool,
                     scale: float = 1.0, fmt: str = ".3f") -> Claim:
    """Set ``c.sensitivity`` from ``sensitivity[key] = (random-weights arrays per seed, dense arrays per seed)``
    (:func:`judge_sensitivity`), shown in the claim's own scale (points where its effect is in points); a claim
    whose verdict says "no change" (``no_change``) on a blind metric becomes :data:`METRIC_BLIND`."""
    sens = {k: j.diff(list(zip(r, d)), unit) for k, (r, d) in sensitivity.items()}
    reading = judge_sensitivity(list(sens.values()), margin)
    largest = max(sens.values(), key=lambda e: abs(e.value))
    c.sensitivity = f"{reading}: trained minus random weights, largest {largest.scaled(scale).text('+' + fmt)}"
    if no_change and reading == BLIND:
        c.verdict = METRIC_BLIND
        c.why += (f"; but the metric cannot tell the trained model from random weights (every "
                  f"trained-minus-random interval lies inside +-{margin * scale:g}), so 'no change' says nothing")
    return c


def judge_sensitivity(family: Sequence[Estimate], margin: float, alpha: float = S.ALPHA) -> str:
    """Can the metric see anything? ``family``: trained dense minus random weights on the claim's metric,
    one comparison per block (paired over the claim's units). :data:`SEES` when **any** comparison lies
    wholly beyond +-margin (Holm over :func:`impact_core.stats.p_beyond`: the metric moves by more than
    the smallest effect of interest between a trained model and its own initialisation); :data:`BLIND`
    when **every** comparison lies inside +-margin (intersection-union, no correction: a change of the
    margin's size would be as large as training itself moves the metric); "undecided" otherwise.
    The choice of "any block sees" over "every block sees" is ours (the paper runs no such check)."""
    reading = judge_no_change(family, margin, alpha)[0]
    return {NOT_REPRODUCED: SEES, REPRODUCED: BLIND}.get(reading, "undecided")


def judge_matched(level_minus_matched: Estimate, expected: str, margin: float) -> str:
    """Does a change follow accuracy? ``level_minus_matched``: the level minus the dense checkpoint of the
    same held-out top-1 (:data:`impact_core.pipeline.MATCHED`), paired over the claim's units.
    :data:`BEYOND_ACCURACY` when the interval lies on the claimed side of 0 and not inside +-margin (the
    level moved further than a dense model of its accuracy: :func:`impact_core.stats.side` reads UP /
    DOWN); :data:`FOLLOWS_ACCURACY` when the interval's claimed-side bound lies inside the margin (the level
    is not shown to move more than the margin further than that dense model: the same, less, or the other
    way); "undecided" otherwise. One interval, one alpha, as every rule here."""
    e = level_minus_matched
    if not e.finite:
        return "undecided"
    if _claimed(S.side(e, margin), expected):
        return BEYOND_ACCURACY
    bound = e.high if expected == "+" else -e.low
    return FOLLOWS_ACCURACY if bound < margin else "undecided"


def with_matched(j: Judge, c: Claim, matched: Sequence, at_level: Sequence, margin: float, unit: str,
                 expected: str, scale: float = 1.0, fmt: str = ".3f") -> Claim:
    """Set ``c.accuracy`` from level minus the matched-accuracy model (:func:`judge_matched`); a
    "reproduced" change that :data:`FOLLOWS_ACCURACY` becomes :data:`ACCURACY` (the dense model at the
    level's accuracy shows it as well, so accuracy, not sparsity, is what it follows)."""
    est = j.diff(list(zip(matched, at_level)), unit)
    reading = judge_matched(est, expected, margin)
    c.accuracy = f"{reading}: level minus dense at its accuracy {est.scaled(scale).text('+' + fmt)}"
    if reading == FOLLOWS_ACCURACY and c.verdict == REPRODUCED:
        c.verdict = ACCURACY
        c.why += (f"; but the dense model at the level's accuracy (a checkpoint chosen on held-out images) "
                  f"shows it too: the level is not {margin * scale:g} beyond it")
    return c


def not_measured(id: str, level: str, claim: str, paper: str, why: str) -> Claim:
    return Claim(id=id, level=level, claim=claim, paper=paper, ours=why, effect="n/a", control="n/a",
                 margin="n/a", verdict=INCONCLUSIVE, rule="not measured", why=why)


def verdict_counts(claims) -> dict[str, int]:
    counts = {v: 0 for v in VERDICTS}
    for c in claims:
        counts[c["verdict"] if isinstance(c, dict) else c.verdict] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# two models compared on the same units (beyond the paper: sparsity trained in, 2:4 vs unstructured)
# ---------------------------------------------------------------------------------------------
def judge_direction_family(family: Sequence[Estimate], expected: str, margin: float,
                           alpha: float = S.ALPHA) -> tuple[str, str]:
    """A direction claim over a family of comparisons (e.g. blocks).

    *reproduced* when **every** comparison's interval lies on the claimed side of 0 and none is
    shown smaller than the margin (intersection-union: no correction); *shown but small* when every
    one lies on the claimed side and some are shown smaller than the margin; *not reproduced* when
    **any** is shown equivalent within +-margin or on the other side (Holm over those p-values);
    *inconclusive* otherwise."""
    fam = [e for e in family if e.finite]
    if not fam:
        return INCONCLUSIVE, "no comparison has an interval"
    other = "-" if expected == "+" else "+"
    claimed = np.array([S.p_side(e, expected) < alpha for e in fam])
    small = np.array([S.p_equivalent(e, margin) < alpha for e in fam])
    equivalent = S.holm([S.p_equivalent(e, margin) for e in fam], alpha) & ~claimed
    opposite = S.holm([S.p_side(e, other) for e in fam], alpha)
    n, eq, opp = len(fam), int(equivalent.sum()), int(opposite.sum())
    if claimed.all():
        if small.any():
            return SMALL, (f"all {n} comparisons lie on the claimed side of 0, {int(small.sum())} shown smaller "
                           f"than +-{margin:g}")
        return REPRODUCED, f"all {n} comparisons lie on the claimed side of 0"
    if eq or opp:
        return NOT_REPRODUCED, (f"of {n} comparisons (Holm), {eq} show no change beyond +-{margin:g} and "
                                f"{opp} change the other way")
    needed = [S.samples_needed(e, margin) for e, c in zip(fam, claimed) if not c]
    most = max((x for x in needed if x), default=None)
    return INCONCLUSIVE, (f"{int(claimed.sum())} of {n} comparisons on the claimed side of 0, none shown against"
                          + (f"; about {most} {S.unit_name(fam[0])} would decide" if most else ""))


def _mean_of(arrays, scale: float) -> float:
    return float(np.nanmean(np.concatenate([np.ravel(np.asarray(x, dtype=np.float64)) for x in arrays]))) * scale


def comparison_claim(j: Judge, *, id: str, level: str, claim: str, paper: str, metric: str, expected: str,
                     a, b, unit: str, labels: tuple[str, str] = ("A", "B"), scale: float = 1.0,
                     fmt: str = ".3f", family: str = "") -> Claim:
    """Model B against model A on the same units, judged on **B minus A**, paired (no control:
    both are the models under test). ``a[g]``, ``b[g]``: one array per training seed, the same
    units in the same order; ``expected``: the side of 0 the claim says B - A lies on.

    ``a`` and ``b`` may instead be dicts ``{name: per-seed arrays}`` over the same names (blocks):
    a family judged with :func:`judge_direction_family` (Holm); the forest plot shows its weakest comparison
    (the one least far on the claimed side). ``family``: the claim this one is a variant of."""
    margin = j.margins[metric]
    f = "+" + fmt
    if isinstance(a, dict):
        fam = {k: j.diff(list(zip(a[k], b[k])), unit) for k in a}
        verdict, why = judge_direction_family(list(fam.values()), expected, margin)
        sign = -1.0 if expected == "-" else 1.0
        eff = min(fam.values(), key=lambda e: sign * e.value)  # the forest shows the weakest comparison
        ours = "; ".join(f"{k}: {_mean_of(a[k], scale):{fmt}} vs {_mean_of(b[k], scale):{fmt}}" for k in a)
        effect = "; ".join(f"{k}: {e.scaled(scale).text(f)}" for k, e in fam.items())
        rule = (f"judge_direction_family: {labels[1]} minus {labels[0]}, paired over {unit}, "
                f"{len(fam)} comparisons (Holm)")
    else:
        eff = j.diff(list(zip(a, b)), unit)
        verdict, why = judge_direction(eff, expected, margin)
        ours, effect = f"{_mean_of(a, scale):{fmt}} vs {_mean_of(b, scale):{fmt}}", eff.scaled(scale).text(f)
        rule = f"judge_direction: {labels[1]} minus {labels[0]}, paired over {unit}"
    return Claim(id=id, level=level, claim=claim, paper=paper, ours=f"{labels[0]} vs {labels[1]}: {ours}",
                 effect=effect, control="n/a", margin=f"+-{margin * scale:g}", verdict=verdict, why=why, rule=rule,
                 family=family, estimate=eff, margin_value=margin, expected=expected)
