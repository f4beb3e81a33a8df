"""Beyond the paper: Wanda 2:4 and weight sparsity trained in from scratch (Gao et al.)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from impact_core.methods import pruning
from impact_core.methods.sparse_training import (L0Projection, kept_weights, magnitude_mask,
                                                 magnitude_mask_reference, scheduled_sparsity)


def test_nm_mask_matches_its_reference_and_zeroes_two_of_every_four():
    g = torch.Generator().manual_seed(0)
    for shape in [(8, 16), (3, 32)]:
        score = torch.randn(*shape, generator=g)
        score[0, :4] = 1.0  # ties: the lower column goes first
        keep = pruning.nm_mask(score)
        assert torch.equal(keep, pruning.nm_mask_reference(score))
        assert (keep.reshape(shape[0], -1, 4).sum(-1) == 2).all()
    assert pruning.nm_mask(torch.ones(1, 4)).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="multiple of 4"):
        pruning.nm_mask(torch.randn(2, 6))


def test_wanda_2_4_has_one_sparsity():
    from impact_core import pipeline
    from impact_core.config import ConfigError, load_config

    assert pruning.PRUNING_METHODS["wanda_2_4"].sparsity == 0.5
    with pytest.raises(ValueError, match="one sparsity"):
        pipeline.check_model_kind(0.7, "wanda_2_4")
    with pytest.raises(ConfigError, match="one sparsity"):
        load_config("smoke", {"pruning.methods": ["wanda", "wanda_2_4"]})
    assert pipeline.check_model_kind(0.5, "wanda_2_4") == 0.5


def test_magnitude_mask_keeps_exactly_k_largest():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 9, generator=g)
    w[0, 0] = w[0, 1]
    for s in (0.0, 0.3, 0.7, 0.95):
        keep = magnitude_mask(w, s)
        assert torch.equal(keep, magnitude_mask_reference(w, s))
        assert int(keep.sum()) == kept_weights(w.numel(), s)
        assert w.abs()[keep].min() >= w.abs()[~keep].max() if (~keep).any() else True
    # many ties at the threshold (rounded weights, exact zeros, +/- the same magnitude): the lower
    # flat index is kept first, as the stable sort keeps it
    tied = torch.round(torch.randn(12, 10, generator=g) * 2) / 2
    tied[3] = 0.0
    tied[5] = -tied[6]
    for s in (0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99):
        assert torch.equal(magnitude_mask(tied, s), magnitude_mask_reference(tied, s)), s


def test_the_anneal_reaches_the_target_on_its_step():
    steps, target, frac = 40, 0.9, 0.5
    values = [scheduled_sparsity(t, steps, target, frac) for t in range(1, steps + 1)]
    reach = math.ceil(frac * steps)
    assert values[reach - 1] == pytest.approx(target) and values[reach - 2] < target
    assert all(a <= b for a, b in zip(values, values[1:])) and values[-1] == target
    assert values[0] == pytest.approx(target / reach)
    with pytest.raises(ValueError):
        scheduled_sparsity(1, 10, 1.0)


def test_the_l0_constraint_holds_after_every_optimiser_step(tiny_fmnist):
    """Training with the projection: after each step every block Linear has exactly the
    scheduled number of nonzero weights (and the count only falls)."""
    from impact_core.data import load_splits
    from impact_core.models import build_model, train_classifier

    cfg = tiny_config(tiny_fmnist)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    steps = 6
    projection = L0Projection(steps, target=0.8, anneal_fraction=0.5)
    seen = []

    def check(m):
        projection(m)
        s = projection.history[-1]
        counts = [(int((lin.weight != 0).sum()), kept_weights(lin.weight.numel(), s))
                  for lin in pruning.prunable_linears(m).values()]
        assert all(have == want for have, want in counts), counts
        seen.append(sum(have for have, _ in counts))

    train_classifier(model, load_splits(cfg)["train"], images=steps * 16, batch_size=16, lr=1e-3,
                     weight_decay=0.0, seed=0, after_step=check)
    assert len(seen) == steps and all(a >= b for a, b in zip(seen, seen[1:]))
    assert projection.history[-1] == 0.8


def test_pipeline_builds_2_4_and_trained_sparse_models(tiny_fmnist, tmp_path, monkeypatch):
    """Wanda 2:4 keeps its pattern through fine-tuning; the trained-sparse model is the dense
    run with the projection (its own cache identity, exactly the target sparsity per matrix)."""
    from impact_core import pipeline

    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 32, "finetune_batch_size": 16},
                      sparse_training={"sparsities": [0.7]})
    m24 = pipeline.pruned_model(cfg, 0.5, "wanda_2_4")
    for lin in pruning.prunable_linears(m24).values():
        zeros = (lin.weight == 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
        assert (zeros == 2).all()
    assert pipeline.finetune_steps(cfg, 0.5, "wanda_2_4") == 2
    sparse = pipeline.pruned_model(cfg, 0.7, pipeline.TRAINED_SPARSE)
    for lin in pruning.prunable_linears(sparse).values():
        assert int((lin.weight != 0).sum()) == kept_weights(lin.weight.numel(), 0.7)
    keys = {str(pipeline.model_inputs(cfg, 0.7, m)) for m in ("wanda", pipeline.TRAINED_SPARSE)}
    assert len(keys) == 2
    assert pipeline.model_label(0.7, pipeline.TRAINED_SPARSE) == "trained sparse 70%"
    with pytest.raises(ValueError, match="sparsity > 0"):
        pipeline.model_inputs(cfg, 0.0, pipeline.TRAINED_SPARSE)


# --- the level "Sparsity trained in": its comparison rule and its claims on synthetic runs ---------
import numpy as np  # noqa: E402

from impact_core import claims as C  # noqa: E402
from impact_core import stats as S  # noqa: E402
from impact_core.config import DEFAULT_MARGINS, load_config  # noqa: E402
from impact_core.levels import sparse_training as st  # noqa: E402

J = C.Judge(margins=dict(DEFAULT_MARGINS))


def _est(value, low, high, n=30):
    return S.Estimate(value, low, high, "classes", n, "test")


def test_comparison_claim_is_b_minus_a_paired_and_judged_by_direction():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.4, 30)
    common = dict(id="x.y", level="sparse_training", claim="B has fewer edges than A", paper="Gao et al.",
                  metric="edge_size", expected="-", unit="classes", labels=("Wanda 70%", "trained sparse 70%"))
    smaller = C.comparison_claim(J, a=[a], b=[a - 0.1 + rng.normal(0, 0.005, 30)], **common)
    assert smaller.verdict == C.REPRODUCED and smaller.effect.startswith("-0.09")
    assert smaller.rule == "judge_direction: trained sparse 70% minus Wanda 70%, paired over classes"
    assert smaller.ours.startswith("Wanda 70% vs trained sparse 70%: ") and smaller.control == "n/a"
    larger = C.comparison_claim(J, a=[a], b=[a + 0.1 + rng.normal(0, 0.005, 30)], **common)
    assert larger.verdict == C.NOT_REPRODUCED and "other way" in larger.why
    same = C.comparison_claim(J, a=[a], b=[a + rng.normal(0, 0.001, 30)], **common)
    assert same.verdict == C.NOT_REPRODUCED and "equivalent" in same.why
    overlapping = C.comparison_claim(J, a=[a], b=[a + rng.normal(0, 0.1, 30)], **common)
    assert overlapping.verdict == C.INCONCLUSIVE and "it would take about" in overlapping.why
    # pairing: a large spread between units that both models share does not widen the interval
    spread = rng.uniform(0, 10, 30)
    assert C.comparison_claim(J, a=[spread], b=[spread - 0.1], **common).verdict == C.REPRODUCED


def test_judge_direction_family_every_outcome():
    up, zero, down, wide = _est(0.1, 0.06, 0.14), _est(0.0, -0.005, 0.005), _est(-0.1, -0.14, -0.06), _est(0.05, -0.1, 0.2)
    assert C.judge_direction_family([up, up, up], "+", 0.02)[0] == C.REPRODUCED
    assert C.judge_direction_family([down, down, down], "-", 0.02)[0] == C.REPRODUCED
    verdict, why = C.judge_direction_family([up, up, down], "+", 0.02)
    assert verdict == C.NOT_REPRODUCED and "1 change the other way" in why
    verdict, why = C.judge_direction_family([up, zero, up], "+", 0.02)
    assert verdict == C.NOT_REPRODUCED and "1 show no change" in why
    verdict, why = C.judge_direction_family([up, wide, up], "+", 0.02)
    assert verdict == C.INCONCLUSIVE and "2 of 3" in why
    assert C.judge_direction_family([], "+", 0.02)[0] == C.INCONCLUSIVE
    # "every comparison on the claimed side" is intersection-union: no correction for the family's size
    edge = S.Estimate(0.02, 0.001, 0.04, "classes", 30, "test")
    assert C.judge_direction_family([edge], "+", 0.005)[0] == C.REPRODUCED
    assert C.judge_direction_family([edge] * 12, "+", 0.005)[0] == C.REPRODUCED
    # "any the other way" is Holm-corrected: just past 0 the other way decides alone, not among twelve
    against = S.Estimate(-0.02, -0.04, -0.001, "classes", 30, "test")
    assert C.judge_direction_family([against], "+", 0.005)[0] == C.NOT_REPRODUCED
    assert C.judge_direction_family([against] + [wide] * 11, "+", 0.005)[0] == C.INCONCLUSIVE


SIMPLER = {  # the quantity -> (its margin's metric, the side that is simpler)
    "size_dense": ("edge_size", -1), "size_remaining": ("edge_size", -1), "node_fraction": ("node_fraction", -1),
    "selectivity": ("selectivity", +1), "NMSE": ("nmse", -1), "dead": ("dead_fraction", -1),
    "insertion": ("insertion", +1), "deletion": ("deletion", -1)}


def synthetic_model(base: dict, shift: float, noise: float, rng, name: str) -> dict:
    """A model of :func:`st.analyse`'s shape: every quantity of ``base`` moved ``shift`` margins towards
    the simpler side (negative: away from it), plus per-unit noise of ``noise`` margins (mean 0 over the units)."""
    def moved(key, values):
        metric, side = SIMPLER[key]
        m = DEFAULT_MARGINS[metric]
        e = rng.normal(0, noise * m, values.shape)
        return values + side * shift * m + e - e.mean(-1, keepdims=True)  # the shift exactly, per block

    v = {k: moved(k, x) for k, x in base.items()}
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    correct = torch.tensor(rng.random(200) < 0.8)
    return {"label": name, "accuracy": {"correct": correct, "top1": float(correct.double().mean()), "top5": 1.0},
            "circuit": {"size_dense": t(v["size_dense"]), "size_remaining": t(v["size_remaining"]),
                        "node_fraction": t(v["node_fraction"]), "k": 4e-5},
            "neuron": {"blocks": [2, 7, 11], "selectivity": t(v["selectivity"])},
            "sae": [{"NMSE": float(x), "dead %": 100 * float(d)} for x, d in zip(v["NMSE"], v["dead"])],
            "attribution": {"scores": {"black": {"chefer": {"insertion": t(v["insertion"]), "deletion": t(v["deletion"])},
                                                 "random": {"insertion": t(0 * v["insertion"]),
                                                            "deletion": t(0 * v["deletion"])}}}}}


def synthetic_run(shift: float, noise: float, seed: int = 0, cfg=None) -> dict:
    """Dense, Wanda and the compared models (trained sparse, 2:4): every B ``shift`` margins simpler than its A."""
    rng = np.random.default_rng(seed)
    base = {"size_dense": rng.uniform(0.1, 0.2, 30), "size_remaining": rng.uniform(0.3, 0.4, 30),
            "node_fraction": rng.uniform(0.3, 0.5, 30), "selectivity": rng.uniform(0.6, 0.8, (3, 30)),
            "NMSE": rng.uniform(0.02, 0.03, 6), "dead": rng.uniform(0.2, 0.3, 6),
            "insertion": rng.uniform(0.0, 0.2, 60), "deletion": rng.uniform(-0.2, 0.0, 60)}
    comps = st.comparisons(cfg or load_config("smoke"))
    models = {st.DENSE: synthetic_model(base, 0, 1, rng, "dense")}
    for c in comps:
        if c["missing"] is None:
            models[c["a"]] = synthetic_model(base, 0, 0, rng, st.label(*c["a"]))
            models[c["b"]] = synthetic_model(base, shift, noise, rng, st.label(*c["b"]))
    return {"models": models, "comparisons": comps, "references": ["black"]}


def test_sparse_training_claims_every_outcome():
    """Trained sparse (and 2:4) clearly simpler than Wanda on every measure: reproduced; clearly less
    simple: not reproduced; the two overlapping: inconclusive. One claim per comparison and measure."""
    names = ["edges", "edges_remaining", "nodes", "selectivity", "nmse", "dead", "insertion_black", "deletion_black"]
    for shift, noise, verdict in [(10, 1, C.REPRODUCED), (-10, 1, C.NOT_REPRODUCED), (0, 8, C.INCONCLUSIVE)]:
        out = st.sparse_training_claims([synthetic_run(shift, noise)], J)
        assert [c.id for c in out] == [f"sparse_training.{cid}.{n}" for cid in ("trained", "2_4") for n in names]
        got = {c.id: c.verdict for c in out}
        assert set(got.values()) == {verdict}, (shift, noise, got)
        assert all(c.level == "sparse_training" and c.rule != "not measured" for c in out)
    out = {c.id: c for c in st.sparse_training_claims([synthetic_run(10, 1)], J)}
    edges = out["sparse_training.trained.edges"]
    assert "Gao et al." in edges.paper and "trained sparse 70%" in edges.claim and "Wanda 70%" in edges.claim
    assert edges.rule.endswith("trained sparse 70% minus Wanda 70%, paired over classes")
    assert "expects no" in out["sparse_training.2_4.edges"].paper
    assert out["sparse_training.trained.nmse"].rule.endswith("paired over SAE seeds")
    assert out["sparse_training.trained.insertion_black"].rule.endswith("paired over images")
    assert "3 comparisons (Holm)" in out["sparse_training.trained.selectivity"].rule
    # two training seeds: the same claims, intervals over the seeds
    two = st.sparse_training_claims([synthetic_run(10, 1, seed=0), synthetic_run(10, 1, seed=1)], J)
    assert {c.verdict for c in two} == {C.REPRODUCED} and "training seeds" in two[0].effect


def test_sparse_training_comparisons_ids_and_what_cannot_be_made():
    cfg = load_config("smoke", {"sparse_training.sparsities": [0.9, 0.7]})
    comps = st.comparisons(cfg)
    assert [c["id"] for c in comps] == ["trained_70", "trained", "2_4"]  # the highest sparsity is "trained"
    assert comps[1]["b"] == (0.9, pipeline_trained()) and comps[2]["a"] == (0.5, "wanda")
    assert st.models(cfg)[0] == st.DENSE and len(st.models(cfg)) == 7
    off = load_config("smoke", {"sparse_training.wanda_2_4": False})
    run = synthetic_run(10, 1, cfg=off)
    out = {c.id: c for c in st.sparse_training_claims([run], J)}
    assert out["sparse_training.2_4.edges"].rule == "not measured"
    assert "wanda_2_4 is false" in out["sparse_training.2_4.edges"].why
    assert out["sparse_training.trained.edges"].verdict == C.REPRODUCED
    agree = st.agreement(list(out.values()))
    assert agree["trained_n"] == "8" and agree["trained_n_simpler"] == "8" and "holds on every measure" in agree["trained_summary"]
    assert agree["2_4_n"] == "0" and "not tested" in agree["2_4_summary"]
    paper = load_config("paper")  # a loaded checkpoint cannot be trained sparse: said, not attempted
    assert all("loaded, not trained here" in c["missing"] for c in st.comparisons(paper) if c["kind"] == "trained")
    assert (0.7, pipeline_trained()) not in st.models(paper)
    with pytest.raises(ValueError, match="above 0"):
        st.check(load_config("smoke", {"sparse_training.sparsities": [0.0]}))


def pipeline_trained():
    from impact_core import pipeline

    return pipeline.TRAINED_SPARSE


def test_sparse_training_tables_read_the_run():
    run = synthetic_run(10, 1)
    out = st.sparse_training_claims([run], J)
    table = st.claims_table(out, run)
    assert len(table) == len(out) and set(table.level) == {"circuit", "neuron", "layer", "model"}
    assert table.comparison.iloc[0] == "trained sparse 70% minus Wanda 70%"
    levels = st.level_table(run)
    assert list(levels.index) == ["dense", "Wanda 70%", "trained sparse 70%", "Wanda 50%", "Wanda 2:4 (50%)"]
    assert "selectivity, block 7" in levels.columns and "insertion - random (black)" in levels.columns
    long = st.long_frame(run)
    assert set(long.metric) >= {"edges", "selectivity (block 2)", "nmse", "deletion_black"}
    assert len(long[(long.model == "dense") & (long.metric == "edges")]) == 30
