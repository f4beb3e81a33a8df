"""Can each metric see anything? The metric-sensitivity rule (trained dense against its own random
initialisation) and the "metric blind" verdict, on synthetic inputs that give every outcome."""
from __future__ import annotations

import re

import numpy as np

from impact_core import claims
from impact_core import stats as S
from impact_core.config import DEFAULT_MARGINS

J = claims.Judge(margins=dict(DEFAULT_MARGINS))
MARGIN = 0.1


def est(value, low, high, n=10):
    return S.Estimate(value, low, high, "classes", n, "test")


def test_judge_sensitivity_every_outcome():
    sees, blind, open_ = est(0.5, 0.3, 0.7), est(0.0, -0.02, 0.03), est(0.05, -0.2, 0.3)
    assert claims.judge_sensitivity([sees], MARGIN) == claims.SEES
    assert claims.judge_sensitivity([blind], MARGIN) == claims.BLIND
    assert claims.judge_sensitivity([open_], MARGIN) == "undecided"
    assert claims.judge_sensitivity([blind, blind, sees], MARGIN) == claims.SEES  # any block that sees
    assert claims.judge_sensitivity([blind, open_], MARGIN) == "undecided"         # every block blind, or undecided
    assert claims.judge_sensitivity([], MARGIN) == "undecided"


def _no_change(dense_minus_random: float, rng_seed: int = 0):
    """A no-change claim (level = control up to noise far inside the margin) with a sensitivity check
    whose trained-minus-random difference is ``dense_minus_random`` per class."""
    rng = np.random.default_rng(rng_seed)
    base = rng.normal(0.5, 0.05, 40)
    level = base + rng.normal(0, 0.001, 40)
    random = base - dense_minus_random + rng.normal(0, 0.001, 40)
    margin = J.margins["selectivity"]
    c = claims.no_change_claim(J, id="neuron.selectivity", level="neuron", claim="no change", paper="-",
                               metric="selectivity", comparisons={(11, 0.7): ([base], [level])}, unit="classes",
                               sensitivity={11: ([random], [base])})
    return c, margin


def test_no_change_on_a_blind_metric_reads_metric_blind():
    margin = DEFAULT_MARGINS["selectivity"]
    blind, _ = _no_change(0.0)
    assert blind.verdict == claims.METRIC_BLIND and blind.sensitivity.startswith("blind")
    sees, _ = _no_change(5 * margin)
    assert sees.verdict == claims.REPRODUCED and sees.sensitivity.startswith("sees")
    plain = claims.no_change_claim(J, id="x", level="neuron", claim="-", paper="-", metric="selectivity",
                                   comparisons={(11, 0.7): ([np.zeros(5)], [np.zeros(5)])}, unit="classes")
    assert plain.sensitivity == ""  # no check asked for: the verdict is the equivalence test's alone


def test_a_change_is_never_relabelled_blind():
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.01, 40)
    margin = DEFAULT_MARGINS["selectivity"]
    c = claims.no_change_claim(J, id="x", level="neuron", claim="-", paper="-", metric="selectivity",
                               comparisons={(11, 0.7): ([base], [base + 10 * margin])}, unit="classes",
                               sensitivity={11: ([base], [base])})
    assert c.verdict == claims.NOT_REPRODUCED and c.sensitivity.startswith("blind")


def test_blind_is_rare_when_the_metric_moves_by_the_margin():
    """The error rate of "blind": with trained minus random exactly at the margin (a metric that does see a
    change of the margin's size), "blind" is read in at most 5% of draws (10 classes, the default's units)."""
    rng = np.random.default_rng(2)
    margin, hits = 0.1, 0
    for _ in range(2000):
        d = rng.normal(margin, 0.1, 10)
        hits += claims.judge_sensitivity([S.mean([d], "classes")], margin) == claims.BLIND
    assert hits / 2000 <= 0.05


def test_the_neuron_level_judges_sensitivity_on_the_random_weights_model(tiny_fmnist, tmp_path):
    """End to end on tiny data: the neuron level gathers the random-weights model's metrics beside dense,
    the levels and the control, and every neuron claim carries its sensitivity reading."""
    from impact_core import levels, pipeline
    from impact_core.levels import neuron
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      neuron={"sparsities": [0.5], "blocks": [11], "top_k": 2, "images": 20, "validation_units": 0})
    cfg.cache_dir = str(tmp_path / "cache")
    runs = neuron.gather(cfg)
    assert runs["random_weights"]["blocks"] == [11]
    assert not np.array_equal(runs["random_weights"]["selectivity"], runs["by_sparsity"][0.0]["selectivity"])
    out = levels.level_claims(cfg, "neuron")
    assert len(out) == 4
    for c in out:
        assert c.sensitivity.split(":")[0] in (claims.SEES, claims.BLIND, "undecided"), c.sensitivity
        assert c.verdict != claims.METRIC_BLIND or c.sensitivity.startswith(claims.BLIND)
    assert pipeline.model_label(0.0, pipeline.RANDOM_WEIGHTS) in {p.label.split(", ")[-1] for p in neuron.pieces(cfg)}


def test_a_change_claim_with_no_change_on_a_blind_metric_reads_metric_blind():
    rng = np.random.default_rng(3)
    base = rng.normal(0.5, 0.05, 60)
    m = DEFAULT_MARGINS["insertion"]
    kw = dict(id="model.insertion", level="model", claim="-", paper="-", metric="insertion", expected="+",
              dense=[base], at_level=[base + rng.normal(0, 1e-4, 60)], control=[base + rng.normal(0, 1e-4, 60)],
              unit="images")
    blind = claims.change_claim(J, **kw, random_weights=[base + rng.normal(0, 1e-4, 60)])
    assert blind.verdict == claims.METRIC_BLIND and blind.sensitivity.startswith(claims.BLIND)
    sees = claims.change_claim(J, **kw, random_weights=[base - 5 * m])
    assert sees.verdict == claims.NOT_REPRODUCED and sees.sensitivity.startswith(claims.SEES)
    up = dict(kw, at_level=[base + 5 * m])  # a change shown: never relabelled, whatever the check reads
    assert claims.change_claim(J, **up, random_weights=[base]).verdict == claims.REPRODUCED


def test_the_model_level_judges_sensitivity_on_the_random_weights_model(tiny_fmnist, tmp_path):
    """End to end on tiny data: the random-weights model's Chefer maps against random order (claims' methods
    only) give every model-level claim its sensitivity reading."""
    from impact_core import levels, pipeline
    from impact_core.levels import model
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      attribution={"sparsities": [0.3], "images": 6, "steps": 2, "batch_size": 2, "figure_classes": 1,
                                   "figure_per_class": 1, "references": ["black"]})
    cfg.cache_dir = str(tmp_path / "cache")
    rw = model.attribution_results(cfg, 0.0, pipeline.RANDOM_WEIGHTS)
    assert set(rw["scores"]["black"]) == set(model.CLAIM_METHODS) and rw["level"] == "random weights"
    out = levels.level_claims(cfg, "model")
    assert out and all(c.sensitivity.split(":")[0] in (claims.SEES, claims.BLIND, "undecided") for c in out)


def test_the_layer_level_judges_sensitivity_on_the_random_weights_models_saes(tiny_fmnist, tmp_path):
    """End to end on tiny data: SAEs of the random-weights model beside the others; the SAE quality and
    latent claims carry their sensitivity reading."""
    from impact_core import levels
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      sae={"sparsities": [0.5], "steps": 20, "batch_size": 16, "train_images": 40, "eval_images": 20,
                           "seeds": 2, "expansion": 2, "k": 4, "top_k": 2})
    cfg.cache_dir = str(tmp_path / "cache")
    out = levels.level_claims(cfg, "layer")
    assert {c.id for c in out} >= {"layer.nmse", "layer.dead", "layer.selectivity"}
    assert all(c.sensitivity.split(":")[0] in (claims.SEES, claims.BLIND, "undecided") for c in out), \
        [c.sensitivity for c in out]


def test_circuit_claims_carry_the_check_and_turn_blind_only_on_no_change():
    import torch

    from impact_core.levels.circuit import circuit_claims

    rng = np.random.default_rng(4)

    def result(node, size, n=30):
        noise = lambda: torch.tensor(rng.normal(0, 0.002, n))  # noqa: E731
        return {"node_fraction": node + noise(), "size_dense": size + noise(), "size_remaining": size + noise(),
                "ncq": 0.9 * (1 - node) + noise(), "acc_circuit": torch.full((n,), 0.9, dtype=torch.float64),
                "acc_ablated": 0.5 + noise(), "acc_random_ablated": 0.8 + noise()[:, None].repeat(1, 3)}

    dense = result(0.3, 0.3)
    run = {"by_sparsity": {0.0: dense, 0.7: result(0.3, 0.3)}, "control": result(0.3, 0.3), "equal_k": None,
           "pruning_only": None, "random_weights": result(0.3, 0.3)}
    out = {c.id: c for c in circuit_claims([run], J)}
    assert out["circuit.nodes"].verdict == claims.METRIC_BLIND  # no change, on a metric blind to training
    assert out["circuit.ablation_dense"].sensitivity == ""     # undefined at chance: no check
    seeing = dict(run, random_weights=result(0.9, 0.9))
    out = {c.id: c for c in circuit_claims([seeing], J)}
    assert out["circuit.nodes"].verdict == claims.NOT_REPRODUCED and out["circuit.nodes"].sensitivity.startswith("sees")
    # in the claim's own scale, as its effect: node fraction in points (0.3 - 0.9 of the nodes: -60 points)
    assert re.search(r"largest -60\.\d\d \[", out["circuit.nodes"].sensitivity), out["circuit.nodes"].sensitivity


def test_the_circuit_level_trains_circuits_on_the_random_weights_model(tiny_fmnist, tmp_path):
    from impact_core import levels, pipeline
    from impact_core.levels import circuit
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      circuit={"sparsities": [0.5], "classes": [0, 1], "epochs": 1, "step_size": 1, "lr": 0.1,
                               "batch_size": 2, "train_images_per_class": 2, "eval_images_per_class": 2,
                               "k_sweep": [0.00008]})
    cfg.cache_dir = str(tmp_path / "cache")
    rw = circuit.circuit_results(cfg, 0.0, method=pipeline.RANDOM_WEIGHTS)
    assert rw["node_fraction"].shape == (2,)
    out = {c.id: c for c in levels.level_claims(cfg, "circuit")}
    assert out["circuit.nodes"].sensitivity.split(":")[0] in (claims.SEES, claims.BLIND, "undecided")


def test_the_discussion_groups_claims_by_what_their_metric_can_see():
    from impact_core import discussion

    def claim(verdict, sensitivity, rule="level minus control per (block, level), paired; judge_no_change"):
        return claims.Claim(id="x", level="neuron", claim=f"{verdict} / {sensitivity}", paper="-", ours="-",
                            effect="-", control="-", margin="-", verdict=verdict, rule=rule, sensitivity=sensitivity)

    out = discussion.sensitivity_groups([claim(claims.REPRODUCED, "sees: ..."), claim(claims.METRIC_BLIND, "blind: ..."),
                                         claim(claims.INCONCLUSIVE, "undecided: ..."), claim(claims.REPRODUCED, "")])
    assert out["sees"] == out["informative_nulls"] == ["reproduced / sees: ..."]
    assert out["blind"] == ["metric blind / blind: ..."] and out["undecided"] == ["inconclusive / undecided: ..."]
    values = discussion.glue_values([claim(claims.METRIC_BLIND, "blind: ...")], [0])
    assert values["n_metric_blind"] == 1 and values["sens_blind"] == "metric blind / blind: ..."
