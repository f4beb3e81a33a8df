"""The cost model (impact_core.cost): its counts against FlopCounterMode, its scaling, its devices.

No timing here: every number is a count from shapes (the calibrated CPU device is never built).
"""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from impact_core import cost
from impact_core.__main__ import main
from impact_core.config import load_config
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def paper():
    return load_config("paper")


def replace(cfg, section: str, **values):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def test_forward_flops_agree_with_flop_counter_on_the_projects_model(tiny_model):
    """The textbook count, FlopCounterMode on the real model (attention as matrix products) and the
    cost model's trace on the meta device: one forward of one image."""
    mcfg = tiny_config().model
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        tiny_model(torch.zeros(1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    measured = counter.get_total_flops()
    assert cost.vit_forward_flops(mcfg) == pytest.approx(measured, rel=0.10)
    assert cost.units(mcfg)["forward"].per_image.flops == pytest.approx(measured, rel=1e-6)


def test_depth_extrapolation_equals_a_trace_at_that_depth():
    mcfg = dataclasses.replace(tiny_config().model, depth=3)
    direct = cost.trace(cost.UNITS["forward"], cost.model_at_depth(mcfg, 3), mcfg)
    extrapolated = cost.units(mcfg)["forward"]
    for field in ("flops", "bytes", "ops"):
        assert getattr(extrapolated.per_image, field) == pytest.approx(getattr(direct.per_image, field))
        assert getattr(extrapolated.fixed, field) == pytest.approx(getattr(direct.fixed, field))


def test_backward_is_about_twice_the_forward_with_weight_gradients_and_once_without(paper):
    u = cost.units(paper.model)
    forward = u["forward"].per_image.flops
    assert cost.vit_forward_flops(paper.model) == pytest.approx(forward, rel=0.01)  # DeiT-III B/16: 35.1 GFLOPs
    assert (u["train"].per_image.flops - forward) / forward == pytest.approx(2.0, abs=0.1)
    assert (u["forward_backward"].per_image.flops - forward) / forward == pytest.approx(1.0, abs=0.1)
    assert (u["circuit_step"].per_image.flops - forward) / forward == pytest.approx(1.0, abs=0.1)


def test_sae_step_flops_agree_with_flop_counter():
    from impact_core.methods import sae as sae_mod

    rows, d, m, k = 64, 16, 256, 8  # m < 64 k: the dense decoder (matrix products FlopCounterMode counts)
    model = sae_mod.BatchTopKSAE(d, m, k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.steps_since_active[: m // 2] = 100  # half the latents dead
    x = torch.randn(rows, d)
    counter = FlopCounterMode(display=False)
    with counter:
        sae_mod.train_step(model, opt, x, aux_coefficient=1 / 32, aux_k=4, dead_after_steps=5)
    assert cost.sae_step(rows, d, m, k, aux_k=4, dead_fraction=0.5).flops == pytest.approx(
        counter.get_total_flops(), rel=0.10)


def test_stage_costs_scale_with_their_budgets(paper):
    masks = cost.circuit_masks(paper)
    twice = cost.circuit_masks(replace(paper, "circuit", epochs=2 * paper.circuit.epochs))
    assert twice.flops == pytest.approx(2 * masks.flops) and twice.ops == pytest.approx(2 * masks.ops)
    assert twice.forwards == 2 * masks.forwards == 2 * 100 * paper.circuit.epochs * 2 * 200
    ev = cost.evaluation(paper, images=10_000)
    assert cost.evaluation(paper, images=20_000).flops == pytest.approx(2 * ev.flops)
    assert cost.evaluation(paper).forwards == 50_000  # ImageNet-1K validation
    curves = cost.insertion_deletion(paper, images=10)
    assert curves.forwards == 10 * (4 + 1) * 2 * 2 * (paper.attribution.steps + 1)  # methods + rule, refs, 2 curves


def test_the_binding_term_moves_from_overhead_to_compute_as_the_model_grows(paper):
    small = cost.predict(cost.insertion_deletion(tiny_config(), images=16, curves=1), cost.H100)
    big = cost.predict(cost.insertion_deletion(paper, images=16, curves=1), cost.H100)
    assert small.binding == "overhead" and big.binding == "compute"


def test_an_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'.*cpu, h100, h200"):
        cost.get_device("tpu")


def test_the_paper_projection_has_hours_for_every_chapter(paper, capsys):
    one = cost.project(paper, cost.H100)
    assert set(one.chapters) == set(cost.CHAPTERS) and all(h > 0 for h in one.chapters.values())
    eight = cost.project(paper, cost.H100, gpus=8)
    assert 0 < eight.total_hours < one.total_hours
    assert one.circuits[1000]["run_device_hours"] == pytest.approx(10 * one.circuits[100]["run_device_hours"], rel=0.01)
    assert one.circuits[1000]["runs"] == one.circuits[100]["runs"] > 0
    fine = next(st for st, _, _ in one.rows if st.stage == "fine-tuning" and st.chapter == "pruning")
    assert fine.runs == 2 * 6 + 1  # Wanda and magnitude at six sparsities, and the control
    assert cost.largest_batch(fine, cost.H100) >= paper.pruning.finetune_batch_size
    assert main(["cost", "--preset", "paper", "--device", "h100", "--gpus", "8"]) == 0
    assert "**total**" in capsys.readouterr().out
    assert main(["cost", "--preset", "paper", "--device", "tpu"]) == 2


def test_replicates_add_the_claims_work_and_no_display_work():
    """Each replicate beyond the first adds the replicated levels' claims work (masks, SAEs, curves on its own
    models), never the one dense model, the sweeps, the galleries or chapter 6."""
    import collections

    from impact_core.config import load_config

    def by_stage(replicates):
        out = collections.Counter()
        for r in cost.stage_costs(load_config("default", {"replicates": replicates})):
            out[(r.chapter, r.stage)] += r.flops
        return out

    one, two, three = by_stage(1), by_stage(2), by_stage(3)
    extra = {k: two[k] - one[k] for k in two}
    assert extra[("circuit", "circuit masks")] > 0 and extra[("layer", "SAE training")] > 0
    assert extra[("model", "insertion/deletion")] > 0 and extra[("pruning", "fine-tuning")] > 0
    for (chapter, stage), flops in extra.items():
        if "book" in stage or chapter == "sparse_training" or stage == "dense training":
            assert flops == 0, (chapter, stage)
    assert all(three[k] - two[k] == pytest.approx(extra[k], rel=1e-9, abs=1) for k in two)  # each replicate alike


def test_every_stage_is_compared_with_the_artefact_kind_it_computes():
    """``profile --against-cost`` sets each stage's prediction beside the build's time for the kind of cached
    artefact it computes: every stage of every preset has one, a declared kind, and the total is the sum."""
    import pandas as pd

    from impact_core import profile
    from impact_core.cache import VERSIONS
    from impact_core.config import load_config

    for preset in ("smoke", "default", "replicates", "paper"):
        stages = {s.stage for s in cost.stage_costs(load_config(preset))}
        assert stages <= set(profile.STAGE_KINDS), stages - set(profile.STAGE_KINDS)
    assert set(profile.STAGE_KINDS.values()) <= set(VERSIONS)
    entries = pd.DataFrame({"kind": ["circuits", "sae"], "task": ["t", "t"], "seconds": [10.0, 4.0],
                            "self_seconds": [8.0, 4.0]})
    device = cost.Device(name="test", peak_flops={"fp32": 1e10, "bf16": 1e10}, bandwidth=1e10, overhead_s=1e-5,
                         memory=2 ** 34)
    table = profile.against_cost(entries, load_config("smoke"), device).set_index("kind")
    assert table.loc["circuits", "measured_s"] == 8.0 and pd.isna(table.loc["accuracy", "measured_s"])
    total = table.loc["total (kinds measured)"]
    assert total.predicted_s == pytest.approx(table.loc[["circuits", "sae"], "predicted_s"].sum())
    assert total.measured_s == 12.0


def test_the_cost_model_counts_the_work_plan():
    """``stage_costs`` walks the plan ``make book`` runs: one circuit run per circuit piece, one SAE (per seed)
    per SAE piece, one attribution run per attribution piece, in every preset; a piece it does not know
    stops it with its name."""
    import collections

    from impact_core import levels
    from impact_core.levels import circuit, layer, model

    for preset in ("smoke", "default", "paper"):
        cfg = load_config(preset)
        runs = collections.Counter()
        for st in cost.stage_costs(cfg):
            runs[st.stage] += st.runs
        pieces = [p for name in cost.CHAPTERS for p in levels.level_pieces(cfg, [name])]
        unique = {p.label: p for p in pieces}.values()  # a piece two levels declare is computed once
        count = collections.Counter(p.entry for p in unique)
        assert runs["circuit masks"] + runs["circuit masks (k sweep, book)"] == count[circuit.circuit_results], preset
        assert runs["attribution maps"] >= count[model.attribution_results], preset
        assert runs["SAE training (book)"] == count[layer.train_sae], preset
    bad = levels.Piece("an unknown piece", print, (0.0,))
    with pytest.raises(KeyError, match="an unknown piece"):
        cost._piece_work(cost._Book(load_config("smoke")), "neuron", bad)
