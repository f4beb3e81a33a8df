"""The judging layer: every verdict rule on synthetic inputs that must produce each outcome."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from impact_core import claims
from impact_core.levels.circuit import circuit_claims
from impact_core.levels.layer import layer_claims
from impact_core.levels.pruning import pruning_claims
from impact_core import stats as S
from impact_core.config import DEFAULT_MARGINS, load_config

RNG = np.random.default_rng(0)
J = claims.Judge(margins=dict(DEFAULT_MARGINS), n_resamples=500)


def est(value, low, high, n=30, unit="classes"):
    dist = np.random.default_rng(1).uniform(low, high, 1000)
    return S.Estimate(value, low, high, unit, n, "test", dist)


# --- stats -----------------------------------------------------------------------------------
def test_bootstrap_uses_bca_and_names_the_unit():
    a = RNG.normal(0, 1, 40)
    e = S.mean_difference([(a, a + 0.5 + RNG.normal(0, 0.1, 40))], "classes")
    assert e.method == "BCa" and e.unit == "classes" and e.n == 40 and e.low < 0.5 < e.high
    small = S.mean_difference([(a[:5], a[:5] + RNG.normal(0.5, 0.1, 5))], "SAE seeds")
    assert small.method == "percentile" and small.low > 0


def test_hierarchical_bootstrap_is_wider_when_seeds_disagree():
    a = RNG.normal(0, 1, 60)
    agree = S.mean_difference([(a[:30], a[:30] + 0.5), (a[30:], a[30:] + 0.5)], "classes", n_resamples=500)
    disagree = S.mean_difference([(a[:30], a[:30] + 0.1), (a[30:], a[30:] + 0.9)], "classes", n_resamples=500)
    assert agree.unit.startswith("2 training seeds") and agree.method == "hierarchical percentile"
    assert disagree.half_width > 3 * agree.half_width


def test_side_and_samples_needed():
    assert S.side(est(0.3, 0.1, 0.5), 0.05) == S.UP
    assert S.side(est(-0.3, -0.5, -0.1), 0.05) == S.DOWN
    assert S.side(est(0.001, -0.01, 0.012), 0.05) == S.EQUIVALENT
    wide = est(0.02, -0.2, 0.24, n=10)
    assert S.side(wide, 0.05) == S.UNDECIDED
    assert S.samples_needed(wide, 0.05) > 10
    # equivalence needs the interval inside the margin; a family needs more units than one comparison
    near = est(0.01, -0.08, 0.1, n=10)
    assert S.samples_needed(near, 0.05, "equivalence", family=12) > S.samples_needed(near, 0.05, "equivalence") > 10
    assert S.samples_needed(est(0.3, 0.2, 0.4), 0.05) is None  # already decided: nothing to ask for


def test_holm_is_step_down():
    assert S.holm([0.01, 0.04, 0.03]).tolist() == [True, False, False]
    assert S.holm([0.01, 0.02, 0.024]).tolist() == [True, True, True]
    assert S.holm([float("nan"), 0.001]).tolist() == [False, True]


def test_trend_slope():
    a = RNG.normal(0, 1, 30)
    t = S.trend([0.0, 0.5, 1.0], [[a], [a + 0.5], [a + 1.0]], "classes")
    assert t.value == pytest.approx(1.0)
    flat = S.trend([0.0, 0.5, 1.0], [[a], [a + RNG.normal(0, 0.01, 30)], [a]], "classes")
    assert claims.trend_reading(flat, "+", 0.05, 1.0) == "flat"
    assert claims.trend_reading(t, "+", 0.05, 1.0) == "grows with sparsity"
    assert claims.trend_reading(t, "-", 0.05, 1.0) == "reverses with sparsity"


# --- rules -------------------------------------------------------------------------------------
def test_judge_change_every_outcome():
    up, zero, down = est(0.3, 0.2, 0.4), est(0.0, -0.01, 0.01), est(-0.3, -0.4, -0.2)
    wide = est(0.1, -0.2, 0.4)
    m = 0.05
    # an effect at the level, absent from the control: reproduced
    assert claims.judge_change(up, zero, up, "+", m)[0] == claims.REPRODUCED
    # the same effect in the control: explained by the pipeline
    assert claims.judge_change(up, up, zero, "+", m)[0] == claims.PIPELINE
    # no effect anywhere: not reproduced (equivalent)
    assert claims.judge_change(zero, zero, zero, "+", m)[0] == claims.NOT_REPRODUCED
    # the other way: not reproduced
    assert claims.judge_change(down, zero, down, "+", m)[0] == claims.NOT_REPRODUCED
    # too little data: inconclusive, saying how much would decide
    verdict, why = claims.judge_change(wide, wide, wide, "+", m)
    assert verdict == claims.INCONCLUSIVE and "would decide" in why
    # no change beyond the control, though not shown against dense: not reproduced
    assert claims.judge_change(wide, wide, zero, "+", m)[0] == claims.NOT_REPRODUCED
    # the level differs from dense but not from the control: explained by the pipeline
    assert claims.judge_change(up, wide, wide, "+", m)[0] == claims.PIPELINE
    # without a control: the direction rule
    assert claims.judge_change(up, None, None, "+", m)[0] == claims.REPRODUCED
    assert claims.judge_change(down, None, None, "-", m)[0] == claims.REPRODUCED


def test_judge_pruning_only():
    down, zero = est(-0.1, -0.15, -0.05), est(0.0, -0.004, 0.004)
    assert claims.judge_pruning_only(claims.REPRODUCED, down, "-", 0.01)[0] == claims.REPRODUCED
    assert claims.judge_pruning_only(claims.REPRODUCED, zero, "-", 0.01)[0] == claims.PRUNING
    assert claims.judge_pruning_only(claims.INCONCLUSIVE, zero, "-", 0.01)[0] == claims.INCONCLUSIVE


def test_judge_no_change_every_outcome():
    tight = [est(0.0, -0.005, 0.005, n=50) for _ in range(6)]
    assert claims.judge_no_change(tight, 0.02)[0] == claims.REPRODUCED
    changed = tight[:5] + [est(0.2, 0.15, 0.25, n=50)]
    assert claims.judge_no_change(changed, 0.02)[0] == claims.NOT_REPRODUCED
    wide = tight[:5] + [est(0.01, -0.1, 0.12, n=50)]
    verdict, info = claims.judge_no_change(wide, 0.02)
    assert verdict == claims.INCONCLUSIVE and info["equivalent"] == 5 and info["changed"] == 0


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
