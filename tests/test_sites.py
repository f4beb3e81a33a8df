import pytest
import torch

from impact_core.methods.sites import ALL_SITES, PAPER_SITES, HookedViT, compute_site_means, mean_ablate


def manual_block(blk, x):
    """timm's Block forward written out, returning every site's value."""
    out = {}
    h = blk.norm1(x)
    out["norm1"] = h
    B, N, C = h.shape
    H = blk.attn.num_heads
    D = C // H
    qkv = blk.attn.qkv(h).reshape(B, N, 3, H, D)
    q, k, v = qkv.unbind(2)
    out["q"], out["k"], out["v"] = q, k, v
    attn = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)) * D ** -0.5
    z = (attn.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)  # (B, N, H, D)
    out["heads"] = z
    a = blk.ls1(blk.attn.proj(z.reshape(B, N, C)))
    out["attn_out"] = a
    x = x + a
    h2 = blk.norm2(x)
    out["norm2"] = h2
    act = blk.mlp.act(blk.mlp.fc1(h2))
    out["mlp_act"] = act
    m = blk.ls2(blk.mlp.fc2(act))
    out["mlp_out"] = m
    out["resid_post"] = x + m
    return out


def test_sites_equal_timm_intermediates(tiny_model):
    hooked = HookedViT(tiny_model)
    x = torch.randn(2, 1, 28, 28)
    names = hooked.site_names(sites=ALL_SITES)
    logits, cache = hooked.run_with_cache(x, names)
    assert torch.allclose(logits, tiny_model(x), atol=1e-5)
    h = tiny_model._pos_embed(tiny_model.patch_embed(x))
    for b, blk in enumerate(tiny_model.blocks):
        ref = manual_block(blk, h)
        for site, value in ref.items():
            assert torch.allclose(cache[f"blocks.{b}.{site}"], value, atol=1e-5), (b, site)
        h = ref["resid_post"]
    # resid_post agrees with timm's own forward_intermediates
    _, inter = tiny_model.forward_intermediates(x, indices=[2, 11], norm=False, output_fmt="NLC")
    assert torch.allclose(cache["blocks.11.resid_post"][:, 1:], inter[1], atol=1e-5)


def test_identity_patch_and_full_keep_change_nothing(tiny_model):
    hooked = HookedViT(tiny_model)
    x = torch.randn(2, 1, 28, 28)
    base = tiny_model(x)
    names = hooked.site_names(sites=PAPER_SITES)
    assert torch.equal(hooked.run_with_hooks(x, {n: (lambda a: a.clone()) for n in names}), base)
    means = {n: torch.randn(17, *hooked.unit_shape(n)) for n in names}
    keep = {n: torch.ones(hooked.num_units(n)) for n in names}
    out = hooked.run_with_hooks(x, {n: mean_ablate(means[n], keep[n], n) for n in names})
    assert torch.equal(out, base)


def test_mean_ablation_sets_units_to_means(tiny_model):
    hooked = HookedViT(tiny_model)
    x = torch.randn(3, 1, 28, 28)
    name = "blocks.4.q"
    mean = torch.randn(17, *hooked.unit_shape(name))
    keep = torch.tensor([1.0, 0.0])  # ablate head 1
    seen = {}
    with hooked.hooks({name: mean_ablate(mean, keep, name)}):
        with hooked.hooks({name: lambda a: seen.setdefault("q", a)}):
            tiny_model(x)
    q = seen["q"]
    assert torch.allclose(q[:, :, 1], mean[None, :, 1].expand(3, -1, -1))
    _, clean = hooked.run_with_cache(x, [name])
    assert torch.allclose(q[:, :, 0], clean[name][:, :, 0])


def test_site_means_one_pass(tiny_model):
    hooked = HookedViT(tiny_model)
    xs = [torch.randn(4, 1, 28, 28), torch.randn(2, 1, 28, 28)]
    names = ["blocks.0.mlp_act", "blocks.7.v", "blocks.11.attn_out"]
    means = compute_site_means(hooked, [(x, None) for x in xs], names)
    _, cache = hooked.run_with_cache(torch.cat(xs), names)
    for n in names:
        assert means[n].shape == (17, *hooked.unit_shape(n))
        assert torch.allclose(means[n], cache[n].mean(0), atol=1e-5)


def test_bad_site_names(tiny_model):
    hooked = HookedViT(tiny_model)
    with pytest.raises(KeyError, match="not a site name"):
        hooked.unit_shape("blocks.1.mlp")
    with pytest.raises(KeyError, match="12 blocks"):
        hooked.unit_shape("blocks.12.q")
    with pytest.raises(KeyError, match="attribution.forward_trace only"):
        hooked.unit_shape("blocks.1.pattern")  # a name of the vocabulary that only attribution records
