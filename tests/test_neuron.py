"""Neuron-level metrics (Sec. 3.2): fast paths against slow direct computations, on tiny inputs."""
import numpy as np
import pytest
import torch

from impact_core.levels import neuron as neuron_level
from impact_core.methods import neuron
from impact_core.config import ConfigError, ModelConfig, load_config
from impact_core.models import build_model
from impact_core.methods.sites import HookedViT, compute_site_means, mean_ablate
from impact_core.methods.unit_metrics import (StreamingClassStats, auroc_rank, auroc_reference, class_variance,
                                      class_variance_reference, label_entropy, label_entropy_reference,
                                      max_over_patches, paired_comparison, selected_unit_values, stratified_halves,
                                      top_units)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- unit metrics -----------------------------------------------------------------------------------------------------

def test_rank_auroc_equals_sklearn_with_ties():
    g = _gen()
    scores = torch.randn(120, 9, generator=g).round(decimals=0)  # few distinct values: many ties
    scores[:, 0] = 1.0  # a constant unit: every score tied, AUROC 0.5
    labels = torch.randint(0, 4, (120,), generator=g)
    labels[labels == 3] = 2  # class 3 absent: NaN on both sides
    ref = auroc_reference(scores, labels, 4)
    assert torch.isnan(ref[:, 3]).all()
    for numpy_sort in (True, False):  # the CPU (numpy) and accelerator (torch.sort) sorting paths
        fast = auroc_rank(scores, labels, 4, max_elements=250, numpy_sort=numpy_sort)  # several unit chunks
        assert torch.isnan(fast[:, 3]).all()
        torch.testing.assert_close(fast[:, :3], ref[:, :3], rtol=0, atol=1e-12)
        assert torch.allclose(fast[0, :3], torch.full((3,), 0.5, dtype=torch.float64))


def test_rank_auroc_at_1000_classes():
    """ImageNet-sized label space: pairwise Mann-Whitney (P(s+ > s-) + P(s+ = s-) / 2) as the direct reference."""
    g = _gen(5)
    n, classes = 1500, 1000
    labels = torch.randint(0, classes, (n,), generator=g)
    scores = torch.randn(n, 3, generator=g).round(decimals=1) + (labels[:, None] % 7 == 0)
    fast = auroc_rank(scores, labels, classes)
    absent = torch.bincount(labels, minlength=classes) == 0
    assert absent.any() and fast[:, absent].isnan().all() and not fast[:, ~absent].isnan().any()
    for u in range(3):
        s = scores[:, u].double()
        gt = (s[:, None] > s[None, :]).double() + 0.5 * (s[:, None] == s[None, :]).double()  # (pos, neg) pairs
        onehot = torch.nn.functional.one_hot(labels, classes).double()
        npos = onehot.sum(0)
        wins = torch.einsum("ic,ij,jc->c", onehot, gt, 1 - onehot)
        direct = wins / (npos * (n - npos))
        torch.testing.assert_close(fast[u, ~absent], direct[~absent], rtol=0, atol=1e-12)


def test_metrics_equal_slow_reference():
    g = _gen(1)
    m = torch.randn(90, 7, generator=g) + 0.5
    m[:, 3] -= 1.8  # mostly negative: class means <= 0 give NaN, clamping matters for the entropy
    labels = torch.randint(0, 5, (90,), generator=g)
    labels[0] = 4
    labels[labels == 4] = 3
    labels[0] = 4  # class 4 has a single image: its CV is NaN
    cv, cv_ref = class_variance(m, labels, 5), class_variance_reference(m, labels, 5)
    assert torch.equal(cv.isnan(), cv_ref.isnan()) and cv[:, 4].isnan().all() and cv[3].isnan().any()
    torch.testing.assert_close(cv.nan_to_num(0), cv_ref.nan_to_num(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(label_entropy(m, labels, 5), label_entropy_reference(m, labels, 5),
                               rtol=1e-10, atol=1e-12)


def test_perfectly_selective_unit():
    g = _gen(2)
    labels = torch.arange(40) % 4
    maxact = torch.rand(40, 3, generator=g)
    maxact[:, 0] = torch.where(labels == 2, 1 + torch.rand(40, generator=g), -0.1 * torch.rand(40, generator=g))
    cls = maxact.clone()
    assert auroc_rank(cls, labels, 4)[0, 2].item() == 1.0
    assert label_entropy(maxact, labels, 4)[0].item() == 0.0
    ent = label_entropy(maxact, labels, 4)
    assert ent[1].item() > 0.5 * np.log(4)  # an unselective unit is far from 0
    st = StreamingClassStats(3, 4)
    st.update(maxact, labels, cls)
    assert st.auroc()[0, 2].item() == 1.0 and st.label_entropy()[0].item() == 0.0


def test_max_over_patches_skips_cls():
    act = torch.zeros(2, 5, 3)
    act[:, 0] = 100.0  # CLS
    act[1, 3, 2] = 7.0
    out = max_over_patches(act)
    assert out.shape == (2, 3) and out[1, 2] == 7.0 and out.max() == 7.0
    with pytest.raises(ValueError):
        max_over_patches(torch.zeros(2, 3))


def test_streaming_equals_full_batch():
    g = _gen(3)
    m, cls = torch.randn(70, 6, generator=g) + 1, torch.randn(70, 6, generator=g)
    labels = torch.randint(0, 3, (70,), generator=g)
    st = StreamingClassStats(6, 3)
    for i in range(0, 70, 16):
        st.update(m[i:i + 16], labels[i:i + 16], cls[i:i + 16])
    assert st.n == 70
    torch.testing.assert_close(st.class_variance(), class_variance(m, labels, 3), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.label_entropy(), label_entropy(m, labels, 3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.auroc(), auroc_rank(cls, labels, 3))
    with pytest.raises(ValueError):
        st.update(m[:4], labels[:4])  # the CLS activations are needed


def test_paired_comparison():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=20)
    res = paired_comparison(dense, dense + 1.0, n_boot=500)
    assert res["median_diff"] == pytest.approx(1.0) and res["ci_low"] == pytest.approx(1.0)
    assert res["ci_high"] == pytest.approx(1.0) and res["wilcoxon_p"] < 1e-4 and res["n"] == 20
    same = paired_comparison(dense, dense)
    assert same["median_diff"] == 0 and same["wilcoxon_p"] == 1.0
    noisy = paired_comparison(dense, dense + rng.normal(scale=0.1, size=20), n_boot=500)
    assert noisy["ci_low"] <= noisy["median_diff"] <= noisy["ci_high"]
    level = dense.copy()
    level[:5] = np.nan
    assert paired_comparison(dense, level)["n"] == 15
    with pytest.raises(ValueError):
        paired_comparison(dense, dense[:3])


def test_bad_labels_rejected():
    with pytest.raises(ValueError, match="labels must lie"):
        auroc_rank(torch.zeros(4, 2), torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(ValueError, match="shape"):
        class_variance(torch.zeros(4, 2), torch.tensor([0, 1]), 3)


# --- a tiny ViT ---------------------------------------------------------------------------------------------------------

def _tiny(seed=0, depth=2):
    torch.manual_seed(seed)
    mcfg = ModelConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=depth,
                       num_heads=2, init_values=1.0, mean=[0.0], std=[1.0])
    model = build_model(mcfg).eval()
    return HookedViT(model)


def _data(n=23, batch=7, seed=0):
    g = _gen(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], x, y


def _means(hooked, batches, blocks):
    return compute_site_means(hooked, batches, hooked.site_names(blocks, ("mlp_act", "heads")))


@pytest.mark.parametrize("site", ["mlp_act", "heads"])
def test_attribution_patching_exact_on_linear_toy(site):
    hooked = _tiny()
    hooked.model.norm = torch.nn.Identity()  # logits now linear in the last block's MLP neurons
    last = hooked.depth - 1
    if site == "heads":
        with torch.no_grad():
            hooked.model.blocks[last].mlp.fc2.weight.zero_()  # ...and in its heads too
    batches, _, _ = _data()
    means = _means(hooked, batches, [last])
    first = neuron.attribution_pass(hooked, batches, means, [last], 3, validation_images=100)
    units = range(0, hooked.mlp_dim, 9) if site == "mlp_act" else range(hooked.mlp_dim, hooked.mlp_dim + 2)
    for u in units:
        keep = torch.ones(hooked.mlp_dim + hooked.num_heads)
        keep[u] = 0
        true = neuron.ablation_effect(hooked, batches, means, last, keep, 3)
        assert true.abs().max() > 1e-4  # the unit matters
        torch.testing.assert_close(first["importance"][last][:, u].float(), true.float(), rtol=1e-4, atol=1e-6)


def test_attribution_not_exact_in_nonlinear_block():
    """The same comparison in block 0 (LayerNorm, GELU, attention downstream) differs: the test above has teeth."""
    hooked = _tiny()
    batches, _, _ = _data()
    means = _means(hooked, batches, [0])
    first = neuron.attribution_pass(hooked, batches, means, [0], 3)
    keep = torch.ones(hooked.mlp_dim + hooked.num_heads)
    keep[hooked.mlp_dim] = 0  # head 0
    true = neuron.ablation_effect(hooked, batches, means, 0, keep, 3)
    assert not torch.allclose(first["importance"][0][:, hooked.mlp_dim].float(), true.float(), rtol=1e-4, atol=1e-6)


def _direct_unit_acts(hooked, x, blocks):
    names = hooked.site_names(blocks, ("mlp_act", "heads"))
    _, cache = hooked.run_with_cache(x, names)
    return {b: neuron.unit_activation(cache[f"blocks.{b}.mlp_act"], cache[f"blocks.{b}.heads"]) for b in blocks}


def _direct_importance(hooked, x, y, means, block):
    """Per image, its own batch of one: sum_t (a - mu) . grad / ||f||, averaged per class."""
    m_name, h_name = f"blocks.{block}.mlp_act", f"blocks.{block}.heads"
    per_image = []
    for i in range(len(y)):
        store = {}

        def keep(name):
            def fn(act):
                store[name] = act
                return act
            return fn

        with hooked.hooks({m_name: keep(m_name), h_name: keep(h_name)}):
            logits = hooked.model(x[i:i + 1])
        gm, gh = torch.autograd.grad(logits[0, y[i]], [store[m_name], store[h_name]])
        em = ((store[m_name] - means[m_name]) * gm).sum(dim=(0, 1))
        eh = ((store[h_name] - means[h_name]) * gh).sum(dim=(0, 1, 3))
        per_image.append(torch.cat([em, eh]).detach() / logits.detach().norm())
    per_image = torch.stack(per_image)
    return torch.stack([per_image[y == c].mean(0) for c in range(3)])


def test_analyse_matches_direct_computation():
    """Both variants against direct per-image computations: held-out (top-K on the selection half, metrics on
    the measurement half) and same-image (all images for both)."""
    hooked = _tiny(seed=1, depth=2)
    blocks = [0, 1]
    batches, x, y = _data(n=17, batch=7)
    means = _means(hooked, batches, blocks)
    res = neuron.analyse(hooked, batches, means, blocks, top_k=4, num_classes=3, classes=[0, 2],
                         n_validation_units=3, validation_images=10, seed=4)
    sel = res["selection"]
    assert torch.equal(sel, stratified_halves(y, 4)) and 0 < int(sel.sum()) < 17
    acts = _direct_unit_acts(hooked, x, blocks)
    every = torch.ones(17, dtype=torch.bool)
    variants = {"": (sel, ~sel), "_same": (every, every)}
    for i, b in enumerate(blocks):
        for suffix, (chosen_on, measured_on) in variants.items():
            imp = _direct_importance(hooked, x[chosen_on], y[chosen_on], means, b)
            torch.testing.assert_close(res["importance" + suffix][i], imp.float(), rtol=1e-4, atol=1e-6)
            top = res["topk" + suffix][i]
            assert torch.equal(top, imp[[0, 2]].topk(4, dim=1).indices)
            u, ym, xm = acts[b][measured_on], y[measured_on], x[measured_on]
            maxact, cls = u[:, 1:].amax(1), u[:, 0]
            auroc, cv = auroc_reference(cls, ym, 3), class_variance_reference(maxact, ym, 3)
            ent = label_entropy_reference(maxact, ym, 3)
            for j, c in enumerate([0, 2]):
                t = top[j]
                assert res["selectivity" + suffix][i, j].item() == pytest.approx(auroc[t, c].mean().item(), abs=1e-9)
                assert res["class_variance" + suffix][i, j].item() == pytest.approx(np.nanmean(cv[t, c].numpy()),
                                                                                    rel=1e-5)
                assert res["label_entropy" + suffix][i, j].item() == pytest.approx(ent[t].mean().item(), rel=1e-5)
                keep = torch.ones(u.shape[-1])
                keep[t] = 0  # the top-K units of class c ablated together, with sites.mean_ablate directly
                xc = xm[ym == c]
                clean = hooked.model(xc)
                m_name, h_name = f"blocks.{b}.mlp_act", f"blocks.{b}.heads"
                abl = hooked.run_with_hooks(xc, {m_name: mean_ablate(means[m_name], keep[:hooked.mlp_dim], m_name),
                                                 h_name: mean_ablate(means[h_name], keep[hooked.mlp_dim:], h_name)})
                impact = ((clean[:, c] - abl[:, c]) / clean.norm(dim=1)).mean()
                assert res["impact" + suffix][i, j].item() == pytest.approx(impact.item(), rel=1e-4, abs=1e-7)
    assert not torch.equal(res["topk"], res["topk_same"])  # the two selections differ here: the check has teeth
    assert res["zero_importance"].shape == (2, 2) and (res["zero_importance"] == 0).all()
    v = res["validation"]
    assert len(v["true"]) == 2 * 3 * 2 and torch.isfinite(v["estimate"]).all() and torch.isfinite(v["true"]).all()
    first10 = [(x[:10], y[:10])]
    for row in (0, len(v["true"]) - 1):  # batched single-unit ablations == one at a time, on the first 10 images
        b, u, c = int(v["block"][row]), int(v["unit"][row]), int(v["class"][row])
        keep = torch.ones(hooked.mlp_dim + hooked.num_heads)
        keep[u] = 0
        one = neuron.ablation_effect(hooked, first10, means, b, keep, 3)
        assert v["true"][row].item() == pytest.approx(one[c].item(), rel=1e-4, abs=1e-7)
    small = neuron.analyse(hooked, batches, means, blocks, top_k=4, num_classes=3, classes=[0, 2],
                           n_validation_units=3, validation_images=10, max_batch=7, seed=4)  # one job per forward
    for key in ("impact", "impact_same", "selectivity"):
        torch.testing.assert_close(small[key], res[key], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(small["validation"]["true"], v["true"], rtol=1e-5, atol=1e-8)
    assert res["n_images"] == 17 and res["n_validation_images"] == 10 and res["n_selection_images"] == int(sel.sum())


def test_skipping_the_same_image_ablation_changes_nothing_else():
    """``same_image_impact=False`` (a model whose same-image impact nothing displays): ``impact_same`` is NaN
    and every other value equals the full analysis (bit for bit, but the held-out impact: its ablations are
    packed into other forwards, equal to float rounding)."""
    hooked = _tiny(seed=1, depth=2)
    batches, x, y = _data(n=17, batch=7)
    means = _means(hooked, batches, [0, 1])
    kw = dict(top_k=4, num_classes=3, n_validation_units=2, validation_images=10, seed=4)
    full = neuron.analyse(hooked, batches, means, [0, 1], **kw)
    part = neuron.analyse(hooked, batches, means, [0, 1], same_image_impact=False, **kw)
    assert set(part) == set(full) and torch.isnan(part["impact_same"]).all()
    assert not torch.isnan(full["impact_same"]).any()
    for key, value in full.items():
        if key == "impact_same":
            continue
        other = part[key]
        if isinstance(value, dict):
            assert all(torch.equal(value[k], other[k]) for k in value), key
        elif key == "impact":
            torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-7)  # float32 forwards
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert value == other, key


def test_ablation_jobs_on_image_subsets():
    """A job restricted to some images equals the same ablation run on those images alone."""
    hooked = _tiny(seed=2)
    batches, x, y = _data(n=20, batch=6)
    means = _means(hooked, batches, [1])
    keep = torch.ones(3, hooked.mlp_dim + hooked.num_heads)
    keep[:, :7] = 0
    keep[1, hooked.mlp_dim] = 0
    subset = torch.arange(20) % 4 != 1
    both = neuron.ablation_jobs(hooked, batches, means, [(1, keep, subset), (1, keep)], 3, max_batch=9)
    alone = neuron.ablation_effect(hooked, [(x[subset], y[subset])], means, 1, keep, 3)
    full = neuron.ablation_effect(hooked, batches, means, 1, keep, 3)
    torch.testing.assert_close(both[0], alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(both[1], full, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(both[0], both[1])


# --- winner's curse: held-out selection -----------------------------------------------------------------------------

def test_stratified_halves_are_disjoint_seeded_and_stratified():
    y = torch.tensor([0] * 11 + [1] * 6 + [2] * 1 + [3] * 20)[torch.randperm(38, generator=_gen(7))]
    sel = stratified_halves(y, 3)
    assert sel.dtype == torch.bool and sel.shape == (38,)  # a mask: the halves sel / ~sel are disjoint, cover all
    for c, n in ((0, 11), (1, 6), (2, 1), (3, 20)):
        assert int(sel[y == c].sum()) == (n + 1) // 2 and int((~sel)[y == c].sum()) == n // 2
    assert torch.equal(sel, stratified_halves(y, 3))
    assert not torch.equal(sel, stratified_halves(y, 4))
    with pytest.raises(ValueError, match="integer"):
        stratified_halves(torch.rand(5), 0)


def test_top_units_counts_zero_and_nan_importance():
    imp = torch.tensor([[0.5, 0.0, -1.0, 0.2, 0.0],   # top-3: 0.5, 0.2, 0.0 -> one zero
                        [0.0, 0.0, 0.0, 0.0, 0.0],    # all zero -> three
                        [3.0, 2.0, 1.0, 0.5, 0.1],    # none
                        [float("nan")] * 5,           # a class without images -> all three
                        [1.0, float("nan"), 2.0, -3.0, -1.0]])  # top-3: 2, 1, -1 (NaN ranked last) -> none
    top, zero = top_units(imp, 3)
    assert zero.tolist() == [1, 3, 0, 3, 0]
    assert set(top[0].tolist()) in ({0, 3, 1}, {0, 3, 4}) and top[2].tolist() == [0, 1, 2]
    assert set(top[4].tolist()) == {2, 0, 4}
    with pytest.raises(ValueError):
        top_units(imp, 6)


def _null_units(n=400, units=200, classes=4, seed=0):
    """Units independent of the labels: CLS and max-over-patch activations are pure noise."""
    g = _gen(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, units, generator=g) + 2.0, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_winners_curse_same_image_selectivity_biased_held_out_not(seed):
    """Top-K by importance (here the class mean of the unit's activation) chosen and measured on the same
    images: AUROC well above 0.5 for label-independent units. Chosen on one half, measured on the other: 0.5."""
    act, y = _null_units(seed=seed)
    sel = stratified_halves(y, seed)
    halves = {}
    for h in (True, False):
        st = StreamingClassStats(act.shape[1], 4)
        rows = sel == h
        st.update(act[rows], y[rows], act[rows])
        halves[h] = st
    every = StreamingClassStats.combine([halves[True], halves[False]])

    def importance(st):
        return st.sum / st.count[:, None]

    classes = range(4)
    top_same, _ = top_units(importance(every), 5)
    top_held, _ = top_units(importance(halves[True]), 5)
    same = selected_unit_values(every, top_same, classes)["selectivity"].mean().item()
    held = selected_unit_values(halves[False], top_held, classes)["selectivity"].mean().item()
    assert same > 0.55  # ~0.58: the winner's curse
    assert abs(held - 0.5) < 0.035  # sd of the mean of 20 held-out AUROCs ~0.01


def test_combined_stats_equal_one_accumulator():
    act, y = _null_units(n=60, units=5, classes=3)
    m = act + torch.randn(act.shape, generator=_gen(9))
    sel = stratified_halves(y, 0)
    parts = []
    for h in (True, False):
        st = StreamingClassStats(5, 3)
        st.update(m[sel == h], y[sel == h], act[sel == h])
        parts.append(st)
    both = StreamingClassStats.combine(parts)
    one = StreamingClassStats(5, 3)
    one.update(m, y, act)
    assert both.n == 60
    torch.testing.assert_close(both.auroc(), one.auroc())
    torch.testing.assert_close(both.class_variance(), one.class_variance())
    torch.testing.assert_close(both.label_entropy(), one.label_entropy())
    assert not torch.allclose(parts[0].auroc(), one.auroc())


def test_analyse_with_many_classes_some_absent():
    """More classes than images: absent classes give NaN metrics, the others stay finite."""
    torch.manual_seed(0)
    mcfg = ModelConfig(img_size=8, patch_size=4, in_chans=1, num_classes=40, embed_dim=16, depth=1,
                       num_heads=2, mean=[0.0], std=[1.0])
    hooked = HookedViT(build_model(mcfg).eval())
    g = _gen(6)
    x, y = torch.randn(30, 1, 8, 8, generator=g), torch.randint(0, 40, (30,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 30, 16)]
    res = neuron.analyse(hooked, batches, _means(hooked, batches, [0]), [0], top_k=3, num_classes=40,
                         n_validation_units=2, validation_images=30)
    n = torch.bincount(y, minlength=40)
    present, measured = n > 0, n > 1  # a class with one image has it in the selection half only
    assert res["impact"].shape == (1, 40) and (present & ~measured).any()
    for suffix, finite in (("_same", present), ("", measured)):
        impact = res["impact" + suffix][0]
        assert impact[~finite].isnan().all() and torch.isfinite(impact[finite]).all()
        assert res["selectivity" + suffix][0, ~finite].isnan().all()
        assert torch.isfinite(res["selectivity" + suffix][0, finite]).all()
    assert torch.isfinite(res["label_entropy"][0, present]).all()
    assert (res["zero_importance"][0, ~present] == 3).all()  # no selection images: NaN importance, counted


def test_bad_setup_rejected_before_compute():
    hooked = _tiny()
    with pytest.raises(ValueError, match="block"):
        neuron.check_setup(hooked, [5], 3, 3)
    with pytest.raises(ValueError, match="top_k"):
        neuron.check_setup(hooked, [0], 10_000, 3)
    with pytest.raises(ValueError, match="outputs"):
        neuron.check_setup(hooked, [0], 3, 7)
    with pytest.raises(ConfigError, match="neuron.top_k"):
        load_config("smoke", {"neuron.top_k": 0})
    with pytest.raises(ConfigError, match="neuron.blocks"):
        load_config("smoke", {"neuron.blocks": []})
    with pytest.raises(ConfigError, match="block 40"):
        load_config("smoke", {"neuron.blocks": [2, 40]})
    with pytest.raises(ConfigError, match="neuron.top_k"):
        load_config("smoke", {"neuron.top_k": 131})
    load_config("smoke", {"neuron.top_k": 130})  # 128 neurons + 2 heads


# --- SAE latents: the same held-out selection ------------------------------------------------------------------------

def test_sae_analyse_held_out_and_same_image():
    from impact_core.methods import sae as S
    from impact_core.methods import sae_features as SF

    hooked = _tiny(seed=3)
    x, y = torch.randn(24, 1, 8, 8, generator=_gen(8)), torch.arange(24) % 3
    with torch.no_grad():
        _, cache = hooked.run_with_cache(x, ["blocks.1.resid_post"])
    sae = S.BatchTopKSAE(16, 32, k=4)
    sae.init_from_batch(cache["blocks.1.resid_post"].reshape(-1, 16), True)
    sae.threshold.fill_(0.0)  # inference mode: every positive pre-activation fires
    sae.eval()
    batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 24, 7)]
    res = SF.analyse(hooked, sae, batches, 1, "cls", 3, 3, seed=5)
    sel = stratified_halves(y, 5)
    assert torch.equal(res["selection"], sel)
    chosen, measured = SF.feature_pass(hooked, sae, [(x[sel], y[sel])], 1, "cls", 3), \
        SF.feature_pass(hooked, sae, [(x[~sel], y[~sel])], 1, "cls", 3)
    every = SF.feature_pass(hooked, sae, batches, 1, "cls", 3)
    for suffix, imp_from, stats_from, xs, ys in (("", chosen, measured, x[~sel], y[~sel]),
                                                 ("_same", every, every, x, y)):
        torch.testing.assert_close(res["importance" + suffix], imp_from["importance"].float(), rtol=1e-4, atol=1e-6)
        top, zero = top_units(imp_from["importance"], 3)
        assert torch.equal(res["topk" + suffix], top)
        values = selected_unit_values(stats_from["stats"], top, range(3))
        for key, v in values.items():
            torch.testing.assert_close(res["per_latent" + suffix][key], v.double(), rtol=1e-4, atol=1e-6,
                                       equal_nan=True)
            torch.testing.assert_close(res[key + suffix], v.double().nanmean(1), rtol=1e-4, atol=1e-6,
                                       equal_nan=True)
        keep = torch.ones(3, 32).scatter_(1, top, 0.0)
        impact = SF.ablation_effect(hooked, sae, [(xs, ys)], 1, "cls", keep, 3)
        torch.testing.assert_close(res["impact" + suffix], impact.double(), rtol=1e-4, atol=1e-6)
        if suffix == "":
            assert torch.equal(res["zero_importance"], zero) and res["zero_importance"].shape == (3,)
    assert res["n_images"] == 24 and res["n_selection_images"] == int(sel.sum())
    with pytest.raises(ValueError, match="top_k"):
        SF.analyse(hooked, sae, batches, 1, "cls", 33, 3)


# --- the control model and the long table -----------------------------------------------------------------------

def test_control_has_its_own_cache_identity():
    from impact_core import pipeline

    cfg = load_config("smoke")
    dense, control = neuron_level.neuron_inputs(cfg, 0.0), neuron_level.neuron_inputs(cfg, 0.0, pipeline.CONTROL)
    assert dense["model"] != control["model"] and control["model"] == pipeline.model_inputs(cfg, 0.0, pipeline.CONTROL)
    with pytest.raises(ValueError, match="control"):
        neuron_level.neuron_metrics(cfg, 0.5, pipeline.CONTROL)


def _fake_result(shift):
    out = {"blocks": [2, 7], "classes": [0, 1, 2, 3, 4]}
    base = torch.arange(10, dtype=torch.float64).view(2, 5)
    for key in neuron.NEURON_METRICS + ("head_fraction",):
        out[key] = base + shift
        out[key + "_same"] = base + 2 * shift + 100
    return out


def test_metrics_frame_and_comparison_with_control():
    frame = neuron_level.metrics_frame({0.0: _fake_result(0.0), 0.7: _fake_result(1.0)}, control=_fake_result(0.5))
    assert set(frame.level) == {"dense", "70%", "control"}
    assert len(frame) == 3 * 5 * 2 * 2 * 5  # models x metrics x variants x blocks x classes
    ctl = frame[(frame.level == "control") & (frame.metric == "selectivity")]
    assert (ctl.sparsity == 0).all() and ctl.value.tolist()[:2] == [0.5, 1.5]
    same = frame[(frame.level == "70%") & (frame.metric == "selectivity_same")]
    assert (same.selection == "same-image").all() and (same.base == "selectivity").all() and same.value.min() == 102
    table = neuron_level.comparison_table(frame[frame.metric == "impact"], n_boot=50)
    assert table.level.tolist() == ["control", "70%", "control", "70%"]  # per block: the control, then the levels
    assert table.median_diff.tolist() == [0.5, 1.0, 0.5, 1.0]


def test_bad_selection_rejected_before_compute():
    hooked = _tiny()
    batches, _, _ = _data(n=9, batch=4)
    means = _means(hooked, batches, [0])
    for bad in (torch.ones(8, dtype=torch.bool), torch.ones(9)):
        with pytest.raises(ValueError, match="selection must be a bool mask of shape"):
            neuron.analyse(hooked, batches, means, [0], 2, 3, selection=bad)


@pytest.mark.parametrize("arch", ["tiny", "default"])
def test_ablations_restarted_at_their_block_equal_whole_forwards(arch):
    """``ablation_jobs`` starts each ablated forward at the family's first hooked block, from the residual stream
    computed once per batch: the same numbers, to the bit, as every forward from the images (``restart=False``),
    for neuron jobs at several blocks packed together or alone, on image subsets, and for SAE latents."""
    from impact_core.methods import sae as S, sae_features as SF, unit_attribution

    if arch == "tiny":
        hooked, (batches, _, _) = _tiny(seed=3, depth=3), _data(n=30, batch=10)
        blocks, C = [0, 1, 2], 3
    else:
        cfg = load_config("default")
        torch.manual_seed(0)
        hooked, C = HookedViT(build_model(cfg.model).eval()), cfg.model.num_classes
        g = _gen(5)
        x, y = torch.randn(120, 1, 28, 28, generator=g), torch.arange(120) % C
        batches = [(x[i:i + 60], y[i:i + 60]) for i in (0, 60)]
        blocks = [2, 7, 11]
    means = _means(hooked, batches, blocks)
    U = hooked.mlp_dim + hooked.num_heads
    n = sum(len(b[1]) for b in batches)
    jobs = []
    for i, b in enumerate(blocks):
        keep = torch.ones(C, U)
        keep[:, i:i + 5] = 0
        keep[1, hooked.mlp_dim + i % hooked.num_heads] = 0
        jobs += [(b, keep, torch.arange(n) % 2 == i % 2), (b, keep)]
    with torch.no_grad():  # the clean logits an attribution pass hands on: the restart then reads the jobs' rows only
        logits = torch.cat([hooked.model(xb) for xb, _ in batches])
    labels = torch.cat([yb for _, yb in batches])
    clean = (logits.gather(1, labels[:, None]).squeeze(1), logits.norm(dim=1))
    held_out = [j for j in jobs if len(j) == 3]
    for max_batch, given, which in ((1, None, jobs), (1024, None, jobs), (1024, clean, jobs), (1024, clean, held_out)):
        plain = neuron.ablation_jobs(hooked, batches, means, which, C, clean=given, max_batch=max_batch, restart=False)
        fast = neuron.ablation_jobs(hooked, batches, means, which, C, clean=given, max_batch=max_batch)
        torch.testing.assert_close(fast, plain, rtol=0, atol=0, equal_nan=True)  # NaN: a class without images
        assert plain.nan_to_num().abs().sum() > 0
    # SAE latents spliced at the last block's residual stream (the layer chapter's family)
    d, last = hooked.embed_dim, hooked.depth - 1
    _, cache = hooked.run_with_cache(batches[0][0], [f"blocks.{last}.resid_post"])
    sae = S.BatchTopKSAE(d, 4 * d, k=4)
    sae.init_from_batch(cache[f"blocks.{last}.resid_post"][:, 0], True)
    sae.threshold.fill_(0.0)  # inference mode: ReLU (an untrained SAE; what matters is that latents are ablated)
    sae.eval()
    families = SF._latents(hooked, sae, last, "cls")
    keep = torch.ones(C, 4 * d)
    keep[:, : 2 * d] = 0
    sae_jobs = [(next(iter(families)), keep, torch.arange(n) % 3 != 0)]
    plain = unit_attribution.ablation_jobs(hooked, batches, families, sae_jobs, C, max_batch=1, restart=False)
    fast = unit_attribution.ablation_jobs(hooked, batches, families, sae_jobs, C, max_batch=1)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0, equal_nan=True)  # class 0 has no image here: NaN
    assert plain.nan_to_num().abs().sum() > 0


def test_a_forward_in_two_parts_is_the_whole_forward():
    hooked = _tiny(seed=4, depth=3)
    x = torch.randn(9, 1, 8, 8, generator=_gen(2))
    with torch.no_grad():
        whole = hooked.model(x)
        res = hooked.residuals(x, [0, 2])
        assert torch.equal(hooked.logits_from(res[0], 0), whole) and torch.equal(hooked.logits_from(res[2], 2), whole)
    with pytest.raises(ValueError, match="before block 2"):
        hooked.logits_from(res[2], 2, {"blocks.1.mlp_act": lambda a: a})
    with pytest.raises(ValueError, match="blocks must lie"):
        hooked.residuals(x, [3])


def test_restarted_ablations_are_chunked_by_their_first_block():
    from impact_core.methods.unit_attribution import _chunks

    jobs = list(range(5))
    assert list(_chunks(jobs, 2, [2, 2, 7, 7, 11])) == [[0, 1], [2, 3], [4]]
    assert list(_chunks(jobs, 3, [2, 2, 2, 7, 11])) == [[0, 1, 2], [3], [4]]
    assert list(_chunks(jobs, 2, [0] * 5)) == [[0, 1], [2, 3], [4]]  # the plain path: ``per`` at a time
