import pytest
import torch

from impact_core import pipeline
from impact_core.config import load_config
from impact_core.data import DataError
from impact_core.models import CheckpointError, build_model, check_checkpoint, load_checkpoint
from tests.conftest import tiny_config


def test_small_model_is_deit3_style(tiny_model):
    assert len(tiny_model.blocks) == 12
    assert tiny_model.no_embed_class and tiny_model.cls_token is not None
    blk = tiny_model.blocks[0]
    assert hasattr(blk.ls1, "gamma") and blk.attn.qkv.out_features == 3 * tiny_model.embed_dim


def test_attention_is_fused_and_the_explicit_trace_agrees(tiny_model):
    from impact_core.methods import attribution

    assert all(blk.attn.fused_attn for blk in tiny_model.blocks)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        logits, trace = attribution.forward_trace(tiny_model, x)
        assert torch.allclose(logits, tiny_model(x), atol=1e-5)
    assert trace["blocks.0.pattern"].shape == (4, tiny_model.blocks[0].attn.num_heads, 17, 17)


def test_training_with_a_batch_larger_than_the_split_is_an_error(tiny_model, tiny_fmnist):
    from impact_core.data import load_splits
    from impact_core.models import train_classifier

    split = load_splits(tiny_config(tiny_fmnist))["train"]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_classifier(tiny_model, split, images=16, batch_size=len(split) + 1, lr=1e-3, weight_decay=0.0)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())


def test_foreach_adamw_equals_the_plain_loop_to_the_bit(tiny_fmnist, monkeypatch):
    """train_classifier updates every parameter with foreach AdamW kernels; the plain per-tensor loop
    gives the same losses and weights, bit for bit (so the cached models need no new key)."""
    from impact_core import models

    split = pipeline.splits(tiny_config(tiny_fmnist))["train"]
    kw = dict(images=96, batch_size=16, lr=1e-3, weight_decay=0.05, seed=3)
    torch.manual_seed(0)
    fast_model = build_model(tiny_config().model)
    plain_model = build_model(tiny_config().model)
    plain_model.load_state_dict(fast_model.state_dict())
    fast = models.train_classifier(fast_model, split, **kw)
    adamw = torch.optim.AdamW
    monkeypatch.setattr(models.torch.optim, "AdamW", lambda params, **k: adamw(params, **{**k, "foreach": False}))
    plain = models.train_classifier(plain_model, split, **kw)
    assert fast == plain and len(fast) == 6
    for (name, a), b in zip(fast_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_deit3_base_from_a_local_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg_model = load_config("paper").model
    reference = build_model(cfg_model)
    assert type(reference).__name__ == "VisionTransformer" and reference.no_embed_class
    path = tmp_path / "deit3_base.pth"
    torch.save({"model": reference.state_dict()}, path)  # the DeiT release layout
    monkeypatch.setenv("IMPACT_DEIT3_CHECKPOINT", str(path))
    monkeypatch.setenv("IMPACT_IMAGENET", str(tmp_path))
    cfg = load_config("paper", {"device": "cpu"})
    check_checkpoint(cfg.model)
    model = load_checkpoint(build_model(cfg.model), cfg.model.checkpoint)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))


def test_missing_or_wrong_checkpoint(tmp_path):
    cfg = load_config("paper", {"model.checkpoint": str(tmp_path / "absent.pth")})
    with pytest.raises(CheckpointError, match="file not found.*absent.pth"):
        check_checkpoint(cfg.model)
    bad = tmp_path / "bad.pth"
    torch.save({"head.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(build_model(tiny_config().model), bad)


def test_preflight_fails_before_compute(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data folder not found"):
        pipeline.preflight(tiny_config(tmp_path / "missing"))
    monkeypatch.delenv("IMPACT_DEIT3_CHECKPOINT", raising=False)
    monkeypatch.setenv("IMPACT_IMAGENET", str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(CheckpointError, match="model.checkpoint"):
        pipeline.preflight(load_config("paper", {"device": "cpu"}))


def test_pipeline_caches_and_is_deterministic(tiny_fmnist, tmp_path, caplog):
    import logging

    pipeline.setup_logging()
    caplog.set_level(logging.INFO, logger="impact_core")
    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 32, "finetune_batch_size": 16})
    cfg.cache_dir = str(tmp_path / "cache")
    acc = pipeline.accuracy(cfg, 0.5, "wanda")
    assert 0 <= acc["top1"] <= 1 and acc["images"] == 20
    assert any("computing pruned_model" in r.message for r in caplog.records)
    caplog.clear()
    again = pipeline.pruned_model(cfg, 0.5, "wanda")
    assert any("reusing pruned_model" in r.message for r in caplog.records)
    # same seed, same numbers: a fresh cache reproduces the weights bit for bit
    cfg2 = tiny_config(tiny_fmnist, pruning={"finetune_images": 32, "finetune_batch_size": 16})
    cfg2.cache_dir = str(tmp_path / "cache2")
    fresh = pipeline.pruned_model(cfg2, 0.5, "wanda")
    for (n, a), (_, b) in zip(again.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(Exception, match="sparsity must lie in"):
        pipeline.pruned_model(cfg, 1.0)


def test_the_random_weights_model_is_the_dense_models_starting_point(tiny_fmnist, tmp_path, monkeypatch):
    """``(0, RANDOM_WEIGHTS)``: the weights train_dense starts from (its training replaced by nothing here),
    a model kind of its own (not the dense model, at sparsity 0 only)."""
    from impact_core import models

    cfg = tiny_config(tiny_fmnist)
    cfg.cache_dir = str(tmp_path / "cache")
    random = pipeline.pruned_model(cfg, 0.0, pipeline.RANDOM_WEIGHTS)
    monkeypatch.setattr(models, "train_classifier", lambda *a, **k: [])
    start, _ = models.train_dense(cfg, pipeline.splits(cfg))
    for (name, a), b in zip(random.state_dict().items(), start.state_dict().values()):
        assert torch.equal(a, b), name
    assert not pipeline.is_dense(0.0, pipeline.RANDOM_WEIGHTS) and pipeline.is_dense(0.0, "magnitude")
    assert pipeline.model_label(0.0, pipeline.RANDOM_WEIGHTS) == "random weights"
    assert "random_weights" in pipeline.model_inputs(cfg, 0.0, pipeline.RANDOM_WEIGHTS)
    with pytest.raises(ValueError, match="random weights model has nothing pruned"):
        pipeline.model_inputs(cfg, 0.5, pipeline.RANDOM_WEIGHTS)
