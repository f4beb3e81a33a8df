"""Replicates of the pipeline: each replicate re-draws every stochastic stage of the pruned models,
the control and the analyses on the one dense model; replicate 0 is every earlier build; the
replicates are the unit of the level-versus-control intervals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from impact_core import claims, levels, pipeline
from impact_core.config import ConfigError, load_config
from impact_core.levels import circuit, layer, model, neuron
from impact_core.schedule import plan


def test_replicate_zero_keeps_every_key_and_seed_and_others_differ():
    cfg = load_config("smoke", {"replicates": 3})
    one = levels.for_replicate(cfg, 1)
    assert pipeline.run_seed(cfg, 1) == cfg.seed + 1 and pipeline.run_seed(one, 1) == cfg.seed + 1 + 7919
    plain = load_config("smoke")
    cache = pipeline.cache_for(cfg)
    keys = {
        "pruned_model": lambda c: pipeline.pruned_inputs(c, 0.7, "wanda"),
        "circuits": lambda c: circuit.circuit_inputs(c, 0.7, 4e-5),
        "sae": lambda c: layer.sae_inputs(c, 0.7, "cls", 4, 4),
        "neuron_metrics": lambda c: neuron.neuron_inputs(c, 0.7),
        "attribution_results": lambda c: model.attribution_inputs(c, 0.7),
    }
    for kind, inputs in keys.items():
        assert cache.key(kind, inputs(cfg)) == cache.key(kind, inputs(plain)), kind  # replicate 0 = today's entries
        assert cache.key(kind, inputs(one)) != cache.key(kind, inputs(cfg)), kind
    # the one dense model, and its accuracy, are shared by every replicate
    assert cache.key(pipeline.DENSE_MODEL, pipeline.dense_inputs(one)) == cache.key(pipeline.DENSE_MODEL,
                                                                                     pipeline.dense_inputs(cfg))
    assert pipeline.accuracy_inputs(one, 0.0) == pipeline.accuracy_inputs(cfg, 0.0)
    # what only the chapter shows is replicate 0's: the neuron validation ablations, attribution's other methods
    assert neuron.neuron_inputs(cfg, 0.7)["neuron"]["validation_units"] == cfg.neuron.validation_units > 0
    assert neuron.neuron_inputs(one, 0.7)["neuron"]["validation_units"] == 0
    assert model.attribution_inputs(one, 0.7)["methods"] == ["chefer", "random"]


def test_display_only_work_is_computed_for_the_displayed_models_alone():
    """The chapters display dense, the control and the Wanda levels of replicate 0; chapter 6's models and
    the other replicates feed claims only, so their display-only work is not computed (nothing reads it)."""
    from impact_core.levels.sparse_training import NM, TRAINED_SPARSE

    cfg = load_config("default", {"replicates": 2})
    one = levels.for_replicate(cfg, 1)
    shown = [(0.0, "wanda"), (0.0, pipeline.CONTROL), (0.7, "wanda"), (0.1, "wanda")]
    hidden = [(0.7, TRAINED_SPARSE), (0.5, NM), (0.8, "wanda"), (0.9, "wanda")]  # 80%, 90%: Table 1 only
    for s, m in shown:
        assert levels.displayed(cfg, "attribution", s, m) and not levels.displayed(one, "attribution", s, m)
        assert model.attribution_inputs(cfg, s, m)["methods"] == ["chefer", "rollout", "generic", "random"]
        assert neuron.neuron_inputs(cfg, s, m)["neuron"]["same_image_impact"]
    for s, m in hidden:
        assert not levels.displayed(cfg, "attribution", s, m)
        assert model.attribution_inputs(cfg, s, m)["methods"] == ["chefer", "random"]
        assert not neuron.neuron_inputs(cfg, s, m)["neuron"]["same_image_impact"]
        assert neuron.neuron_inputs(cfg, s, m)["neuron"]["validation_units"] == 0
    # the validation table shows dense and the Wanda levels, not the control
    assert neuron.neuron_inputs(cfg, 0.0, pipeline.CONTROL)["neuron"]["validation_units"] == 0
    assert neuron.neuron_inputs(cfg, 0.7)["neuron"]["validation_units"] == cfg.neuron.validation_units


def test_bad_replicate_settings_fail_at_loading():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="replicates"):
            load_config("smoke", {"replicates": bad})
    with pytest.raises(ConfigError, match="replicate: 2 is not one of the 2"):
        load_config("smoke", {"replicates": 2, "replicate": 2})


def test_the_calibration_draw_is_the_replicates_own(tiny_fmnist):
    cfg = tiny_config(tiny_fmnist, data={"calib_images": 16})
    cfg = type(cfg).from_dict({**cfg.to_dict(), "replicates": 2})
    zero, one = pipeline.calibration_split(cfg), pipeline.calibration_split(levels.for_replicate(cfg, 1))
    assert np.array_equal(zero.indices, pipeline.splits(cfg)["calib"].indices)
    assert len(one) == len(zero) == 16 and not np.array_equal(one.indices, zero.indices)
    assert set(one.indices) <= set(pipeline.splits(cfg)["train"].indices)


def test_the_plan_computes_each_replicate_on_its_own_models():
    cfg = load_config("smoke", {"replicates": 2})
    tasks = {t.name: t for t in plan(cfg, ["book/chapters/01_pruning", "book/chapters/04_circuit",
                                           "book/chapters/06_sparse_training"])}
    assert "dense model, replicate 1" not in tasks  # one dense model
    assert tasks["model control, replicate 1"].model and tasks["model control, replicate 1"].needs == {"dense model"}
    assert tasks["circuits, 70%, replicate 1"].needs == {"model 70%, replicate 1"}
    assert tasks["circuits, control, replicate 1"].needs == {"model control, replicate 1"}
    assert tasks["circuits, dense, replicate 1"].needs == {"dense model"}
    # the level that is not replicated runs once
    assert not [n for n in tasks if ("trained sparse" in n or "2:4" in n) and "replicate" in n]
    assert all(r in tasks["book/chapters/04_circuit"].needs
               for r in ("circuits, control, replicate 1", "circuits, 70%, replicate 1"))
    # a sweep only the chapter's table reads runs once (a middle k)
    default = {t.name for t in plan(load_config("default", {"replicates": 2, "circuit.k_sweep": [4e-5, 6e-5, 8e-5]}),
                                    ["book/chapters/04_circuit"])}
    assert "circuits at k=6e-05, 70%" in default and "circuits at k=6e-05, 70%, replicate 1" not in default
    assert "circuits at k=8e-05, 70%, replicate 1" in default
    # Table 1's rows that no claim reads (magnitude below the highest level, Wanda 80%) run once
    rows = {t.name for t in plan(load_config("replicates"), ["book/chapters/01_pruning"])}
    assert {"model magnitude 50%", "model 80%"} <= rows
    assert not rows & {"model magnitude 50%, replicate 1", "model 80%, replicate 1"}
    assert {"model magnitude 90%, replicate 2", "model 90%, replicate 2", "model 10%, replicate 2"} <= rows


def test_claims_over_replicates_use_the_replicates_as_units():
    """Two replicates whose level-minus-control effects are +0.3 and +0.1 over 10 classes: the
    interval is the t interval over the two replicate means, its unit names both levels."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 10)
    runs = [(base, base + 0.3 + rng.normal(0, 0.01, 10)), (base, base + 0.1 + rng.normal(0, 0.01, 10))]
    judge = claims.Judge(margins={"x": 0.05}).nested(1, 2)
    est = judge.diff(runs, "classes")
    assert est.unit == "2 replicates (classes nested)" and est.n == 2 and est.df == 1
    assert est.low < 0.1 and est.high > 0.3
    # two training seeds of two replicates each: the seeds are the units, each pooling its replicates
    seeds = claims.Judge(margins={"x": 0.05}).nested(2, 2)
    est = seeds.diff(runs * 2, "classes")
    assert est.unit == "2 training seeds (classes nested)" and est.value == pytest.approx(0.2, abs=0.01)
    assert seeds.pool([torch.ones(2), torch.zeros(2), torch.ones(3), torch.ones(1)])[0].tolist() == [1, 1, 0, 0]


def test_a_replicated_level_is_gathered_and_judged_per_replicate(tiny_fmnist, tmp_path, monkeypatch):
    """A toy level reading the control's accuracy: prepared once per replicate (two fine-tuned controls
    on one dense model), judged with the replicates as units."""
    import yaml

    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(levels, "_LEVELS", {"pruning": levels.get_level("pruning")})
    seen = []

    def gather(cfg):
        seen.append(cfg.replicate)
        return {"dense": pipeline.accuracy(cfg, 0.0), "control": pipeline.accuracy(cfg, 0.0, pipeline.CONTROL)}

    def toy_claims(runs, judge):
        est = judge.diff([(claims.as_array(r["dense"]["correct"]), claims.as_array(r["control"]["correct"]))
                          for r in runs], "images")
        return [claims.Claim(id="toy.control", level="toy", claim="-", paper="-", ours="-", effect=est.text(),
                             control="n/a", margin="-", verdict=claims.judge_direction(est, "+", 0.01)[0], rule="-")]

    levels.register_level(levels.Level(name="toy", title="Toy", section="neuron", gather=gather, claims=toy_claims,
                                       chapter="book/chapters/07_toy", after=("pruning",)))
    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({
        "replicates": 2, "pruning": {"finetune_images": 32, "finetune_batch_size": 16, "sparsities": [0.5]},
        "data": {"root": str(tiny_fmnist), "calib_images": 16, "batch_size": 16, "eval_images": 20},
        "model": {"embed_dim": 16, "num_heads": 2}, "train": {"epochs": 1, "batch_size": 16}}))
    from impact_core.__main__ import prepare

    prepare(str(preset), ["toy"])
    assert seen == [0, 1]
    cfg = load_config(preset)
    (claim,) = levels.all_claims(cfg, ["toy"])
    assert "2 replicates (images nested)" in claim.effect
    a = pipeline.pruned_model(cfg, 0.0, pipeline.CONTROL).state_dict()
    b = pipeline.pruned_model(levels.for_replicate(cfg, 1), 0.0, pipeline.CONTROL).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # each replicate fine-tunes its own control


def test_a_replicate_beyond_the_first_carries_one_sae_seed():
    """Replicate 0 trains every SAE seed (Table 2's spread, the SAE claims' units with one replicate); the
    others one each, counted so by the cost model, while their nested means stay the claims' units."""
    import collections

    from impact_core import cost

    cfg = load_config("default", {"replicates": 3})
    assert cfg.sae.seeds == 3
    assert layer.sae_seeds_of(cfg) == 3 and layer.sae_seeds_of(levels.for_replicate(cfg, 2)) == 1

    def sae_runs(replicates):
        runs = collections.Counter()
        for r in cost.stage_costs(load_config("default", {"replicates": replicates})):
            runs[(r.chapter, r.stage)] += r.runs
        return runs[("layer", "SAE training")]

    models = len(levels.with_dense(cfg.sae.sparsities)) + 3  # dense, every level, the control, random weights, matched
    assert sae_runs(1) == 3 * models and sae_runs(2) == 4 * models and sae_runs(3) == 5 * models
