import numpy as np
import pandas as pd
import torch

from impact_core import claims


def test_direction_and_no_change_rules():
    assert claims.direction_verdict(0.1, 0.3, "+") == claims.REPRODUCED
    assert claims.direction_verdict(-0.3, -0.1, "+") == claims.NOT_REPRODUCED
    assert claims.direction_verdict(-0.1, 0.2, "+") == claims.INCONCLUSIVE
    assert claims.direction_verdict(-0.3, -0.1, "-") == claims.REPRODUCED
    assert claims.no_change_verdict([(-1, 1), (-0.5, 0.2)])[0] == claims.REPRODUCED
    assert claims.no_change_verdict([(0.1, 1), (0.2, 0.4), (-1, 1)])[0] == claims.NOT_REPRODUCED
    assert claims.no_change_verdict([(0.1, 1), (-1, 1), (-1, 1)])[0] == claims.INCONCLUSIVE


def test_bootstrap_interval_covers_a_known_mean():
    x = np.random.default_rng(0).normal(2.0, 1.0, 400)
    lo, hi = claims.bootstrap_ci(x)
    assert lo < 2.0 < hi and hi - lo < 0.5
    ratio, lo, hi = claims.ratio_of_means(np.full(50, 3.0) + x[:50] * 0.01, np.full(50, 1.0))
    assert lo < ratio < hi and abs(ratio - 3.0) < 0.05


def circuits(node, size, ncq, ablated):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {"node_fraction": t(node), "size_dense": t(size), "ncq": t(ncq), "acc_ablated": t(ablated),
            "acc_circuit": t([0.9] * len(node))}


def test_circuit_claims_follow_the_numbers():
    rng = np.random.default_rng(0)
    n = 20
    dense = circuits(0.29 + 0.01 * rng.standard_normal(n), 0.32 + 0.01 * rng.standard_normal(n),
                     0.60 + 0.01 * rng.standard_normal(n), [0.5] * n)
    sparse = circuits(0.42 + 0.01 * rng.standard_normal(n), 0.13 + 0.01 * rng.standard_normal(n),
                      0.78 + 0.01 * rng.standard_normal(n), [0.52] * n)
    out = {c.claim.split(" from")[0]: c for c in claims.circuit_claims({0.0: dense, 0.7: sparse})}
    assert out["circuit edges fall"].verdict == claims.REPRODUCED
    assert out["node fraction rises"].verdict == claims.REPRODUCED
    edge_form = [c for c in claims.circuit_claims({0.0: dense, 0.7: sparse}) if "tables print" in c.claim][0]
    assert edge_form.verdict == claims.REPRODUCED  # 0.9 x (1 - size) rises as the edge size falls
    reverse = {c.claim.split(" from")[0]: c for c in claims.circuit_claims({0.0: sparse, 0.7: dense})}
    assert reverse["circuit edges fall"].verdict == claims.NOT_REPRODUCED
    assert reverse["node fraction rises"].verdict == claims.NOT_REPRODUCED


def test_neuron_and_sae_claims():
    table = pd.DataFrame({"metric": ["selectivity"] * 3 + ["label_entropy"] * 3,
                          "ci_low": [-0.1, -0.2, -0.1, 0.1, 0.2, 0.05], "ci_high": [0.1, 0.1, 0.2, 0.3, 0.4, 0.2]})
    out = {c.claim.split(" shows")[0]: c.verdict for c in claims.neuron_claims(table)}
    assert out == {"selectivity": claims.REPRODUCED, "label entropy": claims.NOT_REPRODUCED}
    q = {0.0: {"NMSE": 0.01, "dead": 9}, 0.3: {"NMSE": 0.02, "dead": 7}, 0.7: {"NMSE": 0.05, "dead": 3}}
    assert [c.verdict for c in claims.sae_claims(q)] == [claims.REPRODUCED, claims.REPRODUCED]


def test_seed_combination():
    a = [claims.Claim("x", "c", "p", "1", "-", claims.REPRODUCED, "r")]
    b = [claims.Claim("x", "c", "p", "2", "-", claims.INCONCLUSIVE, "r")]
    row = claims.combine_seeds([a, b])[0]
    assert row["verdict"] == claims.INCONCLUSIVE and row["seeds"] == "1/2 reproduced"
    assert claims.combine_seeds([a, a])[0]["verdict"] == claims.REPRODUCED


def test_pruning_claims_with_an_untrained_model():
    acc = {("wanda", 0.0): {"top1": 0.0}, ("wanda", 0.7): {"top1": 0.0}}
    rows = claims.pruning_claims(acc)
    assert rows[0].verdict == claims.INCONCLUSIVE  # a random model: no retained fraction, no crash
    acc = {("wanda", 0.0): {"top1": 0.8}, ("wanda", 0.7): {"top1": 0.79}}
    assert claims.pruning_claims(acc)[0].verdict == claims.REPRODUCED
