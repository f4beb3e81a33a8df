"""The judging layer's error rates, measured by simulation at the sample sizes a preset uses.

Every verdict reads a 95% interval (:mod:`impact_core.stats`); this module checks that the
interval covers the true value in at least 93% of draws and that no rule of
:mod:`impact_core.claims` says "reproduced" in more than 5% of draws where the claim is false.
Both run the book's own functions (``stats.mean_difference``, ``claims.judge_change``, ...) on
synthetic per-unit data with a known effect.

* :func:`designs` reads the sample sizes from a preset: classes, SAE seeds, evaluation,
  neuron and attribution images, and the groups above them (training seeds, else replicates).
* :func:`coverage` draws paired data of one design with effect ``delta`` and counts intervals
  that cover it; :func:`rule_rates` counts each rule's verdicts under a false claim.
* :func:`table` gives both for every design of a preset, with the Monte Carlo error
  (``sqrt(p (1 - p) / draws)``); ``python -m impact_core error-rates --preset P`` prints it.

The data: unit values shared by both arms (what pairing removes) plus independent noise per
arm, normal or skewed (centred gamma, shape 4); several groups (training seeds or replicates)
add a group offset of the same spread, so the groups are the units. Images of an accuracy claim
are paired 0/1 outcomes: the paired difference is -1, 0 or +1 with the discordant share of the
design. One replicate cannot show the pipeline's own run-to-run noise: :func:`pipeline_noise`
measures how often a single run per condition says "reproduced" when only that noise differs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import claims as C
from . import stats as S

COVERAGE_FLOOR = 0.93    # every interval a verdict reads covers at least this at nominal 95%
FALSE_REPRODUCED = 0.05  # no rule says "reproduced" of a false claim more often than this


@dataclass(frozen=True)
class Design:
    """One sample size a preset's claims use: ``n`` units per group, ``groups`` groups."""

    name: str
    unit: str
    n: int
    groups: int = 1
    kind: str = "normal"  # "normal", "skewed" (centred gamma, shape 4), "binary" (paired 0/1 outcomes)
    discordant: float = 0.05  # binary: share of images on which the two models disagree


def _eval_images(cfg) -> int:
    if cfg.data.eval_images:
        return int(cfg.data.eval_images)
    return 10_000 if cfg.data.kind == "fashion_mnist" else 50_000


def designs(cfg) -> list[Design]:
    """The sample sizes the preset's claims are judged at (see the module docstring)."""
    from .levels.circuit import resolve_classes as circuit_classes

    n_classes = cfg.model.num_classes
    neuron_classes = cfg.neuron.classes or n_classes
    seeds = len(cfg.seeds) if cfg.seeds else cfg.replicates  # the groups: training seeds, else replicates
    out = [Design(f"{len(circuit_classes(cfg))} classes (circuits)", "classes", len(circuit_classes(cfg)), seeds),
           Design(f"{len(circuit_classes(cfg))} classes, skewed", "classes", len(circuit_classes(cfg)), seeds, "skewed"),
           Design(f"{neuron_classes} classes (neurons)", "classes", neuron_classes, seeds),
           Design(f"{cfg.sae.seeds} SAE seeds", "SAE seeds", cfg.sae.seeds, seeds),
           Design(f"{_eval_images(cfg)} images, top-1", "images", _eval_images(cfg), seeds, "binary"),
           Design(f"{cfg.attribution.images or _eval_images(cfg)} images, AUC", "images",
                  cfg.attribution.images or _eval_images(cfg), seeds, "skewed")]
    return [d for d in out if d.n >= 2 or d.groups >= 2]


def _noise(design: Design, rng: np.random.Generator, skew: bool) -> np.ndarray:
    """Noise of sd 1 per unit: normal, or a centred gamma of shape 4 (skewness 1)."""
    if skew and design.kind == "skewed":
        return rng.gamma(4, 0.5, design.n) - 2.0
    return rng.normal(0, 1, design.n)


def _draw(design: Design, delta: float, rng: np.random.Generator):
    """Paired arrays ``(a, b)`` per group with ``mean(b - a) = delta``: unit values both arms share
    (removed by the pairing), normal noise in ``a`` and the design's noise in ``b``; several
    groups add a normal group offset of sd 1 to ``b``. Binary designs draw the paired difference
    of 0/1 outcomes directly: +1 or -1 on a ``discordant`` share of the images."""
    pairs = []
    for _ in range(design.groups):
        if design.kind == "binary":
            u = rng.random(design.n)
            d = np.where(u < design.discordant / 2 + delta / 2, 1.0, np.where(u < design.discordant, -1.0, 0.0))
            pairs.append((np.zeros(design.n), d))
            continue
        offset = rng.normal(0, 1) if design.groups > 1 else 0.0
        shared = rng.normal(0, 3, design.n)
        pairs.append((shared + _noise(design, rng, False), shared + _noise(design, rng, True) + delta + offset))
    return pairs


def _arms(design: Design, k: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """``k`` models with one truth (no effect between any two), per group: for each arm the
    shared unit values plus its own noise and, with several groups, its own offset; binary: the
    0/1 outcomes of ``k`` models that each flip a ``discordant / 2`` share of one base outcome."""
    out = [[] for _ in range(k)]
    for _ in range(design.groups):
        if design.kind == "binary":
            base = rng.random(design.n) < 0.85
            for arm in out:
                arm.append((base ^ (rng.random(design.n) < design.discordant / 2)).astype(np.float64))
            continue
        shared = rng.normal(0, 3, design.n)
        for arm in out:
            offset = rng.normal(0, 1) if design.groups > 1 else 0.0
            arm.append(shared + _noise(design, rng, True) + offset)
    return out


def coverage(design: Design, draws: int = 2000, delta: float = 0.0, seed: int = 0) -> float:
    """Share of draws whose 95% interval of the paired mean difference covers ``delta``."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(draws):
        e = S.mean_difference(_draw(design, delta, rng), design.unit)
        hits += bool(e.finite and e.low <= delta <= e.high)
    return hits / draws


RULES: dict[str, Callable] = {}  # name -> one draw of a false claim, judged by the book's rule
CLAIMED = (C.REPRODUCED, C.SMALL)  # verdicts that assert the claimed effect (or equivalence) is shown


def _rule(name: str):
    def register(f):
        RULES[name] = f
        return f
    return register


@_rule("judge_change: no effect anywhere")
def _change_null(design, rng, margin):
    dense, control, level = _arms(design, 3, rng)
    diff = lambda x, y: S.mean_difference(list(zip(x, y)), design.unit)  # noqa: E731
    return C.judge_change(diff(dense, level), diff(dense, control), diff(control, level), "+", margin)[0]


@_rule("judge_direction: no effect")
def _direction_null(design, rng, margin):
    return C.judge_direction(S.mean_difference(_draw(design, 0.0, rng), design.unit), "+", margin)[0]


@_rule("judge_no_change: a change at the margin")
def _no_change_at_margin(design, rng, margin):
    """One comparison whose true change is the margin itself: "no change" would be false. (A family
    only adds comparisons that must all be shown equivalent, so one is the rule's worst case.)"""
    return C.judge_no_change([S.mean_difference(_draw(design, margin, rng), design.unit)], margin)[0]


@_rule("judge_direction_family: no effect in 3 comparisons")
def _family_null(design, rng, margin):
    fam = [S.mean_difference(_draw(design, 0.0, rng), design.unit) for _ in range(3)]
    return C.judge_direction_family(fam, "+", margin)[0]


@_rule("judge_chance: ablated accuracy at the margin from chance")
def _chance_at_margin(design, rng, margin):
    at = S.mean_difference(_draw(design, margin, rng), design.unit)
    clearly_above = S.Estimate(1.0, 0.9, 1.1, design.unit, design.n, "fixed")  # random sets keep accuracy
    return C.judge_chance(at, clearly_above, margin)[0]


@_rule("judge_matched: the level a margin beyond the matched model")
def _matched_at_margin(design, rng, margin):
    """The level goes exactly the margin beyond the dense model of its accuracy: "follows accuracy" (which
    turns a reproduced change into "explained by accuracy") would be false. Returns whether it was said."""
    return C.judge_matched(S.mean_difference(_draw(design, margin, rng), design.unit), "+", margin) == C.FOLLOWS_ACCURACY


def rule_rates(design: Design, draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """Each rule's share of "reproduced" or "shown but small" on a false claim (see :data:`RULES`; a rule whose
    false claim is another reading returns whether it made it). The margin is half the per-unit noise sd
    (0.005 on the 0/1 scale of top-1, the preset's ``top1`` margin), where a verdict can go either way."""
    rng = np.random.default_rng(seed)
    margin = 0.005 if design.kind == "binary" else 0.5

    def false_claim(out) -> bool:
        return out if isinstance(out, bool) else out in CLAIMED

    return {name: sum(false_claim(f(design, rng, margin)) for _ in range(draws)) / draws
            for name, f in RULES.items()}


def pipeline_noise(n: int = 10, replicates: int = 1, noise: float = 1.0, draws: int = 1000, seed: int = 0) -> float:
    """Share of "reproduced" from ``judge_change`` when sparsity does nothing but each fine-tuned
    model (level and control) carries its own run-to-run offset of sd ``noise`` (in units of the
    class noise), ``replicates`` runs per condition, the replicates the units when more than one."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(draws):
        dense, ctl, lvl = [], [], []
        for _ in range(replicates):
            shared = rng.normal(0, 3, n)
            dense.append(shared + rng.normal(0, 1, n))
            ctl.append(shared + rng.normal(0, noise) + rng.normal(0, 1, n))
            lvl.append(shared + rng.normal(0, noise) + rng.normal(0, 1, n))
        est = lambda x, y: S.mean_difference(list(zip(x, y)), "classes", groups="replicates")  # noqa: E731
        hits += C.judge_change(est(dense, lvl), est(dense, ctl), est(ctl, lvl), "+", 0.5)[0] == C.REPRODUCED
    return hits / draws


def mc_error(p: float, draws: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / draws)


def table(cfg, draws: int = 2000, seed: int = 0) -> list[dict]:
    """Coverage and every rule's false-"reproduced" rate for each design of ``cfg``."""
    rows = []
    for d in designs(cfg):
        cov = coverage(d, draws, seed=seed)
        groups = "training seeds" if cfg.seeds else "replicates"
        row = {"design": d.name, "unit": d.unit if d.groups == 1 else f"{d.groups} {groups}",
               "coverage": cov, "coverage_mc": mc_error(cov, draws)}
        for name, rate in rule_rates(d, draws // 2, seed).items():
            row[name] = rate
        rows.append(row)
    return rows


def main(argv: Optional[list] = None) -> None:
    import argparse

    import pandas as pd

    from .config import load_config

    p = argparse.ArgumentParser(prog="python -m impact_core error-rates", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--draws", type=int, default=2000)
    a = p.parse_args(argv)
    rows = table(load_config(a.preset), a.draws)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    print(f"\nMonte Carlo error of a rate near 5% from {a.draws // 2} draws: +-{mc_error(0.05, a.draws // 2):.3f}")
    for r in (1, 3, 5):
        print(f"pipeline noise as large as the class noise, {r} replicate(s): judge_change says 'reproduced' "
              f"of no effect in {pipeline_noise(replicates=r):.1%} of draws")
