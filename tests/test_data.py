"""trainers.data on the real MNIST and CIFAR-10 subset in shared/data, plus synthetic files for the readers'
error paths (those test our parsing, not the data)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from trainers.config import DataConfig
from trainers.data import (NORMALIZATION, DataError, FlipCrop, Splits, load_splits, make_loader, normalize,
                           resolve_data_dir)

# Published per-class label counts (shared/data/README.md), so we know every example was read.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TRAIN_COUNTS = [810, 777, 808, 783, 856, 782, 808, 799, 835, 810]
CIFAR_TEST_COUNTS = [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


@pytest.fixture(scope="module")
def mnist(data_dir) -> Splits:
    return load_splits("mnist", data_dir, DataConfig(val_size=1000), seed=0, download=False)


@pytest.fixture(scope="module")
def cifar(data_dir) -> Splits:
    return load_splits("cifar10", data_dir, DataConfig(val_size=500), seed=0, download=False)


def whole(ds):
    """All of a dataset as one batch, in index order."""
    return ds.__getitems__(list(range(len(ds))))


def write_png(img: torch.Tensor, path: str) -> None:
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def write_npz(path: Path, n_train=20, n_test=5, hwc=(32, 32, 3), drop=None, dtype=np.uint8, label_max=9):
    rng = np.random.default_rng(0)
    arrays = {"train_data": rng.integers(0, 256, (n_train, *hwc)).astype(dtype),
              "train_targets": rng.integers(0, label_max + 1, n_train),
              "test_data": rng.integers(0, 256, (n_test, *hwc)).astype(dtype),
              "test_targets": rng.integers(0, label_max + 1, n_test),
              "extra": np.arange(3)}
    arrays.pop(drop, None)
    np.savez(path, **arrays)
    return arrays


# ---- MNIST ------------------------------------------------------------------------------------
def test_mnist_sizes_range_and_every_label(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (59000, 1000, 10000)
    assert mnist.shape == (1, 28, 28) and mnist.num_classes == 10
    assert (mnist.mean, mnist.std) == NORMALIZATION["mnist"]
    assert mnist.train.augment is None  # MNIST is never augmented
    x, y = whole(mnist.test)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1  # raw [0, 1] pixels, not normalized
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS
    _, y_train = whole(mnist.train)
    _, y_val = whole(mnist.val)
    assert torch.bincount(torch.cat([y_train, y_val]), minlength=10).tolist() == MNIST_TRAIN_COUNTS


def test_mnist_matches_torchvision_and_loads_fast(data_dir, mnist):
    load_splits("mnist", data_dir, DataConfig(), seed=0, download=False)  # warm up imports
    start = time.perf_counter()
    load_splits("mnist", data_dir, DataConfig(), seed=0, download=False)
    assert time.perf_counter() - start < 3.0
    ref = torchvision.datasets.MNIST(data_dir, train=True, download=False)
    i = int(mnist.val.indices[0])
    x, y = mnist.val[0]
    assert torch.equal(x[0], ref.data[i].float() / 255) and int(y) == int(ref.targets[i])


def test_split_is_seeded_disjoint_and_complete(data_dir, mnist):
    again = load_splits("mnist", data_dir, DataConfig(val_size=1000), seed=0, download=False)
    other = load_splits("mnist", data_dir, DataConfig(val_size=1000), seed=1, download=False)
    assert torch.equal(again.val.indices, mnist.val.indices)
    assert torch.equal(again.train.indices, mnist.train.indices)
    assert not torch.equal(other.val.indices, mnist.val.indices)
    train, val = set(mnist.train.indices.tolist()), set(mnist.val.indices.tolist())
    assert not train & val
    assert train | val == set(range(60000))


def test_subsets_are_prefixes_of_the_full_split(data_dir, mnist):
    s = load_splits("mnist", data_dir, DataConfig(val_size=1000, subset=500, test_subset=200), seed=0,
                    download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (500, 1000, 200)
    assert torch.equal(s.val.indices, mnist.val.indices)  # the subset never changes the validation set
    assert torch.equal(s.train.indices, mnist.train.indices[:500])
    assert torch.equal(whole(s.test)[0], whole(mnist.test)[0][:200])


# ---- CIFAR-10 subset ----------------------------------------------------------------------------
def test_cifar10_subset_found_from_data_dir(data_dir, cifar):
    assert (len(cifar.train), len(cifar.val), len(cifar.test)) == (8068 - 500, 500, 1017)
    assert cifar.shape == (3, 32, 32) and cifar.num_classes == 10
    assert cifar.source.endswith("cifar10_subset.npz")
    z = np.load(data_dir / "cifar10-subset" / "cifar10_subset.npz")
    x, y = whole(cifar.test)
    assert torch.equal(x, torch.from_numpy(z["test_data"]).permute(0, 3, 1, 2).float() / 255)
    assert torch.bincount(y, minlength=10).tolist() == CIFAR_TEST_COUNTS
    y_all = torch.cat([whole(cifar.train)[1], whole(cifar.val)[1]])
    assert torch.bincount(y_all, minlength=10).tolist() == CIFAR_TRAIN_COUNTS


def test_npz_by_config_or_as_data_dir(data_dir, cifar):
    cfg = DataConfig(val_size=500, npz="cifar10-subset/cifar10_subset.npz")
    by_cfg = load_splits("cifar10", data_dir, cfg, seed=0, download=False)
    as_dir = load_splits("cifar10", data_dir / "cifar10-subset" / "cifar10_subset.npz", DataConfig(val_size=500),
                         seed=0, download=False)
    for s in (by_cfg, as_dir):
        assert torch.equal(s.train.indices, cifar.train.indices)
        assert torch.equal(whole(s.val)[0], whole(cifar.val)[0])


def test_augmentation_is_flip_plus_edge_crop(cifar):
    ds = cifar.train
    assert ds.augment == FlipCrop(2)
    idx = list(range(256))
    torch.manual_seed(0)
    x1, y1 = ds.__getitems__(idx)
    torch.manual_seed(0)
    x2, _ = ds.__getitems__(idx)
    plain = ds.images[ds.indices[:256]]
    assert x1.shape == (256, 3, 32, 32) and torch.equal(y1, ds.labels[ds.indices[:256]])
    assert torch.equal(x1, x2)  # reproducible from torch's seed
    changed = (x1 != plain.float() / 255).flatten(1).any(1)
    assert changed.float().mean() > 0.8  # only no-flip, zero-offset crops stay unchanged (1/50)
    # Reference: torchvision's order, flip then pad with edge values then crop, drawn as FlipCrop draws.
    torch.manual_seed(0)
    dy, dx = torch.randint(0, 5, (256, 1)), torch.randint(0, 5, (256, 1))
    flip = torch.rand(256, 1) < 0.5
    for i in range(256):
        img = plain[i].float().flip(-1) if flip[i] else plain[i].float()
        padded = F.pad(img[None], (2, 2, 2, 2), mode="replicate")[0]
        assert torch.equal(x1[i] * 255, padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32])
    # Validation and test views are never augmented.
    assert cifar.val.augment is None and cifar.test.augment is None


def test_augment_off(data_dir):
    s = load_splits("cifar10", data_dir, DataConfig(val_size=500, augment=False), seed=0, download=False)
    assert s.train.augment is None
    x, _ = s.train.__getitems__([0, 1])
    assert torch.equal(x, s.train.images[s.train.indices[:2]].float() / 255)


# ---- normalize and loaders ----------------------------------------------------------------------
def test_normalize_per_channel():
    mean, std = NORMALIZATION["cifar10"]
    x = torch.rand(4, 3, 5, 5)
    out = normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c] - mean[c]) / std[c])
    assert torch.allclose(normalize(x[0], mean, std), out[0])  # a single image too
    assert torch.equal(normalize(x[:, :1], *NORMALIZATION["mnist"]), x[:, :1])
    with pytest.raises(ValueError, match="3 channels"):
        normalize(torch.rand(2, 1, 5, 5), mean, std)


def test_loader_order_is_reproducible_and_resumable(mnist):
    ds = mnist.val
    epoch = lambda loader: torch.cat([y for _, y in loader])  # noqa: E731
    a, b = make_loader(ds, 64, shuffle=True, seed=5), make_loader(ds, 64, shuffle=True, seed=5)
    first = epoch(a)
    assert torch.equal(first, epoch(b))
    assert sorted(first.tolist()) == sorted(whole(ds)[1].tolist()) and len(first) == len(ds)
    assert not torch.equal(first, whole(ds)[1])  # shuffled
    assert not torch.equal(first, epoch(make_loader(ds, 64, shuffle=True, seed=6)))  # by the seed
    state = a.generator.get_state()  # a checkpoint between epochs
    second = epoch(a)
    assert not torch.equal(second, first)
    resumed = make_loader(ds, 64, shuffle=True, seed=5)
    resumed.generator.set_state(state)
    assert torch.equal(epoch(resumed), second)
    x, y = next(iter(make_loader(ds, 64, shuffle=False, drop_last=True)))
    assert x.shape == (64, 1, 28, 28) and torch.equal(y, whole(ds)[1][:64])
    assert len(make_loader(ds, 64, shuffle=False, drop_last=True)) == len(ds) // 64


def test_unshuffled_loader_leaves_global_rng_alone(mnist):
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    for _ in make_loader(mnist.val, 500, shuffle=False):
        pass
    assert torch.equal(torch.rand(3), expected)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CERTTUNE_DATA", str(tmp_path))
    assert resolve_data_dir("/x/y") == Path("/x/y")
    assert resolve_data_dir(None) == tmp_path
    monkeypatch.delenv("CERTTUNE_DATA")
    assert resolve_data_dir(None) == Path("data")


# ---- synthetic files: our readers ---------------------------------------------------------------
def test_grayscale_npz_for_mnist(tmp_path):
    arrays = write_npz(tmp_path / "m.npz", n_train=30, hwc=(28, 28))
    s = load_splits("mnist", tmp_path, DataConfig(val_size=10, npz="m.npz"), seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (20, 10, 5)
    x, y = s.test[3]
    assert x.shape == (1, 28, 28) and torch.equal(x[0] * 255, torch.from_numpy(arrays["test_data"][3]).float())
    assert int(y) == arrays["test_targets"][3]


def test_tinyimagenet_folders(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    g = torch.Generator().manual_seed(0)
    imgs = {}
    for w in wnids:
        for k in range(3):
            img = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
            (root / "train" / w / "images").mkdir(parents=True, exist_ok=True)
            write_png(img, str(root / "train" / w / "images" / f"{w}_{k}.png"))
            imgs[(w, k)] = img
        (root / "val" / w).mkdir(parents=True)
        write_png(imgs[(w, 0)], str(root / "val" / w / "v.png"))
    s = load_splits("tinyimagenet", tmp_path, DataConfig(val_size=2, augment=False), seed=0)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (7, 2, 3, 200)
    x, y = whole(s.test)
    order = sorted(wnids)  # class ids follow sorted folder names
    assert y.tolist() == [0, 1, 2]
    assert torch.equal(x * 255, torch.stack([imgs[(w, 0)] for w in order]).float())
    # The official val layout (images/ + val_annotations.txt) reads the same.
    for w in wnids:
        (root / "val" / w / "v.png").rename(root / "val" / f"{w}.png")
        (root / "val" / w).rmdir()
    (root / "val" / "images").mkdir()
    lines = []
    for w in ["n03", "n01"]:
        (root / "val" / f"{w}.png").rename(root / "val" / "images" / f"{w}.png")
        lines.append(f"{w}.png\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    x, y = whole(load_splits("tinyimagenet", tmp_path, DataConfig(val_size=2), seed=0).test)
    assert y.tolist() == [2, 0] and torch.equal(x[0] * 255, imgs[("n03", 0)].float())


# ---- errors -------------------------------------------------------------------------------------
def test_missing_mnist_names_the_expected_file(tmp_path):
    with pytest.raises(DataError, match=r"MNIST not found under .*MNIST/raw/train-images-idx3-ubyte.*"
                                        r"download=False.*CERTTUNE_DATA"):
        load_splits("mnist", tmp_path, DataConfig(), seed=0, download=False)


def test_failed_mnist_download_is_reported(tmp_path, monkeypatch):
    # A refused local port stands in for "no network", so the test is the same with or without internet.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"MNIST not found under .*train-images-idx3-ubyte.*download failed"):
        load_splits("mnist", tmp_path, DataConfig(), seed=0, download=True)
    assert time.perf_counter() - start < 30


def test_missing_cifar10_and_tinyimagenet(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found .*cifar-10-batches-py.*cifar10-subset/\*\.npz"):
        load_splits("cifar10", tmp_path, DataConfig(), seed=0, download=False)
    with pytest.raises(DataError, match=r"TinyImageNet not found .*tiny-imagenet-200/train"):
        load_splits("tinyimagenet", tmp_path, DataConfig(), seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(drop="test_targets"), r"c\.npz: missing key 'test_targets'"),
    (dict(hwc=(30, 30, 3)), r"'train_data' has shape \(20, 30, 30, 3\); cifar10 expects \(N, 32, 32, 3\)"),
    (dict(hwc=(32, 32)), r"cifar10 expects \(N, 32, 32, 3\)"),
    (dict(dtype=np.float32), r"'train_data' must be uint8"),
    (dict(label_max=12), r"'train_targets' labels must be in \[0, 9\]"),
])
def test_bad_npz(tmp_path, kwargs, match):
    write_npz(tmp_path / "c.npz", **kwargs)
    with pytest.raises(DataError, match=match):
        load_splits("cifar10", tmp_path, DataConfig(val_size=5, npz="c.npz"), seed=0)


def test_bad_sizes_and_paths(tmp_path):
    write_npz(tmp_path / "c.npz")  # 20 train, 5 test
    ok = dict(val_size=5, npz=str(tmp_path / "c.npz"))  # absolute npz path
    assert len(load_splits("cifar10", "/nonexistent", DataConfig(**ok, subset=15), seed=0).train) == 15
    with pytest.raises(DataError, match=r"data\.subset: 16 must be in \[0, 15\]"):
        load_splits("cifar10", tmp_path, DataConfig(**ok, subset=16), seed=0)
    with pytest.raises(DataError, match=r"data\.val_size: 20 must be smaller than the 20"):
        load_splits("cifar10", tmp_path, DataConfig(val_size=20, npz="c.npz"), seed=0)
    with pytest.raises(DataError, match=r"data\.test_subset: 6 exceeds the 5 test examples"):
        load_splits("cifar10", tmp_path, DataConfig(**ok, test_subset=6), seed=0)
    with pytest.raises(DataError, match=r"data\.npz: .*missing\.npz not found"):
        load_splits("cifar10", tmp_path, DataConfig(npz="missing.npz"), seed=0)
    with pytest.raises(DataError, match=r"dataset: unknown 'svhn'"):
        load_splits("svhn", tmp_path, DataConfig(), seed=0)
