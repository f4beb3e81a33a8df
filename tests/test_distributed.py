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
    assert one["acc"] == two["acc"]
    for name in one["norms"]:
        assert torch.allclose(one["norms"][name], two["norms"][name], rtol=1e-5), name
    for name in one["means"]:
        assert torch.allclose(one["means"][name], two["means"][name], atol=1e-5), name
    for name in one["weights"]:  # DDP's averaged gradient of the two halves = the full-batch gradient
        assert torch.allclose(one["weights"][name], two["weights"][name], atol=1e-4), name
    # per-image passes: each process computes its rows, the batch is put back together
    for key, value in one["neuron"].items():
        assert torch.allclose(value.double(), two["neuron"][key].double(), atol=1e-5, equal_nan=True), key
    assert torch.allclose(one["sae_acts"], two["sae_acts"], atol=1e-5)
    assert one["sae_acts"].shape[0] == 20 * 17  # every eval image's 17 tokens, in order
    # attribution: each process scores every other chunk of the evaluation images
    for key, value in one["attribution"].items():
        assert torch.allclose(value.double(), two["attribution"][key].double(), atol=1e-6), key
