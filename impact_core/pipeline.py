"""The artefacts every chapter needs, computed on first use and cached by config.

    dense_model(cfg)                      trained (small preset) or loaded (paper preset) model
    pruned_model(cfg, sparsity, method)   pruned + fine-tuned model (sparsity 0 -> dense)
    pruned_model(cfg, 0, CONTROL)         the negative control: the dense model fine-tuned exactly
                                          as a pruned model is, with nothing pruned
    accuracy(cfg, sparsity, method)       top-1 / top-5 on the eval split
    site_means(cfg, sparsity, method)     per-position dataset means of all named sites
    pruned_model(cfg, sparsity, MATCHED)  the matched-accuracy control: the dense training's checkpoint
                                          whose held-out top-1 is nearest Wanda's at ``sparsity``

Each cache key is a hash of exactly the config subset the artefact depends on
(plus the keys of the artefacts it is built from), so a chapter run with another
sparsity reuses the dense model and everything else it shares.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .methods import pruning
from .cache import CacheError, ResultCache, artefact
from .config import Config, check_sparsity, config_hash, resolve_device
from .data import Batches, check_data, load_splits
from .models import (architecture, build_model, check_checkpoint, evaluate, load_checkpoint, train_classifier,
                     train_dense)
from .methods.sparse_training import L0Projection
from .methods.sites import ALL_SITES, HookedViT, compute_site_means

log = logging.getLogger("impact_core")

DENSE_MODEL = artefact("dense_model", 1)
PRUNED_MODEL = artefact("pruned_model", 2)  # 2: fine-tuning steps stored; the control model
TRAINED_SPARSE_MODEL = artefact("trained_sparse_model", 1)
ACCURACY = artefact("accuracy", 2)  # 2: per-image ``correct``
SITE_MEANS = artefact("site_means", 1)
DENSE_CHECKPOINTS = artefact("dense_checkpoints", 1)  # written by the dense training beside its model
HOLDOUT_ACCURACY = artefact("holdout_accuracy", 1)    # top-1 on the held-out split (levels and checkpoints)
MATCHED_MODEL = artefact("matched_model", 1)

CONTROL = "control"
"""The negative-control model kind: the dense model taken through a pruned model's pipeline
(the same fine-tuning: images, learning rate, batch, seed, steps) with nothing pruned. Every
level function takes it as ``(sparsity=0.0, method=CONTROL)``; its effect against dense is
what the pipeline alone does, so a sparsity effect is judged against it (issue "negative
control")."""


CONTROL_ROW = "control (dense, fine-tuned, nothing pruned)"
"""The control's row name in the chapters' tables (its short label is :func:`model_label`'s "control")."""


TRAINED_SPARSE = "trained_sparse"
"""A model trained sparse from scratch (:mod:`impact_core.methods.sparse_training`): the dense
model's architecture, data, optimiser and budget with an annealed L0 constraint on every block
Linear, ``(sparsity > 0, method=TRAINED_SPARSE)``."""


RANDOM_WEIGHTS = "random_weights"
"""The metric-sensitivity control: the dense model's own initialisation (the weights its training starts
from, ``build_model`` after ``torch.manual_seed(seed)``; for a loaded architecture, the library's
initialisation at that seed), never trained, ``(sparsity=0.0, method=RANDOM_WEIGHTS)``. A metric that
cannot tell the trained dense model from it cannot see a change of interpretability (issue "Can each
metric see anything?")."""


MATCHED = "matched_accuracy"
"""The matched-accuracy control (Frankle and Bau 2019: interpretable units survive pruning until accuracy
falls): the dense model at the accuracy of the level, ``(sparsity > 0, method=MATCHED)``. Of the dense
training's ``train.checkpoints`` evenly spaced checkpoints, the one whose top-1 on the held-out split
(``data.holdout_images``, never the evaluation split) is nearest Wanda's at ``sparsity`` in the same
replicate (:func:`pick_matched`). A change that the level shows and this dense model shows as well
follows accuracy, not sparsity. The matched model is trained no further (no fine-tuning): our choice;
the control model separates what fine-tuning does."""


REINIT = "reinit_top"
"""The random-weights control's cascade: ``(0.0, reinit_method(j))`` is the dense model with its head, final
norm and top ``j`` blocks set back to its own initialisation (the weights :data:`RANDOM_WEIGHTS` has there),
the rest trained (Adebayo et al. 2018's cascading randomisation, from the logits down). ``config.cascade``
lists the j analysed."""


def reinit_method(blocks: int) -> str:
    """The model kind of the cascade step that re-initialises the top ``blocks`` blocks: ``"reinit_top3"``."""
    return f"{REINIT}{int(blocks)}"


def reinit_blocks(method: str) -> Optional[int]:
    """``j`` of a cascade model kind (:func:`reinit_method`), or None for any other kind."""
    tail = method[len(REINIT):] if method.startswith(REINIT) else ""
    return int(tail) if tail.isdigit() and int(tail) > 0 else None


def matched_control(cfg: Config) -> bool:
    """Whether the preset builds the matched-accuracy control (dense checkpoints on a held-out split)."""
    return bool(cfg.train.checkpoints) and architecture(cfg.model).trained_here


def check_model_kind(sparsity: float, method: str) -> float:
    """The one check of a model's identity: ``sparsity`` in [0, 1) and ``method`` a registered
    pruning method, or ``CONTROL`` at sparsity 0. Returns the sparsity as a float."""
    sparsity = check_sparsity(sparsity, "sparsity")
    if method in (CONTROL, RANDOM_WEIGHTS) or reinit_blocks(method):
        if sparsity != 0:
            raise ValueError(f"the {model_label(0.0, method)} model has nothing pruned: sparsity must be 0, "
                             f"got {sparsity}")
    elif method in (TRAINED_SPARSE, MATCHED):
        if sparsity == 0:
            raise ValueError(f"a {method} model needs a sparsity > 0 (sparsity 0 is the dense model)")
    elif method not in pruning.PRUNING_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; known: {list(pruning.PRUNING_METHODS)} (or {CONTROL!r})")
    elif pruning.PRUNING_METHODS[method].sparsity not in (None, sparsity) and sparsity != 0:
        raise ValueError(f"{method} has one sparsity, {pruning.PRUNING_METHODS[method].sparsity}; got {sparsity}")
    return sparsity


def is_dense(sparsity: float, method: str) -> bool:
    """Whether ``(sparsity, method)`` names the one dense model (any pruning method at sparsity 0; not the
    control, the random-weights model or a cascade step, which are models of their own)."""
    return float(sparsity) == 0 and method not in (CONTROL, RANDOM_WEIGHTS) and not reinit_blocks(method)


def setup_logging(level: int = logging.INFO) -> None:
    """Log what is cached and reused to stderr (visible in papermill's output)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[impact] %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


_PREFLIGHT_PASSED: set[str] = set()


def preflight(cfg: Config) -> None:
    """All checks that must pass before any compute: data, checkpoint, device (once per
    configuration and process: the entry points call it, the code below them trusts it)."""
    use_cpu_threads(cfg)
    key = config_hash(cfg.to_dict())
    if key in _PREFLIGHT_PASSED:
        return
    check_data(cfg)
    check_checkpoint(cfg.model)
    resolve_device(cfg)
    _PREFLIGHT_PASSED.add(key)


def use_cpu_threads(cfg: Config) -> None:
    """On the CPU, run every computation on ``cfg.cpu_threads`` torch threads (default 1).

    A matrix product splits its sums between threads, so the thread count changes the last bits of
    every number (the dense model trained on one thread differs from the one trained on two). A fixed
    count makes the numbers independent of how many chapters or work pieces share the machine (the
    runner runs ``--jobs`` of them side by side, one thread each) and of the machine's core count;
    :func:`cache_for` puts it in every CPU key."""
    if resolve_device(cfg).type == "cpu" and torch.get_num_threads() != cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)


def cache_for(cfg: Config) -> ResultCache:
    """The result cache; every key also records ``precision`` when it is not fp32, and on the CPU
    ``cpu_threads`` (:func:`use_cpu_threads`)."""
    salt = {"precision": cfg.precision} if cfg.precision != "fp32" else {}
    if resolve_device(cfg).type == "cpu":
        salt["cpu_threads"] = cfg.cpu_threads
    return ResultCache(cfg.cache_path, salt=salt or None)


_SPLITS: dict[str, dict] = {}


def splits(cfg: Config):
    """The data splits (loaded once per process for a given data config)."""
    key = config_hash({"data": cfg.data.to_dict(), "model_norm": [cfg.model.mean, cfg.model.std],
                       "img": cfg.model.img_size, "seed": cfg.seed})
    if key not in _SPLITS:
        _SPLITS[key] = load_splits(cfg)
    return _SPLITS[key]


REPLICATE_STRIDE = 7919  # a prime: replicate r's seeds sit 7919 r above replicate 0's, apart from every other offset


def run_seed(cfg: Config, offset: int = 0) -> int:
    """The seed of a stochastic stage of replicate ``cfg.replicate`` (fine-tuning, calibration draw,
    SAE initialisation, circuit masks, random baselines): ``cfg.seed + offset`` for replicate 0 (the
    seeds every earlier build used) and ``+ 7919 * replicate`` beyond it. The dense model and the
    evaluation images are the same in every replicate."""
    return cfg.seed + offset + REPLICATE_STRIDE * cfg.replicate


def replicate_inputs(cfg: Config) -> dict:
    """What a replicate adds to a cache key: nothing for replicate 0 (its entries are today's), else its index."""
    return {"replicate": cfg.replicate} if cfg.replicate else {}


def calibration_split(cfg: Config):
    """The calibration images pruning scores its weights on: ``data.calib_images`` drawn from the training
    images, at ``seed`` for replicate 0 (the ``calib`` split) and at :func:`run_seed` beyond it."""
    data = splits(cfg)
    if not cfg.replicate:
        return data["calib"]
    train = data["train"]
    idx = np.sort(np.random.default_rng(run_seed(cfg)).permutation(train.indices)[: cfg.data.calib_images])
    return dataclasses.replace(train, name="calib", indices=idx)


def dense_inputs(cfg: Config) -> dict:
    inputs = {"model": cfg.model.to_dict(), "seed": cfg.seed}
    if architecture(cfg.model).trained_here:
        train, data = cfg.train.to_dict(), {"kind": cfg.data.kind, "train_images": cfg.data.train_images}
        if not train["checkpoints"]:  # the keys of builds before the checkpoints existed stay valid
            train.pop("checkpoints")
        if cfg.data.holdout_images:
            data["holdout_images"] = cfg.data.holdout_images
        inputs.update(train=train, data=data)
    else:
        ckpt = Path(cfg.model.checkpoint)
        inputs["checkpoint"] = {"path": str(ckpt.resolve()), "size": ckpt.stat().st_size,
                                "mtime": int(ckpt.stat().st_mtime)}
    inputs["model"].pop("checkpoint", None)
    return inputs


def pruned_inputs(cfg: Config, sparsity: float, method: str) -> dict:
    p = cfg.pruning
    return {"dense": cache_for(cfg).key(DENSE_MODEL, dense_inputs(cfg)), "method": method,
            "sparsity": sparsity, "calib_images": cfg.data.calib_images, "calib_batch_size": cfg.data.batch_size,
            "seed": cfg.seed, **replicate_inputs(cfg), "finetune": {"images": p.finetune_images, "lr": p.finetune_lr, "batch_size": p.finetune_batch_size,
                         "weight_decay": cfg.train.weight_decay}}


def trained_sparse_inputs(cfg: Config, sparsity: float) -> dict:
    return {"dense": dense_inputs(cfg), "sparsity": sparsity,
            "anneal_fraction": cfg.sparse_training.anneal_fraction}


def model_inputs(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """What identifies a model in the inputs of the artefacts built on it: the cache key of the
    dense model at sparsity 0, else of the pruned one (or the control). Every artefact computes
    this first, so a bad sparsity or method fails here, before any compute."""
    sparsity = check_model_kind(sparsity, method)
    cache = cache_for(cfg)
    if method == RANDOM_WEIGHTS:
        return {"random_weights": random_weights_inputs(cfg)}
    if reinit_blocks(method):
        return {"reinit": {"dense": cache.key(DENSE_MODEL, dense_inputs(cfg)), "blocks": reinit_blocks(method),
                           "init": random_weights_inputs(cfg)}}
    if is_dense(sparsity, method):
        return {"dense": cache.key(DENSE_MODEL, dense_inputs(cfg))}
    if method == TRAINED_SPARSE:
        return {"trained_sparse": cache.key(TRAINED_SPARSE_MODEL, trained_sparse_inputs(cfg, sparsity))}
    if method == MATCHED:
        return {"matched": cache.key(MATCHED_MODEL, matched_inputs(cfg, sparsity))}
    return {"pruned": cache.key(PRUNED_MODEL, pruned_inputs(cfg, sparsity, method))}


def site_means_inputs(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    return {"model": model_inputs(cfg, sparsity, method), "calib_images": cfg.data.calib_images,
            "data_kind": cfg.data.kind, "batch_size": cfg.data.batch_size, "sites": list(ALL_SITES)}


def site_means_key(cfg: Config, sparsity: float, method: str = "wanda") -> str:
    """The key of :func:`site_means`' entry (in the inputs of the artefacts that mean-ablate with them)."""
    return cache_for(cfg).key(SITE_MEANS, site_means_inputs(cfg, sparsity, method))


def _state_to_model(cfg: Config, state: dict, device) -> torch.nn.Module:
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return model.to(device).eval()


def random_weights_inputs(cfg: Config) -> dict:
    """What identifies the random-weights model: the architecture and the seed (nothing is trained)."""
    model = cfg.model.to_dict()
    model.pop("checkpoint", None)
    return {"model": model, "seed": cfg.seed}


def random_weights_model(cfg: Config) -> torch.nn.Module:
    """:data:`RANDOM_WEIGHTS`: the initialisation :func:`~impact_core.models.train_dense` starts from (built, not
    cached: it costs one initialisation)."""
    preflight(cfg)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model).to(resolve_device(cfg)).eval()


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """``count`` evenly spaced steps of a ``steps``-step training, the last at its end:
    ``round(steps * i / count)`` for i = 1..count (distinct, so fewer when count > steps)."""
    return sorted({max(1, round(steps * i / count)) for i in range(1, count + 1)})


def reinit_model(cfg: Config, blocks: int) -> torch.nn.Module:
    """The cascade step :func:`reinit_method` ``(blocks)``: the dense model with ``head``, ``norm`` (and
    ``fc_norm``) and its top ``blocks`` blocks copied from :func:`random_weights_model` (built, not cached)."""
    model, init = dense_model(cfg), random_weights_model(cfg).state_dict()
    depth = len(model.blocks)
    top = tuple(f"blocks.{b}." for b in range(depth - blocks, depth)) + ("head.", "norm.", "fc_norm.")
    state = model.state_dict()
    state.update({k: v for k, v in init.items() if k.startswith(top)})
    model.load_state_dict(state)
    return model.eval()


def dense_model(cfg: Config) -> torch.nn.Module:
    """The dense model: trained by the project (small preset) or loaded from ``model.checkpoint``.
    With ``train.checkpoints``, the training also stores its checkpoints (:data:`DENSE_CHECKPOINTS`)."""
    preflight(cfg)
    device = resolve_device(cfg)
    if not architecture(cfg.model).trained_here:
        return load_checkpoint(build_model(cfg.model), cfg.model.checkpoint).to(device).eval()

    def compute():
        saved: list[tuple[int, dict]] = []

        def start(steps):  # copies the weights at the checkpoint steps; changes nothing of the training
            at, done = set(checkpoint_steps(steps, cfg.train.checkpoints)), [0]

            def hook(model):
                done[0] += 1
                if done[0] in at:
                    saved.append((done[0], {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
            return hook

        model, losses = train_dense(cfg, splits(cfg), device=device,
                                    after_step=start if cfg.train.checkpoints else None)
        if saved:
            cache_for(cfg).save(DENSE_CHECKPOINTS, dense_checkpoints_key(cfg),
                                {"steps": [st for st, _ in saved], "states": [sd for _, sd in saved]},
                                dense_inputs(cfg))
            log.info("stored %d dense checkpoints (steps %s)", len(saved), [st for st, _ in saved])
        return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "losses": losses}

    entry = cache_for(cfg).get_or_compute(DENSE_MODEL, dense_inputs(cfg), compute)
    return _state_to_model(cfg, entry["state"], device)


def dense_training_losses(cfg: Config) -> list[float]:
    """Loss per step of the dense training run; empty when the model was loaded, not trained here."""
    if not architecture(cfg.model).trained_here:
        return []
    cache = cache_for(cfg)
    try:
        return cache.load(DENSE_MODEL, cache.key(DENSE_MODEL, dense_inputs(cfg)))["losses"]
    except (KeyError, CacheError):
        return []


def pruned_model(cfg: Config, sparsity: float, method: str = "wanda") -> torch.nn.Module:
    """Prune the dense model at ``sparsity`` with ``method``, fine-tune with the mask kept.

    ``method=CONTROL`` (sparsity 0): the same fine-tuning with nothing pruned (no mask)."""
    sparsity = check_model_kind(sparsity, method)
    if method == RANDOM_WEIGHTS:
        return random_weights_model(cfg)
    if reinit_blocks(method):
        return reinit_model(cfg, reinit_blocks(method))
    if is_dense(sparsity, method):
        return dense_model(cfg)
    if method == TRAINED_SPARSE:
        return trained_sparse_model(cfg, sparsity)
    if method == MATCHED:
        return matched_model(cfg, sparsity)
    device = resolve_device(cfg)

    def compute():
        model = dense_model(cfg)
        data = splits(cfg)
        masks = None
        if method != CONTROL:
            norms = None
            if pruning.pruning_method(method).needs_input_norms:
                norms = pruning.input_norms(model, Batches(calibration_split(cfg), cfg.data.batch_size), device=device,
                                            precision=cfg.precision)
            masks = pruning.prune_model(model, method, sparsity, norms)
        p = cfg.pruning
        losses = []
        if p.finetune_images > 0:
            losses = train_classifier(model, data["train"], images=p.finetune_images,
                                      batch_size=p.finetune_batch_size, lr=p.finetune_lr,
                                      weight_decay=cfg.train.weight_decay, seed=run_seed(cfg, 1), device=device,
                                      after_step=None if masks is None else (lambda m: pruning.apply_masks(m, masks)),
                                      desc=f"fine-tune {method} {sparsity:g}")
        return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "finetune_steps": len(losses)}

    entry = cache_for(cfg).get_or_compute(PRUNED_MODEL, pruned_inputs(cfg, sparsity, method), compute)
    return _state_to_model(cfg, entry["state"], device)


def dense_checkpoints_key(cfg: Config) -> str:
    """The key of the dense training's checkpoints (:data:`DENSE_CHECKPOINTS`: the dense model's inputs)."""
    return cache_for(cfg).key(DENSE_CHECKPOINTS, dense_inputs(cfg))


def dense_checkpoints(cfg: Config) -> dict:
    """``{"steps": [...], "states": [...]}``: the dense training's checkpoints (trains the dense model if needed)."""
    if not matched_control(cfg):
        raise ValueError("no dense checkpoints: the preset sets no train.checkpoints (or loads its model)")
    dense_model(cfg)
    cache = cache_for(cfg)
    key = dense_checkpoints_key(cfg)
    try:
        return cache.load(DENSE_CHECKPOINTS, key)
    except (KeyError, CacheError, FileNotFoundError) as err:
        raise CacheError(f"the dense model is cached without its checkpoints ({DENSE_CHECKPOINTS}/{key}): remove "
                         f"its entry ({DENSE_MODEL}/{cache.key(DENSE_MODEL, dense_inputs(cfg))}) to train it again, "
                         f"with checkpoints") from err


def holdout_top1(cfg: Config, build, inputs: dict, desc: str) -> float:
    """Top-1 on the held-out split of the model ``build()`` makes (built only when not cached under ``inputs``,
    which name the model)."""
    inputs = {**inputs, "holdout_images": cfg.data.holdout_images, "data_kind": cfg.data.kind,
              "batch_size": cfg.data.batch_size}
    return cache_for(cfg).get_or_compute(HOLDOUT_ACCURACY, inputs, lambda: evaluate(
        build(), splits(cfg)["holdout"], cfg.data.batch_size, resolve_device(cfg), desc=desc,
        precision=cfg.precision)["top1"])


CHECKPOINTS = "dense_checkpoints"
"""What the plan's piece :func:`checkpoint_accuracies` is ``of``: ``(0.0, CHECKPOINTS)``, one for all replicates.
Every piece of the matched-accuracy control waits for it (:func:`impact_core.schedule.plan`)."""


def checkpoint_accuracies(cfg: Config) -> list[float]:
    """The held-out top-1 of every dense checkpoint (:func:`dense_checkpoints`, in step order), each a cached
    :data:`HOLDOUT_ACCURACY` entry. The matched-accuracy control of every replicate picks from them; the plan
    computes them once, right after the dense model, so no replicate's control waits on another's."""
    device = resolve_device(cfg)
    ckpts, key = dense_checkpoints(cfg), dense_checkpoints_key(cfg)
    return [holdout_top1(cfg, lambda sd=sd: _state_to_model(cfg, sd, device), {"checkpoint": key, "step": st},
                         desc=f"held-out top-1, checkpoint {st}")
            for st, sd in zip(ckpts["steps"], ckpts["states"])]


def pick_matched(checkpoint_top1, target: float) -> int:
    """The checkpoint whose held-out top-1 is nearest ``target`` (a tie goes to the later checkpoint)."""
    gaps = [abs(float(a) - float(target)) for a in checkpoint_top1]
    return max(range(len(gaps)), key=lambda i: (-gaps[i], i))


def matched_inputs(cfg: Config, sparsity: float) -> dict:
    return {"checkpoints": dense_checkpoints_key(cfg),
            "level": model_inputs(cfg, sparsity, "wanda"), "holdout_images": cfg.data.holdout_images,
            "batch_size": cfg.data.batch_size}


def _matched_entry(cfg: Config, sparsity: float) -> dict:
    """The cached entry of :func:`matched_model`: ``state`` and the choice (see :func:`matched_choice`)."""
    if not matched_control(cfg):
        raise ValueError("the matched-accuracy control needs train.checkpoints > 0 and data.holdout_images > 0 "
                         "on a model trained here")

    def compute():
        ckpts = dense_checkpoints(cfg)
        top1 = checkpoint_accuracies(cfg)
        level = holdout_top1(cfg, lambda: pruned_model(cfg, sparsity, "wanda"), {"model": model_inputs(cfg, sparsity)},
                             desc=f"held-out top-1, {model_label(sparsity)}")
        i = pick_matched(top1, level)
        log.info("matched-accuracy control for %s: checkpoint at step %d (held-out top-1 %.4f; the level %.4f)",
                 model_label(sparsity), ckpts["steps"][i], top1[i], level)
        return {"state": ckpts["states"][i], "step": ckpts["steps"][i], "steps": ckpts["steps"],
                "checkpoint_top1": top1, "level_top1": level}

    return cache_for(cfg).get_or_compute(MATCHED_MODEL, matched_inputs(cfg, sparsity), compute)


def matched_model(cfg: Config, sparsity: float) -> torch.nn.Module:
    """:data:`MATCHED` at ``sparsity``: the dense checkpoint nearest in held-out top-1 to Wanda at ``sparsity``
    (this replicate's). The entry keeps every checkpoint's held-out top-1, the level's, and the choice."""
    return _state_to_model(cfg, _matched_entry(cfg, sparsity)["state"], resolve_device(cfg))


def matched_choice(cfg: Config, sparsity: float) -> dict:
    """The matched-accuracy control's entry without its weights: ``step``, ``steps``, ``checkpoint_top1``,
    ``level_top1`` (held-out top-1)."""
    return {k: v for k, v in _matched_entry(cfg, sparsity).items() if k != "state"}


def trained_sparse_model(cfg: Config, sparsity: float) -> torch.nn.Module:
    """The dense model's training run (same seed, initialisation, data, optimiser and budget) with
    the L0 projection of :class:`~impact_core.methods.sparse_training.L0Projection` after every
    step, annealed to ``sparsity`` over ``sparse_training.anneal_fraction`` of the steps."""
    if not architecture(cfg.model).trained_here:
        raise ValueError(f"model.arch={cfg.model.arch} is loaded, not trained here: it cannot be trained sparse")
    device = resolve_device(cfg)

    def compute():
        projection = None

        def start(steps):
            nonlocal projection
            projection = L0Projection(steps, sparsity, cfg.sparse_training.anneal_fraction)
            return projection

        model, losses = train_dense(cfg, splits(cfg), device=device, after_step=start,
                                    desc=f"train sparse {sparsity:g}")
        return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "losses": losses,
                "sparsity_schedule": projection.history}

    entry = cache_for(cfg).get_or_compute(TRAINED_SPARSE_MODEL, trained_sparse_inputs(cfg, sparsity), compute)
    return _state_to_model(cfg, entry["state"], device)


def accuracy_inputs(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    return {"model": model_inputs(cfg, sparsity, method), "eval_images": cfg.data.eval_images,
            "data_kind": cfg.data.kind, "batch_size": cfg.data.batch_size}


def accuracy(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """Top-1 / top-5 on the eval split (cached)."""
    inputs = accuracy_inputs(cfg, sparsity, method)

    def compute():
        model = pruned_model(cfg, sparsity, method)
        return evaluate(model, splits(cfg)["eval"], cfg.data.batch_size, resolve_device(cfg),
                        desc=f"evaluate {method} {sparsity:g}", precision=cfg.precision)

    return cache_for(cfg).get_or_compute(ACCURACY, inputs, compute)


def hooked_model(cfg: Config, sparsity: float, method: str = "wanda") -> HookedViT:
    return HookedViT(pruned_model(cfg, sparsity, method))


def site_means(cfg: Config, sparsity: float, method: str = "wanda") -> dict[str, torch.Tensor]:
    """Per-position means of every site of every block over ``data.calib_images`` training images.

    Eq. 11 replaces inactive nodes by "their mean activation over the training
    distribution": we take it over the calibration images (a seeded sample of train).
    """
    inputs = site_means_inputs(cfg, sparsity, method)

    def compute():
        hooked = hooked_model(cfg, sparsity, method)
        names = hooked.site_names(sites=ALL_SITES)
        return compute_site_means(hooked, Batches(splits(cfg)["calib"], cfg.data.batch_size), names,
                                  device=resolve_device(cfg), desc=f"site means {sparsity:g}",
                                  precision=cfg.precision)

    return cache_for(cfg).get_or_compute(SITE_MEANS, inputs, compute)


def finetune_steps(cfg: Config, sparsity: float, method: str = "wanda") -> int:
    """Optimiser steps of a pruned (or control) model's fine-tuning, read from its cache entry."""
    pruned_model(cfg, sparsity, method)
    cache = cache_for(cfg)
    return int(cache.load(PRUNED_MODEL, cache.key(PRUNED_MODEL, pruned_inputs(cfg, sparsity, method)))["finetune_steps"])


def model_label(sparsity: float, method: str = "wanda") -> str:
    if method == CONTROL:
        return "control"
    if method == RANDOM_WEIGHTS:
        return "random weights"
    if reinit_blocks(method):
        return f"top {reinit_blocks(method)} blocks re-initialised"
    if method == TRAINED_SPARSE:
        return f"trained sparse {sparsity:.0%}"
    if method == MATCHED:
        return f"dense at {sparsity:.0%}'s accuracy"
    if method != "wanda" and sparsity > 0:
        return f"{method} {sparsity:.0%}"
    return "dense" if sparsity == 0 else f"{sparsity:.0%}"

