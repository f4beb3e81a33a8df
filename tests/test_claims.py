"""The judging layer: every verdict rule on synthetic inputs that must produce each outcome."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from impact_core import claims
from impact_core.levels.circuit import circuit_claims
from impact_core.levels.layer import layer_claims
from impact_core.levels.pruning import pruning_claims
from impact_core import stats as S
from impact_core.config import DEFAULT_MARGINS, load_config

RNG = np.random.default_rng(0)
J = claims.Judge(margins=dict(DEFAULT_MARGINS))


def est(value, low, high, n=30, unit="classes"):
    return S.Estimate(value, low, high, unit, n, "test")


# --- stats -----------------------------------------------------------------------------------
def test_t_interval_is_scipys_and_names_the_unit():
    a = RNG.normal(0, 1, 40)
    b = a + 0.5 + RNG.normal(0, 0.1, 40)
    e = S.mean_difference([(a, b)], "classes")
    ci = sps.ttest_1samp(b - a, 0).confidence_interval(0.95)
    assert e.method == "t" and e.unit == "classes" and e.n == 40 and e.df == 39
    assert (e.low, e.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    # p-values read the same interval: p < 0.05 exactly when the interval excludes 0 / lies inside the margin
    assert S.p_side(e, "+") == pytest.approx(sps.ttest_1samp(b - a, 0, alternative="greater").pvalue * 2)
    edge = S.Estimate(0.0, -0.02, 0.02, "classes", 10, "t", df=9)
    assert S.p_equivalent(edge, 0.02) == pytest.approx(0.05) and S.p_equivalent(edge, 0.0201) < 0.05
    assert S.p_beyond(S.Estimate(0.05, 0.02, 0.08, "classes", 10, "t", df=9), 0.02) == pytest.approx(0.05)


def test_several_groups_are_the_units_with_classes_nested():
    a = RNG.normal(0, 1, 60)
    agree = S.mean_difference([(a[:30], a[:30] + 0.5), (a[30:], a[30:] + 0.5 + 1e-3)], "classes")
    disagree = S.mean_difference([(a[:30], a[:30] + 0.1), (a[30:], a[30:] + 0.9)], "classes", groups="replicates")
    assert agree.unit == "2 training seeds (classes nested)" and agree.df == 1 and agree.n == 2
    assert disagree.unit.startswith("2 replicates") and disagree.half_width > 3 * agree.half_width
    # the groups' own means are the units: a t interval over them
    ci = sps.ttest_1samp([0.1, 0.9], 0).confidence_interval(0.95)
    assert (disagree.low, disagree.high) == pytest.approx((ci.low, ci.high))


def test_ratio_by_the_delta_method_and_the_trend_by_unit_slopes():
    b = RNG.uniform(1, 2, 400)
    a = 2.5 * b + RNG.normal(0, 0.05, 400)
    r = S.ratio_of_means([(a, b)], "images")
    assert r.value == pytest.approx(np.mean(a) / np.mean(b)) and r.low < 2.5 < r.high and r.half_width < 0.01
    x = RNG.normal(0, 1, 30)
    t = S.trend([0.0, 0.5, 1.0], [[x], [x + 0.5], [x + 1.0 + RNG.normal(0, 0.01, 30)]], "classes")
    assert t.value == pytest.approx(1.0, abs=0.01) and t.low < 1.0 < t.high and t.df == 29


def test_side_and_samples_needed():
    assert S.side(est(0.3, 0.1, 0.5), 0.05) == S.UP
    assert S.side(est(-0.3, -0.5, -0.1), 0.05) == S.DOWN
    assert S.side(est(0.001, -0.01, 0.012), 0.05) == S.EQUIVALENT
    assert S.side(est(0.02, 0.01, 0.03), 0.05) == S.SMALL_UP
    assert S.side(est(-0.02, -0.03, -0.01), 0.05) == S.SMALL_DOWN
    wide = est(0.02, -0.2, 0.24, n=10)
    assert S.side(wide, 0.05) == S.UNDECIDED
    assert S.samples_needed(wide, 0.05) > 10
    # equivalence needs the interval inside the margin; a family needs more units than one comparison
    near = est(0.01, -0.08, 0.1, n=10)
    assert S.samples_needed(near, 0.05, "equivalence", family=12) > S.samples_needed(near, 0.05, "equivalence") > 10
    assert S.samples_needed(est(0.3, 0.2, 0.4), 0.05) is None  # already decided: nothing to ask for
    # t quantiles, not 1/sqrt(n): from 3 groups (df 2), halving the interval needs 5 or 6 groups, not 12
    three = S.Estimate(0.05, -0.05, 0.15, "3 replicates", 3, "t", df=2)
    n, s = S.units_needed(three, three.half_width / 2), three.se * np.sqrt(3)
    half = lambda k: sps.t.ppf(0.975, k - 1) * s / np.sqrt(k)  # noqa: E731
    assert half(n) < three.half_width / 2 <= half(n - 1) and n < 12


def test_holm_is_step_down():
    assert S.holm([0.01, 0.04, 0.03]).tolist() == [True, False, False]
    assert S.holm([0.01, 0.02, 0.024]).tolist() == [True, True, True]
    assert S.holm([float("nan"), 0.001]).tolist() == [False, True]


def test_trend_slope_every_reading():
    a = RNG.normal(0, 1, 30)
    t = S.trend([0.0, 0.5, 1.0], [[a], [a + 0.5], [a + 1.0]], "classes")
    assert t.value == pytest.approx(1.0)
    flat = S.trend([0.0, 0.5, 1.0], [[a], [a + RNG.normal(0, 0.01, 30)], [a]], "classes")
    assert claims.trend_reading(flat, "+", 0.05, 1.0) == "flat"
    assert claims.trend_reading(t, "+", 0.05, 1.0) == "grows with sparsity"
    assert claims.trend_reading(t, "-", 0.05, 1.0) == "reverses with sparsity"
    noisy = S.trend([0.0, 1.0], [[a], [a + RNG.normal(0, 1, 30)]], "classes")
    assert claims.trend_reading(noisy, "+", 0.05, 1.0) == "undecided"
    # several training seeds: the seeds' slopes are the units
    seeds = S.trend([0.0, 1.0], [[a[:15], a[15:]], [a[:15] + 0.9, a[15:] + 1.1]], "classes")
    assert seeds.n == 2 and seeds.value == pytest.approx(1.0) and claims.trend_reading(seeds, "+", 0.05, 1.0) == "undecided"


# --- rules -------------------------------------------------------------------------------------
def test_judge_change_every_outcome():
    up, zero, down = est(0.3, 0.2, 0.4), est(0.0, -0.01, 0.01), est(-0.3, -0.4, -0.2)
    wide = est(0.1, -0.2, 0.4)
    m = 0.05
    # an effect at the level, absent from the control: reproduced
    assert claims.judge_change(up, zero, up, "+", m)[0] == claims.REPRODUCED
    # the same effect in the control, and the level shown equivalent to it: explained by the pipeline
    assert claims.judge_change(up, up, zero, "+", m)[0] == claims.PIPELINE
    # no effect anywhere: not reproduced (equivalent)
    assert claims.judge_change(zero, zero, zero, "+", m)[0] == claims.NOT_REPRODUCED
    # the other way: not reproduced
    assert claims.judge_change(down, zero, down, "+", m)[0] == claims.NOT_REPRODUCED
    # the other way beyond the control (the control rose further than the level): not reproduced
    verdict, why = claims.judge_change(up, est(0.6, 0.5, 0.7), down, "+", m)
    assert verdict == claims.NOT_REPRODUCED and "other way" in why
    # too little data: inconclusive, saying how much would decide
    verdict, why = claims.judge_change(wide, wide, wide, "+", m)
    assert verdict == claims.INCONCLUSIVE and "it would take about" in why and "replicates" in why
    # equivalent to the control, the control's own effect undecided: not reproduced (no change beyond it)
    assert claims.judge_change(wide, wide, zero, "+", m)[0] == claims.NOT_REPRODUCED
    # the level differs from dense, the level-vs-control comparison undecided: inconclusive, never "pipeline"
    assert claims.judge_change(up, wide, wide, "+", m)[0] == claims.INCONCLUSIVE
    # the case: control shown equivalent to dense, beyond the control undecided -> inconclusive
    verdict, _ = claims.judge_change(est(0.05, 0.001, 0.1), est(0, -0.019, 0.019), est(0.05, -0.015, 0.11), "+", 0.02)
    assert verdict == claims.INCONCLUSIVE
    # level equal to dense while the control fell: not reproduced (no change from dense), never "reproduced"
    assert claims.judge_change(zero, est(-0.3, -0.4, -0.2), up, "+", m)[0] == claims.NOT_REPRODUCED
    # shown against dense and beyond the control, but both shown smaller than the margin: its own words
    small = est(0.02, 0.01, 0.03)
    assert claims.judge_change(small, zero, small, "+", m)[0] == claims.SMALL
    # without a control: the direction rule
    assert claims.judge_change(up, None, None, "+", m)[0] == claims.REPRODUCED
    assert claims.judge_change(down, None, None, "-", m)[0] == claims.REPRODUCED
    assert claims.judge_change(small, None, None, "+", m)[0] == claims.SMALL


def test_reproduced_never_turns_into_not_reproduced_as_the_interval_narrows():
    """[0.002, 0.021] with margin 0.02 and the more precise [0.002, 0.019]: reproduced, then
    shown but small (never "not reproduced"); narrowing further around any value never flips it."""
    m, zero = 0.02, est(0.0, -0.005, 0.005)
    assert claims.judge_change(est(0.0115, 0.002, 0.021), zero, est(0.0115, 0.002, 0.021), "+", m)[0] == claims.REPRODUCED
    assert claims.judge_change(est(0.0105, 0.002, 0.019), zero, est(0.0105, 0.002, 0.019), "+", m)[0] == claims.SMALL
    order = {claims.INCONCLUSIVE: 0, claims.REPRODUCED: 1, claims.SMALL: 2, claims.NOT_REPRODUCED: 2}
    for value in np.linspace(-0.03, 0.05, 33):
        seen = []
        for half in np.geomspace(0.1, 1e-4, 40):
            e = est(value, value - half, value + half)
            seen.append(claims.judge_change(e, zero, e, "+", m)[0])
        assert claims.NOT_REPRODUCED not in seen or claims.REPRODUCED not in seen[seen.index(claims.NOT_REPRODUCED):]
        assert not (claims.REPRODUCED in seen and claims.NOT_REPRODUCED in seen), (value, seen)
        assert all(order[x] <= order[y] or x == claims.SMALL for x, y in zip(seen, seen[1:])), (value, seen)


def test_judge_pruning_only():
    down, zero, wide = est(-0.1, -0.15, -0.05), est(0.0, -0.004, 0.004), est(0.0, -0.05, 0.05)
    assert claims.judge_pruning_only(claims.REPRODUCED, down, "-", 0.01)[0] == claims.REPRODUCED
    assert claims.judge_pruning_only(claims.REPRODUCED, zero, "-", 0.01)[0] == claims.PRUNING
    assert claims.judge_pruning_only(claims.REPRODUCED, est(0.1, 0.05, 0.15), "-", 0.01)[0] == claims.PRUNING
    # merely undecided against the counterfactual: inconclusive, never "explained by pruning alone"
    verdict, why = claims.judge_pruning_only(claims.REPRODUCED, wide, "-", 0.01)
    assert verdict == claims.INCONCLUSIVE and "undecided" in why
    assert claims.judge_pruning_only(claims.INCONCLUSIVE, zero, "-", 0.01)[0] == claims.INCONCLUSIVE


def test_judge_no_change_every_outcome():
    tight = [est(0.0, -0.005, 0.005, n=50) for _ in range(6)]
    assert claims.judge_no_change(tight, 0.02)[0] == claims.REPRODUCED
    changed = tight[:5] + [est(0.2, 0.15, 0.25, n=50)]
    assert claims.judge_no_change(changed, 0.02)[0] == claims.NOT_REPRODUCED
    wide = tight[:5] + [est(0.01, -0.1, 0.12, n=50)]
    verdict, info = claims.judge_no_change(wide, 0.02)
    assert verdict == claims.INCONCLUSIVE and info["equivalent"] == 5 and info["changed"] == 0
    # "every comparison equivalent" is an intersection-union test: no correction for the family size.
    # A comparison whose TOST p is 0.01 is equivalent alone and in a family of 12.
    one = S.Estimate(0.0, -0.0155, 0.0155, "classes", 10, "t", df=9)
    assert S.p_equivalent(one, 0.02) < 0.05
    assert claims.judge_no_change([one], 0.02)[0] == claims.judge_no_change([one] * 12, 0.02)[0] == claims.REPRODUCED
    # "any changed" is corrected: one comparison just beyond the margin alone, not in a family of 12
    beyond = S.Estimate(0.05, 0.021, 0.079, "classes", 10, "t", df=9)
    assert claims.judge_no_change([beyond], 0.02)[0] == claims.NOT_REPRODUCED
    assert claims.judge_no_change([beyond] + tight * 2, 0.02)[0] == claims.INCONCLUSIVE


def test_judge_direction_family_every_outcome():
    up, small, zero = est(0.3, 0.2, 0.4), est(0.02, 0.01, 0.03), est(0.0, -0.01, 0.01)
    assert claims.judge_direction_family([up] * 4, "+", 0.05)[0] == claims.REPRODUCED
    assert claims.judge_direction_family([up, small], "+", 0.05)[0] == claims.SMALL
    assert claims.judge_direction_family([up, zero], "+", 0.05)[0] == claims.NOT_REPRODUCED
    assert claims.judge_direction_family([up, est(-0.3, -0.4, -0.2)], "+", 0.05)[0] == claims.NOT_REPRODUCED
    assert claims.judge_direction_family([up, est(0.1, -0.2, 0.4)], "+", 0.05)[0] == claims.INCONCLUSIVE


def test_judge_threshold_and_magnitude():
    assert claims.judge_threshold(est(0.99, 0.98, 0.995), 0.96) == claims.REPRODUCED
    assert claims.judge_threshold(est(0.9, 0.88, 0.92), 0.96) == claims.NOT_REPRODUCED
    assert claims.judge_threshold(est(0.96, 0.95, 0.97), 0.96) == claims.INCONCLUSIVE
    assert claims.judge_magnitude(est(2.5, 2.3, 2.7), 2.5, 0.25) == "matches"
    assert claims.judge_magnitude(est(1.2, 1.1, 1.3), 2.5, 0.25) == "differs"
    assert claims.judge_magnitude(est(2.0, 1.5, 2.6), 2.5, 0.25) == "undecided"


def test_judge_chance_every_outcome():
    at_chance, away = est(0.0, -0.02, 0.02), est(0.3, 0.25, 0.35)
    random_higher, random_same = est(0.3, 0.2, 0.4), est(0.0, -0.01, 0.01)
    assert claims.judge_chance(at_chance, random_higher, 0.05)[0] == claims.REPRODUCED
    # a random node set of the same size does as well: not reproduced
    assert claims.judge_chance(at_chance, random_same, 0.05)[0] == claims.NOT_REPRODUCED
    assert claims.judge_chance(away, random_higher, 0.05)[0] == claims.NOT_REPRODUCED
    assert claims.judge_chance(at_chance, est(0.1, -0.2, 0.4), 0.05)[0] == claims.INCONCLUSIVE
    # without random node sets: the equivalence alone, or undecided
    assert claims.judge_chance(at_chance, None, 0.05)[0] == claims.REPRODUCED
    assert claims.judge_chance(est(0.04, -0.02, 0.1), None, 0.05)[0] == claims.INCONCLUSIVE
    # shown away from chance by less than the margin still counts as at chance (the claim is equivalence)
    assert claims.judge_chance(est(0.02, 0.01, 0.03), random_higher, 0.05)[0] == claims.REPRODUCED


# --- claims built from per-unit arrays -----------------------------------------------------
def circuit_result(node, size, n=30, acc=0.9, ablated=0.5, random_ablated=0.8):
    noise = lambda: torch.tensor(RNG.normal(0, 0.005, n))  # noqa: E731
    return {"node_fraction": node + noise(), "size_dense": size + noise(), "size_remaining": size + noise(),
            "ncq": (0.9 * (1 - node) + noise()), "acc_circuit": torch.full((n,), acc, dtype=torch.float64),
            "acc_ablated": ablated + noise(), "acc_random_ablated": random_ablated + noise()[:, None].repeat(1, 3)}


def test_circuit_claims_tell_sparsity_from_pipeline_and_pruning():
    dense, control = circuit_result(0.3, 0.3), circuit_result(0.3, 0.3)
    sparse = circuit_result(0.42, 0.12)
    run = {"by_sparsity": {0.0: dense, 0.7: sparse}, "control": control, "equal_k": None,
           "pruning_only": {"size_dense": torch.full((30,), 0.2, dtype=torch.float64)}}
    out = {c.id: c for c in circuit_claims([run], J)}
    assert out["circuit.nodes"].verdict == claims.REPRODUCED
    assert out["circuit.edges"].verdict == claims.REPRODUCED
    assert out["circuit.edges"].magnitude.startswith("matches")  # 0.3 / 0.12 = 2.5
    assert out["circuit.ablation_dense"].verdict == claims.REPRODUCED
    # the control shows the node rise too: explained by the pipeline
    run_pipe = dict(run, control=circuit_result(0.42, 0.3))
    assert {c.id: c for c in circuit_claims([run_pipe], J)}["circuit.nodes"].verdict == claims.PIPELINE
    # the dense circuits on the pruned weights fall as far: explained by pruning alone
    run_prune = dict(run, pruning_only={"size_dense": sparse["size_dense"].clone()})
    assert {c.id: c for c in circuit_claims([run_prune], J)}["circuit.edges"].verdict == claims.PRUNING
    # random node sets of the same size also return to chance: not reproduced
    run_rand = dict(run, by_sparsity={0.0: circuit_result(0.3, 0.3, random_ablated=0.5), 0.7: sparse})
    assert {c.id: c for c in circuit_claims([run_rand], J)}["circuit.ablation_dense"].verdict == claims.NOT_REPRODUCED


def test_layer_claims_judge_over_sae_seeds_not_one_sign():
    def rows(nmse):
        return [{"NMSE": v, "dead %": 10.0} for v in nmse]
    run = {"by_sparsity": {0.0: rows([0.0180, 0.0181, 0.0179]), 0.7: rows([0.0180, 0.0182, 0.0179])},
           "control": rows([0.0181, 0.0180, 0.0180])}
    out = {c.id: c for c in layer_claims([run], J)}
    assert out["layer.nmse"].verdict == claims.NOT_REPRODUCED  # a difference in the fifth decimal is no change
    run_up = {"by_sparsity": {0.0: rows([0.018, 0.0181, 0.0179]), 0.7: rows([0.030, 0.031, 0.029])},
              "control": rows([0.0181, 0.018, 0.018])}
    assert {c.id: c for c in layer_claims([run_up], J)}["layer.nmse"].verdict == claims.REPRODUCED


def test_pruning_claims_threshold_over_images():
    n = 2000
    dense = torch.tensor(RNG.random(n) < 0.9)
    keep = dense & torch.tensor(RNG.random(n) < 0.995)
    lose = dense & torch.tensor(RNG.random(n) < 0.8)
    acc = lambda c: {"correct": c, "top1": float(c.double().mean())}  # noqa: E731
    run = {"accuracy": {("wanda", 0.0): acc(dense), ("wanda", 0.7): acc(keep), ("magnitude", 0.0): acc(dense),
                        ("magnitude", 0.7): acc(lose)}, "control": acc(dense)}
    out = {c.id: c for c in pruning_claims([run], J)}
    assert out["pruning.retained"].verdict == claims.REPRODUCED
    assert out["pruning.wanda_vs_magnitude"].verdict == claims.REPRODUCED
    run["accuracy"][("wanda", 0.7)] = acc(lose)
    assert {c.id: c for c in pruning_claims([run], J)}["pruning.retained"].verdict == claims.NOT_REPRODUCED


def test_margins_come_from_the_preset():
    cfg = load_config("smoke", {"verdicts.margins": {"nmse": 0.5}})
    j = claims.Judge.from_config(cfg)
    assert j.margins["nmse"] == 0.5 and j.margins["selectivity"] == DEFAULT_MARGINS["selectivity"]
