"""bf16 autocast of the forward-only passes stays within the tolerances stated in
impact_core/precision.py (against fp32, on a small seeded model trained here)."""
import pytest
import torch

from impact_core.methods import pruning
from impact_core.cache import ResultCache
from impact_core.config import ConfigError, load_config
from impact_core.data import Batches, load_splits
from impact_core.models import build_model, evaluate, train_classifier
from impact_core.pipeline import cache_for
from impact_core.precision import autocast
from impact_core.methods.sae import activation_chunks
from impact_core.methods.sites import PAPER_SITES, HookedViT, compute_site_means
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained():
    cfg = tiny_config(data={"train_images": 3000, "eval_images": 1000, "calib_images": 256, "batch_size": 250})
    splits = load_splits(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    train_classifier(model, splits["train"], images=15000, batch_size=50, lr=3e-3, weight_decay=0.05)
    return cfg, model.eval(), splits


def test_fp32_autocast_is_a_no_op(trained):
    cfg, model, splits = trained
    x, _ = next(iter(Batches(splits["eval"], 32)))
    with torch.no_grad(), autocast("cpu", "fp32"):
        a = model(x)
    with torch.no_grad():
        b = model(x)
    assert torch.equal(a, b)
    with torch.no_grad(), autocast("cpu", "bf16"):
        assert model(x).dtype == torch.bfloat16  # bf16 really is in use


def test_accuracy_and_predictions(trained):
    cfg, model, splits = trained
    a32 = evaluate(model, splits["eval"], 250)
    a16 = evaluate(model, splits["eval"], 250, precision="bf16")
    assert a32["top1"] > 0.5  # a model that has learnt something, so predictions are meaningful
    assert abs(a32["top1"] - a16["top1"]) <= 0.01
    same = []
    for x, _ in Batches(splits["eval"], 250):
        with torch.no_grad():
            p32 = model(x).argmax(1)
            with autocast("cpu", "bf16"):
                p16 = model(x).argmax(1)
        same.append((p32 == p16).float())
    assert torch.cat(same).mean() >= 0.98


def test_calibration_norms_and_wanda_masks(trained):
    cfg, model, splits = trained
    n32 = pruning.input_norms(model, Batches(splits["calib"], 128))
    n16 = pruning.input_norms(model, Batches(splits["calib"], 128), precision="bf16")
    agree, total = 0, 0
    for name, layer in pruning.prunable_linears(model).items():
        assert ((n16[name] - n32[name]).abs() / n32[name]).max() <= 1e-2, name
        m32 = pruning.row_mask(pruning.scores(layer.weight, "wanda", n32[name]), 0.5)
        m16 = pruning.row_mask(pruning.scores(layer.weight, "wanda", n16[name]), 0.5)
        agree += (m32 == m16).sum().item()
        total += m32.numel()
    assert agree / total >= 0.99


def test_site_means(trained):
    cfg, model, splits = trained
    hooked = HookedViT(model)
    names = hooked.site_names(sites=PAPER_SITES)
    m32 = compute_site_means(hooked, Batches(splits["calib"], 128), names)
    m16 = compute_site_means(hooked, Batches(splits["calib"], 128), names, precision="bf16")
    for name in names:
        assert (m16[name] - m32[name]).abs().max() <= 2e-2 * m32[name].abs().max(), name


def test_sae_activations(trained):
    cfg, model, splits = trained
    hooked = HookedViT(model)
    for tokens in ("cls", "all"):
        a32 = torch.cat(list(activation_chunks(hooked, Batches(splits["calib"], 128), "blocks.11.resid_post",
                                               tokens, "cpu")))
        a16 = torch.cat(list(activation_chunks(hooked, Batches(splits["calib"], 128), "blocks.11.resid_post",
                                               tokens, "cpu", "bf16")))
        assert a16.dtype == torch.float32
        assert (a16 - a32).norm() / a32.norm() <= 1e-2


def test_precision_in_config_and_cache_keys(tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        load_config("smoke", overrides={"precision": "fp16"})
    fp32 = load_config("smoke")
    bf16 = load_config("smoke", overrides={"precision": "bf16"})
    inputs = {"a": 1}
    salted = ResultCache(tmp_path, salt={"cpu_threads": fp32.cpu_threads})  # on the CPU: the thread count
    assert cache_for(fp32).key("accuracy", inputs) == salted.key("accuracy", inputs)  # fp32 adds nothing more
    assert cache_for(bf16).key("accuracy", inputs) != cache_for(fp32).key("accuracy", inputs)


def test_cpu_threads_fix_the_numbers_and_enter_the_keys(tmp_path):
    """The thread count changes the last bits of a training run, so it is one setting of the config
    (default 1), applied by preflight whatever the process had, and part of every CPU key."""
    from impact_core.pipeline import preflight

    with pytest.raises(ConfigError, match="cpu_threads"):
        load_config("smoke", overrides={"cpu_threads": 0})
    one, two = load_config("smoke"), load_config("smoke", overrides={"cpu_threads": 2})
    assert one.cpu_threads == 1
    assert cache_for(one).key("accuracy", {"a": 1}) != cache_for(two).key("accuracy", {"a": 1})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        preflight(one)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
