"""The chapters' galleries (top-activating images of units and SAE latents, per-class circuit maps,
per-image attribution curves) on a tiny seeded model: what they return is checked against plain
reference loops over all images, their figures have one image panel per shown image, and the cached
galleries compute nothing on a second call."""
from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import tiny_config, tiny_vit, write_tiny_fmnist  # noqa: E402
from impact_core import pipeline  # noqa: E402
from impact_core.levels import circuit as circuit_level  # noqa: E402
from impact_core.levels import layer, neuron  # noqa: E402
from impact_core.levels import model as model_level  # noqa: E402
from impact_core.methods import circuits  # noqa: E402
from impact_core.methods.perturbation import auc  # noqa: E402
from impact_core.methods.sites import HookedViT  # noqa: E402


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Fashion-MNIST-shaped IDX files (60 train / 20 test images) and a cache of this module's own."""
    root = tmp_path_factory.mktemp("gallery")
    data = write_tiny_fmnist(root / "fmnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMPACT_CACHE", str(root / "cache"))
        yield data


def image_panels(fig) -> int:
    return sum(1 for ax in fig.axes if ax.images)


def computed_kinds(caplog, call) -> set[str]:
    """The cache kinds ``call()`` computes (not reuses)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="impact_core"):
        call()
    return {r.getMessage().split()[2].split("/")[0] for r in caplog.records
            if r.getMessage().startswith("cache: computing")}


def check_top_images(g: dict, reference: torch.Tensor, split, cfg, n: int) -> None:
    """``g``'s row ``j`` against ``reference[:, j]`` (every image's activation of unit ``j``): the returned
    values are the ``n`` highest, at the returned images, with those images' labels and pixels."""
    assert g["activations"].shape == g["positions"].shape == g["labels"].shape == (reference.shape[1], n)
    for j in range(reference.shape[1]):
        ref = reference[:, j]
        assert torch.allclose(g["activations"][j], ref.sort(descending=True).values[:n], atol=1e-5)
        assert torch.allclose(ref[g["positions"][j]], g["activations"][j], atol=1e-5)
        assert len(set(g["positions"][j].tolist())) == n
        assert (g["activations"][j][:-1] >= g["activations"][j][1:]).all()
        pos = g["positions"][j].numpy()
        assert g["labels"][j].tolist() == split.labels[pos].tolist()
        x, _ = split.dataset.batch(split.indices[pos])
        pixels = (x * cfg.model.std[0] + cfg.model.mean[0]).clamp(0, 1)
        assert torch.allclose(g["images"][j], pixels, atol=1e-6)


def test_top_activating_picks_the_highest_rows_stably():
    scores = torch.tensor([[1.0, 5.0], [3.0, 5.0], [3.0, -1.0], [0.5, 2.0]])
    values, rows = neuron.top_activating(scores, 3)
    assert rows.tolist() == [[1, 2, 0], [0, 1, 3]]  # ties: the earlier image first
    assert values.tolist() == [[3.0, 3.0, 1.0], [5.0, 5.0, 2.0]]
    assert neuron.top_activating(scores, 10)[1].shape == (2, 4)  # at most every image
    with pytest.raises(ValueError, match="positive"):
        neuron.top_activating(scores, 0)
    assert neuron.gallery_classes(2, [3, 5, 7]) == [3, 5]
    with pytest.raises(ValueError, match="analysed"):
        neuron.gallery_classes([4], [3, 5, 7])


def test_neuron_gallery_returns_the_top_activating_images(tiny_setup, caplog):
    cfg = tiny_config(tiny_setup, data={"eval_images": 20},
                      neuron={"blocks": [5, 11], "top_k": 2, "images": 20, "validation_units": 1,
                              "validation_images": 10})
    n = 4
    assert "neuron_gallery" in computed_kinds(caplog, lambda: neuron.neuron_gallery(cfg, 0.0, classes=3,
                                                                                     images_per_unit=n))
    hooked = pipeline.hooked_model(cfg, 0.0)
    with pytest.MonkeyPatch.context() as mp:  # the second call loads the cached gallery: no forward pass
        mp.setattr(pipeline, "hooked_model", lambda *a, **k: pytest.fail("the gallery was recomputed"))
        kinds = computed_kinds(caplog, lambda: neuron.neuron_gallery(cfg, 0.0, classes=3, images_per_unit=n))
        g = neuron.neuron_gallery(cfg, 0.0, classes=3, images_per_unit=n)
    assert kinds == set()
    r = neuron.neuron_metrics(cfg, 0.0)
    assert g["block"] == 11 and g["classes"] == [0, 1, 2]
    assert g["units"] == [int(r["topk"][1, c, 0]) for c in range(3)]
    n_mlp = hooked.mlp_dim
    for name, u in zip(g["unit_names"], g["units"]):
        assert name == (f"block 11, neuron {u}" if u < n_mlp else f"block 11, head {u - n_mlp}")

    # reference: one image at a time, each unit's activation maxed over the patch tokens by hand
    split = neuron.metric_images(cfg, pipeline.splits(cfg)["eval"])
    reference = torch.zeros(len(split), len(g["units"]))
    with torch.no_grad():
        for i in range(len(split)):
            x, _ = split.dataset.batch(split.indices[i:i + 1])
            _, cache = hooked.run_with_cache(x, ["blocks.11.mlp_act", "blocks.11.heads"])
            for j, u in enumerate(g["units"]):
                if u < n_mlp:
                    reference[i, j] = cache["blocks.11.mlp_act"][0, 1:, u].max()
                else:
                    reference[i, j] = cache["blocks.11.heads"][0, 1:, u - n_mlp].norm(dim=-1).max()
    check_top_images(g, reference, split, cfg, n)

    other = neuron.neuron_gallery(cfg, 0.0, classes=[4, 1], images_per_unit=2, block=5)
    assert other["classes"] == [4, 1] and other["block"] == 5 and other["units"][1] == int(r["topk"][0, 1, 0])
    with pytest.raises(ValueError, match="not analysed"):
        neuron.neuron_gallery(cfg, 0.0, block=7)

    fig = neuron.gallery_figure({"dense": g, "again": g}, title="t")
    assert isinstance(fig, matplotlib.figure.Figure) and image_panels(fig) == 3 * 2 * n
    plt.close(fig)


@pytest.mark.parametrize("tokens", ["cls", "all"])
def test_sae_gallery_returns_the_top_activating_images(tiny_setup, caplog, tokens):
    cfg = tiny_config(tiny_setup, data={"eval_images": 20},
                      sae={"tokens": tokens, "k": 2, "expansion": 2, "batch_size": 16, "steps": 3, "aux_k": 4,
                           "train_images": 40, "eval_images": 20, "seeds": 1, "top_k": 2})
    n = 5
    assert "sae_gallery" in computed_kinds(caplog, lambda: layer.sae_gallery(cfg, 0.0, classes=2, images_per_unit=n))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "hooked_model", lambda *a, **k: pytest.fail("the gallery was recomputed"))
        kinds = computed_kinds(caplog, lambda: layer.sae_gallery(cfg, 0.0, classes=2, images_per_unit=n))
        g = layer.sae_gallery(cfg, 0.0, classes=2, images_per_unit=n)
    assert kinds == set()
    feats = layer.sae_feature_metrics(cfg, 0.0)
    assert g["units"] == [int(feats["topk"][c, 0]) for c in range(2)] and g["tokens"] == tokens
    assert g["block"] == cfg.model.depth - 1

    # reference: one image at a time through the model and the SAE
    entry = layer.train_sae(cfg, 0.0)
    sae = layer.load_sae(entry)
    hooked = pipeline.hooked_model(cfg, 0.0)
    name = f"blocks.{entry['block']}.resid_post"
    split = layer.seeded_subset(pipeline.splits(cfg)["eval"], cfg.sae.eval_images, cfg.seed + 1)
    reference = torch.zeros(len(split), 2)
    with torch.no_grad():
        for i in range(len(split)):
            x, _ = split.dataset.batch(split.indices[i:i + 1])
            _, cache = hooked.run_with_cache(x, [name])
            act = cache[name][0]  # (tokens, d)
            for j, u in enumerate(g["units"]):
                if tokens == "cls":
                    reference[i, j] = sae.encode(act[:1])[0, u]
                else:  # the max over the patch tokens (Eq. 5)
                    reference[i, j] = sae.encode(act[1:])[:, u].max()
    check_top_images(g, reference, split, cfg, n)

    fig = layer.gallery_figure({"dense": g, "again": g})
    assert isinstance(fig, matplotlib.figure.Figure) and image_panels(fig) == 2 * 2 * n
    plt.close(fig)


def test_circuit_gallery_is_the_per_class_site_fraction(tiny_setup, monkeypatch):
    cfg = tiny_config(tiny_setup)
    hooked = HookedViT(tiny_vit(depth=3, dim=8, heads=2))
    g_ = torch.Generator().manual_seed(0)
    active = {nm: torch.rand(3, hooked.num_units(nm), generator=g_) > 0.4 for nm in circuits.node_sites(hooked)}
    fake = {"classes": [2, 5, 7], "k": 4e-5, "active": active, "node_fraction": circuits.node_fraction(hooked, active)}
    monkeypatch.setattr(circuit_level, "circuit_results", lambda cfg, s, k=None, method="wanda": fake)
    want = circuits.site_fractions(hooked, active)
    assert torch.allclose(circuit_level.active_fractions(active), want)
    g = circuit_level.circuit_gallery(cfg, 0.0, classes=[7, 2])
    assert g["classes"] == [7, 2] and g["fraction"].shape == (2, 3, 8)
    assert torch.allclose(g["fraction"], want[[2, 0]])
    assert torch.allclose(g["node_fraction"], fake["node_fraction"][[2, 0]])
    assert circuit_level.circuit_gallery(cfg, 0.0)["classes"] == [2, 5]
    fig = circuit_level.gallery_figure({"dense": g, "70%": g})
    assert isinstance(fig, matplotlib.figure.Figure) and image_panels(fig) == 2 * 2
    plt.close(fig)


def test_attribution_gallery_curves_are_the_images_own(tiny_setup):
    cfg = tiny_config(tiny_setup, data={"eval_images": 20},
                      attribution={"images": 6, "steps": 3, "batch_size": 2, "figure_classes": 3,
                                   "figure_per_class": 1, "references": ["black", "rise"]})
    res = model_level.attribution_results(cfg, 0.0)
    for ref in ("black", "rise"):
        g = model_level.attribution_gallery(cfg, 0.0, images=2, reference=ref)
        assert g["reference"] == ref and g["insertion_curve"].shape == g["deletion_curve"].shape == (2, 4)
        assert g["maps"].shape == (2, 28, 28) and g["images"].shape == (2, 1, 28, 28)
        pos = [res["figure_positions"][i] for i in g["rows"]]
        assert g["positions"].tolist() == pos and g["labels"].tolist() == res["labels"][pos].tolist()
        assert torch.equal(g["targets"], res["targets"][pos])
        # the per-image AUCs are the cached results' for the same images
        assert torch.allclose(g["insertion"], res["scores"][ref]["chefer"]["insertion"][pos], atol=1e-5)
        assert torch.allclose(g["deletion"], res["scores"][ref]["chefer"]["deletion"][pos], atol=1e-5)
        assert torch.allclose(auc(g["insertion_curve"]), g["insertion"])
    assert len(set(g["labels"].tolist())) == 2  # one image per class first
    with pytest.raises(ValueError, match="reference"):
        model_level.attribution_gallery(cfg, 0.0, reference="mean")
    fig = model_level.gallery_figure({"dense": g, "again": g})
    assert isinstance(fig, matplotlib.figure.Figure) and image_panels(fig) == 2 * (1 + 2)
    plt.close(fig)
