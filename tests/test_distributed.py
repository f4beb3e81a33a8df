"""Data-parallel passes under torchrun (gloo, 2 CPU processes) equal the single-process results:
sum-reduced passes (calibration norms, dataset means, accuracy), DDP fine-tuning, and the
per-image passes (neuron attribution patching and ablation, SAE activation streaming,
attribution scores over the evaluation images)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from impact_core.config import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "ddp_worker.py"


def run(args, env):
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_equal_one(tiny_fmnist, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cache = tmp_path / "cache"
    run([sys.executable, str(WORKER), str(tiny_fmnist), str(tmp_path / "single.pt"), str(cache)], env)
    shutil.rmtree(cache / "attribution_results")  # recomputed under torchrun from the same cached model
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tiny_fmnist), str(tmp_path / "ddp.pt"), str(cache)], env)
    assert (cache / "attribution_results").is_dir()
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    two = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert {k: v for k, v in one["acc"].items() if k != "correct"} == {k: v for k, v in two["acc"].items() if k != "correct"}
    assert torch.equal(one["acc"]["correct"], two["acc"]["correct"])  # per image, in the original order
    for name in one["norms"]:
        assert torch.allclose(one["norms"][name], two["norms"][name], rtol=1e-5), name
    for name in one["means"]:
        assert torch.allclose(one["means"][name], two["means"][name], atol=1e-5), name
    for name in one["weights"]:  # DDP's averaged gradient of the two halves = the full-batch gradient
        assert torch.allclose(one["weights"][name], two["weights"][name], atol=1e-4), name
    # per-image passes: each process computes its rows, the batch is put back together
    # float32 sums in another order: at the scale of the values (the SAE importances reach 8.5, and
    # differ by up to 2.9e-5 between one and two processes on 2026-12-04's AMD EPYC machine)
    for key, value in one["neuron"].items():
        scale = max(1.0, float(value.double().abs().nan_to_num().max()))
        assert torch.allclose(value.double(), two["neuron"][key].double(), atol=1e-5 * scale, equal_nan=True), key
    assert torch.allclose(one["sae_acts"], two["sae_acts"], atol=1e-5)
    assert one["sae_acts"].shape[0] == 20 * 17  # every eval image's 17 tokens, in order
    # attribution: each process scores every other chunk of the evaluation images
    for key, value in one["attribution"].items():
        assert torch.allclose(value.double(), two["attribution"][key].double(), atol=1e-6, equal_nan=True), key


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_prepare_under_torchrun_caches_what_one_process_would(tiny_fmnist, tmp_path):
    """`torchrun -m impact_core prepare` (2 processes) fills the cache with the same neuron,
    SAE, attribution and circuit results as one process, from the same cached models."""
    import yaml

    from impact_core.config import load_config
    from impact_core.levels.circuit import circuit_results
    from impact_core.levels.layer import quality_row, train_sae
    from impact_core.levels.model import attribution_results
    from impact_core.levels.neuron import neuron_metrics

    preset = {"name": "tiny", "data": {"root": str(tiny_fmnist), "calib_images": 16, "batch_size": 16},
              "model": {"embed_dim": 16, "num_heads": 2}, "train": {"epochs": 1, "batch_size": 16},
              "pruning": {"methods": ["wanda"], "sparsities": [0.5], "finetune_images": 16,
                          "finetune_batch_size": 16},
              "neuron": {"sparsities": [0.5], "blocks": [11], "top_k": 2, "images": 20, "validation_units": 2,
                         "validation_images": 10},
              "sae": {"sparsities": [0.5], "k": 4, "expansion": 2, "batch_size": 16, "steps": 3, "aux_k": 4, "top_k": 2,
                      "train_images": 40, "eval_images": 20},
              "attribution": {"sparsities": [0.5], "images": 6, "steps": 2, "batch_size": 1,  # 2 chunks: 4 + 2
                              "figure_classes": 2, "figure_per_class": 1},
              "circuit": {"sparsities": [0.5], "classes": [0, 1, 2], "class_chunk": 1, "epochs": 2, "step_size": 1,
                          "lr": 0.1, "batch_size": 2, "train_images_per_class": 2, "eval_images_per_class": 2}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    for cache in (one, two):
        (tmp_path / f"{cache.name}.yaml").write_text(yaml.safe_dump({**preset, "cache_dir": str(cache)}))
    stages = ["neuron", "layer", "model", "circuit"]
    run([sys.executable, "-m", "impact_core", "prepare", "--preset", str(tmp_path / "one.yaml"),
         "--stages", "pruning", *stages], env)
    for kind in ("dense_model", "pruned_model"):  # the same models: only the passes differ
        shutil.copytree(one / kind, two / kind)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "impact_core", "prepare", "--preset", str(tmp_path / "two.yaml"), "--stages", *stages], env)
    cfg1, cfg2 = load_config(tmp_path / "one.yaml"), load_config(tmp_path / "two.yaml")
    for s in (0.0, 0.5):
        n1, n2 = neuron_metrics(cfg1, s), neuron_metrics(cfg2, s)
        assert torch.equal(n1["topk"], n2["topk"])
        for metric in ("impact", "selectivity", "class_variance", "label_entropy", "importance"):
            assert torch.allclose(n1[metric], n2[metric], atol=1e-5, equal_nan=True), metric
        q1, q2 = quality_row(train_sae(cfg1, s)), quality_row(train_sae(cfg2, s))
        for key in ("NMSE", "dead"):
            assert q1[key] == pytest.approx(q2[key], abs=1e-5), key
        a1, a2 = attribution_results(cfg1, s), attribution_results(cfg2, s)
        for m in ("chefer", "generic"):
            assert torch.allclose(a1["methods"][m]["insertion"], a2["methods"][m]["insertion"], atol=1e-6)
        c1, c2 = circuit_results(cfg1, s), circuit_results(cfg2, s)  # classes split between the processes
        for nm in c1["active"]:
            assert torch.equal(c1["active"][nm], c2["active"][nm]), nm
        for key in ("acc_circuit", "acc_ablated", "edges", "losses"):
            assert torch.allclose(c1[key].double(), c2[key].double(), atol=1e-6), key
