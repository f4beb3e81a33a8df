"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (or alone for the reference)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from impact_core import distributed
from impact_core.methods import pruning  # noqa: E402
from impact_core.data import Batches, load_splits  # noqa: E402
from impact_core.models import build_model, evaluate, train_classifier  # noqa: E402
from impact_core.methods.sites import HookedViT, compute_site_means  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

data_root, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
distributed.init_from_env("cpu")
cfg = tiny_config(data_root)
splits = load_splits(cfg)
torch.manual_seed(0)
model = build_model(cfg.model).eval()
norms = pruning.input_norms(model, Batches(splits["calib"], 8))
names = ["blocks.0.norm1", "blocks.5.q", "blocks.11.mlp_act"]
means = compute_site_means(HookedViT(model), Batches(splits["train"], 12), names)
acc = evaluate(model, splits["eval"], batch_size=8)
train_classifier(model, splits["train"], images=48, batch_size=16, lr=1e-3, weight_decay=0.05)

# per-image passes: neuron attribution patching + ablation, SAE activations, attribution scores
from impact_core.levels.model import attribution_results  # noqa: E402
from impact_core.methods import neuron  # noqa: E402
from impact_core.methods.sae import activation_chunks  # noqa: E402

hooked = HookedViT(model.eval())
unit_means = compute_site_means(hooked, Batches(splits["train"], 12), hooked.site_names(sites=["mlp_act", "heads"]))
passed = neuron.attribution_pass(hooked, Batches(splits["eval"], 7), unit_means, [0, 11], 10, validation_images=5)
keep = torch.ones(sum(neuron.block_unit_counts(hooked)))
keep[:5] = 0
ablation = neuron.ablation_jobs(hooked, Batches(splits["eval"], 7), unit_means, [(11, keep)], 10)
acts = torch.cat(list(activation_chunks(hooked, Batches(splits["eval"], 7), "blocks.6.resid_post", "all", "cpu")))

acfg = tiny_config(data_root, attribution={"images": 12, "steps": 4, "batch_size": 2, "figure_classes": 2,
                                           "figure_per_class": 1})
acfg.cache_dir = sys.argv[3]  # shared by both runs: the same dense model, attribution recomputed
attribution = attribution_results(acfg, 0.0)

# SAE latents through the same unit-attribution core: attribution and ablation passes split by rows
from impact_core.methods import sae_features  # noqa: E402
from impact_core.methods.sae import BatchTopKSAE  # noqa: E402

sae = BatchTopKSAE(16, 32, k=4, seed=3)
sae.init_from_batch(acts, True)
sae.threshold.fill_(0.0)  # inference mode: every positive pre-activation fires
features = sae_features.analyse(hooked, sae, Batches(splits["eval"], 7), 6, "all", 2, 10, seed=1)

if distributed.is_main():
    stats = passed["stats"][11]
    torch.save({"norms": norms, "means": means, "acc": acc,
                "weights": {k: v.clone() for k, v in model.state_dict().items()},
                "neuron": {"importance": passed["importance"][11], "importance_val": passed["importance_val"][0],
                           "own_logit": passed["own_logit"], "labels": passed["labels"],
                           "class_variance": stats.class_variance(), "cls": stats.cls_scores(),
                           "ablation": ablation,
                           **{f"sae_{k}": features[k] for k in ("importance", "importance_same", "impact",
                                                                 "impact_same", "selectivity", "label_entropy")}},
                "sae_acts": acts,
                "attribution": {"targets": attribution["targets"],
                                **{f"{m}_{k}": attribution["methods"][m][k]
                                   for m in ("chefer", "rollout") for k in ("insertion", "deletion", "figure_maps")},
                                "randomisation": attribution["randomisation"]["chefer"]}}, out)
