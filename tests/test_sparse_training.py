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
