"""BatchTopK SAE: training-mode sparsity, threshold, unit decoder, aux loss, recovery, quality metrics."""
import numpy as np
import pytest
import torch

from impact_core.levels import layer
from impact_core.methods import sae as S


def _opt(sae):
    return torch.optim.Adam(sae.parameters(), lr=1e-2)


def _step(sae, x, opt=None, dead_after=1000, aux_k=8):
    return S.train_step(sae, opt or _opt(sae), x, aux_coefficient=1 / 32, aux_k=aux_k,
                        dead_after_steps=dead_after)


def test_batch_topk_keeps_exactly_k_times_batch():
    torch.manual_seed(0)
    sae = S.BatchTopKSAE(8, 32, k=3).train()
    x = torch.randn(10, 8) + 3.0
    sae.b_enc.data.fill_(10.0)  # every pre-activation positive: exactly k*B survive
    f = sae.encode(x)
    assert int((f > 0).sum()) == 3 * 10
    # per-sample counts vary (batch-level, not per-sample, top-k) but the kept ones are the largest
    pre = sae.pre_acts(x * sae.input_scale).detach()
    f = f.detach()
    kept_min = f[f > 0].min()
    assert float(pre[f == 0].max()) <= float(kept_min)


def test_batch_topk_breaks_ties_by_position_and_the_floor_changes_nothing():
    """Entries tied at the k*B-th value are kept lowest position first (the same in every run); ranking
    only the entries above a floor keeps the same ones, to the bit, ties included; a floor above too many
    entries falls back to ranking all of them."""
    acts = torch.tensor([[0.9, 0.5, 0.0, 0.5], [0.5, 0.2, 0.7, 0.5]])
    f = S.batch_topk(acts, 2)  # 4 kept: 0.9, 0.7 and the first two of the four 0.5s
    want = torch.tensor([[0.9, 0.5, 0.0, 0.5], [0.0, 0.0, 0.7, 0.0]])
    assert torch.equal(f, want)
    for floor in (0.1, 0.4, 0.6):  # 0.6: only two entries above it, so all are ranked
        assert torch.equal(S.batch_topk(acts, 2, floor), want)
    g = torch.Generator().manual_seed(0)
    pre = torch.relu(torch.randn(64, 96, generator=g)).requires_grad_(True)
    w = torch.randn(64, 96, generator=g)
    pre.data[5] = pre.data[9]  # one row twice: its latents tie
    grads = []
    for floor in (None, 0.5, 1.0):
        pre.grad = None
        f = S.batch_topk(pre, 4, floor)
        (f * w).sum().backward()
        grads.append((f.detach(), pre.grad.clone()))
    assert all(torch.equal(grads[0][0], a) and torch.equal(grads[0][1], b) for a, b in grads[1:])
    assert int((grads[0][0] > 0).sum()) == 4 * 64


def test_training_with_the_floor_equals_ranking_the_whole_batch():
    """train_step's fast BatchTopK (TOPK_FLOOR) gives the plain path's SAE and history to the bit, on
    batches that repeat rows (ties)."""
    rows = torch.randn(60, 6, generator=torch.Generator().manual_seed(3)) + 0.5

    def run(floor_factor):
        sae = S.BatchTopKSAE(6, 24, k=3, seed=5)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        batches, hist = S.buffered_batches(rows, 32, seed=1), []
        for step in range(60):
            x = next(batches)
            if step == 0:
                sae.init_from_batch(x, True)
            hist.append(S.train_step(sae, opt, x, aux_coefficient=1 / 32, aux_k=4, dead_after_steps=5,
                                     floor_factor=floor_factor))
        return hist, sae.state_dict()

    (h0, s0), (h1, s1) = run(None), run(S.TOPK_FLOOR)
    assert h0 == h1
    assert all(torch.equal(s0[key], s1[key]) for key in s0)


def test_threshold_set_after_one_step_and_used_in_inference():
    torch.manual_seed(0)
    sae = S.BatchTopKSAE(8, 32, k=4)
    with pytest.raises(RuntimeError, match="threshold is not set"):
        sae.eval().encode(torch.randn(3, 8))
    x = torch.randn(64, 8)
    sae.init_from_batch(x, True)
    out = _step(sae, x)
    assert sae.threshold_is_set and torch.isfinite(sae.threshold)
    # inference: exactly the pre-activations above the threshold survive, unchanged
    sae.eval()
    pre = sae.pre_acts(x * sae.input_scale)
    f = sae.encode(x)
    theta = float(sae.threshold)
    assert torch.equal(f > 0, pre > theta)
    assert torch.allclose(f[f > 0], pre[pre > theta])
    # raising the threshold removes activations: it is really what inference uses
    sae.threshold.fill_(theta * 2 + 1e-3)
    assert int((sae.encode(x) > 0).sum()) < int((f > 0).sum())
    assert out["mse"] >= 0


def test_threshold_is_ema_of_min_kept():
    torch.manual_seed(1)
    sae = S.BatchTopKSAE(6, 12, k=2, threshold_beta=0.9)
    opt = _opt(sae)
    x1, x2 = torch.randn(32, 6), torch.randn(32, 6)
    sae.init_from_batch(x1, True)
    _step(sae, x1, opt)
    t1 = float(sae.threshold)
    # the min kept activation of the second step, computed before the step changes weights
    with torch.no_grad():
        f2 = S.batch_topk(sae.pre_acts(x2 * sae.input_scale), 2)
    _step(sae, x2, opt)
    assert float(sae.threshold) == pytest.approx(0.9 * t1 + 0.1 * float(f2[f2 > 0].min()), rel=1e-5)


def test_decoder_rows_unit_norm_and_parallel_grad_removed():
    torch.manual_seed(0)
    sae = S.BatchTopKSAE(8, 24, k=3)
    opt = _opt(sae)
    x = torch.randn(50, 8) * 5
    sae.init_from_batch(x, True)
    for _ in range(5):
        _step(sae, x, opt)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(24), atol=1e-5)
    # the gradient that reaches the optimiser is orthogonal to each row
    sae.train()
    loss = (sae.decode_normalised(S.batch_topk(sae.pre_acts(x), 3)) - x).pow(2).sum()
    sae.zero_grad()
    loss.backward()
    with torch.no_grad():
        scale = sae.W_dec.grad.norm(dim=1).max()
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-2 * scale
        sae.remove_parallel_grad()
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5 * scale


def test_aux_loss_zero_without_dead_and_positive_with_dead():
    torch.manual_seed(0)
    sae = S.BatchTopKSAE(8, 16, k=2)
    x = torch.randn(20, 8)
    xn = x * sae.input_scale
    pre = sae.pre_acts(xn)
    xn_hat = sae.decode_normalised(S.batch_topk(pre, 2))
    none = torch.zeros(16, dtype=torch.bool)
    assert float(S.aux_loss(sae, xn, xn_hat, pre, none, aux_k=4)) == 0.0
    some = none.clone()
    some[:8] = True
    aux = S.aux_loss(sae, xn, xn_hat, pre, some, aux_k=4)
    assert float(aux) > 0
    aux.backward()  # gradients reach only the dead latents' decoder rows
    assert sae.W_dec.grad[8:].abs().sum() == 0 and sae.W_dec.grad[:8].abs().sum() > 0
    # in a training step with dead_after large, no latent is dead and aux is reported as 0
    out = _step(sae, x, dead_after=10**6)
    assert out["aux"] == 0.0 and out["dead"] == 0


def test_aux_loss_fast_path_matches_reference():
    torch.manual_seed(0)
    dense = S.BatchTopKSAE(8, 40, k=3, decode_impl="dense")
    fast = S.BatchTopKSAE(8, 40, k=3, decode_impl="sparse")
    fast.load_state_dict(dense.state_dict())
    x = torch.randn(12, 8)
    dead = torch.rand(40) < 0.5
    grads = []
    for sae in (dense, fast):
        pre = sae.pre_acts(x)
        xn_hat = sae.decode_normalised(S.batch_topk(pre, 3)).detach()
        loss = S.aux_loss(sae, x, xn_hat, pre, dead, aux_k=5)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (sae.W_dec, sae.W_enc))))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
    assert grads[0][1].abs().sum() > 0


def test_sparse_decode_matches_dense():
    torch.manual_seed(0)
    f = S.batch_topk(torch.relu(torch.randn(7, 40)), 3).requires_grad_(True)
    W = torch.randn(40, 5, requires_grad=True)
    dense = f @ W
    g = torch.randn(7, 5)
    gf_d, gW_d = torch.autograd.grad((dense * g).sum(), (f, W))
    sparse = S.sparse_decode(f, W)
    gf_s, gW_s = torch.autograd.grad((sparse * g).sum(), (f, W))
    assert torch.allclose(dense, sparse, atol=1e-5)
    assert torch.allclose(gW_d, gW_s, atol=1e-5)
    mask = f.detach() != 0
    assert torch.allclose(gf_d[mask], gf_s[mask], atol=1e-5)


def test_recovers_known_sparse_dictionary():
    """Data = sparse nonnegative combinations of 24 unit atoms in 12-d; the SAE finds the atoms."""
    gen = torch.Generator().manual_seed(0)
    d, n_atoms, k = 12, 24, 2
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def batches():
        while True:
            codes = torch.zeros(256, n_atoms)
            idx = torch.rand(256, n_atoms, generator=gen).argsort(1)[:, :k]  # k distinct atoms per sample
            codes.scatter_(1, idx, torch.rand(256, k, generator=gen) + 0.5)
            yield codes @ atoms

    torch.manual_seed(0)
    sae = S.BatchTopKSAE(d, 48, k=k, seed=123, decode_impl="sparse", threshold_beta=0.98)  # init unrelated to atoms
    best_init = (atoms @ sae.W_dec.detach().T).max(1).values  # random directions: a poor match
    S.fit(sae, batches(), 400, lr=1e-2, aux_coefficient=1 / 32, aux_k=8, dead_after_steps=20,
          normalize_input=False, progress=False)
    best = (atoms @ sae.W_dec.detach().T).max(1).values  # best cosine of each true atom
    assert float(best_init.mean()) < 0.85
    assert float(best.mean()) > 0.95 and float(best.min()) > 0.9, best
    x = next(batches())
    x_hat, _ = sae.eval()(x)
    assert S.nmse_per_sample(x, x_hat.detach()) < 0.2  # inference (threshold) mode
    assert S.fve(x, x_hat.detach()) > 0.5


def test_nmse_fve_dead_against_numpy():
    torch.manual_seed(0)
    x = torch.randn(300, 6).double() + 2
    x_hat = x + 0.3 * torch.randn(300, 6).double()
    f = torch.relu(torch.randn(300, 10))
    f[:, 3] = 0
    f[:, 7] = 0
    acc = S.QualityAccumulator(10)
    for a in range(0, 300, 70):  # streamed in uneven chunks
        acc.add(x[a:a + 70], x_hat[a:a + 70], f[a:a + 70])
    r = acc.result()
    X, Xh = x.numpy(), x_hat.numpy()
    per_sample = np.mean(((X - Xh) ** 2).sum(1) / (X ** 2).sum(1))
    fvu = ((X - Xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    # the paper's NMSE is the fraction of variance unexplained: NMSE + FVE = 1 (its Tables 2, 5, 6)
    assert r["nmse"] == pytest.approx(fvu, rel=1e-9)
    assert r["fve"] == pytest.approx(1 - fvu, rel=1e-9)
    assert abs(r["nmse"] + r["fve"] - 1) < 1e-9
    assert r["nmse_per_sample"] == pytest.approx(per_sample, rel=1e-9)
    assert r["nmse"] > 2 * r["nmse_per_sample"]  # inputs far from 0: the two definitions really differ
    # the plain functions agree with the accumulator
    assert S.nmse(x, x_hat) == pytest.approx(r["nmse"], rel=1e-9)
    assert S.fve(x, x_hat) == pytest.approx(r["fve"], rel=1e-9)
    assert S.nmse_per_sample(x, x_hat) == pytest.approx(r["nmse_per_sample"], rel=1e-9)
    assert r["dead"] == 2 and r["dead_fraction"] == pytest.approx(0.2)
    assert r["eval_tokens"] == 300
    row = layer.quality_row({"tokens": "cls", "k": 2, "expansion": 2, "n_latents": 10, "metrics": r})
    assert (row["NMSE"], row["FVE"], row["NMSE per sample"]) == (r["nmse"], r["fve"], r["nmse_per_sample"])


def test_normalisation_is_invisible_in_raw_space():
    torch.manual_seed(0)
    sae = S.BatchTopKSAE(8, 16, k=2)
    x = torch.randn(40, 8) * 50
    sae.init_from_batch(x, True)
    assert (x * sae.input_scale).pow(2).sum(-1).mean().item() == pytest.approx(8, rel=1e-4)
    sae.train()
    f = sae.encode(x)
    assert torch.allclose(sae.decode(f) * sae.input_scale, f @ sae.W_dec + sae.b_dec, atol=1e-4)


def test_token_selection_and_streaming():
    act = torch.arange(2 * 5 * 3).float().view(2, 5, 3)
    assert torch.equal(S.select_tokens(act, "cls"), act[:, 0])
    assert S.select_tokens(act, "patch").shape == (8, 3)
    assert S.select_tokens(act, "all").shape == (10, 3)
    with pytest.raises(ValueError, match="tokens"):
        S.select_tokens(act, "CLS ")
    rows = torch.arange(30).float().view(30, 1)
    stream = S.shuffled_batches(lambda e: [rows[:10], rows[10:20], rows[20:]], 4, 8, seed=0)
    seen = torch.cat([next(stream) for _ in range(15)]).view(-1)  # 60 rows = two epochs
    assert all(b.shape == (4, 1) for b in [next(stream)])
    counts = torch.bincount(seen.long(), minlength=30)
    assert counts.sum() == 60 and counts.max() <= 3  # each row at most once per epoch (+ one pool carry)
    again = S.shuffled_batches(lambda e: [rows[:10], rows[10:20], rows[20:]], 4, 8, seed=0)
    assert torch.equal(torch.cat([next(again) for _ in range(15)]).view(-1), seen)


def test_bad_arguments_fail_before_compute():
    from impact_core.config import ConfigError, load_config

    cfg = load_config("smoke")
    with pytest.raises(ValueError, match="tokens"):
        layer.train_sae(cfg, 0.0, tokens="patches")
    with pytest.raises(ValueError, match="exceeds"):
        layer.train_sae(cfg, 0.0, k=10**6)
    with pytest.raises(ConfigError, match="sae.tokens"):
        load_config("smoke", {"sae.tokens": "foo"})
    with pytest.raises(ValueError, match="k must"):
        S.BatchTopKSAE(4, 8, k=9)
    with pytest.raises(ValueError, match="sae_seed"):
        layer.train_sae(cfg, 0.0, sae_seed=-1)
    with pytest.raises(ValueError, match="control"):
        layer.train_sae(cfg, 0.5, method="control")
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="sae.seeds"):
            load_config("smoke", {"sae.seeds": bad})
    assert load_config("smoke").sae.seeds == 2 and load_config("default").sae.seeds == 3


def test_sae_seeds_share_activations_and_the_control_works(tiny_fmnist, tmp_path):
    """On a tiny model: SAE seeds differ only in the SAE, reuse the activation buffers; the control model works."""
    from impact_core import pipeline
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_fmnist, pruning={"finetune_images": 16, "finetune_batch_size": 16},
                      sae={"k": 2, "expansion": 2, "batch_size": 16, "steps": 3, "aux_k": 4, "train_images": 40,
                           "eval_images": 20, "seeds": 2, "top_k": 2})
    cfg.cache_dir = str(tmp_path / "cache")
    layer._ACT_BUFFERS.clear()
    rows = layer.quality_over_seeds(cfg, 0.0)
    assert len(layer._ACT_BUFFERS) == 2  # train and eval activations of the dense model, shared by both seeds
    assert [r["sae seed"] for r in rows] == [0, 1]
    a, b = (layer.train_sae(cfg, 0.0, sae_seed=i) for i in (0, 1))
    assert not torch.equal(a["state"]["W_dec"], b["state"]["W_dec"])  # another initialisation
    assert rows[0]["eval tokens"] == rows[1]["eval tokens"] == 20
    for r in rows:
        assert abs(r["NMSE"] + r["FVE"] - 1) < 1e-9
    control = layer.quality_over_seeds(cfg, 0.0, pipeline.CONTROL)
    assert len(control) == 2 and len(layer._ACT_BUFFERS) == 4  # the control model's own activations
    c0 = layer.train_sae(cfg, 0.0, method=pipeline.CONTROL)
    assert not torch.equal(c0["state"]["b_dec"], a["state"]["b_dec"])  # trained on another model's residuals
    feats = layer.sae_feature_metrics(cfg, 0.0, method=pipeline.CONTROL, sae_seed=1)
    assert feats["impact"].shape == (cfg.model.num_classes,) and feats["topk"].shape == (cfg.model.num_classes, 2)


def test_activation_sets_are_stored_once_and_change_nothing(tiny_fmnist, tmp_path, caplog):
    """An activation set is computed once and stored in the result cache: another SAE on the same model
    and tokens, in a process without the in-memory buffers (cleared here), reads it instead of running
    the model again. The SAE trained on stored activations equals the one trained without storing, bit
    for bit; a set larger than ``sae.cache_activations_mb`` is not stored."""
    import logging

    from impact_core import pipeline
    from impact_core.config import ConfigError, load_config
    from tests.conftest import tiny_config

    sae = {"k": 2, "expansion": 2, "batch_size": 16, "steps": 3, "aux_k": 4, "train_images": 40, "eval_images": 20,
           "seeds": 1, "top_k": 2}
    cfg = tiny_config(tiny_fmnist, sae=sae)
    cfg.cache_dir = str(tmp_path / "stored")
    layer._ACT_BUFFERS.clear()
    first = layer.train_sae(cfg, 0.0)
    stored = pipeline.cache_for(cfg).root / layer.SAE_ACTIVATIONS
    assert len(list(stored.glob("*.pt"))) == 2  # the train and the eval set
    layer._ACT_BUFFERS.clear()  # as in another worker process
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="impact_core"):
        layer.train_sae(cfg, 0.0, k=3)
    assert caplog.text.count("reusing sae_acts/") == 2 and "SAE activations:" not in caplog.text

    unstored = tiny_config(tiny_fmnist, sae={**sae, "cache_activations_mb": 0})
    unstored.cache_dir = str(tmp_path / "unstored")
    layer._ACT_BUFFERS.clear()
    plain = layer.train_sae(unstored, 0.0)
    assert not (pipeline.cache_for(unstored).root / layer.SAE_ACTIVATIONS).exists()
    assert all(torch.equal(first["state"][key], plain["state"][key]) for key in plain["state"])
    assert first["metrics"]["nmse"] == plain["metrics"]["nmse"]
    with pytest.raises(ConfigError, match="cache_activations_mb"):
        load_config("smoke", {"sae.cache_activations_mb": -1})


# --- SAE feature metrics: splicing, zero ablation, attribution ------------------------------------------------------

def _tiny_vit_and_sae(tokens="cls"):
    from conftest import tiny_vit
    from impact_core.methods.sites import HookedViT

    hooked = HookedViT(tiny_vit(init_values=0.1))
    hooked.model.cls_token.data.normal_()  # an untrained CLS token is ~0: give the CLS residual a scale
    with torch.no_grad():
        _, cache = hooked.run_with_cache(torch.randn(16, 1, 8, 8), ["blocks.1.resid_post"])
    acts = cache["blocks.1.resid_post"].reshape(-1, 8)  # real residuals, all tokens
    sae = S.BatchTopKSAE(8, 16, k=3)
    sae.init_from_batch(acts, True)
    opt = _opt(sae)
    for _ in range(3):
        _step(sae, acts, opt)
    sae.eval()
    cls = cache["blocks.1.resid_post"][:, 0]
    assert (sae.encode(cls) > 0).any(1).float().mean() > 0.5  # latents fire on the CLS residuals
    return hooked, sae


def test_splice_is_exact_and_zero_ablation_removes_decoder_directions():
    from impact_core.methods import sae_features as SF

    hooked, sae = _tiny_vit_and_sae()
    act = torch.randn(4, 5, 8)
    store = {}
    same = SF.splice_hook(sae, "cls", store)(act)
    assert torch.allclose(same, act, atol=1e-5)
    keep = torch.ones(4, 16)
    keep[:, [2, 5, 7]] = 0
    new = SF.splice_hook(sae, "patch", store, keep=keep)(act)
    f = sae.encode(act[:, 1:])
    expected = act[:, 1:] - (f * (1 - keep[:, None, :])) @ sae.W_dec / sae.input_scale
    assert torch.allclose(new[:, 1:], expected, atol=1e-5)
    assert torch.equal(new[:, 0], act[:, 0])  # CLS untouched by a patch-token SAE
    x = torch.randn(6, 1, 8, 8)
    clean = hooked.model(x)
    spliced = hooked.run_with_hooks(x, {"blocks.1.resid_post": SF.splice_hook(sae, "all", {})})
    assert torch.allclose(clean, spliced, atol=1e-5)


def test_attribution_equals_chain_rule_through_the_decoder():
    from impact_core.methods import sae_features as SF

    hooked, sae = _tiny_vit_and_sae()
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = SF.feature_pass(hooked, sae, [(x, y)], 0, "cls", 3)
    # direct: gradient of each image's own logit w.r.t. the CLS residual, projected on decoder rows
    for p in hooked.parameters():
        p.requires_grad_(False)
    logits, cache = hooked.run_with_cache(x, ["blocks.0.resid_post"], detach=False)
    resid = cache["blocks.0.resid_post"]
    # run again with the residual as a leaf to get d logit / d resid
    leaf = resid.detach().requires_grad_(True)
    logits = hooked.run_with_hooks(x, {"blocks.0.resid_post": lambda a: leaf})
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), leaf)
    f = sae.encode(resid[:, 0].detach())
    est = f * (g[:, 0] @ sae.W_dec.T) / sae.input_scale / logits.detach().norm(dim=1, keepdim=True)
    for c in range(3):
        assert torch.allclose(out["importance"][c].float(), est[y == c].mean(0), atol=1e-5)


def test_zero_ablation_effect_matches_direct_computation():
    from impact_core.methods import sae_features as SF

    hooked, sae = _tiny_vit_and_sae()
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    keep = torch.ones(3, 16)
    keep[0, :8] = 0
    keep[2, 8:] = 0
    eff = SF.ablation_effect(hooked, sae, [(x, y)], 1, "cls", keep, 3)
    with torch.no_grad():
        clean = hooked.model(x)
    expected = []
    for i in range(6):
        def patch(a, i=i):
            f = sae.encode(a[:, 0])
            a = a.clone()
            a[:, 0] = a[:, 0] - (f * (1 - keep[y[i]])) @ sae.W_dec / sae.input_scale
            return a
        abl = hooked.run_with_hooks(x[i:i + 1], {"blocks.1.resid_post": patch})
        expected.append(((clean[i, y[i]] - abl[0, y[i]]) / clean[i].norm()).item())
    expected = torch.tensor(expected)
    for c in range(3):
        assert float(eff[c]) == pytest.approx(float(expected[y == c].mean()), abs=1e-4)
    assert abs(float(eff[0])) + abs(float(eff[2])) > 1e-3  # the ablation really changed something
    assert float(eff[1]) == pytest.approx(0.0, abs=1e-4)  # nothing ablated for class 1


def test_sweep_rows_mirror_the_papers_tables():
    rows = layer.sweep_rows("cls", 16, 8)
    assert [r["paper"] for r in rows] == [r[:3] for r in __import__("impact_core.paper_values").paper_values.PAPER_TABLE_5]
    assert [(r["k"], r["expansion"]) for r in rows[:6]] == [(16, 4), (16, 8), (16, 16), (4, 8), (8, 8), (32, 8)]
    assert {r["tokens"] for r in rows[6:]} == {"all", "patch"}
    assert [(r["k"], r["expansion"]) for r in layer.sweep_rows("cls", 16, 8, dense=False)] == [(16, 4), (16, 8), (32, 8)]


def test_activation_stream_keeps_grad_mode_and_token_shapes():
    hooked, _ = _tiny_vit_and_sae()
    gen = S.activation_chunks(hooked, [(torch.randn(2, 1, 8, 8), torch.zeros(2))], "blocks.1.resid_post", "patch", "cpu")
    chunk = next(gen)
    assert torch.is_grad_enabled()  # the generator's no_grad must not leak into the trainer
    assert chunk.shape == (2 * 4, 8) and not chunk.requires_grad


def test_training_is_deterministic_for_a_seed():
    rows = torch.randn(200, 6, generator=torch.Generator().manual_seed(3))

    def run():
        torch.manual_seed(0)
        sae = S.BatchTopKSAE(6, 24, k=2, seed=5)
        S.fit(sae, S.buffered_batches(rows, 32, seed=1), 15, lr=1e-2, aux_coefficient=1 / 32, aux_k=4,
              dead_after_steps=3, progress=False)
        return sae.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("family", ["sae", "neuron"])
def test_ablation_split_over_two_simulated_processes_equals_one(monkeypatch, family):
    """Both unit families go through the shared torchrun split of the ablation pass: simulated in one process,
    rank r takes rows r::2 of every batch and rank 1's all-reduce adds rank 0's partial sums."""
    from impact_core.methods import neuron
    from impact_core.methods import sae_features as SF
    from impact_core.methods import unit_attribution as UA
    from impact_core.methods.sites import compute_site_means

    hooked, sae = _tiny_vit_and_sae()
    x, y = torch.randn(11, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.arange(11) % 3
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    subset = torch.arange(11) % 3 != 0
    if family == "sae":
        keep = torch.ones(3, 16)
        keep[0, :8] = 0
        keep[2, 8:] = 0

        def effects():
            return SF.ablation_effects(hooked, sae, batches, 1, "cls", [(keep, subset), (keep, None)], 3, max_batch=64)
    else:
        means = compute_site_means(hooked, batches, hooked.site_names([1], ("mlp_act", "heads")))
        keep = torch.ones(3, hooked.mlp_dim + hooked.num_heads)
        keep[:, :5] = 0
        keep[1, hooked.mlp_dim] = 0

        def effects():
            return neuron.ablation_jobs(hooked, batches, means, [(1, keep, subset), (1, keep)], 3, max_batch=64)

    whole = effects()
    partial = []

    def record(t):
        partial.append(t.clone())
        return t

    def add_recorded(t):
        return t.add_(partial.pop(0))

    for rank, reduce in ((0, record), (1, add_recorded)):
        monkeypatch.setattr(UA, "local_rows", lambda t, rank=rank: t[rank::2])
        monkeypatch.setattr(UA, "all_reduce_sum", reduce)
        split = effects()
        if rank == 0:
            sums, count = partial
            mine = torch.tensor([0, 2, 4, 6, 8, 10])  # rank 0's rows of the batches of 6 and 5 images
            assert count.sum() == int(subset[mine].sum()) + len(mine)  # only its own rows were ablated
            assert not torch.allclose(split, whole, rtol=1e-3)  # its share alone is not the answer
    assert not partial
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_the_reading_sweep_trains_the_rows_the_chapter_compares_and_no_other(monkeypatch):
    """``sae.sweep: reading`` (the default build): e/2, 2k and the other token sets at dense, 2k at the main
    level, the probe everywhere; the chapter's reading runs on those rows alone; ``full`` is every row."""
    import pandas as pd

    from impact_core.config import ConfigError, load_config
    from impact_core.levels import with_dense

    cfg = load_config("default", {"sae.sweep": "reading"})
    full = load_config("default", {"sae.sweep": "full"})
    spec = lambda c, s: [(r["tokens"], r["k"], r["expansion"]) for r in layer.sweep_specs(c, s)]  # noqa: E731
    assert spec(cfg, 0.0) == [("cls", 16, 4), ("cls", 16, 8), ("cls", 32, 8), ("all", 16, 8), ("patch", 16, 8)]
    assert spec(cfg, 0.7) == [("cls", 16, 8), ("cls", 32, 8)]
    assert spec(cfg, 0.3) == [("cls", 16, 8)]  # the probe alone: the model's own SAE, nothing trained for the sweep
    for s in with_dense(cfg.sae.sparsities):
        assert set(spec(cfg, s)) < set(spec(full, s))
        assert spec(full, s) == [(r["tokens"], r["k"], r["expansion"]) for r in layer.sweep_rows("cls", 16, 8, dense=s == 0)]
    assert "5 SAEs" in layer.sweep_text(cfg) and "15 SAEs" in layer.sweep_text(full)
    with pytest.raises(ConfigError, match="sweep"):
        load_config("default", {"sae.sweep": "some"})

    rows = [{"sparsity": s, "tokens": t, "k": k, "expansion": e, "NMSE": 0.1 + 0.01 * i, "FVE": 0.9 - 0.01 * i}
            for i, (s, (t, k, e)) in enumerate((s, r) for s in with_dense(cfg.sae.sparsities) for r in spec(cfg, s))]
    entry = {"metrics": {"eval_images": 10, "eval_tokens": 10, "nmse": 0.1, "fve": 0.9, "dead": 0}, "n_latents": 128}
    monkeypatch.setattr(layer, "train_sae", lambda *a, **k: entry)
    values = layer.reading_values(cfg, pd.DataFrame(rows), {0.7: {"label_entropy": torch.ones(3)}}, 11)
    assert np.isfinite([values["k2_gain_dense"], values["k2_gain_main"], values["e2_gain_dense"],
                        values["fve_other_tokens"]]).all()
