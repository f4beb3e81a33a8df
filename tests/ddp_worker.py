"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (or alone for the reference)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from impact_core import distributed, pruning  # noqa: E402
from impact_core.data import Batches, load_splits  # noqa: E402
from impact_core.models import build_model, evaluate, train_classifier  # noqa: E402
from impact_core.sites import HookedViT, compute_site_means  # noqa: E402
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
if distributed.is_main():
    torch.save({"norms": norms, "means": means, "acc": acc,
                "weights": {k: v.clone() for k, v in model.state_dict().items()}}, out)
