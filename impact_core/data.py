"""Data: Fashion-MNIST from IDX files (the embedded default) and ImageNet-style folders.

Splits are deterministic functions of the config and its seed:

* ``train``: the training set (capped at ``data.train_images``), less the held-out images;
* ``holdout``: ``data.holdout_images`` training images drawn at ``seed + 2`` that nothing trains,
  calibrates or is analysed on (present only when that is > 0): the matched-accuracy control picks
  its dense checkpoint on them;
* ``calib``: ``data.calib_images`` training images drawn at ``seed`` (Wanda calibration);
* ``eval``: the test / validation set (capped at ``data.eval_images``, a seeded subset).

Images come out normalised with the model's own mean and std.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .config import Config, ConfigError

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "eval_images": "t10k-images-idx3-ubyte",
    "eval_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` (Debian), or download the four IDX "
                "files from the Fashion-MNIST site and set data.root (or `-p data_root PATH`) to their folder")


class DataError(FileNotFoundError):
    """A data folder or file is missing or unreadable."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, dims, then big-endian uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values, found {data.size} (truncated file?)")
    return data.reshape(dims)


def find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {INSTALL_HINT}")


def check_data(cfg: Config) -> None:
    """Fail fast, before any compute, when the data folder is not there."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        hint = INSTALL_HINT if cfg.data.kind == "fashion_mnist" else \
            "set data.root to a folder holding train/ and val/ in ImageFolder layout"
        raise DataError(f"data folder not found: {root} ({hint})")
    if cfg.data.kind == "fashion_mnist":
        for stem in FASHION_MNIST_FILES.values():
            find_idx(root, stem)
    else:
        for sub in ("train", "val"):
            if not (root / sub).is_dir():
                raise DataError(f"ImageFolder data set {root} has no '{sub}/' folder")


@dataclass
class Split:
    """A list of images of one data set: ``dataset[i] -> (image, label)``, selected by ``indices``."""

    name: str
    dataset: object
    indices: np.ndarray
    classes: list
    num_workers: int = 0  # DataLoader workers decoding an image folder (``data.num_workers``; in-memory data: none)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.dataset.labels)[self.indices]

    def subset(self, indices: np.ndarray, name: Optional[str] = None) -> "Split":
        """A sub-split; ``indices`` index into this split."""
        return Split(name or self.name, self.dataset, self.indices[np.asarray(indices)], self.classes,
                     self.num_workers)


class InMemoryImages:
    """Images held as one normalised float tensor (Fashion-MNIST: 60k x 1 x 28 x 28)."""

    def __init__(self, images_u8: np.ndarray, labels: np.ndarray, mean, std):
        x = torch.from_numpy(images_u8.astype(np.float32) / 255.0).unsqueeze(1)
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.images = (x - m) / s
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray):
        idx_t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return self.images[idx_t], self.labels[idx_t]


class FolderImages:
    """An ImageNet-style folder (``class/xxx.JPEG``) read with torchvision."""

    def __init__(self, root: Path, img_size: int, mean, std):
        from torchvision import datasets, transforms

        tf = transforms.Compose([
            transforms.Resize(int(round(img_size / 0.875))),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])
        self.folder = datasets.ImageFolder(str(root), transform=tf)
        self.labels = np.array(self.folder.targets, dtype=np.int64)
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.folder[int(i)]


def seeded_positions(n_total: int, n: Optional[int], seed: int) -> np.ndarray:
    """``n`` of ``range(n_total)``: the first ``n`` of a permutation seeded by ``seed``, sorted
    (all of them when ``n`` is None or at least ``n_total``). Every seeded sample of images in
    the project (training cap, evaluation cap, each level's images) is drawn by this."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def seeded_subset(split: "Split", n: Optional[int], seed: int, name: Optional[str] = None) -> "Split":
    """The :func:`seeded_positions` sample of a split (the split itself when it has at most ``n`` images)."""
    if n is None or n >= len(split):
        return split
    return split.subset(seeded_positions(len(split), n, seed), name=name)


def load_splits(cfg: Config) -> dict[str, Split]:
    """The deterministic ``train``, ``calib`` and ``eval`` splits of the config's data set, and ``holdout``
    when ``data.holdout_images`` > 0 (:func:`hold_out`)."""
    check_data(cfg)
    root = Path(cfg.data.root)
    mcfg = cfg.model
    if cfg.data.kind == "fashion_mnist":
        arrays = {k: read_idx(find_idx(root, stem)) for k, stem in FASHION_MNIST_FILES.items()}
        train = InMemoryImages(arrays["train_images"], arrays["train_labels"], mcfg.mean, mcfg.std)
        evals = InMemoryImages(arrays["eval_images"], arrays["eval_labels"], mcfg.mean, mcfg.std)
        classes = list(FASHION_MNIST_CLASSES)
    else:
        train = FolderImages(root / "train", mcfg.img_size, mcfg.mean, mcfg.std)
        evals = FolderImages(root / "val", mcfg.img_size, mcfg.mean, mcfg.std)
        classes = list(train.classes)
    from .models import architecture

    if len(classes) != mcfg.num_classes and architecture(mcfg).trained_here:  # a loaded model keeps its head
        raise ConfigError(f"model.num_classes={mcfg.num_classes} but the data set has {len(classes)} classes")
    train_idx = seeded_positions(len(train), cfg.data.train_images, cfg.seed)
    train_idx, holdout_idx = hold_out(train_idx, cfg.data.holdout_images, cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed)
    calib_idx = np.sort(rng.permutation(train_idx)[: cfg.data.calib_images])
    eval_idx = seeded_positions(len(evals), cfg.data.eval_images, cfg.seed + 1)
    workers = cfg.data.num_workers
    out = {
        "train": Split("train", train, train_idx, classes, workers),
        "calib": Split("calib", train, calib_idx, classes, workers),
        "eval": Split("eval", evals, eval_idx, classes, workers),
    }
    if len(holdout_idx):
        out["holdout"] = Split("holdout", train, holdout_idx, classes, workers)
    return out


def hold_out(train_idx: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training positions into (kept, held out): ``n`` of them drawn at ``seed``
    (:func:`seeded_positions`), both sorted. Nothing trains, calibrates or is analysed on the held-out
    images; the matched-accuracy control picks its dense checkpoint on them (``data.holdout_images``)."""
    if not n:
        return train_idx, train_idx[:0]
    if n >= len(train_idx):
        raise ConfigError(f"data.holdout_images={n} leaves no training images (the training split has "
                          f"{len(train_idx)}); lower it")
    held = np.zeros(len(train_idx), dtype=bool)
    held[seeded_positions(len(train_idx), n, seed)] = True
    return train_idx[~held], train_idx[held]


def batches(split: Split, batch_size: int, shuffle: bool = False, seed: int = 0,
            limit: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches of a split; shuffled deterministically by ``seed``.

    An image folder is decoded by the split's ``num_workers`` DataLoader processes
    (``data.num_workers``), so every pass over it (training, calibration, means, evaluation, the
    level chapters') uses the preset's workers; the order of the batches does not depend on them."""
    idx = split.indices
    if shuffle:
        idx = idx[np.random.default_rng(seed).permutation(len(idx))]
    if limit is not None:
        idx = idx[:limit]
    ds = split.dataset
    if isinstance(ds, InMemoryImages):
        for start in range(0, len(idx), batch_size):
            yield ds.batch(idx[start:start + batch_size])
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx.tolist()), batch_size=batch_size,
                                         shuffle=False, num_workers=split.num_workers)
    for images, labels in loader:
        yield images, labels


class Batches:
    """A re-iterable view of :func:`batches` (tqdm and two-pass code need ``len`` and re-iteration)."""

    def __init__(self, split: Split, batch_size: int, **kwargs):
        self.split, self.batch_size, self.kwargs = split, batch_size, kwargs

    def __iter__(self):
        return batches(self.split, self.batch_size, **self.kwargs)

    def __len__(self) -> int:
        n = len(self.split) if self.kwargs.get("limit") is None else min(len(self.split), self.kwargs["limit"])
        return -(-n // self.batch_size)
