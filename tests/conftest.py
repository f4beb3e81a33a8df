"""Shared fixtures: tiny models and data the tests make themselves."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
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
        base.setdefault(key, {}).update(value)
    return Config.from_dict(base)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config().model).eval()


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """Every chapter of _toc.yml executed on the smoke preset and the HTML built with -W (once)."""
    from impact_core.runner import build_book

    out = tmp_path_factory.mktemp("book")
    html = build_book("smoke", out=out)
    return out, html
