"""Circuit discovery (Sec. 3.4, App. A.1 / C): STE, mean-ablation masks, edges, batched classes."""
import numpy as np
import pytest
import torch

from impact_core.levels import circuit as circuit_level
from impact_core.methods import circuits
from impact_core.config import load_config
from impact_core.data import InMemoryImages, Split
from impact_core.methods.sites import PAPER_SITES, HookedViT, compute_site_means, mean_ablate
from conftest import tiny_vit


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids spin-waiting on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_split(n=60, classes=3, seed=0, img=8):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 256, size=(n, img, img), dtype=np.uint8)
    images[labels == 0, :img // 2] = 255  # give class 0 something to see
    return Split("train", InMemoryImages(images, labels, [0.5], [0.25]), np.arange(n), list(range(classes)))


def toy(n=60, **vit):
    """A tiny hooked ViT, a random split of ``n`` images and its site means."""
    hooked = HookedViT(tiny_vit(**vit))
    split = random_split(n=n)
    return hooked, split, means_for(hooked, split)


def means_for(hooked, split):
    x = split.dataset.images[torch.from_numpy(split.indices)]
    return compute_site_means(hooked, [(x, None)], hooked.site_names(sites=PAPER_SITES))


def test_ste_forward_binary_and_surrogate_gradient():
    m = torch.tensor([-1.0, -0.3, 0.0, 1e-6, 0.4, 1.0], requires_grad=True)
    tau = 2.0
    out = circuits.heaviside(m, tau)
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 1, 1, 1]))
    g = torch.randn(6)
    out.backward(g)
    s = torch.sigmoid(tau * m.detach())
    assert torch.allclose(m.grad, g * tau * s * (1 - s))


def test_all_on_is_the_model_bit_for_bit_and_all_off_gives_means():
    hooked, split, means = toy()
    model = hooked.model
    x = split.dataset.images[:10]
    with torch.no_grad():
        names = circuits.node_sites(hooked)
        for K in (1, 2):  # K classes: the batch is K stacked copies
            xs = torch.cat([x] * K)
            ref = model(xs)
            ones = {n: torch.ones(K, hooked.num_units(n)) for n in names}
            with hooked.hooks(circuits.mask_hooks(ones, means)):
                assert torch.equal(model(xs), ref)

        zeros = {n: torch.zeros(1, hooked.num_units(n)) for n in names}
        seen = {}
        fns = {n: [mean_ablate(means[n], zeros[n], n), (lambda n: lambda a: seen.__setitem__(n, a.clone()))(n)]
               for n in names}
        with hooked.hooks(fns):
            out = model(x)
    for n in names:
        assert torch.equal(seen[n], means[n].expand_as(seen[n])), n
    assert torch.allclose(out, out[:1].expand_as(out))  # the input no longer matters


def test_edge_counting_matches_brute_force():
    model = tiny_vit(depth=2, dim=8, heads=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                lin.weight.mul_((torch.rand(lin.weight.shape, generator=g) > 0.5).float())
    hooked = HookedViT(model)
    K = 3
    active = {n: torch.rand(K, hooked.num_units(n), generator=g) > 0.4 for n in circuits.node_sites(hooked)}
    got = circuits.edge_counts(hooked, active)

    D, Cd = hooked.head_dim, hooked.embed_dim
    want = [0] * K
    dense = remaining = 0
    for b, blk in enumerate(model.blocks):
        a = lambda s: active[f"blocks.{b}.{s}"]  # noqa: E731
        mats = [(blk.attn.qkv.weight, lambda r: (("q", "k", "v")[r // Cd], (r % Cd) // D), lambda j: ("norm1", j)),
                (blk.attn.proj.weight, lambda r: ("attn_out", r), lambda j: ("head", j // D)),
                (blk.mlp.fc1.weight, lambda r: ("mlp_act", r), lambda j: ("norm2", j)),
                (blk.mlp.fc2.weight, lambda r: ("mlp_out", r), lambda j: ("mlp_act", j))]
        for W, out_node, in_node in mats:
            for r in range(W.shape[0]):
                for j in range(W.shape[1]):
                    dense += 1
                    if W[r, j] == 0:
                        continue
                    remaining += 1
                    for k in range(K):
                        so, io = out_node(r)
                        si, ii = in_node(j)
                        on_in = any(a(s)[k, ii] for s in "qkv") if si == "head" else a(si)[k, ii]
                        if a(so)[k, io] and on_in:
                            want[k] += 1
    assert got["edges"].tolist() == want
    assert got["dense_total"].item() == dense and got["remaining_total"].item() == remaining
    all_on = {n: torch.ones_like(t) for n, t in active.items()}
    assert circuits.edge_counts(hooked, all_on)["edges"][0].item() == remaining


def planted_model():
    """Class 0 ("bright") is readable only through norm2[0] -> mlp_act[5] -> mlp_out[2] -> head."""
    model = tiny_vit(depth=1, dim=4, heads=2, classes=2, global_pool="avg")
    model.norm, model.fc_norm = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        blk = model.blocks[0]
        for ln in (blk.norm1, blk.norm2):
            ln.weight.fill_(1.0)
        blk.ls1.gamma.fill_(1.0)
        blk.ls2.gamma.fill_(1.0)
        pe = model.patch_embed.proj
        pe.weight[0] = 1.0  # channel 0: patch sum - 8 (16 pixels in [0, 1] each)
        pe.weight[1] = -1.0
        pe.bias[0], pe.bias[1] = -8.0, 8.0
        blk.mlp.fc1.weight[5, 0] = 2.0
        blk.mlp.fc2.weight[2, 5] = 1.0
        model.head.weight[0, 2] = 3.0
        model.head.bias[0] = -4.0
    return model


def planted_split(n=80, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    bright = rng.uniform(0.6, 1.0, size=(n, 8, 8))
    dark = rng.uniform(0.0, 0.4, size=(n, 8, 8))
    images = np.where(labels[:, None, None] == 0, bright, dark)
    ds = InMemoryImages((images * 255).astype(np.uint8), labels, [0.0], [1.0])
    ds.images = torch.from_numpy(images).float().unsqueeze(1)  # exact pixels
    return Split("toy", ds, np.arange(n), [0, 1])


def test_mask_training_finds_the_planted_path():
    torch.manual_seed(0)
    model = planted_model()
    hooked = HookedViT(model)
    split = planted_split()
    assert (model(split.dataset.images).argmax(1).numpy() == split.labels).all()
    means = means_for(hooked, split)
    data = circuits.ClassSets(split, [0], 20, seed=0, what="toy")
    logits, losses = circuits.train_masks(hooked, means, data, k=1e-2, epochs=10, lr=0.1, step_size=10, gamma=0.5,
                                   batch_size=10, progress=False)
    active = {n: t > 0 for n, t in logits.items()}
    on = sorted((n, i) for n, a in active.items() for i in torch.nonzero(a[0]).flatten().tolist())
    assert on == [("blocks.0.mlp_act", 5), ("blocks.0.mlp_out", 2), ("blocks.0.norm2", 0)]
    rand = circuits.random_node_sets(active, [0], draws=3, seed=0)
    acc = circuits.evaluate_masks(hooked, means, data, active, batch_size=16, random_sets=rand)
    assert acc["full"].item() == 1.0 and acc["circuit"].item() == 1.0
    assert acc["ablated"].item() == 0.5  # the circuit removed: never says "bright", chance on a balanced set
    # the planted path is all the model uses: the circuit keeps its margin, ablating it leaves the empty one
    f = circuits.faithfulness(acc["margin_circuit"], acc["margin_full"], acc["margin_empty"])
    f_abl = circuits.faithfulness(acc["margin_ablated"], acc["margin_full"], acc["margin_empty"])
    assert f.item() == pytest.approx(1.0, abs=1e-5) and f_abl.item() == pytest.approx(0.0, abs=1e-5)
    assert acc["random_ablated"].shape == acc["margin_random_ablated"].shape == (1, 3)
    frac = circuits.node_fraction(hooked, active)
    assert circuits.num_nodes(hooked) == 4 * 4 + 16 + 3 * 2  # four C-sized sites, 4C neurons, q/k/v per head
    assert frac.item() == pytest.approx(3 / circuits.num_nodes(hooked))
    assert circuits.ncq(acc["circuit"], acc["full"], frac).item() == pytest.approx(1 - 3 / 38)
    e = circuits.edge_counts(hooked, active)
    assert e["edges"].item() == 2  # fc1[5, 0] and fc2[2, 5]: the planted path's two weights
    sf = circuits.site_fractions(hooked, active)[0, 0]
    want = {"norm2": 1 / 4, "mlp_act": 1 / 16, "mlp_out": 1 / 4}
    assert sf.tolist() == pytest.approx([want.get(s, 0.0) for s in PAPER_SITES])


def test_fast_mask_hooks_equal_one_mean_ablate_per_site():
    """mask_hooks (head masks as channel masks, q/k/v on the fused qkv output) gives the per-site
    reference's output exactly (keep in {0, 1}) and its gradients to the masks and the input to rounding."""
    hooked, split, means = toy(n=90, depth=2, dim=8, heads=2, classes=3)
    names = circuits.node_sites(hooked)
    g = torch.Generator().manual_seed(0)
    keep = {n: (torch.rand(3, hooked.num_units(n), generator=g) > 0.4).float() for n in names}
    x = split.dataset.images[:12]
    outs = []
    for hooks in (circuits.mask_hooks, circuits.mask_hooks_per_site):
        m = {n: t.clone().requires_grad_(True) for n, t in keep.items()}
        xi = x.clone().requires_grad_(True)
        with hooked.hooks(hooks(m, means)):
            z = hooked.model(xi)
        (z ** 2).sum().backward()
        outs.append((z.detach(), {n: t.grad for n, t in m.items()}, xi.grad))
    (z_fast, g_fast, x_fast), (z_ref, g_ref, x_ref) = outs
    assert torch.equal(z_fast, z_ref)
    assert torch.allclose(x_fast, x_ref, rtol=1e-5, atol=1e-6)
    for n in names:
        assert torch.allclose(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-5), n
    assert any(g_ref[n].abs().sum() > 0 for n in names if n.endswith((".q", ".k", ".v")))
    with pytest.raises(KeyError, match="q, k and v are masked together"):
        circuits.mask_hooks({n: t for n, t in keep.items() if not n.endswith(".k")}, means)


def test_fast_mask_training_equals_the_plain_per_site_reference():
    """train_masks keeps all sites' logits in one tensor (one Heaviside, count, AdamW and clamp) and masks
    with mask_hooks; the plain path (per-site logits, hooks, optimiser loop and clamp) gives the same
    losses and logits to float rounding and the same circuits."""
    hooked, split, means = toy(n=90, depth=2, dim=8, heads=2, classes=3)
    data = circuits.ClassSets(split, [0, 1, 2], 10, seed=3, what="toy")
    kw = dict(k=1e-3, epochs=3, lr=0.2, step_size=2, gamma=0.5, batch_size=8, seed=5, progress=False)
    fast, fast_loss = circuits.train_masks(hooked, means, data, **kw)
    plain, plain_loss = circuits.train_masks(hooked, means, data, plain=True, **kw)
    assert list(fast) == list(plain) == circuits.node_sites(hooked)
    assert torch.allclose(fast_loss, plain_loss, atol=1e-5)
    for n in fast:
        assert fast[n].shape == plain[n].shape
        assert torch.allclose(fast[n], plain[n], atol=1e-5), n
        assert torch.equal(fast[n] > 0, plain[n] > 0), n
    assert any((t <= 0).any() for t in fast.values()) and any((t == -1).any() for t in fast.values())


def test_batched_classes_equal_sequential_training():
    hooked, split, means = toy(n=90, depth=2, dim=8, heads=2, classes=3)
    model = hooked.model
    data = circuits.ClassSets(split, [0, 1, 2], 10, seed=3, what="toy")
    kw = dict(k=1e-3, epochs=3, lr=0.2, step_size=2, gamma=0.5, batch_size=8, seed=5, progress=False)
    fast, fast_loss = circuits.train_masks(hooked, means, data, **kw)
    ref, ref_loss = circuits.train_masks_sequential(hooked, means, data, **kw)
    assert fast_loss.shape == ref_loss.shape == (9, 3)
    assert torch.allclose(fast_loss, ref_loss, atol=1e-5)
    for n in fast:
        assert torch.allclose(fast[n], ref[n], atol=1e-5), n
        assert torch.equal(fast[n] > 0, ref[n] > 0), n
    assert any((t <= 0).any() for t in fast.values())  # training did switch nodes off
    active = {n: t > 0 for n, t in fast.items()}
    together = circuits.evaluate_masks(hooked, means, data, active, batch_size=7)
    for i in range(3):
        alone = circuits.evaluate_masks(hooked, means, data.select([i]), {n: a[i:i + 1] for n, a in active.items()}, 7)
        for key in ("full", "circuit", "ablated"):
            assert alone[key].item() == pytest.approx(together[key][i].item()), key
    assert all(p.requires_grad for p in model.parameters())  # model left as found

    # random baselines and margins: the batched evaluation equals class by class as well
    rand = circuits.random_node_sets(active, data.classes, draws=2, seed=4)
    together = circuits.evaluate_masks(hooked, means, data, active, batch_size=7, random_sets=rand)
    for i in range(3):
        alone = circuits.evaluate_masks(hooked, means, data.select([i]), {n: a[i:i + 1] for n, a in active.items()}, 7,
                                 random_sets=circuits.random_node_sets({n: a[i:i + 1] for n, a in active.items()},
                                                                [data.classes[i]], draws=2, seed=4))
        for key in ("random_ablated", "margin_full", "margin_circuit", "margin_ablated", "margin_random_ablated",
                    "margin_empty", "empty"):
            assert torch.allclose(alone[key], together[key][i:i + 1], atol=1e-5), key


def test_random_node_sets_have_the_circuits_per_site_counts():
    hooked = HookedViT(tiny_vit(depth=2, dim=8, heads=2))
    g = torch.Generator().manual_seed(0)
    active = {n: torch.rand(3, hooked.num_units(n), generator=g) > 0.5 for n in circuits.node_sites(hooked)}
    active["blocks.0.mlp_act"][1] = True  # a site fully on: the random set must be the whole site
    active["blocks.1.q"][2] = False  # fully off: empty
    rand = circuits.random_node_sets(active, [0, 5, 7], draws=4, seed=1)
    for n, a in active.items():
        assert rand[n].shape == (3, 4, a.shape[1]) and rand[n].dtype == torch.bool
        assert torch.equal(rand[n].sum(-1), a.sum(-1, keepdim=True).expand(3, 4)), n
    assert rand["blocks.0.mlp_act"][1].all() and not rand["blocks.1.q"][2].any()
    mlp = rand["blocks.1.mlp_act"]  # 32 units, about half on: draws differ from each other and from the circuit
    assert not torch.equal(mlp[0, 0], mlp[0, 1]) and not torch.equal(mlp[0, 0], active["blocks.1.mlp_act"][0])
    # seeded by (seed, class, draw): class 5 draws the same sets whatever classes share its chunk
    alone = circuits.random_node_sets({n: a[1:2] for n, a in active.items()}, [5], draws=4, seed=1)
    assert all(torch.equal(alone[n][0], rand[n][1]) for n in active)
    other = circuits.random_node_sets(active, [0, 5, 7], draws=4, seed=2)
    assert not all(torch.equal(other[n], rand[n]) for n in active)
    with pytest.raises(ValueError, match="rows for 2 classes"):
        circuits.random_node_sets(active, [0, 1], draws=1, seed=0)


def test_margins_of_all_on_and_all_off_circuits():
    hooked, split, means = toy(n=60, depth=2, dim=8, heads=2, classes=3, global_pool="avg")  # avg pool: the empty model still varies
    model = hooked.model
    data = circuits.ClassSets(split, [0, 2], 8, seed=1, what="toy")
    names = circuits.node_sites(hooked)
    on = {n: torch.ones(2, hooked.num_units(n), dtype=torch.bool) for n in names}
    off = {n: torch.zeros_like(a) for n, a in on.items()}
    ev_on = circuits.evaluate_masks(hooked, means, data, on, 5, random_sets=circuits.random_node_sets(on, data.classes, 2, 0))
    ev_off = circuits.evaluate_masks(hooked, means, data, off, 5, random_sets=circuits.random_node_sets(off, data.classes, 2, 0))

    # the full model's margin, computed directly over each class's positive images
    for i, c in enumerate(data.classes):
        pos = data.idx[i][data.y[i].numpy() == 1]
        with torch.no_grad():
            z = model(split.dataset.images[torch.from_numpy(split.indices[pos])])
        s = z[:, c] - torch.cat([z[:, :c], z[:, c + 1:]], 1).logsumexp(1)
        assert ev_on["margin_full"][i].item() == pytest.approx(s.mean().item(), abs=1e-5)
    assert not torch.allclose(ev_on["margin_full"], ev_on["margin_empty"])
    assert torch.equal(ev_on["margin_circuit"], ev_on["margin_full"])
    assert torch.equal(ev_on["margin_ablated"], ev_on["margin_empty"])
    assert torch.equal(ev_on["margin_random_ablated"], ev_on["margin_empty"][:, None].expand(2, 2))  # all nodes drawn
    assert torch.equal(ev_off["margin_circuit"], ev_off["margin_empty"])
    assert torch.equal(ev_off["margin_ablated"], ev_off["margin_full"])
    assert torch.equal(ev_off["margin_random_ablated"], ev_off["margin_full"][:, None].expand(2, 2))  # no node drawn
    assert torch.allclose(circuits.faithfulness(ev_on["margin_circuit"], ev_on["margin_full"], ev_on["margin_empty"]),
                          torch.ones(2))
    assert torch.allclose(circuits.faithfulness(ev_off["margin_circuit"], ev_off["margin_full"], ev_off["margin_empty"]),
                          torch.zeros(2))


def test_compute_circuits_result_keys_and_summary():
    from types import SimpleNamespace

    hooked, split, means = toy(n=90, depth=1, dim=8, heads=2, classes=3)
    train = circuits.ClassSets(split, [0, 1, 2], 6, seed=0, what="toy")
    evals = circuits.ClassSets(split, [0, 1, 2], 6, seed=1, what="toy")
    cc = SimpleNamespace(class_chunk=2, epochs=1, lr=0.2, step_size=1, step_gamma=0.5, batch_size=6, tau=1.0,
                         weight_decay=0.0, init_mean=0.5, init_std=0.01, random_draws=3)
    res = circuits.compute_circuits(hooked, means, train, evals, cc, k=1e-3, seed=0)
    for key in ("acc_full", "acc_circuit", "acc_ablated", "acc_empty", "margin_full", "margin_circuit",
                "margin_ablated", "margin_empty", "faithfulness", "faithfulness_ablated", "node_fraction", "ncq",
                "size_dense", "size_remaining"):
        assert res[key].shape == (3,), key
    assert res["acc_random_ablated"].shape == res["margin_random_ablated"].shape == (3, 3)
    want = (res["margin_circuit"] - res["margin_empty"]) / (res["margin_full"] - res["margin_empty"])
    assert torch.allclose(res["faithfulness"], want)
    po = {"size_dense": res["size_dense"] / 2, "size_remaining": res["size_remaining"] / 2}
    summ = circuit_level.summary(res, po)
    assert summ["Random-ablated acc. (%)"][0] == pytest.approx(res["acc_random_ablated"].double().mean().item() * 100)
    assert summ["Pruning-only size (% dense edges)"][0] == pytest.approx(summ["Size (% dense edges)"][0] / 2)
    assert "Pruning-only size (% dense edges)" not in circuit_level.summary(res)


def test_pruning_only_edges_counts_the_dense_circuits_on_pruned_weights(monkeypatch):
    from impact_core import pipeline

    dense = tiny_vit(depth=2, dim=8, heads=2)
    pruned = tiny_vit(depth=2, dim=8, heads=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in pruned.blocks:
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                lin.weight.mul_((torch.rand(lin.weight.shape, generator=g) > 0.5).float())
    hooked = {0.0: HookedViT(dense), 0.5: HookedViT(pruned)}
    active = {n: torch.rand(2, hooked[0.0].num_units(n), generator=g) > 0.3 for n in circuits.node_sites(hooked[0.0])}
    monkeypatch.setattr(circuit_level, "circuit_results", lambda cfg, s: {"active": active} if s == 0 else None)
    monkeypatch.setattr(pipeline, "hooked_model", lambda cfg, s, method="wanda": hooked[s])
    cfg = load_config("smoke")

    same = circuit_level.pruning_only_edges(cfg, 0.0)
    ref = circuits.edge_counts(hooked[0.0], active)
    assert torch.equal(same["edges"], ref["edges"])
    assert torch.allclose(same["size_dense"], ref["edges"] / ref["dense_total"])
    cut = circuit_level.pruning_only_edges(cfg, 0.5)
    assert (cut["edges"] < same["edges"]).all()
    assert (cut["size_remaining"] > cut["size_dense"]).all()  # fewer remaining weights than dense ones
    with pytest.raises(ValueError, match="control model has nothing pruned"):
        circuit_level.pruning_only_edges(cfg, 0.5, method=pipeline.CONTROL)


def test_presets_give_logits_room_to_switch_off_before_the_first_decay():
    assert circuits.steps_per_epoch(200, 8) == 25 and circuits.steps_per_epoch(201, 8) == 26
    for preset in ("smoke", "default", "paper"):
        cc = load_config(preset).circuit
        assert circuits.first_decay_travel(cc) > cc.init_mean, preset
    cc = load_config("default").circuit
    assert circuits.first_decay_travel(cc) == pytest.approx(cc.lr * cc.step_size * 25)


def test_balanced_sets_and_bad_input():
    split = random_split(n=30)
    idx, y = circuits.balanced_indices(split.labels, 1, 5, seed=0)
    assert y.sum() == 5 and len(idx) == 10 and len(set(idx.tolist())) == 10
    assert (split.labels[idx] == 1).tolist() == y.astype(bool).tolist()
    with pytest.raises(ValueError, match="class 1 has 10 images"):
        circuits.balanced_indices(split.labels, 1, 11, seed=0)


def test_bad_settings_fail_before_compute():
    from impact_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="repeated class"):
        load_config("smoke", {"circuit.classes": [1, 1]})
    with pytest.raises(ConfigError, match="epochs: must be an integer"):
        load_config("smoke", {"circuit.epochs": 1.5})
    with pytest.raises(ConfigError, match="k_sweep"):
        load_config("smoke", {"circuit.k_sweep": []})
    with pytest.raises(ConfigError, match="out of range"):
        load_config("smoke", {"circuit.classes": [0, 10]})
    cfg = load_config("smoke")
    assert circuit_level.resolve_classes(load_config("smoke", {"circuit.classes": None})) == list(range(10))
    assert circuit_level.default_k(cfg, 0.0) == cfg.circuit.k_dense and circuit_level.default_k(cfg, 0.7) == cfg.circuit.k_sparse
    with pytest.raises(ValueError, match="k must be"):
        circuit_level.circuit_results(cfg, 0.7, k=-1.0)
    with pytest.raises(ConfigError, match="random_draws"):
        load_config("smoke", {"circuit.random_draws": 0})
    with pytest.raises(ValueError, match="control model has nothing pruned"):
        circuit_level.circuit_results(cfg, 0.7, method="control")


def test_control_gets_the_pruned_k_and_its_own_cache_identity():
    from impact_core import pipeline

    cfg = load_config("smoke")
    assert cfg.circuit.k_dense != cfg.circuit.k_sparse
    assert circuit_level.default_k(cfg, 0.0, pipeline.CONTROL) == cfg.circuit.k_sparse
    assert circuit_level.default_k(cfg, 0.0, "wanda") == cfg.circuit.k_dense
    ctrl = circuit_level.circuit_inputs(cfg, 0.0, cfg.circuit.k_sparse, pipeline.CONTROL)
    dense = circuit_level.circuit_inputs(cfg, 0.0, cfg.circuit.k_sparse, "wanda")
    control_key = pipeline.cache_for(cfg).key(pipeline.PRUNED_MODEL, pipeline.pruned_inputs(cfg, 0.0, "control"))
    assert ctrl["model"] != dense["model"] and ctrl["model"] == {"pruned": control_key}
    assert ctrl["site_means"] == pipeline.site_means_key(cfg, 0.0, pipeline.CONTROL) != dense["site_means"]


def test_k_sweep_always_holds_the_dense_k():
    cfg = load_config("smoke", {"circuit.k_sweep": [6e-5, 4e-5], "circuit.k_dense": 9e-5})
    assert circuit_level.sweep_ks(cfg) == [4e-5, 6e-5, 9e-5]
    assert circuit_level.sweep_ks(load_config("default")) == sorted(load_config("default").circuit.k_sweep)  # already in it


def test_paper_tables_follow_the_edge_form_of_ncq():
    """Our reading of Tables 3 / 7: printed NCQ = Acc * (1 - Size), not Eq. 12's node form."""
    from impact_core.paper_values import PAPER_TABLE_3, PAPER_TABLE_7

    for table in (PAPER_TABLE_3, PAPER_TABLE_7):
        for acc, size, ncq in zip(table["acc_pct"], table["size_pct"], table["ncq"]):
            assert circuits.ncq_edges(acc[0] / 100, size[0] / 100) == pytest.approx(ncq[0], abs=1.5e-3)
        node_form = [(1 - n[0] / 100) for n in table["node_pct"]]
        assert any(abs(f - q[0]) > 0.05 for f, q in zip(node_form, table["ncq"]))  # bounded by 1 - node fraction
