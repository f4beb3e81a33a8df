"""Every chapter on a "paper-shaped" smoke: timm's DeiT-III B/16 architecture (86M parameters,
224x224 RGB, 1000 classes) with a checkpoint this test writes, and a tiny ImageNet-style folder
built from the 20 real ImageNet photos that the PyPI package foolbox ships (installed with
--no-deps by `make setup`). Budgets are cut to seconds; the numbers mean nothing, the code path
is the paper preset's, in fp32 (see the preset below).
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from impact_core.config import load_config
from impact_core.models import build_model
from impact_core.runner import toc_chapters


def foolbox_images() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")  # located, not imported: its own dependencies are absent
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg"))


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not foolbox_images(), reason="foolbox's ImageNet photos missing (make setup installs them)")]


@pytest.fixture(scope="module")
def paper_shaped_preset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    photos = foolbox_images()
    for split in ("train", "val"):
        for photo in photos:  # imagenet_<index>_<label>.jpg
            label = int(photo.stem.split("_")[-1])
            folder = root / "imagenet" / split / f"{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, folder / photo.name)
    torch.manual_seed(0)
    checkpoint = root / "deit3_base_patch16_224.pth"
    torch.save({"model": build_model(load_config("paper").model).state_dict()}, checkpoint)
    preset = {
        "extends": "paper", "name": "paper-shaped", "device": "cpu", "cache_dir": str(root / "cache"),
        # fp32: this CPU has no bf16 matrix units, so the paper preset's bf16 autocast is emulated and
        # made this test 3-5x slower (an evaluation of 4 images took 15.6 s instead of 3.4 s); the
        # autocast of every forward-only pass is tested on its own in test_precision.py
        "precision": "fp32",
        "data": {"root": str(root / "imagenet"), "calib_images": 4, "batch_size": 4, "num_workers": 0},
        "model": {"checkpoint": str(checkpoint)},
        "pruning": {"methods": ["wanda"], "sparsities": [0.7], "finetune_images": 2, "finetune_batch_size": 2},
        "neuron": {"sparsities": [0.7], "top_k": 2, "images": 4, "validation_units": 2, "validation_images": 2},
        "sae": {"sparsities": [0.7], "k": 8, "expansion": 2, "batch_size": 8, "steps": 3, "aux_k": 4,
                "train_images": 8, "eval_images": 6, "seeds": 2},
        "circuit": {"sparsities": [0.7], "classes": [0, 1], "epochs": 1, "step_size": 1, "k_sweep": [0.00004],
                    "train_images_per_class": 1, "eval_images_per_class": 1, "random_draws": 1},
        "attribution": {"sparsities": [0.7], "images": 1, "steps": 4, "batch_size": 1, "references": ["black"],
                        "figure_classes": 1, "figure_per_class": 1},  # the RISE substitute runs in the smoke book
        # a loaded model is not trained sparse ("not measured"); Wanda 2:4 runs in the smoke book
        "sparse_training": {"sparsities": [0.7], "wanda_2_4": False},
    }
    path = root / "paper_shaped.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_paper_preset_shape(paper_shaped_preset):
    cfg = load_config(paper_shaped_preset)
    assert cfg.model.arch == "deit3_base_patch16_224" and cfg.model.num_classes == 1000
    assert cfg.model.img_size == 224 and cfg.data.kind == "imagefolder"


def test_every_chapter_runs_paper_shaped(paper_shaped_preset, tmp_path):
    from impact_core.runner import build_book

    html = build_book(str(paper_shaped_preset), out=tmp_path, jobs=2)
    for chapter in toc_chapters():
        assert (html / f"{chapter}.html").exists(), chapter
