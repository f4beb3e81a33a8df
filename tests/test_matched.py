"""The matched-accuracy control: a held-out split, the dense training's checkpoints, the checkpoint
nearest the level's held-out top-1, and the rule that says whether a change follows accuracy."""
from __future__ import annotations

import numpy as np
import pytest

from impact_core import claims, pipeline
from impact_core import stats as S
from impact_core.config import DEFAULT_MARGINS, ConfigError, load_config
from impact_core.data import hold_out

J = claims.Judge(margins=dict(DEFAULT_MARGINS))
MARGIN = 0.1


def est(value, low, high):
    return S.Estimate(value, low, high, "classes", 10, "test")


def test_judge_matched_every_outcome():
    # claimed "+": level minus the dense model at the level's accuracy
    assert claims.judge_matched(est(0.5, 0.3, 0.7), "+", MARGIN) == claims.BEYOND_ACCURACY
    assert claims.judge_matched(est(0.0, -0.05, 0.05), "+", MARGIN) == claims.FOLLOWS_ACCURACY   # the same
    assert claims.judge_matched(est(0.05, 0.02, 0.08), "+", MARGIN) == claims.FOLLOWS_ACCURACY   # further, by less than the margin
    assert claims.judge_matched(est(-0.5, -0.7, -0.3), "+", MARGIN) == claims.FOLLOWS_ACCURACY  # the dense model moved further
    assert claims.judge_matched(est(0.1, -0.1, 0.3), "+", MARGIN) == "undecided"
    assert claims.judge_matched(est(0.1, 0.02, 0.3), "+", MARGIN) == claims.BEYOND_ACCURACY  # as "reproduced": beyond 0, not inside the margin
    # claimed "-": mirrored
    assert claims.judge_matched(est(-0.5, -0.7, -0.3), "-", MARGIN) == claims.BEYOND_ACCURACY
    assert claims.judge_matched(est(0.5, 0.3, 0.7), "-", MARGIN) == claims.FOLLOWS_ACCURACY
    assert claims.judge_matched(est(float("nan"), float("nan"), float("nan")), "+", MARGIN) == "undecided"


def _change(level_shift, matched_shift, seed=0):
    """A node-fraction rise of ``level_shift`` beyond dense and control; the matched model at ``matched_shift``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.3, 0.05, 40)
    noise = lambda: rng.normal(0, 0.001, 40)  # noqa: E731
    return claims.change_claim(J, id="circuit.nodes", level="circuit", claim="-", paper="-", metric="node_fraction",
                               expected="+", dense=[base], at_level=[base + level_shift + noise()],
                               control=[base + noise()], unit="classes", matched=[base + matched_shift + noise()])


def test_a_reproduced_change_that_follows_accuracy_reads_explained_by_accuracy():
    m = DEFAULT_MARGINS["node_fraction"]
    follows = _change(5 * m, 5 * m)
    assert follows.verdict == claims.ACCURACY and follows.accuracy.startswith(claims.FOLLOWS_ACCURACY)
    beyond = _change(5 * m, 0.0)
    assert beyond.verdict == claims.REPRODUCED and beyond.accuracy.startswith(claims.BEYOND_ACCURACY)
    # a change not shown is never relabelled, whatever the matched model does
    none = _change(0.0, 0.0)
    assert none.verdict == claims.NOT_REPRODUCED and none.accuracy.startswith(claims.FOLLOWS_ACCURACY)
    plain = claims.change_claim(J, id="x", level="circuit", claim="-", paper="-", metric="node_fraction", expected="+",
                                dense=[np.zeros(5)], at_level=[np.ones(5)], control=[np.zeros(5)], unit="classes")
    assert plain.accuracy == ""  # no matched model given: no reading


def test_pick_matched_takes_the_nearest_checkpoint_and_the_later_on_a_tie():
    assert pipeline.pick_matched([0.5, 0.8, 0.85, 0.9], 0.84) == 2
    assert pipeline.pick_matched([0.5, 0.75, 1.0], 0.875) == 2  # tie: the more trained checkpoint
    assert pipeline.pick_matched([0.5, 0.8, 0.9], 0.95) == 2  # above every checkpoint: the last, the dense model


def test_checkpoint_steps_are_evenly_spaced_and_end_with_the_training():
    assert pipeline.checkpoint_steps(100, 4) == [25, 50, 75, 100]
    assert pipeline.checkpoint_steps(3, 5) == [1, 2, 3]
    assert pipeline.checkpoint_steps(1643, 20)[-1] == 1643


def test_the_held_out_split_is_disjoint_and_seeded():
    train = np.arange(100)
    kept, held = hold_out(train, 10, seed=2)
    assert len(held) == 10 and len(kept) == 90 and not set(kept) & set(held)
    assert np.array_equal(held, hold_out(train, 10, seed=2)[1]) and not np.array_equal(held, hold_out(train, 10, 3)[1])
    assert hold_out(train, 0, 2)[0] is train
    with pytest.raises(ConfigError, match="leaves no training images"):
        hold_out(train, 100, 2)


def test_checkpoints_without_a_held_out_split_are_a_config_error():
    with pytest.raises(ConfigError, match="holdout_images"):
        load_config("default", {"data.holdout_images": 0})
    with pytest.raises(ConfigError, match="integer"):
        load_config("default", {"train.checkpoints": 2.5})
    assert pipeline.matched_control(load_config("default"))
    assert not pipeline.matched_control(load_config("default", {"train.checkpoints": 0}))


def test_the_plan_builds_the_matched_model_after_the_level_it_matches():
    from impact_core.runner import toc_chapters
    from impact_core.schedule import plan

    cfg = load_config("default")
    tasks = {t.name: t for t in plan(cfg, toc_chapters())}
    label = pipeline.model_label(0.7, pipeline.MATCHED)
    checkpoints = "held-out top-1, dense checkpoints"  # once for all replicates, a model piece after the dense one
    assert tasks[checkpoints].model and tasks[checkpoints].needs == {"dense model"}
    assert not [n for n in tasks if n.startswith(checkpoints + ", replicate")]
    for what in ("circuits", "SAEs", "attribution"):
        assert tasks[f"{what}, {label}"].needs == {"dense model", "model 70%", checkpoints}
        assert tasks[f"{what}, {label}, replicate 2"].needs == {"dense model", "model 70%, replicate 2", checkpoints}
    assert f"neuron metrics, {label}" not in tasks  # the neuron claims are "no change": nothing reads it


def test_the_matched_model_is_a_dense_checkpoint_chosen_on_held_out_images(tiny_fmnist, tmp_path):
    """End to end on tiny data: checkpoints stored beside the dense model (the last one is the dense model),
    held-out top-1 of each and of the level, the nearest chosen; the circuit claims carry the reading."""
    import torch

    from impact_core import levels
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, data={"holdout_images": 10}, train={"checkpoints": 3},
                      pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      circuit={"sparsities": [0.5], "classes": [0, 1], "epochs": 1, "step_size": 1, "lr": 0.1,
                               "batch_size": 2, "train_images_per_class": 2, "eval_images_per_class": 2,
                               "k_sweep": [0.00008]})
    cfg.cache_dir = str(tmp_path / "cache")
    data = pipeline.splits(cfg)
    assert len(data["holdout"]) == 10 and not set(data["holdout"].indices) & set(data["train"].indices)
    assert not set(data["holdout"].indices) & set(data["calib"].indices)
    ckpts = pipeline.dense_checkpoints(cfg)
    dense = pipeline.dense_model(cfg).state_dict()
    assert len(ckpts["steps"]) == 3 and all(torch.equal(dense[k], ckpts["states"][-1][k]) for k in dense)
    matched = pipeline.pruned_model(cfg, 0.5, pipeline.MATCHED).state_dict()
    choice = pipeline.matched_choice(cfg, 0.5)
    i = choice["steps"].index(choice["step"])
    assert i == pipeline.pick_matched(choice["checkpoint_top1"], choice["level_top1"])
    assert choice["checkpoint_top1"] == pipeline.checkpoint_accuracies(cfg)  # the plan's piece: the same entries
    assert all(torch.equal(matched[k], ckpts["states"][i][k]) for k in matched)
    out = {c.id: c for c in levels.level_claims(cfg, "circuit")}
    assert out["circuit.nodes"].accuracy.split(":")[0] in (claims.BEYOND_ACCURACY, claims.FOLLOWS_ACCURACY, "undecided")


def test_table4_shows_a_dash_for_methods_a_claims_only_model_was_not_scored_with():
    """The matched-accuracy control (like every claims-only model) has Chefer and random order only: its Table 4
    row shows those and "–" for the rest."""
    import torch

    from impact_core.levels import model
    from impact_core.methods import attribution as attr

    def scores(methods):
        g = torch.Generator().manual_seed(0)
        return {"black": {m: {k: torch.rand(6, generator=g) for k in ("insertion", "deletion")} for m in methods}}

    by_model = {"dense": {"scores": scores(attr.METHODS), "level": "dense"},
                "matched": {"scores": scores(model.CLAIM_METHODS), "level": "matched"}}
    tables, rows = model.table4(by_model, ["black"])
    t = tables["black"]
    other = next(m for m in attr.METHODS if m not in model.CLAIM_METHODS)
    assert t.loc["matched", ("insertion", attr.METHOD_LABELS[other])] == "–"
    assert t.loc["matched", ("insertion", attr.METHOD_LABELS["chefer"])].count("[") == 1
    assert set(rows[rows.model == "matched"].method) == set(model.CLAIM_METHODS)
