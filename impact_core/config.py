"""Validated configuration: small dataclasses that reject unknown fields.

A preset (``params/<name>.yaml``) is read into :class:`Config`. Every section is
a dataclass; an unknown or misspelt key, or an out-of-range value, raises
:class:`ConfigError` naming the dotted key, before any compute.

Overrides use dotted keys: ``load_config("smoke", {"pruning.sparsities": [0.7]})``.
String paths may contain ``${VAR}`` (expanded from the environment).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO_ROOT / "params"


class ConfigError(ValueError):
    """A configuration key is unknown, or its value is invalid."""


def check_sparsity(value: float, key: str) -> float:
    """A sparsity is the fraction of weights set to zero: it must lie in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: sparsity must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{key}: sparsity must lie in [0, 1), got {value!r}")
    return float(value)


def as_sparsity_list(value: Any, key: str) -> list[float]:
    """Accept one sparsity or a list of them (papermill passes either)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(f"{key}: give at least one sparsity level")
    return [check_sparsity(v, key) for v in values]


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: must be a number {bound}, got {value!r}")


def _count(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: must be an integer >= 0, got {value!r}")


class Section:
    """Base of every config section: strict construction from a dict."""

    def validate(self, prefix: str) -> None:  # overridden where ranges matter
        pass

    @classmethod
    def from_dict(cls, data: Optional[dict], prefix: str = ""):
        data = dict(data or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                where = f"{prefix}{key}"
                msg = f"unknown config key '{where}'"
                if hint:
                    msg += f" (did you mean '{prefix}{hint[0]}'?)"
                raise ConfigError(msg)
        kwargs = {}
        for name, f in names.items():
            if name not in data:
                continue
            value = data[name]
            sub = _section_type(f)
            if sub is not None:
                value = sub.from_dict(value, prefix=f"{prefix}{name}.")
            kwargs[name] = value
        obj = cls(**kwargs)
        obj.validate(prefix)
        return obj

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_type(f: dataclasses.Field):
    t = f.type if not isinstance(f.type, str) else globals().get(f.type)
    if isinstance(t, type) and issubclass(t, Section):
        return t
    return None


@dataclass
class DataConfig(Section):
    """Where the images come from and how many of each split are used."""

    kind: str = "fashion_mnist"  # "fashion_mnist" (IDX files) or "imagefolder" (ImageNet layout)
    root: str = "/usr/share/datasets/fashion-mnist"
    train_images: Optional[int] = None  # cap on the training split (None: all)
    calib_images: int = 1024  # Wanda calibration images (paper: 4096), drawn from train at `seed`
    eval_images: Optional[int] = None  # cap on the evaluation split (None: all)
    # Training images held out of every training, calibration and analysis (a seeded draw at `seed + 2`):
    # the split the matched-accuracy control picks its dense checkpoint on, never the evaluation split.
    # 0: no held-out split (and no matched-accuracy control)
    holdout_images: int = 0
    batch_size: int = 256  # inference batch size
    num_workers: int = 0

    def validate(self, prefix: str) -> None:
        if self.kind not in ("fashion_mnist", "imagefolder"):
            raise ConfigError(f"{prefix}kind: must be 'fashion_mnist' or 'imagefolder', got {self.kind!r}")
        self.root = os.path.expandvars(str(self.root))
        for key in ("calib_images", "batch_size"):
            _positive(getattr(self, key), prefix + key)
        for key in ("train_images", "eval_images"):
            if getattr(self, key) is not None:
                _positive(getattr(self, key), prefix + key)
        _positive(self.num_workers, prefix + "num_workers", allow_zero=True)
        _count(self.holdout_images, prefix + "holdout_images")


@dataclass
class ModelConfig(Section):
    """The backbone: an architecture of ``impact_core.models.ARCHITECTURES``."""

    arch: str = "small_deit3"  # the project's own ViT, trained here; "deit3_base_patch16_224" is loaded from `checkpoint`
    checkpoint: Optional[str] = None  # local weights file (required for the timm DeiT-III)
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = 7
    embed_dim: int = 96
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    init_values: float = 0.1  # LayerScale initial value
    mean: list = field(default_factory=lambda: [0.2860])  # input normalisation
    std: list = field(default_factory=lambda: [0.3530])

    def validate(self, prefix: str) -> None:
        from .models import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{prefix}arch: unknown architecture {self.arch!r}; registered: {list(ARCHITECTURES)}")
        if self.checkpoint is not None:
            self.checkpoint = os.path.expandvars(str(self.checkpoint))
        for key in ("img_size", "in_chans", "num_classes", "patch_size", "embed_dim", "depth", "num_heads"):
            _positive(getattr(self, key), prefix + key)
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{prefix}embed_dim: {self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(f"{prefix}mean/std: need one value per input channel ({self.in_chans})")


@dataclass
class TrainConfig(Section):
    """Training of the dense model (the small preset trains its own)."""

    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0
    # Dense checkpoints saved at evenly spaced steps of the training (the last at its end), from which the
    # matched-accuracy control is picked on the held-out split (data.holdout_images); 0: none, no control
    checkpoints: int = 0

    def validate(self, prefix: str) -> None:
        for key in ("epochs", "batch_size", "lr"):
            _positive(getattr(self, key), prefix + key)
        _positive(self.weight_decay, prefix + "weight_decay", allow_zero=True)
        _count(self.checkpoints, prefix + "checkpoints")


@dataclass
class PruningConfig(Section):
    """Sec. 3.1: Wanda / magnitude pruning of every Linear in the blocks, then fine-tuning."""

    methods: list = field(default_factory=lambda: ["wanda", "magnitude"])
    sparsities: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.8, 0.9])
    finetune_images: int = 12000  # images seen while fine-tuning each pruned model (paper: 2 epochs)
    finetune_lr: float = 2e-4
    finetune_batch_size: int = 128

    def validate(self, prefix: str) -> None:
        from .methods.pruning import PRUNING_METHODS

        for m in self.methods:
            if m not in PRUNING_METHODS:
                raise ConfigError(f"{prefix}methods: unknown pruning method {m!r} (registered: {list(PRUNING_METHODS)})")
        self.sparsities = as_sparsity_list(self.sparsities, prefix + "sparsities")
        for m in self.methods:
            fixed = PRUNING_METHODS[m].sparsity
            if fixed is not None and any(s != fixed for s in self.sparsities):
                raise ConfigError(f"{prefix}methods: {m} has one sparsity ({fixed}), but sparsities are {self.sparsities}")
        _positive(self.finetune_images, prefix + "finetune_images", allow_zero=True)
        _positive(self.finetune_lr, prefix + "finetune_lr")


@dataclass
class NeuronConfig(Section):
    """Sec. 3.2 / 4.2: top-K units per class by attribution patching, four metrics."""

    sparsities: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    blocks: list = field(default_factory=lambda: [2, 7, 11])
    top_k: int = 50  # units per class and block (paper: 50 of 3,072 neurons + 12 heads, 1.6%)
    images: Optional[int] = 2000  # evaluation images (None: all); half select the top-K, half measure them
    classes: Optional[int] = None  # analyse the first N classes (None: all)
    validation_units: int = 16  # units per block whose true single-unit ablation checks attribution patching (paper: none)
    validation_images: Optional[int] = 500  # images of that check (None: all of `images`)

    def validate(self, prefix: str) -> None:
        self.sparsities = as_sparsity_list(self.sparsities, prefix + "sparsities")
        _positive(self.top_k, prefix + "top_k")
        _positive(self.validation_units, prefix + "validation_units", allow_zero=True)
        for key in ("images", "classes", "validation_images"):
            if getattr(self, key) is not None:
                _positive(getattr(self, key), prefix + key)
        if not isinstance(self.blocks, (list, tuple)) or not self.blocks:
            raise ConfigError(f"{prefix}blocks: give a non-empty list of block indices")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.blocks):
            raise ConfigError(f"{prefix}blocks: block indices must be integers >= 0, got {self.blocks!r}")


@dataclass
class SAEConfig(Section):
    """Sec. 3.3 / 4.3: BatchTopK sparse autoencoders (paper: k=128, x32, CLS of block 11)."""

    sparsities: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    block: int = -1  # -1: the last block
    tokens: str = "cls"  # "cls", "patch" or "all"
    k: int = 16
    expansion: int = 8
    lr: float = 1e-3
    batch_size: int = 256
    steps: int = 2000
    aux_coefficient: float = 1.0 / 32
    aux_k: int = 64
    dead_after_steps: int = 50
    threshold_beta: float = 0.99  # EMA of the min kept activation (BatchTopK code: 0.999 over long runs)
    normalize_input: bool = True
    train_images: Optional[int] = None
    eval_images: Optional[int] = 2000
    top_k: int = 50  # latents per class for the four metrics (paper: top-50, as for neurons)
    buffer_max_mb: int = 1024  # training activations up to this size are buffered, larger ones streamed
    cache_activations_mb: int = 1024  # buffered activation sets up to this size are stored in the result cache
                                      # (computed once for every process of a build); 0: never stored
    pool_batches: int = 32  # streaming: the shuffling pool holds this many SAE batches
    seeds: int = 3  # SAE training seeds per model (Table 2 analogue: mean and min-max over them)
    sweep: str = "full"  # Tables 5 / 6: "full" (every row of the paper's sweep) or "reading" (the rows the
                         # chapter's reading compares; display only either way: no claim reads the sweep)

    def validate(self, prefix: str) -> None:
        self.sparsities = as_sparsity_list(self.sparsities, prefix + "sparsities")
        if self.sweep not in ("full", "reading"):
            raise ConfigError(f"{prefix}sweep: must be 'full' or 'reading', got {self.sweep!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"{prefix}seeds: must be an integer >= 1, got {self.seeds!r}")
        for key in ("top_k", "buffer_max_mb", "pool_batches", "aux_k", "dead_after_steps"):
            _positive(getattr(self, key), prefix + key)
        if isinstance(self.cache_activations_mb, bool) or not isinstance(self.cache_activations_mb, (int, float)) \
                or self.cache_activations_mb < 0:
            raise ConfigError(f"{prefix}cache_activations_mb: must be a number >= 0, got {self.cache_activations_mb!r}")
        if not 0.0 <= self.threshold_beta < 1.0:
            raise ConfigError(f"{prefix}threshold_beta: must lie in [0, 1), got {self.threshold_beta!r}")
        from .methods.sae import TOKEN_SETS

        if self.tokens not in TOKEN_SETS:
            raise ConfigError(f"{prefix}tokens: must be one of {list(TOKEN_SETS)}, got {self.tokens!r}")
        for key in ("k", "expansion", "lr", "batch_size", "steps"):
            _positive(getattr(self, key), prefix + key)
        for key in ("k", "expansion", "block"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int):
                raise ConfigError(f"{prefix}{key}: must be an integer, got {getattr(self, key)!r}")


@dataclass
class CircuitConfig(Section):
    """Sec. 3.4 / App. C: learnable node masks at 8 sites per block."""

    sparsities: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    classes: Optional[list] = None  # class indices (None: all classes of the data set)
    k_dense: float = 8e-5
    k_sparse: float = 4e-5
    k_sweep: list = field(default_factory=lambda: [4e-5, 5e-5, 6e-5, 7e-5, 8e-5])
    epochs: int = 15
    lr: float = 1e-2
    step_gamma: float = 0.2
    step_size: int = 5
    tau: float = 1.0
    init_mean: float = 0.5
    init_std: float = 0.01
    train_images_per_class: int = 200  # positives per class for mask training (same number of negatives)
    eval_images_per_class: int = 200
    batch_size: int = 8  # images per class per mask-training step (paper: not stated)
    weight_decay: float = 0.01  # AdamW decoupled weight decay on mask logits (paper: not stated; torch default)
    class_chunk: int = 10  # classes trained together in one batched forward (memory knob)
    random_draws: int = 5  # random node sets per class, same per-site counts as its circuit, mean-ablated

    def validate(self, prefix: str) -> None:
        self.sparsities = as_sparsity_list(self.sparsities, prefix + "sparsities")
        for key in ("k_dense", "k_sparse", "lr", "tau", "batch_size", "class_chunk", "step_size",
                    "train_images_per_class", "eval_images_per_class", "random_draws"):
            _positive(getattr(self, key), prefix + key)
        _positive(self.epochs, prefix + "epochs")
        for key in ("epochs", "step_size", "batch_size", "class_chunk", "train_images_per_class",
                    "eval_images_per_class", "random_draws"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int):
                raise ConfigError(f"{prefix}{key}: must be an integer, got {getattr(self, key)!r}")
        _positive(self.weight_decay, prefix + "weight_decay", allow_zero=True)
        for key in ("step_gamma", "init_std"):
            _positive(getattr(self, key), prefix + key)
        if not isinstance(self.k_sweep, (list, tuple)) or not self.k_sweep:
            raise ConfigError(f"{prefix}k_sweep: give a non-empty list of coefficients")
        for v in self.k_sweep:
            _positive(v, prefix + "k_sweep")
        if self.classes is not None:
            if not isinstance(self.classes, (list, tuple)) or not self.classes:
                raise ConfigError(f"{prefix}classes: give a non-empty list of class indices, or null")
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes):
                raise ConfigError(f"{prefix}classes: class indices must be integers >= 0, got {self.classes!r}")
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"{prefix}classes: repeated class index in {self.classes!r}")


@dataclass
class AttributionConfig(Section):
    """Sec. 3.5 / 4.5: Chefer transformer attribution, insertion / deletion."""

    sparsities: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    images: int = 500
    steps: int = 16
    # insertion / deletion substitutes, the first one primary (the Table 4 analogue): "black" (0 in [0,1]
    # pixel space, the paper's "zero-valued reference image"), "mean" (0 in normalised space) or "rise"
    # (RISE: insertion from a blurred copy, deletion to 0 in normalised space)
    references: list = field(default_factory=lambda: ["black", "rise"])
    batch_size: int = 32
    layerscale_rule: str = "z"  # "z": R_in = R_out (conserving); "inverse": the paper's Eq. 14 R_out/(gamma+eps)
    figure_classes: int = 4  # Fig. 4 analogue: this many classes ...
    figure_per_class: int = 2  # ... and this many images of each
    # display only: the methods no claim reads (rollout, generic), Chefer under the other LayerScale rule and
    # the randomisation test run on the first this-many images (whole chunks of 4 x batch_size); the claims'
    # methods (Chefer, random) on all ``images``. None: every image.
    display_images: Optional[int] = None

    def validate(self, prefix: str) -> None:
        from .methods.attribution import LAYERSCALE_RULES
        from .methods.perturbation import REFERENCES

        self.sparsities = as_sparsity_list(self.sparsities, prefix + "sparsities")
        if isinstance(self.references, str):
            self.references = [self.references]
        if not isinstance(self.references, list) or not self.references:
            raise ConfigError(f"{prefix}references: must be a non-empty list, got {self.references!r}")
        for r in self.references:
            if r not in REFERENCES:
                raise ConfigError(f"{prefix}references: unknown reference {r!r} (use one of {list(REFERENCES)})")
        if len(set(self.references)) != len(self.references):
            raise ConfigError(f"{prefix}references: repeated entries in {self.references!r}")
        if self.layerscale_rule not in LAYERSCALE_RULES:
            raise ConfigError(f"{prefix}layerscale_rule: must be one of {list(LAYERSCALE_RULES)}, got {self.layerscale_rule!r}")
        if self.display_images is not None:
            _positive(self.display_images, prefix + "display_images")
            if not isinstance(self.display_images, int):
                raise ConfigError(f"{prefix}display_images: must be an integer or null, got {self.display_images!r}")
        for key in ("images", "steps", "batch_size", "figure_classes", "figure_per_class"):
            _positive(getattr(self, key), prefix + key)
            if not isinstance(getattr(self, key), int):
                raise ConfigError(f"{prefix}{key}: must be an integer, got {getattr(self, key)!r}")


@dataclass
class SparseTrainingConfig(Section):
    """Beyond the paper: models trained sparse from scratch (Gao et al. 2025) and Wanda 2:4,
    analysed at the four levels beside Wanda at the same sparsity (impact_core.levels.sparse_training)."""

    sparsities: list = field(default_factory=lambda: [0.7, 0.9])  # trained-sparse and Wanda models compared at these
    anneal_fraction: float = 0.5  # the L0 constraint reaches its target after this fraction of training
    wanda_2_4: bool = True  # also Wanda 2:4 (50%, semi-structured), against Wanda unstructured at 50%

    def validate(self, prefix: str) -> None:
        self.sparsities = as_sparsity_list(self.sparsities, prefix + "sparsities")
        if not 0 < self.anneal_fraction <= 1:
            raise ConfigError(f"{prefix}anneal_fraction: must lie in (0, 1], got {self.anneal_fraction!r}")


@dataclass
class VerdictConfig(Section):
    """How claims are judged (impact_core.claims): the smallest effect of interest per metric,
    in the metric's own units (absolute differences), and the magnitude tolerance. The level of
    every interval and test is fixed (95%, :data:`impact_core.stats.LEVEL`): one alpha for the book."""

    margins: dict = field(default_factory=lambda: dict(DEFAULT_MARGINS))
    magnitude_tolerance: float = 0.25  # a stated magnitude matches when our interval lies within x/(1+t) .. x*(1+t)

    def validate(self, prefix: str) -> None:
        if not isinstance(self.margins, dict):
            raise ConfigError(f"{prefix}margins: give a mapping metric -> margin")
        unknown = sorted(set(self.margins) - set(DEFAULT_MARGINS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], DEFAULT_MARGINS, n=1)
            raise ConfigError(f"unknown config key '{prefix}margins.{unknown[0]}'"
                              + (f" (did you mean '{prefix}margins.{hint[0]}'?)" if hint else ""))
        self.margins = {**DEFAULT_MARGINS, **self.margins}
        for key, value in self.margins.items():
            _positive(value, f"{prefix}margins.{key}")
        _positive(self.magnitude_tolerance, prefix + "magnitude_tolerance")


# The smallest effect of interest per metric (absolute, in the metric's units): a change
# inside +-margin counts as "no change" (equivalence); printed beside every verdict. The values are
# those in use since the margins were introduced; MARGIN_RULES records the rule behind each (written
# down on 2026-12-04 without changing any value).
DEFAULT_MARGINS = {
    "top1": 0.005,
    "selectivity": 0.02,
    "label_entropy": 0.05,
    "class_variance": 0.05,
    "impact": 0.01,
    "node_fraction": 0.02,
    "edge_size": 0.01,
    "ncq": 0.02,
    "ablated_accuracy": 0.05,
    "circuit_accuracy": 0.02,
    "faithfulness": 0.05,
    "nmse": 0.002,
    "dead_fraction": 0.01,
    "insertion": 0.01,
    "deletion": 0.01,
}

# Why each margin is what it is (the discussion prints this table beside the preset's values).
MARGIN_RULES = {
    "top1": "half a point of top-1: the resolution of the paper's accuracy claims (96.1% retained; Wanda "
            "ahead by 6.34 points at 90%), a fraction, so the same on ImageNet",
    "selectivity": "0.02 AUROC: 4% of the range from chance (0.5) to a perfect detector (1.0); scale-free",
    "label_entropy": "2.2% of the largest entropy log C (0.05 of log 10 = 2.30 nats); on C = 1000 classes the "
                     "same share is 0.15 nats (params/paper.yaml)",
    "class_variance": "0.05 of the coefficient of variation, a ratio, so scale-free: a change of 5% of the "
                      "spread's own scale",
    "impact": "0.01 of Eq. 2's logit change over the logit vector's norm: a change of 1% of the norm, "
              "scale-free",
    "node_fraction": "2 points: about one standard deviation of the paper's node fraction across categories "
                     "(29.03 +- 1.97, Table 3)",
    "edge_size": "1 point of the dense edges: about 0.6 of the paper's spread across categories (32.42 +- 1.75) "
                 "and under a tenth of the change it reports (32.4 -> 12.9)",
    "ncq": "0.02: under half the paper's spread across categories (0.602 +- 0.046)",
    "ablated_accuracy": "5 points of one-vs-rest accuracy from chance (0.5): a tenth of the distance from chance "
                        "to a perfect circuit",
    "circuit_accuracy": "2 points: under a third of the paper's spread of circuit accuracy (89.12 +- 6.58)",
    "faithfulness": "0.05 of the logit-difference ratio (1 = the full model's): 5% of the full effect",
    "nmse": "0.002: a quarter of the dense NMSE the paper reports (0.0075), a twenty-fifth of its rise (to 0.0594); "
            "NMSE is scale-free",
    "dead_fraction": "1% of the latents: the paper calls its changes (85.93 -> 68.3 dead of 24,576) negligible as a "
                     "share of all features",
    "insertion": "0.01 of an AUC in [0, 1]: 1% of its range, scale-free",
    "deletion": "0.01 of an AUC in [0, 1]: 1% of its range, scale-free",
}


@dataclass
class Config(Section):
    """The whole configuration of one build of the book."""

    name: str = "custom"
    seed: int = 0
    seeds: Optional[list] = None  # several training seeds: the discussion judges claims across them
    # Independent replicates of the pipeline's stochastic stages for every pruned model and the control
    # (calibration draw, fine-tuning order and seed, SAE seeds, circuit masks' initialisation, random
    # baselines) on the same dense model: the replicate is the unit of the level-versus-control
    # comparison (impact_core.stats), with classes or images nested inside it.
    replicates: int = 1
    replicate: int = 0  # which replicate this config computes (set by levels.for_replicate; 0: today's seeds)
    # The random-weights control's cascade (Adebayo et al. 2018): for each j, the dense model with its head,
    # final norm and top j blocks re-initialised (pipeline.reinit_method), taken through every level's
    # analyses like the random-weights model; each claim then says from which j its metric sees the change.
    # [] (default): none; each j costs about one random-weights model (some 100 s of task time per replicate)
    cascade: list = field(default_factory=list)
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto"
    precision: str = "fp32"  # "fp32" or "bf16": autocast of the forward-only passes (impact_core.precision)
    cpu_threads: int = 1  # torch threads of every computation on the CPU: part of every cache key (see cpu_salt)
    cache_dir: str = ".cache/impact"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    sparse_training: SparseTrainingConfig = field(default_factory=SparseTrainingConfig)
    verdicts: VerdictConfig = field(default_factory=VerdictConfig)

    def validate(self, prefix: str) -> None:
        if not (self.device in ("cpu", "cuda", "auto") or str(self.device).startswith("cuda:")):
            raise ConfigError(f"{prefix}device: must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{prefix}precision: must be 'fp32' or 'bf16', got {self.precision!r}")
        if isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int) or self.cpu_threads < 1:
            raise ConfigError(f"{prefix}cpu_threads: must be an integer >= 1, got {self.cpu_threads!r}")
        self.cache_dir = os.path.expandvars(str(self.cache_dir))
        for key in ("replicates", "replicate"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "replicates" else 0):
                raise ConfigError(f"{prefix}{key}: must be an integer >= {1 if key == 'replicates' else 0}, got {v!r}")
        if self.replicate >= self.replicates:
            raise ConfigError(f"{prefix}replicate: {self.replicate} is not one of the {self.replicates} replicate(s)")
        if self.seeds is not None:
            if not isinstance(self.seeds, list) or not self.seeds or not all(isinstance(x, int) for x in self.seeds):
                raise ConfigError(f"{prefix}seeds: must be a non-empty list of integers, got {self.seeds!r}")
            self.seed = self.seeds[0]
        if not isinstance(self.cascade, list) or not all(
                isinstance(j, int) and not isinstance(j, bool) and 1 <= j < self.model.depth for j in self.cascade) \
                or len(set(self.cascade)) != len(self.cascade):
            raise ConfigError(f"{prefix}cascade: a list of distinct block counts in [1, {self.model.depth}) (model.depth "
                              f"= {self.model.depth}; all blocks re-initialised is the random-weights model), "
                              f"got {self.cascade!r}")
        if self.train.checkpoints and not self.data.holdout_images:
            raise ConfigError(f"{prefix}train.checkpoints: the matched-accuracy control picks its checkpoint on a "
                              f"held-out split; set data.holdout_images > 0 (or train.checkpoints: 0)")
        self._check_against_model(prefix)

    def _check_against_model(self, prefix: str) -> None:
        """The analysis settings that depend on the model: blocks exist, K and k fit, classes exist.
        Checked here, once; the code below config loading trusts a loaded config."""
        m, nc, sc = self.model, self.neuron, self.sae
        for b in nc.blocks:
            if b >= m.depth:
                raise ConfigError(f"{prefix}neuron.blocks: block {b} is not in [0, {m.depth}) for model.depth={m.depth}")
        units = int(m.embed_dim * m.mlp_ratio) + m.num_heads
        if isinstance(nc.top_k, bool) or not isinstance(nc.top_k, int) or nc.top_k > units:
            raise ConfigError(f"{prefix}neuron.top_k: must be an integer <= {units} (MLP neurons + heads per block), "
                              f"got {nc.top_k!r}")
        if not -m.depth <= sc.block < m.depth:
            raise ConfigError(f"{prefix}sae.block: {sc.block} is not a block of a {m.depth}-block model (-1: the last)")
        latents = m.embed_dim * sc.expansion
        if sc.k > latents:
            raise ConfigError(f"{prefix}sae.k: {sc.k} exceeds the number of latents ({latents} = "
                              f"{m.embed_dim} x {sc.expansion})")
        bad = [c for c in self.circuit.classes or [] if c >= m.num_classes]
        if bad:
            raise ConfigError(f"{prefix}circuit.classes: {bad} out of range for a model with {m.num_classes} classes")

    @property
    def cache_path(self) -> Path:
        path = Path(os.environ.get("IMPACT_CACHE", self.cache_dir))
        return path if path.is_absolute() else REPO_ROOT / path


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def preset_path(preset: str | os.PathLike) -> Path:
    """A preset name (``smoke``) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"preset file not found: {path}")
        return path
    path = PARAMS_DIR / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(known)}")
    return path


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_preset(preset: str | os.PathLike, _seen: tuple = ()) -> dict:
    """A preset's raw dict; ``extends: <preset>`` starts from another preset and overrides it."""
    path = preset_path(preset)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} is not a mapping")
    parent = data.pop("extends", None)
    if parent is not None:
        if str(parent) in _seen:
            raise ConfigError(f"preset {path}: circular 'extends: {parent}'")
        data = _deep_merge(read_preset(parent, _seen + (str(parent),)), data)
    return data


def load_config(preset: str | os.PathLike = "default", overrides: Optional[dict] = None) -> Config:
    """Read a preset and apply dotted-key overrides; validate everything."""
    data = read_preset(preset)
    if os.environ.get("IMPACT_DATA_ROOT"):  # `make ... DATA_DIR=...` points the loader elsewhere
        data.setdefault("data", {})["root"] = os.environ["IMPACT_DATA_ROOT"]
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return Config.from_dict(data)


def config_hash(obj: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able object (a config subset, an artefact's inputs)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def resolve_device(cfg: Config):
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} asked for, but no CUDA device is available")
    return torch.device(cfg.device)
