"""Transformer attribution (Chefer, LayerScale-aware) and insertion / deletion: tiny, seconds."""
import math

import pytest
import torch
import torch.nn as nn

from impact_core.methods import attribution as attr
from impact_core.levels import model as model_level
from impact_core.methods import perturbation as pert
from impact_core.methods.sites import ALL_SITES, ATTRIBUTION_SITES, LOGITS, POOLED, HookedViT, block_name, site_name
from conftest import tiny_vit


def layerscale_vit(seed=0, depth=2):
    """:func:`conftest.tiny_vit` with varied LayerScale, so that the two LayerScale rules really differ."""
    m = tiny_vit(patch_size=2, dim=16, depth=depth, mlp_ratio=2.0, init_values=0.3, seed=seed)
    with torch.no_grad():
        for b in m.blocks:
            b.ls1.gamma.uniform_(0.05, 0.5)
            b.ls2.gamma.uniform_(0.05, 0.5)
    return m


# ----------------------------------------------------------------------------- rules conserve


def test_linear_rule_conserves():
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, 7, 12, generator=g), torch.randn(9, 12, generator=g)
    R = torch.rand(5, 7, 9, generator=g)
    Rin = attr.lrp_linear(x, W, R)
    assert torch.allclose(Rin.sum((1, 2)), R.sum((1, 2)), rtol=1e-4)
    # bias ignored: relevance does not depend on it, and a one-hot on a unit with z+ > 0 stays there
    assert Rin.shape == x.shape


def test_add_and_matmul_rules_conserve():
    g = torch.Generator().manual_seed(1)
    a, b, R = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    Ra, Rb = attr.lrp_add(a, b, R)
    assert torch.allclose((Ra + Rb).sum((1, 2)), R.sum((1, 2)), rtol=1e-4, atol=1e-5)
    A = torch.rand(3, 2, 5, 5, generator=g).softmax(-1)
    V, Rm = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    RA, RV = attr.lrp_matmul(A, V, Rm)
    assert torch.allclose(RA.sum((1, 2, 3)), Rm.sum((1, 2, 3)) / 2, rtol=1e-4, atol=1e-5)
    assert torch.allclose(RV.sum((1, 2, 3)), Rm.sum((1, 2, 3)) / 2, rtol=1e-4, atol=1e-5)


def test_layerscale_z_rule_conserves_eq14_does_not():
    """The z-rule through b = gamma * u (gradient x input, R_u = u * gamma * R_b / b) conserves relevance;
    Eq. 14 scales each unit's relevance by 1 / gamma and does not. Checked in a whole model, LayerScale
    by LayerScale."""
    g = torch.Generator().manual_seed(0)
    gamma = torch.tensor([0.1, 0.5, 2.0])
    u, R = torch.randn(4, 6, 3, generator=g), torch.rand(4, 6, 3, generator=g) + 0.1
    z_by_autograd = attr._gi(lambda t: gamma * t, [u], R)[0]  # the generic z-rule of an elementwise product
    assert torch.allclose(attr.lrp_layerscale(gamma, R, "z"), z_by_autograd, atol=1e-5)
    inv = attr.lrp_layerscale(gamma, R, "inverse")
    assert torch.allclose(inv, R / (gamma + attr.LAYERSCALE_EPS))
    m, x = layerscale_vit(depth=2), torch.randn(3, 1, 8, 8)
    rows = {rule: {r["layer"]: r for r in attr.relevance_conservation(m, x, rule)} for rule in attr.LAYERSCALE_RULES}
    for i, blk in enumerate(m.blocks):
        for name in (site_name(i, "attn_out"), site_name(i, "mlp_out")):  # the LayerScale steps
            z, eq14 = rows["z"][name], rows["inverse"][name]
            assert z["ratio"] == pytest.approx(1.0, abs=1e-5)
            assert abs(eq14["ratio"] - 1) > 0.05  # signed relevance reweighted by 1 / gamma, gamma in [0.05, 0.5]


def test_whole_model_conservation_per_layer():
    m = layerscale_vit(depth=3)
    x = torch.randn(4, 1, 8, 8)
    z = attr.relevance_conservation(m, x, "z")
    assert all(abs(r["at_input"] - r["at_output"]) < 1e-3 * max(1.0, abs(r["at_output"])) for r in z), z
    inv = attr.relevance_conservation(m, x, "inverse")
    blocks = [r for r in inv if r["layer"].count(".") == 1]
    assert any(abs(r["ratio"] - 1) > 0.05 for r in blocks)


# ----------------------------------------------------------------------------- implementation checks


def test_trace_matches_model_and_qkv_decoupling_equals_fused():
    m = layerscale_vit()
    x = torch.randn(3, 1, 8, 8)
    logits, trace = attr.forward_trace(m, x)
    assert torch.allclose(logits, m(x), atol=1e-5)
    t = logits.argmax(1)
    dec = attr.relprop(m, trace, t)
    fused = attr.relprop(m, trace, t, fused_qkv=True)
    for a, b in zip(dec, fused):
        assert torch.allclose(a, b, atol=1e-6)


def test_trace_and_report_use_the_site_names():
    """forward_trace names what it records as sites.py does, and its sites equal HookedViT's;
    every conservation row is named by a recorded site, a block or the logits."""
    m = layerscale_vit()
    x = torch.randn(3, 1, 8, 8)
    _, trace = attr.forward_trace(m, x)
    hooked = HookedViT(m)
    names = hooked.site_names(sites=ALL_SITES)
    assert set(trace) == set(names) | set(hooked.site_names(sites=ATTRIBUTION_SITES)) | {POOLED}
    _, cache = hooked.run_with_cache(x, names)
    for n in names:
        assert torch.allclose(trace[n], cache[n], atol=1e-5), n
    layers = [r["layer"] for r in attr.relevance_conservation(m, x)]
    assert set(layers) <= set(trace) | {LOGITS} | {block_name(i) for i in range(hooked.depth)}
    assert len(set(layers)) == len(layers) == 1 + 11 * hooked.depth  # the head, then 11 steps per block


@pytest.mark.parametrize("rule", attr.LAYERSCALE_RULES)
def test_fast_equals_plain_reference(rule):
    m = layerscale_vit(seed=3)
    x = torch.randn(3, 1, 8, 8)
    fast = attr.attribute(m, x, "chefer", layerscale_rule=rule)["patch"]
    ref = torch.stack([attr.chefer_reference(m, x[i], layerscale_rule=rule) for i in range(3)])
    # float32 rounding of two different orders of the same sums, at the scale of the map: the inverse
    # rule (Eq. 14) divides by the LayerScale output, which amplifies it (measured up to 3.7e-5 of the
    # map's maximum on an AMD EPYC machine, 7e-6 for the z-rule); a wrong rule moves the map by 1e-2 or more
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


@pytest.mark.parametrize("method", ["chefer", "rollout", "generic"])
def test_batched_equals_one_by_one(method):
    m = layerscale_vit(seed=4)
    x = torch.randn(5, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 1, 0])
    batched = attr.attribute(m, x, method, target=target, batch_size=5)
    single = [attr.attribute(m, x[i:i + 1], method, target=int(target[i])) for i in range(5)]
    # maps scaled to a maximum of 1; a batch of one runs other matrix kernels than a batch of five, and
    # rollout multiplies their rounding through the layers' attention products (measured up to 4.7e-5
    # on an AMD EPYC machine); an image mixed up with another would move its map by far more
    assert torch.allclose(batched["maps"], torch.cat([s["maps"] for s in single]), atol=1e-4)
    assert torch.equal(batched["target"], target)


def test_bad_input_is_rejected_before_compute():
    m = layerscale_vit()
    with pytest.raises(attr.AttributionError, match="unknown attribution method"):
        attr.attribute(m, torch.zeros(1, 1, 8, 8), "gradcam")
    with pytest.raises(attr.AttributionError, match="do not fit"):
        attr.attribute(m, torch.zeros(1, 3, 8, 8))
    with pytest.raises(attr.AttributionError, match="LayerScale rule"):
        attr.attribute(m, torch.zeros(1, 1, 8, 8), layerscale_rule="eq14")


# ----------------------------------------------------------------------------- planted toy


def planted_batch(n, g):
    """8x8 images, 16 patches of 2x2, faint noise; one patch at a random place carries a marker
    (its top-left pixel = 1) and the class (its bottom-right pixel = +1 for class 1, -1 for class 0)."""
    x = 0.02 * torch.randn(n, 1, 8, 8, generator=g)
    where = torch.randint(0, 16, (n,), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        r, c = divmod(int(where[i]), 4)
        x[i, 0, 2 * r, 2 * c] = 1.0
        x[i, 0, 2 * r + 1, 2 * c + 1] = 1.0 if y[i] else -1.0
    return x, y, where


@pytest.fixture(scope="module")
def planted_model():
    """A one-block ViT wired by hand: the class token attends to the marked patch and reads its sign.

    Token features come in (+a, -a) pairs so LayerNorm keeps their signs and each class has
    positive evidence (the alpha=1, beta=0 rule ignores negative contributions): dims 0/1 the sign pixel,
    2/3 a class-token flag, 4/5 the marker pixel, 6/7 a constant (a floor for LayerNorm's std).
    """
    m = tiny_vit(patch_size=2, dim=8, depth=1, heads=1, classes=2, mlp_ratio=2.0, init_values=1.0)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for n in m.modules():
            if isinstance(n, nn.LayerNorm):
                n.weight.fill_(1.0)
        m.blocks[0].ls1.gamma.fill_(1.0)
        m.blocks[0].ls2.gamma.fill_(1.0)
        w = m.patch_embed.proj.weight  # (8, 1, 2, 2)
        w[0, 0, 1, 1], w[1, 0, 1, 1] = 1.0, -1.0
        w[4, 0, 0, 0], w[5, 0, 0, 0] = 3.0, -3.0
        m.patch_embed.proj.bias[6], m.patch_embed.proj.bias[7] = 1.0, -1.0
        m.cls_token[0, 0, 2], m.cls_token[0, 0, 3] = 1.0, -1.0
        qkv = m.blocks[0].attn.qkv.weight  # rows: q (8), k (8), v (8)
        qkv[0, 2] = 10.0  # q: "I am the class token"
        qkv[8, 4] = 10.0  # k: "I carry the marker"
        qkv[16, 0], qkv[17, 1] = 1.0, 1.0  # v: the sign pixel, as (+s, -s)
        m.blocks[0].attn.proj.weight.copy_(torch.eye(8))
        m.head.weight[1, 0], m.head.weight[0, 1] = 5.0, 5.0  # positive evidence for either class
    return m.eval()


def test_planted_patch_gets_the_maximum(planted_model):
    g = torch.Generator().manual_seed(123)
    x, y, where = planted_batch(24, g)
    assert (planted_model(x).argmax(1) == y).float().mean() > 0.9  # the toy was learnt
    patch = attr.attribute(planted_model, x, "chefer")["patch"].flatten(1)
    hits = (patch.argmax(1) == where).float().mean()
    assert hits >= 0.9, hits


def test_randomised_model_gives_different_maps(planted_model):
    g = torch.Generator().manual_seed(7)
    x, _, _ = planted_batch(24, g)  # enough images for the interval of the mean correlation to decide
    trained = attr.attribute(planted_model, x, "chefer")
    rand = attr.attribute(attr.randomized_model(planted_model, seed=0), x, "chefer", target=trained["target"])
    rho = attr.spearman_per_image(trained["maps"], rand["maps"])
    check = model_level.randomisation_check({"randomisation": {"chefer": rho}})["chefer"]
    assert check["constant_maps"] == 0 and check["high"] < 0.5 and check["verdict"] == "passes", (check, rho)
    # on this one-block toy some re-initialisations give constant maps (the class row of A_bar clamps to 0):
    # seed 1 does, and the check must say so instead of passing it as "uncorrelated"
    flat = attr.attribute(attr.randomized_model(planted_model, seed=1), x, "chefer", target=trained["target"])
    check = model_level.randomisation_check({"randomisation": {"chefer": attr.spearman_per_image(trained["maps"], flat["maps"])}})
    assert check["chefer"]["constant_maps"] > 0 and check["chefer"]["verdict"] == "fails"


def test_spearman_is_rank_based_and_nan_for_constant_maps():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 4, 4, generator=g)
    assert torch.allclose(torch.as_tensor(attr.spearman_per_image(maps, maps ** 3)), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(torch.as_tensor(attr.spearman_per_image(maps, 1 - maps)), -torch.ones(3, dtype=torch.float64))
    flat = maps.clone()
    flat[1] = 0.5
    rho = attr.spearman_per_image(maps, flat)
    assert math.isnan(rho[1]) and not math.isnan(rho[0]) and not math.isnan(rho[2])


def test_randomisation_check_fails_on_constant_maps_and_high_correlation(planted_model):
    g = torch.Generator().manual_seed(7)
    x, _, _ = planted_batch(6, g)
    trained = attr.attribute(planted_model, x, "chefer")
    degenerate = attr.randomized_model(planted_model, seed=1)
    with torch.no_grad():  # a "randomisation" that leaves nothing: every map is constant
        for p in degenerate.parameters():
            p.zero_()
    flat = attr.attribute(degenerate, x, "chefer", target=trained["target"])
    assert (flat["maps"].flatten(1).amax(1) == flat["maps"].flatten(1).amin(1)).all()
    rho = attr.spearman_per_image(trained["maps"], flat["maps"])
    check = model_level.randomisation_check({"randomisation": {"chefer": rho}})["chefer"]
    assert check["constant_maps"] == 6 and check["verdict"] == "fails" and math.isnan(check["median_spearman"])
    # a map that survives randomisation (nearly unchanged ordering): the interval lies above the threshold
    near = model_level.randomisation_check({"randomisation": {"chefer": torch.tensor([0.9, 0.8, 0.7, 0.85])}})["chefer"]
    assert near["mean_spearman"] == pytest.approx(0.8125) and near["low"] > 0.5 and near["verdict"] == "fails"
    low = model_level.randomisation_check({"randomisation": {"chefer": torch.tensor([0.1, 0.2, 0.15, 0.05])}})["chefer"]
    assert low["verdict"] == "passes"
    # three images spread across the threshold cannot decide: undecided, never "passes" from a point estimate
    spread = model_level.randomisation_check({"randomisation": {"chefer": torch.tensor([0.1, 0.2, 0.6])}})["chefer"]
    assert spread["median_spearman"] < 0.5 and spread["verdict"] == "undecided"
    one_constant = model_level.randomisation_check({"randomisation": {"chefer": torch.tensor([0.1, float("nan"), 0.0])}})
    assert one_constant["chefer"]["constant_maps"] == 1 and one_constant["chefer"]["verdict"] == "fails"


# ----------------------------------------------------------------------------- random baseline


def test_random_baseline_is_upsampled_seeded_patch_scores():
    m = layerscale_vit(seed=5)
    x = torch.randn(3, 1, 8, 8)
    out = attr.attribute(m, x, "random", seed=11)
    expected_patch = torch.rand((3, 4, 4), generator=torch.Generator().manual_seed(11))  # one score per 2x2 patch
    assert torch.equal(out["patch"], expected_patch)
    assert torch.allclose(out["maps"], attr.to_image_maps(expected_patch, (8, 8)))
    assert out["maps"].amin() == 0 and out["maps"].amax() == 1  # min-max normalised like the methods' maps
    other = attr.attribute(m, x, "random", seed=12)
    assert not torch.allclose(other["maps"], out["maps"])
    assert torch.equal(out["target"], m(x).argmax(1))


# ----------------------------------------------------------------------------- insertion / deletion


class OnePixelModel(nn.Module):
    """p(class 0) = value of pixel (0, 0) in [0, 1]: the perfect ordering puts that pixel first."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        p = x[:, 0, 0, 0].clamp(1e-6, 1 - 1e-6)
        return torch.stack([p.log(), (1 - p).log()], 1)


def test_insertion_deletion_known_aucs():
    model = OnePixelModel()
    x = torch.ones(2, 1, 4, 4)
    good = torch.zeros(2, 4, 4)
    good[:, 0, 0] = 1.0  # pixel (0, 0) first
    bad = torch.ones(2, 4, 4)
    bad[:, 0, 0] = 0.0  # pixel (0, 0) last
    ref = pert.reference_value([0.0], [1.0], "mean")  # reference pixel 0
    target = torch.zeros(2, dtype=torch.long)
    s = 16  # one pixel per step
    perfect = pert.insertion_deletion(model, x, good, target, s, ref)
    worst = pert.insertion_deletion(model, x, bad, target, s, ref)
    assert torch.allclose(perfect["insertion"], torch.tensor(15.5 / 16), atol=1e-4)
    assert torch.allclose(perfect["deletion"], torch.tensor(0.5 / 16), atol=1e-4)
    assert torch.allclose(worst["insertion"], torch.tensor(0.5 / 16), atol=1e-4)
    assert torch.allclose(worst["deletion"], torch.tensor(15.5 / 16), atol=1e-4)
    # 4 steps of 4 pixels: the first step already holds the pixel
    coarse = pert.insertion_deletion(model, x, good, target, 4, ref)
    assert torch.allclose(coarse["insertion"], torch.tensor(3.5 / 4), atol=1e-4)
    # the curves are built batch by batch: a small batch gives the same numbers
    small = pert.insertion_deletion(model, x, good, target, s, ref, batch_size=5)
    assert torch.allclose(small["insertion_curve"], perfect["insertion_curve"])


def test_reference_values():
    mean, std = [0.5, 0.25], [0.5, 0.25]
    black = pert.reference_value(mean, std, "black")
    assert torch.allclose(black * torch.tensor(std) + torch.tensor(mean), torch.zeros(2))  # 0 in pixel space
    assert torch.equal(pert.reference_value(mean, std, "mean"), torch.zeros(2))
    with pytest.raises(ValueError):
        pert.reference_value(mean, std, "blur")
    with pytest.raises(ValueError, match="unknown reference"):
        pert.substitutes(torch.zeros(1, 2, 4, 4), mean, std, "blur")


def test_rise_substitutes_blur_in_mean_out():
    from torchvision.transforms.functional import gaussian_blur

    assert pert.rise_blur_params(224) == (11, 5.0)  # RISE's own kernel and sigma
    assert pert.rise_blur_params(28) == (3, 0.625)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 28, 28, generator=g)
    start, fill = pert.substitutes(x, [0.3], [0.4], "rise")
    assert torch.equal(fill, torch.zeros(1))  # deletion: the data mean, 0 after normalisation
    assert torch.allclose(start, gaussian_blur(x, [3, 3], [0.625, 0.625]))
    assert start.std() < x.std()  # smoothed
    # blur commutes with normalisation (a per-channel affine map): blurring pixels or normalised images agree
    pixels = x * 0.4 + 0.3
    assert torch.allclose((gaussian_blur(pixels, [3, 3], [0.625, 0.625]) - 0.3) / 0.4, start, atol=1e-5)
    b_start, b_fill = pert.substitutes(x, [0.3], [0.4], "black")
    assert torch.equal(b_start, b_fill) and torch.allclose(b_fill, torch.tensor([-0.75]))


def test_insertion_starts_from_a_per_image_reference():
    """Insertion from an image-shaped start: step 0 is the start image's probability."""
    model = OnePixelModel()
    x = torch.ones(2, 1, 4, 4)
    good = torch.zeros(2, 4, 4)
    good[:, 0, 0] = 1.0
    start = torch.full((2, 1, 4, 4), 0.25)
    start[1] = 0.75
    fill = torch.zeros(1)
    target = torch.zeros(2, dtype=torch.long)
    curves = pert.perturbation_curves(model, x, good, target, 16, fill, insertion_start=start, batch_size=5)
    assert torch.allclose(curves["insertion"][:, 0], torch.tensor([0.25, 0.75]), atol=1e-5)
    assert torch.allclose(curves["insertion"][:, 1:], torch.ones(2, 16), atol=1e-5)
    assert torch.allclose(curves["deletion"][:, 1:], torch.full((2, 16), 1e-6), atol=1e-5)  # the fill: pixel 0
    with pytest.raises(ValueError, match="insertion_start"):
        pert.perturbation_curves(model, x, good, target, 16, fill, insertion_start=torch.zeros(2, 1, 4, 3))


@pytest.mark.parametrize("reference", ["black", "rise"])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_shared_endpoints_equal_the_plain_curves(reference, steps):
    """The curves' ends come from one :func:`endpoint_probs` per chunk and reference; the inner steps are
    forwarded per map. Equal to the plain computation that forwards every step of every map (to float rounding:
    the same images go through the model in other batches)."""
    m = layerscale_vit(seed=3)
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    maps = torch.rand(7, 8, 8, generator=torch.Generator().manual_seed(6))
    target = m(x).argmax(1)
    start, fill = pert.substitutes(x, [0.5], [0.25], reference)
    ends = pert.endpoint_probs(m, x, target, fill, start, batch_size=5)
    fast = pert.perturbation_curves(m, x, maps, target, steps, fill, 5, start, endpoints=ends)
    plain = pert.perturbation_curves_reference(m, x, maps, target, steps, fill, 5, start)
    for kind in ("insertion", "deletion"):
        torch.testing.assert_close(fast[kind], plain[kind], rtol=0, atol=1e-6)  # other batch rows: float rounding
    assert torch.equal(pert.perturbation_curves(m, x, maps, target, steps, fill, 5, start)["deletion"],
                       plain["deletion"])  # no endpoints: the plain path


def test_auc_is_normalised():
    assert torch.allclose(pert.auc(torch.ones(1, 9)), torch.tensor([1.0]))
    assert torch.allclose(pert.auc(torch.linspace(0, 1, 11)[None]), torch.tensor([0.5]))
    assert math.isclose(pert.pixel_ranks(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]]))[0, 1].item(), 0)


# ----------------------------------------------------------------------------- the cached entry point


def test_attribution_results_for_the_control_has_every_reference(tiny_fmnist, tmp_path):
    """On a tiny model: the control model's results hold both references for every method, the
    primary one under "methods"; the RISE reference gives other numbers than black."""
    from impact_core import pipeline
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      attribution={"images": 5, "steps": 2, "batch_size": 1, "figure_classes": 2,
                                   "figure_per_class": 1, "references": ["black", "rise"]})
    cfg.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="control"):
        model_level.attribution_results(cfg, 0.5, method=pipeline.CONTROL)
    res = model_level.attribution_results(cfg, 0.0, method=pipeline.CONTROL)
    assert res["level"] == "control" and res["references"] == ["black", "rise"]
    assert set(res["scores"]) == {"black", "rise"}
    for r in res["scores"]:
        assert set(res["scores"][r]) == set(attr.METHODS)
        for m, sc in res["scores"][r].items():
            assert sc["insertion"].shape == sc["deletion"].shape == (5,)
            assert sc["insertion_curve"].shape == sc["deletion_curve"].shape == (3,)
    for m in attr.METHODS:
        assert torch.equal(res["methods"][m]["insertion"], res["scores"]["black"][m]["insertion"])
    # insertion starts from black vs from the blurred image: other first points of the curve
    assert not torch.allclose(res["scores"]["black"]["chefer"]["insertion_curve"][0],
                              res["scores"]["rise"]["chefer"]["insertion_curve"][0])
    assert set(model_level.randomisation_check(res)) == {"chefer", "rollout", "generic"}
    # Chefer under the other LayerScale rule (Eq. 14): the same images, its own maps and scores
    assert res["other_rule"]["rule"] == "inverse" and set(res["other_rule"]["scores"]) == {"black", "rise"}
    assert res["other_rule"]["scores"]["black"]["deletion"].shape == (5,)
    dense = model_level.attribution_results(cfg, 0.0)
    assert dense["level"] == "dense"
    assert not torch.allclose(dense["scores"]["black"]["chefer"]["insertion"],
                              res["scores"]["black"]["chefer"]["insertion"])  # another (fine-tuned) model


def test_display_only_work_runs_on_the_display_images(tiny_fmnist, tmp_path):
    """``attribution.display_images``: the methods no claim reads, the randomisation test and the other
    LayerScale rule run on the first images (whole chunks); the claims' methods on every image, equal bit for
    bit to a build that runs everything on every image; the figure images lie among the display images."""
    from tests.conftest import tiny_config

    base = {"images": 10, "steps": 2, "batch_size": 1, "figure_classes": 2, "figure_per_class": 1,
            "references": ["black"]}
    every = tiny_config(tiny_fmnist, attribution=base)
    every.cache_dir = str(tmp_path / "every")
    few = tiny_config(tiny_fmnist, attribution={**base, "display_images": 3})
    few.cache_dir = str(tmp_path / "few")
    assert model_level.display_count(few) == 4 and model_level.display_count(every) == 10  # chunks of 4
    full, part = model_level.attribution_results(every, 0.0), model_level.attribution_results(few, 0.0)
    for m in ("chefer", "random"):
        for key in ("insertion", "deletion"):
            assert torch.equal(full["scores"]["black"][m][key], part["scores"]["black"][m][key])
            assert part["scores"]["black"][m][key].shape == (10,)
    for m in ("rollout", "generic"):
        assert part["scores"]["black"][m]["insertion"].shape == (4,)
        assert torch.equal(part["scores"]["black"][m]["insertion"], full["scores"]["black"][m]["insertion"][:4])
    assert part["randomisation"]["chefer"].shape == (4,)
    assert part["other_rule"]["scores"]["black"]["deletion"].shape == (4,)
    assert all(i < 4 for i in part["figure_positions"])
    table = model_level.layerscale_rule_table({"dense": part}, ["black"], "z")  # paired on the display images
    assert len(table) == 2
    with pytest.raises(Exception, match="display_images"):
        tiny_config(tiny_fmnist, attribution={**base, "display_images": 0})


def test_references_config_is_validated():
    from impact_core.config import ConfigError, load_config

    assert load_config("smoke").attribution.references == ["black", "rise"]
    assert load_config("default").attribution.references[0] == "black"  # the paper's reading is primary
    with pytest.raises(ConfigError, match="unknown reference"):
        load_config("smoke", {"attribution.references": ["black", "blur"]})
    with pytest.raises(ConfigError, match="repeated"):
        load_config("smoke", {"attribution.references": ["rise", "rise"]})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("smoke", {"attribution.baseline": "black"})  # folded into references


def test_the_claims_methods_alone_equal_their_entries_of_the_full_chunk():
    """Replicates beyond the first score only the claims' methods (Chefer and random order): their
    numbers equal, bit for bit, those the full chunk (every method, the other rule) computes."""
    from types import SimpleNamespace

    m = layerscale_vit(seed=3)
    rand = attr.randomized_model(m, seed=4)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    a = SimpleNamespace(references=["black", "rise"], layerscale_rule="z", batch_size=4, steps=4)
    full = pert.score_chunk(m, rand, x, a, [0.5], [0.25], seed=9, figure_rows=[0, 2])
    claims_only = pert.score_chunk(m, rand, x, a, [0.5], [0.25], seed=9, figure_rows=[0, 2],
                                   methods=model_level.CLAIM_METHODS, extras=False)
    assert set(claims_only) == {"chefer", "random", "target"} and "chefer_other_rule" in full
    assert torch.equal(full["target"], claims_only["target"])
    for method in model_level.CLAIM_METHODS:
        for ref in a.references:
            for key, value in full[method]["scores"][ref].items():
                assert torch.equal(value, claims_only[method]["scores"][ref][key]), (method, ref, key)
