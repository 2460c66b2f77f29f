"""Image data for certified training: in-memory uint8 tensors, a seeded validation split, reproducible loaders.

Images leave this module as float tensors in [0, 1], (C, H, W), NOT normalized: ε is defined on the raw
pixel scale and the trainer clips perturbed inputs to the [0, 1] box before calling `normalize`.
Whole datasets stay in memory as uint8 and are converted (and augmented) one batch at a time, which keeps
an epoch free of per-sample Python work.

Sources, per dataset (the first that exists wins):
- any dataset: an .npz named by `data.npz` (relative to the data dir unless absolute), or the data dir itself
  when it is an .npz file;
- mnist: torchvision's `<dir>/MNIST/raw/*-idx?-ubyte`, downloaded when missing and allowed;
- cifar10: torchvision's `<dir>/cifar-10-batches-py`, else `<dir>/cifar10-subset/*.npz` or `<dir>/cifar10*.npz`,
  else a torchvision download;
  downloads go to `<dir>` (created if missing); $CERTTUNE_MNIST_MIRROR (a URL folder holding the four MNIST .gz
  files) and $CERTTUNE_CIFAR10_URL (the cifar-10-python.tar.gz URL) replace torchvision's sources. Each source
  is probed first (an HTTP HEAD, at most PROBE_TIMEOUT_S), so no network fails in seconds;
- tinyimagenet: `<dir>/tiny-imagenet-200/{train,val}` image folders (no download).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
import zipfile
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from .config import DataConfig

NORMALIZATION = {
    "mnist": ((0.0,), (1.0,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "tinyimagenet": (3, 64, 64)}  # (C, H, W)
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "tinyimagenet": 200}
CROP_PADDING = {"cifar10": 2, "tinyimagenet": 4}  # train augmentation: flip + edge-padded crop; MNIST has none
NPZ_KEYS = ("train_data", "train_targets", "test_data", "test_targets")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0  # per connect/read, so a download without network fails instead of hanging
PROBE_TIMEOUT_S = 5.0  # an HTTP HEAD to a download source, in a thread (a DNS lookup has no timeout)
MNIST_MIRROR_ENV = "CERTTUNE_MNIST_MIRROR"
CIFAR10_URL_ENV = "CERTTUNE_CIFAR10_URL"
HINT = "Pass --data-dir or set CERTTUNE_DATA"
BRING = ("To bring the data: run once with network access (MNIST and CIFAR-10 download into the data dir; "
         f"${MNIST_MIRROR_ENV} or ${CIFAR10_URL_ENV} name another source), copy torchvision's files there, or set "
         "data.npz=FILE to an .npz of uint8 images (train_data, train_targets, test_data, test_targets). " + HINT)


class DataError(ValueError):
    """Data that cannot be found or read. The message names the path and what was expected."""


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The explicit argument, else $CERTTUNE_DATA, else ./data."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("CERTTUNE_DATA")
    return Path(env).expanduser() if env else Path("data")


def normalize(x: Tensor, mean, std) -> Tensor:
    """(x - mean) / std per channel; x is (C, H, W) or a batch (N, C, H, W)."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if x.dim() < 3 or x.shape[-3] != mean.numel() or std.numel() != mean.numel():
        raise ValueError(f"normalize: expected (N,) C, H, W input with C = {mean.numel()} channels, "
                         f"got shape {tuple(x.shape)}")
    return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


# ---- datasets and augmentation ------------------------------------------------------------------
@dataclass(frozen=True)
class FlipCrop:
    """RandomHorizontalFlip + RandomCrop(size, padding, padding_mode='edge') on a batch (N, C, H, W).

    Edge padding followed by a crop equals reading the image at clamped coordinates, and a flip reads
    column w-1-j, so the whole augmentation is two gathers (no padded copy). Draws from torch's global RNG,
    so the trainer's seed makes it reproducible.
    """
    padding: int

    def __call__(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.padding
        dy = torch.randint(0, 2 * p + 1, (n, 1)) - p  # crop offset in the padded image, minus the padding
        dx = torch.randint(0, 2 * p + 1, (n, 1)) - p
        flip = torch.rand(n, 1) < 0.5
        rows = (torch.arange(h) + dy).clamp(0, h - 1)  # (n, h)
        cols = (torch.arange(w) + dx).clamp(0, w - 1)  # (n, w): column of the (possibly flipped) image
        cols = torch.where(flip, w - 1 - cols, cols)  # ... and of the original one
        x = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w))
        return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


class _Batch(tuple):
    """An already collated (images, labels) pair; `collate` passes it through unchanged."""


def collate(data):
    return tuple(data) if isinstance(data, _Batch) else default_collate(data)


class ImageDataset(Dataset):
    """Rows `indices` of uint8 `images` (N, C, H, W) with int64 `labels`; items are float in [0, 1].

    `images`/`labels` are the whole source split, shared between the train and validation views;
    `indices` says which rows this view holds. `augment` (batch → batch, uint8) runs per fetched batch.
    """

    def __init__(self, images: Tensor, labels: Tensor, indices: Tensor | None = None,
                 augment: Callable[[Tensor], Tensor] | None = None):
        self.images = images
        self.labels = labels
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, idx: list[int]) -> _Batch:
        rows = self.indices[torch.as_tensor(idx, dtype=torch.long)]
        x = self.images[rows]
        if self.augment is not None:
            x = self.augment(x)
        return _Batch((x.float().div_(255), self.labels[rows]))

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]


@dataclass
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    mean: tuple
    std: tuple
    shape: tuple  # (C, H, W)
    num_classes: int
    source: str = ""  # the file or folder the images came from, for the run log


@dataclass
class _Raw:
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    source: str


# ---- splits -----------------------------------------------------------------------------------
def load_splits(dataset: str, data_dir: str | Path | None, cfg: DataConfig, seed: int,
                download: bool = True) -> Splits:
    """Train / validation / test views of `dataset`; the validation rows are carved from the training set."""
    if dataset not in SHAPES:
        raise DataError(f"dataset: unknown {dataset!r}; allowed: {', '.join(SHAPES)}")
    root = resolve_data_dir(data_dir)
    raw = _load_raw(dataset, root, cfg, download)
    train_idx, val_idx = split_indices(len(raw.train_y), cfg.val_size, cfg.subset, seed)
    n_test = len(raw.test_y)
    if cfg.test_subset > n_test:
        raise DataError(f"data.test_subset: {cfg.test_subset} exceeds the {n_test} test examples in {raw.source}")
    test_idx = torch.arange(cfg.test_subset or n_test)
    augment = FlipCrop(CROP_PADDING[dataset]) if cfg.augment and dataset in CROP_PADDING else None
    mean, std = NORMALIZATION[dataset]
    return Splits(train=ImageDataset(raw.train_x, raw.train_y, train_idx, augment),
                  val=ImageDataset(raw.train_x, raw.train_y, val_idx),
                  test=ImageDataset(raw.test_x, raw.test_y, test_idx),
                  mean=mean, std=std, shape=SHAPES[dataset], num_classes=NUM_CLASSES[dataset],
                  source=raw.source)


def split_indices(n: int, val_size: int, subset: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) row indices: a seeded permutation, val first, then the first `subset` (0 = all) of the rest."""
    if val_size < 1:
        raise DataError(f"data.val_size: must be >= 1, got {val_size}")
    if val_size >= n:
        raise DataError(f"data.val_size: {val_size} must be smaller than the {n} training examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:val_size], perm[val_size:]
    if subset < 0 or subset > len(rest):
        raise DataError(f"data.subset: {subset} must be in [0, {len(rest)}], the training examples left "
                        f"after the {val_size}-example validation split (0 = all)")
    return (rest[:subset] if subset else rest), val


# ---- loaders ----------------------------------------------------------------------------------
def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None = None,
                drop_last: bool = False) -> DataLoader:
    """A single-process loader whose order depends only on `loader.generator`.

    The trainer reseeds `loader.generator` from (seed, epoch) at the start of every epoch, so a resumed run
    sees the same order without saving loader state. A generator is given even without shuffling so that iterating never draws from torch's global RNG
    (DataLoader draws a worker base seed per epoch). `seed=None` uses `torch.initial_seed()`.
    """
    generator = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=0,
                      generator=generator, collate_fn=collate)


# ---- sources ----------------------------------------------------------------------------------
def _load_raw(dataset: str, root: Path, cfg: DataConfig, download: bool) -> _Raw:
    if cfg.npz:
        npz = Path(cfg.npz).expanduser()
        npz = npz if npz.is_absolute() else root / npz
        if not npz.is_file():
            raise DataError(f"data.npz: {npz} not found (relative paths are read from the data dir {root})")
        return read_npz(npz, dataset)
    if root.suffix == ".npz" and root.is_file():
        return read_npz(root, dataset)
    if dataset == "mnist":
        return _load_mnist(root, download)
    if dataset == "cifar10":
        return _load_cifar10(root, download)
    return _load_tinyimagenet(root)


def read_npz(path: Path, dataset: str) -> _Raw:
    """uint8 images (N, H, W, C) or (N, H, W) and integer labels under NPZ_KEYS; other keys are ignored."""
    check_npz_headers(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from e
    with z:
        for key in NPZ_KEYS:
            if key not in z.files:
                raise DataError(f"{path}: missing key '{key}' (expected keys: {', '.join(NPZ_KEYS)})")
        arrays = {key: _npz_array(z, key, path) for key in NPZ_KEYS}
        train_x = _npz_images(arrays["train_data"], dataset, path, "train_data")
        test_x = _npz_images(arrays["test_data"], dataset, path, "test_data")
        train_y = _npz_labels(arrays["train_targets"], len(train_x), dataset, path, "train_targets")
        test_y = _npz_labels(arrays["test_targets"], len(test_x), dataset, path, "test_targets")
    return _Raw(train_x, train_y, test_x, test_y, source=str(path))


def check_npz_headers(path: Path) -> None:
    """Each array's .npy header, read without allocating anything: the bytes its shape and dtype claim must be
    the bytes the archive says the member holds, and fit this machine's memory. A header claiming 279 TiB
    is refused here instead of ending in a MemoryError (numpy allocates what the header says, then reads)."""
    try:
        with zipfile.ZipFile(path) as z:
            members = {i.filename: i for i in z.infolist()}
            for key in NPZ_KEYS:
                info = members.get(key + ".npy")
                if info is not None:
                    with z.open(info) as f:
                        _check_npy_header(f, info.file_size, path, key)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"cannot read {path} as .npz: {_one_line(e)}") from None


def _check_npy_header(f, member_bytes: int, path: Path, key: str) -> None:
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except (ValueError, SyntaxError, TypeError) as e:
        raise DataError(f"{path}: '{key}' has no valid .npy header: {_one_line(e)[:200]}") from None
    if dtype.hasobject:
        raise DataError(f"{path}: '{key}' holds Python objects (a pickle); refused, only numbers are read")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    header = f.tell()
    if claimed != member_bytes - header:
        raise DataError(f"{path}: '{key}' claims shape {shape} of {dtype} ({claimed:,} bytes) but holds "
                        f"{max(member_bytes - header, 0):,}; refused")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if claimed > memory:
        raise DataError(f"{path}: '{key}' claims {claimed / 2**30:,.1f} GiB, more than this machine's memory")


def _npz_array(z, key: str, path: Path) -> np.ndarray:
    """One array of the archive; object arrays (pickles) are refused by allow_pickle=False, never loaded."""
    try:
        return z[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read '{key}': {' '.join(str(e).split())}") from None


def _npz_images(arr: np.ndarray, dataset: str, path: Path, key: str) -> Tensor:
    c, h, w = SHAPES[dataset]
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: '{key}' must be uint8 pixels in 0..255, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]  # grayscale (N, H, W)
    if arr.ndim != 4 or arr.shape[1:] != (h, w, c):
        raise DataError(f"{path}: '{key}' has shape {arr.shape}; {dataset} expects (N, {h}, {w}, {c})"
                        + (" or (N, H, W) for grayscale" if c == 1 else ""))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def _npz_labels(arr: np.ndarray, n: int, dataset: str, path: Path, key: str) -> Tensor:
    if not np.issubdtype(arr.dtype, np.integer) or arr.shape != (n,):
        raise DataError(f"{path}: '{key}' must be {n} integer labels (one per image), got {arr.dtype} "
                        f"array of shape {arr.shape}")
    k = NUM_CLASSES[dataset]
    if n and not (arr.min() >= 0 and arr.max() < k):
        raise DataError(f"{path}: '{key}' labels must be in [0, {k - 1}] for {dataset}, got "
                        f"[{arr.min()}, {arr.max()}]")
    return torch.from_numpy(arr.astype(np.int64))


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextmanager
def _download_sources():
    """torchvision's download sources, replaced by $CERTTUNE_MNIST_MIRROR / $CERTTUNE_CIFAR10_URL when set, as
    {"mnist": [mirror URL, ...], "cifar10": [URL]}; torchvision's class attributes are restored afterwards."""
    from torchvision.datasets import CIFAR10, MNIST

    saved = MNIST.mirrors, CIFAR10.url
    mirror, url = os.environ.get(MNIST_MIRROR_ENV), os.environ.get(CIFAR10_URL_ENV)
    try:
        yield {"mnist": [mirror.rstrip("/") + "/"] if mirror else list(MNIST.mirrors),
               "cifar10": [url] if url else [CIFAR10.url]}
    finally:
        MNIST.mirrors, CIFAR10.url = saved


def _reachable(urls: list[str]) -> list[str]:
    """The URLs whose server answers an HTTP HEAD (any status) within PROBE_TIMEOUT_S, probed at once in
    threads: a DNS lookup has no timeout of its own, and a host that accepts but never answers would hold
    each file's download for DOWNLOAD_SOCKET_TIMEOUT_S. OSError naming each failure when none answers."""
    failures: dict[str, str] = {}

    def probe(url: str) -> None:
        host = urlsplit(url).hostname or url
        failures[url] = f"{host}: no answer within {PROBE_TIMEOUT_S:g} s"
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answers (a folder URL may well be 403 or 404)
        except (OSError, ValueError) as e:  # URLError, timeouts; ValueError: not a URL
            failures[url] = f"{host}: {_one_line(getattr(e, 'reason', e))}"
            return
        del failures[url]

    threads = [threading.Thread(target=probe, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [u for u, t in zip(urls, threads) if not t.is_alive() and u not in failures]
    if not alive:
        raise OSError("cannot reach " + "; ".join(failures.get(u, f"{u}: no answer") for u in urls))
    return alive


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first (a failed download removes them again)."""
    return [p for p in [path, *path.parents] if not p.exists()]


def _remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass  # holds a partial download, or was never made


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _load_mnist(root: Path, download: bool) -> _Raw:
    from torchvision.datasets import MNIST  # imported here: torchvision takes ~1 s to import

    raw_dir = root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw_dir / f).is_file()]
    reason = "download=False"
    if missing and download:
        new_dirs = _missing_dirs(raw_dir)
        try:
            with _download_sources() as sources:
                with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                    MNIST.mirrors = _reachable(sources["mnist"])
                    MNIST(root, train=True, download=True)
        except (RuntimeError, OSError) as e:  # URLError and socket timeouts are OSErrors
            reason = f"download failed: {_one_line(e)[:300].rstrip('.')}"
        missing = [f for f in MNIST_FILES if not (raw_dir / f).is_file()]
        if missing:
            _remove_if_empty(new_dirs)
    if missing:
        raise DataError(f"MNIST not found under {root} (expected {raw_dir / missing[0]}); {reason}. {BRING}")
    check_mnist_files(raw_dir)
    try:
        train, test = MNIST(root, train=True), MNIST(root, train=False)
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"cannot read MNIST from {raw_dir}: {_one_line(e)}") from e
    raw = _Raw(train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long(),
               source=str(raw_dir))
    _check_shapes(raw, "mnist")
    return raw


IDX_UBYTE = 0x08  # the idx format's type code of unsigned bytes, the only type MNIST's files use


def check_mnist_files(raw_dir: Path) -> None:
    """MNIST's idx files checked as an .npz is, before torchvision reads them: magic numbers (unsigned bytes;
    3 dimensions for images, 1 for labels), 28x28 images, sizes that match the header, as many labels as
    images, labels in 0..9. torchvision would read float labels, extra bytes or a short file silently."""
    for split in ("train", "t10k"):
        n_images = _idx_count(raw_dir / f"{split}-images-idx3-ubyte", (28, 28))
        labels_file = raw_dir / f"{split}-labels-idx1-ubyte"
        n_labels = _idx_count(labels_file, ())
        if n_labels != n_images:
            raise DataError(f"{labels_file}: {n_labels} labels for {n_images} images")
        labels = np.fromfile(labels_file, dtype=np.uint8, offset=8)
        if labels.size and labels.max() >= NUM_CLASSES["mnist"]:
            raise DataError(f"{labels_file}: labels must be in [0, 9], found {labels.max()}")


def _idx_count(path: Path, item_shape: tuple[int, ...]) -> int:
    """The item count of an idx file of unsigned bytes whose items have `item_shape`; DataError otherwise."""
    ndim = 1 + len(item_shape)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{path}: too short for an idx header ({size} bytes)")
    zero, kind, dims = int.from_bytes(header[:2], "big"), header[2], header[3]
    if zero != 0 or kind != IDX_UBYTE or dims != ndim:
        raise DataError(f"{path}: bad magic number 0x{header[:4].hex()} (expected 0x0000080{ndim}: unsigned bytes, "
                        f"{ndim} dimension{'s' if ndim > 1 else ''})")
    shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if shape[1:] != item_shape:
        raise DataError(f"{path}: items of shape {shape[1:]}, expected {item_shape}")
    expected = len(header) + int(np.prod(shape, dtype=object))
    if size != expected:
        raise DataError(f"{path}: {size} bytes, but its header {shape} says {expected}")
    return shape[0]


def _load_cifar10(root: Path, download: bool) -> _Raw:
    # The complete torchvision copy beats a subset .npz beside it; a download is the last resort.
    batches = root / "cifar-10-batches-py"
    looked = []
    if batches.is_dir():
        try:
            return _torchvision_cifar10(root, download=False)
        except RuntimeError as e:
            looked.append(f"{batches} (unusable: {_one_line(e)})")
    else:
        looked.append(str(batches))
    found = sorted((root / "cifar10-subset").glob("*.npz")) + sorted(root.glob("cifar10*.npz"))
    if found:
        return read_npz(found[0], "cifar10")
    looked += [str(root / "cifar10-subset" / "*.npz"), str(root / "cifar10*.npz")]
    reason = "download=False"
    if download:
        from torchvision.datasets import CIFAR10

        new_dirs = _missing_dirs(root)
        try:
            with _download_sources() as sources:
                with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                    CIFAR10.url = _reachable(sources["cifar10"])[0]
                    return _torchvision_cifar10(root, download=True)
        except (RuntimeError, OSError) as e:
            reason = f"download failed: {_one_line(e)[:300].rstrip('.')}"
            _remove_if_empty(new_dirs)
    raise DataError(f"CIFAR-10 not found under {root} (looked for {', '.join(looked)}); {reason}. {BRING}")


def _torchvision_cifar10(root: Path, download: bool) -> _Raw:
    from torchvision.datasets import CIFAR10

    train = CIFAR10(root, train=True, download=download)
    test = CIFAR10(root, train=False, download=False)
    to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    raw = _Raw(to_nchw(train.data), torch.tensor(train.targets, dtype=torch.int64),
               to_nchw(test.data), torch.tensor(test.targets, dtype=torch.int64),
               source=str(root / "cifar-10-batches-py"))
    _check_shapes(raw, "cifar10")
    return raw


def _load_tinyimagenet(root: Path) -> _Raw:
    """The official tiny-imagenet-200 folders; val either sorted into class folders or as shipped
    (val/images + val_annotations.txt). Class ids follow the sorted train folder names."""
    base = root / "tiny-imagenet-200"
    train_dir, val_dir = base / "train", base / "val"
    if not (train_dir.is_dir() and val_dir.is_dir()):
        raise DataError(
            f"TinyImageNet not found under {root} (expected {train_dir}/<wnid>/**/*.JPEG and {val_dir}/<wnid>/*.JPEG "
            f"or {val_dir}/images + val_annotations.txt); it is not downloaded automatically: unzip "
            f"tiny-imagenet-200.zip into {root}, or pass data.npz. {HINT}")
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"TinyImageNet: no class folders in {train_dir}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    try:
        train = make_dataset(str(train_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise DataError(f"TinyImageNet: {_one_line(e)}") from e
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file() and (val_dir / "images").is_dir():
        val = _val_from_annotations(annotations, val_dir / "images", class_to_idx)
    else:
        try:
            val = make_dataset(str(val_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        except FileNotFoundError as e:
            raise DataError(f"TinyImageNet: {_one_line(e)}") from e
    if not val:
        raise DataError(f"TinyImageNet: no validation images in {val_dir} (expected {val_dir}/<wnid>/*.JPEG)")
    train_x, train_y = _decode_all(train)
    test_x, test_y = _decode_all(val)
    raw = _Raw(train_x, train_y, test_x, test_y, source=str(base))
    _check_shapes(raw, "tinyimagenet")
    return raw


def _val_from_annotations(annotations: Path, images: Path, class_to_idx: dict) -> list[tuple[str, int]]:
    samples = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in class_to_idx:
            raise DataError(f"{annotations}:{line_no}: class {wnid!r} has no folder in the training set")
        samples.append((str(images / name), class_to_idx[wnid]))
    return samples


def _decode_all(samples: list[tuple[str, int]]) -> tuple[Tensor, Tensor]:
    from PIL import Image  # torchvision's own ImageFolder loader; torchvision.io decoding is deprecated

    images = []
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                images.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot decode image {path}: {_one_line(e)}") from e
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise DataError(f"images differ in size: {sorted(shapes)[:3]} (first: {samples[0][0]})")
    return torch.stack(images), torch.tensor([y for _, y in samples], dtype=torch.int64)


def _check_shapes(raw: _Raw, dataset: str) -> None:
    for name, x in (("train", raw.train_x), ("test", raw.test_x)):
        if tuple(x.shape[1:]) != SHAPES[dataset]:
            raise DataError(f"{raw.source}: {name} images have shape {tuple(x.shape[1:])} (C, H, W); "
                            f"{dataset} expects {SHAPES[dataset]}")


def train_split_size(dataset: str, data_dir: str | Path | None, cfg: DataConfig) -> int:
    """The training images left after the validation split, with no subset: what `data.subset` is a part of
    (a subset fidelity scales the batch by its share: tuner/space/fidelity.py)."""
    if dataset not in SHAPES:
        raise DataError(f"dataset: unknown {dataset!r}; allowed: {', '.join(SHAPES)}")
    root = resolve_data_dir(data_dir)
    if dataset == "tinyimagenet" and not cfg.npz:  # 100,000 image files: count them, do not decode them
        from torchvision.datasets.folder import IMG_EXTENSIONS
        train_dir = root / "tiny-imagenet-200" / "train"
        if not train_dir.is_dir():
            raise DataError(f"TinyImageNet not found under {root} (expected {train_dir}); or pass data.npz")
        n = sum(1 for p in train_dir.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    else:
        n = len(_load_raw(dataset, root, cfg, download=True).train_y)
    return len(split_indices(n, cfg.val_size, 0, 0)[0])
