import pytest
import torch

from impact_core.methods import pruning
from impact_core.data import Batches, load_splits
from impact_core.models import train_classifier
from tests.conftest import tiny_config


def test_row_mask_matches_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    for sparsity in (0.0, 0.1, 0.5, 0.7, 0.9):
        score = torch.randint(0, 5, (7, 13), generator=g).float()  # many ties
        assert torch.equal(pruning.row_mask(score, sparsity), pruning.row_mask_reference(score, sparsity))


def test_wanda_prunes_exactly_the_lowest_scores_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 20, generator=g)
    norm = torch.rand(20, generator=g) + 0.1
    s = pruning.scores(w, "wanda", norm)
    keep = pruning.row_mask(s, 0.5)
    for i in range(6):  # brute force: every pruned score <= every kept score, exactly 10 pruned
        assert (~keep[i]).sum() == 10
        assert s[i][~keep[i]].max() <= s[i][keep[i]].min()
    assert torch.allclose(s, w.abs() * norm)


def test_input_norms_match_direct_computation(tiny_model):
    x = torch.randn(3, 1, 28, 28)
    norms = pruning.input_norms(tiny_model, [(x, torch.zeros(3))])
    blk = tiny_model.blocks[0]
    tokens = blk.norm1(tiny_model._pos_embed(tiny_model.patch_embed(x)))
    expected = tokens.reshape(-1, tokens.shape[-1]).pow(2).sum(0).sqrt()
    assert torch.allclose(norms["blocks.0.attn.qkv"], expected, atol=1e-4)
    assert set(norms) == set(pruning.prunable_linears(tiny_model))


def test_only_block_linears_are_pruned(tiny_model):
    head = tiny_model.head.weight.clone()
    embed = tiny_model.patch_embed.proj.weight.clone()
    pruning.prune_model(tiny_model, "magnitude", 0.5)
    assert torch.equal(head, tiny_model.head.weight) and torch.equal(embed, tiny_model.patch_embed.proj.weight)
    names = {n.split(".")[-1] for n in pruning.prunable_linears(tiny_model)}
    assert names == {"qkv", "proj", "fc1", "fc2"}
    for name, value in pruning.layer_sparsity(tiny_model).items():
        assert value == 0.5, name


def test_mask_survives_finetuning(tiny_fmnist):
    cfg = tiny_config(tiny_fmnist)
    splits = load_splits(cfg)
    from impact_core.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    norms = pruning.input_norms(model, Batches(splits["calib"], 8))
    masks = pruning.prune_model(model, "wanda", 0.7, norms)
    before = pruning.layer_sparsity(model)
    # Without re-applying masks, AdamW revives pruned weights ...
    import copy
    free = copy.deepcopy(model)
    train_classifier(free, splits["train"], images=32, batch_size=16, lr=1e-2, weight_decay=0.05)
    assert min(pruning.layer_sparsity(free).values()) < 0.7
    # ... with the mask re-applied after every step the sparsity stays exact.
    train_classifier(model, splits["train"], images=32, batch_size=16, lr=1e-2, weight_decay=0.05,
                     after_step=lambda m: pruning.apply_masks(m, masks))
    after = pruning.layer_sparsity(model)
    for name, layer in pruning.prunable_linears(model).items():
        assert after[name] == before[name] == int(layer.in_features * 0.7) / layer.in_features
    assert all(torch.equal(masks[n], m) for n, m in pruning.masks_from_weights(model).items())


def test_control_model_is_dense_fine_tuned_like_a_pruned_model(tiny_fmnist, tmp_path, monkeypatch):
    """The negative control: exactly the dense model's nonzero count, the same fine-tuning
    (steps and images) as a pruned model, and weights that differ from dense (it was tuned)."""
    from impact_core import pipeline
    from impact_core.levels import pruning as pruning_level

    monkeypatch.setenv("IMPACT_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 32, "finetune_batch_size": 16, "sparsities": [0.5]},
                      data={"eval_images": 20})
    table = pruning_level.control_check(cfg, sparsity=0.5)
    dense, control, pruned = table.index
    assert table.loc[control, "nonzero block weights"] == table.loc[dense, "nonzero block weights"]
    assert table.loc[pruned, "nonzero block weights"] < table.loc[dense, "nonzero block weights"]
    assert table.loc[control, "fine-tuning steps"] == table.loc[pruned, "fine-tuning steps"] == 2
    assert table.loc[control, "fine-tuning images"] == table.loc[pruned, "fine-tuning images"] == 32
    d, c = pipeline.dense_model(cfg).state_dict(), pipeline.pruned_model(cfg, 0.0, pipeline.CONTROL).state_dict()
    assert any(not torch.equal(d[k], c[k]) for k in d)
    assert pipeline.model_inputs(cfg, 0.0, pipeline.CONTROL) != pipeline.model_inputs(cfg, 0.0)
    with pytest.raises(ValueError, match="nothing pruned"):
        pipeline.pruned_model(cfg, 0.5, pipeline.CONTROL)
