import numpy as np
import pytest
import torch

from impact_core.data import DataError, batches, check_data, load_splits, read_idx
from tests.conftest import tiny_config, write_idx


def test_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, gz=False)
    write_idx(tmp_path / "b", arr, gz=True)
    assert (read_idx(tmp_path / "a") == arr).all()
    assert (read_idx(tmp_path / "b.gz") == arr).all()


def test_truncated_idx(tmp_path):
    arr = np.zeros((4, 5), dtype=np.uint8)
    write_idx(tmp_path / "a", arr, gz=False)
    (tmp_path / "a").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "a")


def test_loader_on_tiny_folder(tiny_fmnist):
    cfg = tiny_config(tiny_fmnist)
    s = load_splits(cfg)
    assert len(s["train"]) == 60 and len(s["eval"]) == 20 and len(s["calib"]) == 16
    x, y = next(batches(s["eval"], 8))
    assert x.shape == (8, 1, 28, 28) and y.tolist() == list(range(8))
    # normalised with the model's mean / std
    raw = read_idx(tiny_fmnist / "t10k-images-idx3-ubyte.gz")[0] / 255.0
    assert np.allclose(x[0, 0].numpy(), (raw - 0.2860) / 0.3530, atol=1e-5)


def test_splits_are_deterministic(tiny_fmnist):
    a = load_splits(tiny_config(tiny_fmnist, data={"eval_images": 10}))
    b = load_splits(tiny_config(tiny_fmnist, data={"eval_images": 10}))
    assert (a["calib"].indices == b["calib"].indices).all()
    assert (a["eval"].indices == b["eval"].indices).all() and len(a["eval"]) == 10
    c = load_splits(tiny_config(tiny_fmnist, data={"eval_images": 10}).__class__.from_dict(
        {"seed": 1, "data": {"root": str(tiny_fmnist), "calib_images": 16, "eval_images": 10}}))
    assert not (a["calib"].indices == c["calib"].indices).all()
    s1 = [y.tolist() for _, y in batches(a["train"], 16, shuffle=True, seed=3)]
    s2 = [y.tolist() for _, y in batches(a["train"], 16, shuffle=True, seed=3)]
    assert s1 == s2


def test_missing_folder_and_file(tmp_path, tiny_fmnist):
    with pytest.raises(DataError, match="data folder not found.*apt-get install dataset-fashion-mnist"):
        check_data(tiny_config(tmp_path / "nope"))
    (tiny_fmnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        check_data(tiny_config(tiny_fmnist))


def test_imagefolder_loader(tmp_path):
    """The paper preset's ImageNet-style folders: class sub-folders of JPEG/PNG images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    from impact_core.config import Config

    cfg = Config.from_dict({"data": {"kind": "imagefolder", "root": str(tmp_path), "calib_images": 4},
                            "model": {"img_size": 32, "in_chans": 3, "num_classes": 2, "patch_size": 8,
                                      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    s = load_splits(cfg)
    assert s["train"].classes == ["n01440764", "n01443537"] and len(s["eval"]) == 6 and len(s["calib"]) == 4
    x, y = next(batches(s["eval"], 4))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 0, 1]
    # data.num_workers reaches every pass over the folder through the split (a sub-split keeps it);
    # the batches are the same, in the same order, as the main process decodes them
    workers = load_splits(Config.from_dict({**cfg.to_dict(), "data": {**cfg.data.to_dict(), "num_workers": 2}}))
    sub = workers["train"].subset(np.arange(5))
    assert workers["eval"].num_workers == 2 and sub.num_workers == 2 and s["eval"].num_workers == 0
    for (a, la), (b, lb) in zip(batches(sub, 2, shuffle=True, seed=3), batches(s["train"].subset(np.arange(5)), 2,
                                                                                 shuffle=True, seed=3)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    (tmp_path / "val").rename(tmp_path / "validation")
    with pytest.raises(DataError, match="no 'val/' folder"):
        check_data(cfg)
