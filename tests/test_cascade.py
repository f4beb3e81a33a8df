"""The random-weights control's cascade (Adebayo et al. 2018): the dense model with its top j blocks set back
to its initialisation, taken through the levels' analyses, and the sensitivity check read at each step."""
from __future__ import annotations

import pytest
import torch

from impact_core import claims, discussion, levels, pipeline
from impact_core.config import ConfigError, load_config


def test_cascade_model_kinds_round_trip_and_bad_steps_are_config_errors():
    assert pipeline.reinit_blocks(pipeline.reinit_method(3)) == 3
    assert pipeline.reinit_blocks("wanda") is None and pipeline.reinit_blocks(pipeline.REINIT) is None
    assert pipeline.check_model_kind(0.0, pipeline.reinit_method(2)) == 0.0
    assert not pipeline.is_dense(0.0, pipeline.reinit_method(2))
    with pytest.raises(ValueError, match="sparsity must be 0"):
        pipeline.check_model_kind(0.5, pipeline.reinit_method(2))
    for bad in ([0], [12], [1, 1], [1.5], "1"):
        with pytest.raises(ConfigError, match="cascade"):
            load_config("default", {"cascade": bad})
    assert load_config("default").cascade == []  # off in default


def test_the_plan_takes_each_cascade_step_through_every_level():
    from impact_core.runner import toc_chapters
    from impact_core.schedule import plan

    cfg = load_config("default", {"cascade": [1, 6], "replicates": 1})
    tasks = {t.name: t for t in plan(cfg, toc_chapters())}
    for j in (1, 6):
        label = pipeline.model_label(0.0, pipeline.reinit_method(j))
        for what in ("neuron metrics", "SAEs", "circuits", "attribution"):
            assert tasks[f"{what}, {label}"].needs == {"dense model"}
    assert not any("re-initialised" in name for name in (t.name for t in plan(load_config("default"), toc_chapters())))


def test_cascade_step_swaps_every_random_weights_entry_that_has_a_cascade():
    run = {"by_sparsity": {0.0: 1}, "random_weights": "rw", "cascade": {1: "top1", 6: "top6"},
           "features": {"random_weights": "frw", "cascade": {1: "ftop1", 6: "ftop6"}}, "other": {"random_weights": "x"}}
    step = levels.cascade_step(run, 6)
    assert step["random_weights"] == "top6" and step["features"]["random_weights"] == "ftop6"
    assert step["other"]["random_weights"] == "x" and run["random_weights"] == "rw"  # no cascade there; input kept


def test_the_reinit_model_keeps_the_lower_blocks_and_resets_the_top(tiny_fmnist, tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, cascade=[2])
    cfg.cache_dir = str(tmp_path / "cache")
    dense = pipeline.dense_model(cfg).state_dict()
    init = pipeline.random_weights_model(cfg).state_dict()
    reinit = pipeline.pruned_model(cfg, 0.0, pipeline.reinit_method(2)).state_dict()
    depth = cfg.model.depth
    for k, v in reinit.items():
        top = k.startswith(("head.", "norm.")) or any(k.startswith(f"blocks.{b}.") for b in (depth - 2, depth - 1))
        assert torch.equal(v, init[k] if top else dense[k]), k
    assert not torch.equal(reinit["head.weight"], dense["head.weight"])


def test_the_circuit_claims_read_the_check_at_each_cascade_step(tiny_fmnist, tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      circuit={"sparsities": [0.5], "classes": [0, 1], "epochs": 1, "step_size": 1, "lr": 0.1,
                               "batch_size": 2, "train_images_per_class": 2, "eval_images_per_class": 2,
                               "k_sweep": [0.00008]}, cascade=[1, 6])
    cfg.cache_dir = str(tmp_path / "cache")
    out = {c.id: c for c in levels.level_claims(cfg, "circuit")}
    nodes = out["circuit.nodes"]
    assert nodes.cascade.startswith("top 1: ") and "; top 6: " in nodes.cascade
    assert out["circuit.ablation_dense"].cascade == ""  # no sensitivity check there, so no cascade
    frame = discussion.controls_frame(list(out.values()), cfg.cascade)
    assert list(frame.columns) == ["verdict", "can the metric see? (trained - random weights)",
                                   "... top 1 blocks re-initialised", "... top 6 blocks re-initialised",
                                   "does it follow accuracy? (level - dense at its accuracy)"]
    assert frame.loc["circuit.nodes", "... top 1 blocks re-initialised"].split()[0] in (claims.SEES, claims.BLIND,
                                                                                       "undecided")
    assert frame.loc["circuit.nodes", "does it follow accuracy? (level - dense at its accuracy)"] == "-"  # none built
    assert "circuit.ablation_dense" not in frame.index  # it carries neither check
    no_cascade = discussion.controls_frame(list(out.values()))
    assert not any("re-initialised" in col for col in no_cascade.columns)
