"""Shared fixtures: tiny models and data the tests make themselves."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from impact_core.config import Config  # noqa: E402
from impact_core.models import build_model  # noqa: E402


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write an unsigned-byte IDX file (the Fashion-MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_fmnist(tmp_path) -> Path:
    """A folder holding the four Fashion-MNIST IDX files with 60 train / 20 test images."""
    return write_tiny_fmnist(tmp_path / "fmnist")


def write_tiny_fmnist(folder: Path) -> Path:
    """Write seeded Fashion-MNIST-shaped IDX files (60 train / 20 test images) into a new ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (60, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(60) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(20) % 10)
    return folder


def tiny_config(data_root: Path | str = "/usr/share/datasets/fashion-mnist", **sections) -> Config:
    """A config for a very small 12-block model (dim 16, 2 heads)."""
    base = {"data": {"root": str(data_root), "calib_images": 16, "batch_size": 16},
            "model": {"embed_dim": 16, "num_heads": 2},
            "train": {"epochs": 1, "batch_size": 16}}
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:  # a top-level key (``cascade=[1, 6]``)
            base[key] = value
    return Config.from_dict(base)


def tiny_vit(*, img_size: int = 8, patch_size: int = 4, dim: int = 8, depth: int = 2, heads: int = 2,
             classes: int = 3, mlp_ratio: float = 4.0, init_values: float = 0.5, seed: int = 0,
             global_pool: str = "token"):
    """A small one-channel timm ViT of the project's architecture (class token, ``no_embed_class``,
    LayerScale ``init_values``), initialised after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=1, num_classes=classes,
                             embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                             class_token=True, no_embed_class=True, init_values=init_values,
                             global_pool=global_pool).eval()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config().model).eval()


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """Every chapter of _toc.yml executed on the smoke preset and the HTML built with -W (once)."""
    from impact_core.runner import build_book

    out = tmp_path_factory.mktemp("book")
    html = build_book("smoke", out=out, jobs=2)  # the level chapters two at a time, as make book runs them
    return out, html
