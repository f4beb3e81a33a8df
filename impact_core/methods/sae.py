"""BatchTopK sparse autoencoders on residual-stream activations (paper Sec. 3.3 / 4.3, App. B).

The SAE (Bussmann et al., "BatchTopK sparse autoencoders")::

    pre   = W_enc (s*x - b_dec) + b_enc                     (m latents, d inputs)
    f     = BatchTopK(ReLU(pre))   training: keep the k*B largest values of the whole batch
          = ReLU(pre) * [ReLU(pre) > theta]   inference: a fixed threshold theta
    x_hat = (W_dec^T f + b_dec) / s

Choices (stated here and in the chapter):

* Pre-activation. The paper's Eq. 8 writes ``W_enc x + b_enc``; we subtract the decoder
  bias first, as Bussmann et al. and Gao et al. do. Both describe the same function class
  (``b_enc' = b_enc - W_enc b_dec``); the centring only helps optimisation.
* Input normalisation (``sae.normalize_input``). ``x`` is multiplied by one scalar
  ``s = sqrt(d / E||x||^2)`` estimated on the first training batch, so that inputs have
  mean squared norm ``d`` whatever the model's scale. ``x_hat`` is mapped back by ``1/s``;
  NMSE and FVE are ratios and do not depend on ``s``.
* Decoder rows have unit norm: the gradient component parallel to each row is removed
  before every optimiser step and the rows are renormalised after it.
* Auxiliary loss (Gao et al.) revives dead latents: a latent is *dead in training* when it
  has not fired for ``sae.dead_after_steps`` steps. With ``e = x - x_hat`` (detached, in
  normalised space) the ``aux_k`` largest dead pre-activations of each sample reconstruct
  ``e``: ``L_aux = mean_b ||e - W_dec^T f_aux||^2``; total loss
  ``L = mean_b ||x - x_hat||^2 + aux_coefficient * L_aux``. ``L_aux = 0`` when no latent is dead.
* Inference threshold ``theta``: an exponential moving average (``sae.threshold_beta``) of
  the smallest positive activation kept by BatchTopK in each training step. The first step
  sets it to that step's minimum directly, so it is set after a single step, however short
  the training (the public trainer starts it only after 1000 steps and otherwise silently
  falls back to plain ReLU). Using an SAE in inference mode whose threshold was never set
  is an error.

Quality (Table 2), over the evaluation tokens:

* ``nmse = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean||^2``, the fraction of variance
  unexplained, the paper's NMSE: in every row of its Tables 2, 5 and 6 NMSE + explained
  variance = 1, as it is by this definition (not by OpenAI's per-sample ratio below);
* ``fve = 1 - nmse`` (fraction of variance explained, the paper's "explained variance");
* ``nmse_per_sample = mean_i ||x_i - x_hat_i||^2 / ||x_i||^2``, OpenAI's (Gao et al.) normalised
  MSE, kept for comparison: it divides by the raw norm, not the variance, so it is smaller;
* dead latents: never active (inference mode) on any evaluation token, as count and fraction.

Several SAEs per model (``sae.seeds``): SAE seed ``i`` initialises the SAE and orders its batches
with ``cfg.seed + 1009 * i`` (``i = 0`` is the single SAE of the sweeps); the training and
evaluation images and their activations are the same for every SAE seed.

Activations come from ``blocks.{b}.resid_post`` of the model via :class:`HookedViT`, token set
``cls`` (position 0), ``patch`` (positions 1..) or ``all``. They are streamed: image batches go
through the model and their tokens through a shuffling pool into SAE batches, so the paper's
activation set (1.28 M images x 197 tokens x 768 floats) is never held in memory. When the whole
training activation set is smaller than ``sae.buffer_max_mb`` it is computed once and reused
every epoch (the small presets), which gives the same batches' distribution at a fraction of
the compute.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..precision import autocast
from ..distributed import gather_rows, local_rows

log = logging.getLogger("impact_core")

TOKEN_SETS = ("cls", "patch", "all")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def batch_topk(acts: torch.Tensor, k: int, floor: Optional[float] = None) -> torch.Tensor:
    """Keep the ``k * B`` largest entries of the whole ``(B, m)`` batch, zero the rest.

    Entries that tie at the ``k * B``-th value and do not all fit are kept lowest position first
    (row-major), so the result is defined to the bit (``topk`` alone would keep an arbitrary few). Ties
    are real: a batch drawn from a few thousand activation rows can hold one row twice.

    ``floor`` (fast path; training passes 0.8 x the last step's smallest kept value): only the entries
    above it are ranked, about 1.3 ``k * B`` of ``B * m`` at the default shape, where ranking all of
    them took a third of the SAE step. When fewer than ``k * B`` entries lie above it, the whole batch
    is ranked (the plain path, ``floor=None``). Both give the same result to the bit (tested).
    """
    flat = acts.reshape(-1)
    n_keep = min(k * acts.shape[0], flat.numel())
    pool = None  # the positions ranked: None for all of them
    if floor is not None and floor > 0:
        cand = (flat > floor).nonzero().squeeze(1)
        if cand.numel() >= n_keep:
            pool = cand
    ranked = flat if pool is None else flat[pool]
    vals, j = ranked.topk(n_keep, sorted=False)
    kth = vals.min()
    if bool((ranked == kth).sum() > (vals == kth).sum()):  # a tie cut at the boundary
        above = (ranked > kth).nonzero().squeeze(1)
        j = torch.cat([above, (ranked == kth).nonzero().squeeze(1)[:n_keep - above.numel()]])
        vals = ranked[j]
    idx = j if pool is None else pool[j]
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)


class BatchTopKSAE(nn.Module):
    """A BatchTopK SAE with ``n_latents`` latents on ``d``-dimensional inputs (see module docstring).

    ``module.train()``: BatchTopK; ``module.eval()``: threshold. ``decode_impl`` picks how
    ``f -> x_hat`` is computed in training: ``"dense"`` (plain ``f @ W_dec``, the reference) or
    ``"sparse"`` (``embedding_bag`` over the ``k*B`` kept entries only; same result). The
    auxiliary loss follows the same switch (:func:`aux_loss`).
    """

    def __init__(self, d: int, n_latents: int, k: int, threshold_beta: float = 0.999, seed: int = 0,
                 decode_impl: str = "dense"):
        super().__init__()
        if k < 1 or k > n_latents:
            raise ValueError(f"k must lie in [1, n_latents={n_latents}], got {k}")
        if decode_impl not in ("dense", "sparse"):
            raise ValueError(f"decode_impl must be 'dense' or 'sparse', got {decode_impl!r}")
        self.d, self.n_latents, self.k = d, n_latents, k
        self.threshold_beta = threshold_beta
        self.decode_impl = decode_impl
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(n_latents, d, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())            # (m, d), unit rows
        self.W_enc = nn.Parameter(w.clone())            # (m, d), tied at init (Gao et al.)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("threshold", torch.tensor(-1.0))     # < 0: not set yet
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("steps_since_active", torch.zeros(n_latents, dtype=torch.long))
        self.kept_min: Optional[float] = None  # the last training step's smallest kept activation (not saved)

    # -- pieces ------------------------------------------------------------------------------
    @property
    def threshold_is_set(self) -> bool:
        return bool(self.threshold.item() >= 0)

    def pre_acts(self, xn: torch.Tensor) -> torch.Tensor:
        """``ReLU(W_enc (xn - b_dec) + b_enc)`` on normalised inputs."""
        return F.relu((xn - self.b_dec) @ self.W_enc.T + self.b_enc)

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """BatchTopK in training mode, the threshold in inference mode."""
        if self.training:
            return batch_topk(pre, self.k)
        if not self.threshold_is_set:
            raise RuntimeError("BatchTopKSAE: the inference threshold is not set; train the SAE first "
                               "(or call .train() to use BatchTopK)")
        return pre * (pre > self.threshold)

    def decode_normalised(self, f: torch.Tensor) -> torch.Tensor:
        if self.decode_impl == "sparse" and self.training:
            return sparse_decode(f, self.W_dec) + self.b_dec
        return f @ self.W_dec + self.b_dec

    # -- public --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``f`` of raw inputs ``x`` (..., d) -> (..., m)."""
        shape = x.shape
        f = self.select(self.pre_acts(x.reshape(-1, self.d) * self.input_scale))
        return f.view(*shape[:-1], self.n_latents)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the raw input space, ``(W_dec^T f + b_dec) / s``."""
        return (f @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    # -- training helpers -------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor, normalize_input: bool) -> None:
        """Set the input scale (if normalising) and ``b_dec`` to the batch mean."""
        if normalize_input:
            self.input_scale.fill_(math.sqrt(self.d / x.pow(2).sum(-1).mean().clamp_min(1e-12).item()))
        self.b_dec.copy_((x * self.input_scale).mean(0))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of each decoder row's gradient its component along the (unit) row."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def update_threshold(self, f: torch.Tensor) -> None:
        """EMA of the smallest kept positive activation; the first update sets it outright."""
        kept = f[f > 0]
        if kept.numel() == 0:
            return
        m = kept.min()
        self.kept_min = float(m)
        if not self.threshold_is_set:
            self.threshold.copy_(m)
        else:
            self.threshold.mul_(self.threshold_beta).add_((1 - self.threshold_beta) * m)


def choose_decode_impl(n_latents: int, k: int) -> str:
    """``"sparse"`` when the dictionary is much wider than ``k`` (``n_latents >= 64 k``), else ``"dense"``.

    From ``benchmarks/bench_sae.py`` on the shared 2-core CPU (noisy): the dense step is faster at
    the default preset's shape (512 latents, k=16; sparse/dense 0.6-0.9x), the sparse one mostly at
    the paper's (24,576 latents, k=128, batch 256: 1.1-1.4x in four of five runs, 0.7x in one).
    Not measured on a GPU yet.
    """
    return "sparse" if n_latents >= 64 * k else "dense"


def sparse_decode(f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``f @ W_dec`` through ``embedding_bag`` over the nonzero entries of ``f`` only.

    Costs ``nnz * d`` instead of ``B * m * d``; gradients reach both the kept values of ``f``
    (``per_sample_weights``) and ``W_dec``. Equal to the dense product (tested).
    """
    B, m = f.shape
    nz = f.detach().reshape(-1).nonzero().squeeze(1)   # row-major: rows come out grouped
    rows, cols = nz // m, nz % m
    counts = torch.bincount(rows, minlength=B)
    offsets = torch.cumsum(counts, 0) - counts
    weights = f.reshape(-1)[nz]
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=weights)


def aux_loss(sae: BatchTopKSAE, xn: torch.Tensor, xn_hat: torch.Tensor, pre: torch.Tensor,
             dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """``mean_b ||e - W_dec^T TopK_aux(pre[:, dead])||^2`` with ``e = xn - xn_hat`` detached; 0 if none dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    e = (xn - xn_hat).detach()
    if sae.decode_impl == "sparse":
        # fast path: top-k over all latents with the live ones pushed below any ReLU output,
        # then an embedding_bag over the chosen rows of W_dec (no (B, n_dead) or (n_dead, d) copies)
        vals, idx = pre.masked_fill(~dead, -1.0).topk(min(aux_k, n_dead), dim=1)
        e_hat = F.embedding_bag(idx, sae.W_dec, mode="sum", per_sample_weights=vals)
    else:  # reference: gather the dead latents, dense product
        dead_pre = pre[:, dead]
        vals, idx = dead_pre.topk(min(aux_k, n_dead), dim=1)
        f_aux = torch.zeros_like(dead_pre).scatter(1, idx, vals)
        e_hat = f_aux @ sae.W_dec[dead]
    return (e_hat - e).pow(2).sum(-1).mean()


TOPK_FLOOR = 0.8
"""Training ranks only the pre-activations above this fraction of the last step's smallest kept one
(:func:`batch_topk`'s ``floor``): on the default preset's activations 1.14-2.5 times the kept number
(median 1.3) lay above it over a 2,000-step run, never fewer than were kept."""


def train_step(sae: BatchTopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, *, aux_coefficient: float,
               aux_k: int, dead_after_steps: int, floor_factor: Optional[float] = TOPK_FLOOR) -> dict[str, float]:
    """One optimiser step on a raw batch ``x`` (B, d): MSE + aux, unit-norm decoder, threshold.
    ``floor_factor=None``: BatchTopK ranks the whole batch (the plain path; the same SAE, tested)."""
    sae.train()
    xn = x * sae.input_scale
    pre = sae.pre_acts(xn)
    floor = None if floor_factor is None or sae.kept_min is None else floor_factor * sae.kept_min
    f = batch_topk(pre, sae.k, floor)
    xn_hat = sae.decode_normalised(f)
    mse = (xn_hat - xn).pow(2).sum(-1).mean()
    with torch.no_grad():
        fired = (f > 0).any(0)
        sae.steps_since_active += 1
        sae.steps_since_active[fired] = 0
        dead = sae.steps_since_active >= dead_after_steps
    aux = aux_loss(sae, xn, xn_hat, pre, dead, aux_k)
    loss = mse + aux_coefficient * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalise_decoder()
    sae.update_threshold(f.detach())
    return {"loss": loss.item(), "mse": mse.item(), "aux": aux.item(), "dead": int(dead.sum())}


def fit(sae: BatchTopKSAE, batches: Iterator[torch.Tensor], steps: int, *, lr: float, aux_coefficient: float,
        aux_k: int, dead_after_steps: int, normalize_input: bool = True, desc: str = "SAE",
        progress: bool = True) -> dict[str, list]:
    """Train ``sae`` for ``steps`` steps on raw activation batches (an iterator of (B, d) tensors).

    Adam (betas 0.9, 0.999). The first batch sets the input scale and ``b_dec``.
    Returns the per-step history (loss, mse, aux, number dead in training).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    history: dict[str, list] = {"loss": [], "mse": [], "aux": [], "dead": []}
    bar = tqdm(total=steps, desc=desc, leave=False, disable=not progress)
    for step in range(steps):
        try:
            x = next(batches)
        except StopIteration:
            raise ValueError(f"{desc}: the activation stream ended after {step} of {steps} steps") from None
        if step == 0:
            sae.init_from_batch(x, normalize_input)
        out = train_step(sae, opt, x, aux_coefficient=aux_coefficient, aux_k=aux_k,
                         dead_after_steps=dead_after_steps)
        for key, v in out.items():
            history[key].append(v)
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(mse=f"{out['mse']:.4f}", dead=out["dead"])
    bar.close()
    sae.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------
class QualityAccumulator:
    """Streaming NMSE (the paper's, ``1 - FVE``), FVE, per-sample NMSE, dead latents and L0 over chunks of (x, x_hat, f).

    All sums in float64; ``total variance = sum ||x||^2 - n ||mean||^2``.
    """

    def __init__(self, n_latents: int):
        self.n = 0
        self.sum_ratio = 0.0
        self.sum_err = 0.0
        self.sum_sq = 0.0
        self.sum_x: Optional[torch.Tensor] = None
        self.sum_l0 = 0.0
        self.ever_active = torch.zeros(n_latents, dtype=torch.bool)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        err = (x - x_hat).pow(2).sum(-1)
        sq = x.pow(2).sum(-1)
        self.sum_ratio += float((err / sq.clamp_min(1e-30)).sum())
        self.sum_err += float(err.sum())
        self.sum_sq += float(sq.sum())
        s = x.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        active = f > 0
        self.sum_l0 += float(active.sum())
        self.ever_active |= active.any(0).cpu()
        self.n += x.shape[0]

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no evaluation activations")
        mean = self.sum_x / self.n
        total_var = self.sum_sq - self.n * float(mean.pow(2).sum())
        dead = int((~self.ever_active).sum())
        fvu = self.sum_err / total_var
        return {"nmse": fvu, "fve": 1.0 - fvu, "nmse_per_sample": self.sum_ratio / self.n,
                "dead": dead, "dead_fraction": dead / len(self.ever_active), "l0": self.sum_l0 / self.n,
                "eval_tokens": self.n, "n_latents": len(self.ever_active)}


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The paper's NMSE, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (= 1 - FVE; see module docstring)."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def nmse_per_sample(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """OpenAI's (Gao et al.) NMSE: mean over samples of ``||x - x_hat||^2 / ||x||^2``."""
    return float(((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())


def fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance explained, ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``."""
    return 1.0 - nmse(x, x_hat)


@torch.no_grad()
def evaluate(sae: BatchTopKSAE, chunks: Iterable[torch.Tensor], batch_size: int = 4096) -> dict:
    """Quality of ``sae`` in inference mode (threshold) over chunks of raw activations."""
    sae.eval()
    acc = QualityAccumulator(sae.n_latents)
    for chunk in chunks:
        for start in range(0, chunk.shape[0], batch_size):
            x = chunk[start:start + batch_size]
            x_hat, f = sae(x)
            acc.add(x, x_hat, f)
    return acc.result()


# ---------------------------------------------------------------------------------------------
# Activations from the model
# ---------------------------------------------------------------------------------------------
def check_tokens(tokens: str) -> str:
    if tokens not in TOKEN_SETS:
        raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
    return tokens


def token_positions(tokens: str, n_tokens: int) -> slice:
    """Positions of the token set in a ``(B, N, d)`` activation (CLS is position 0)."""
    return {"cls": slice(0, 1), "patch": slice(1, n_tokens), "all": slice(0, n_tokens)}[check_tokens(tokens)]


def select_tokens(act: torch.Tensor, tokens: str) -> torch.Tensor:
    """``(B, N, d)`` -> ``(B * n_tok, d)`` rows of the token set, image-major."""
    return act[:, token_positions(tokens, act.shape[1])].reshape(-1, act.shape[-1])


def activation_chunks(hooked, images: Iterable, name: str, tokens: str, device,
                      precision: str = "fp32") -> Iterator[torch.Tensor]:
    """One ``(n, d)`` chunk of ``name``'s token activations per image batch (model forward only).

    Under torchrun each process runs the forward on its rows of the batch and the chunk is
    put back together (:func:`impact_core.distributed.gather_rows`), so every process trains
    on the same activations as one process would."""
    hooked.eval()
    for batch in images:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():  # not around the yield: grad mode would leak into the consumer
            with autocast(device, precision):
                _, cache = hooked.run_with_cache(local_rows(x).to(device), [name])
            act = cache[name][:, token_positions(tokens, cache[name].shape[1])].float()
            act = gather_rows(act.contiguous(), x.shape[0])
        yield act.reshape(-1, act.shape[-1])


def shuffled_batches(epoch_chunks: Callable[[int], Iterable[torch.Tensor]], batch_size: int, pool_size: int,
                     seed: int) -> Iterator[torch.Tensor]:
    """Endless ``(batch_size, d)`` batches: epochs of chunks mixed through a shuffling pool.

    ``epoch_chunks(e)`` gives epoch ``e``'s chunks. Rows gather in a pool; once it holds
    ``pool_size`` rows it is permuted and all but half a pool leave as batches, so tokens of one
    image rarely share a batch. Deterministic for a seed.
    """
    if batch_size < 1 or pool_size < batch_size:
        raise ValueError("need 1 <= batch_size <= pool_size")
    gen = torch.Generator().manual_seed(seed)
    pool: list[torch.Tensor] = []
    held = 0
    epoch = 0
    while True:
        got_any = False
        for chunk in epoch_chunks(epoch):
            got_any = True
            pool.append(chunk)
            held += chunk.shape[0]
            if held >= pool_size:
                rows = torch.cat(pool)
                rows = rows[torch.randperm(rows.shape[0], generator=gen).to(rows.device)]
                n_out = (rows.shape[0] - pool_size // 2) // batch_size * batch_size
                for start in range(0, n_out, batch_size):
                    yield rows[start:start + batch_size]
                pool, held = [rows[n_out:]], rows.shape[0] - n_out
        if not got_any:
            raise ValueError("the activation source is empty")
        epoch += 1


def buffered_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches from an in-memory activation set, reshuffled every epoch (last partial dropped)."""
    if rows.shape[0] < batch_size:
        raise ValueError(f"only {rows.shape[0]} training activations for a batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(rows.shape[0], generator=gen).to(rows.device)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield rows[perm[start:start + batch_size]]


def tokens_per_image(tokens: str, n_tokens: int) -> int:
    return {"cls": 1, "patch": n_tokens - 1, "all": n_tokens}[check_tokens(tokens)]
