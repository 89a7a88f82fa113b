"""Datasets as fixed train / validation / test splits.

``val`` is held out of the training data by a seeded, stratified split and is what rewards are computed
on; ``test`` is touched only for final reports. Small datasets (digits, Fashion-MNIST, fake) are decoded
once into in-memory tensors, because per-sample ``__getitem__`` calls would dominate a CPU epoch.

Where files are looked for, in order: the ``root`` argument, the ``PRUNE_ENV_DATA`` environment
variable, then each dataset's usual system location (``/usr/share/datasets/fashion-mnist`` from the
Debian package ``dataset-fashion-mnist``). Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

from prune_env.errors import DatasetError, DatasetNotFoundError, InvalidSettingError, UnknownNameError
from prune_env.names import DATASET_NAMES
from prune_env.splits import Splits, check_fraction, minimum_samples, stratified_split
from prune_env.validation import check_settings

DATA_ENV = "PRUNE_ENV_DATA"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_NAMED_DATASETS = frozenset(
    {"digits", "fashion-mnist", "fashion_mnist", "fashionmnist", "cifar10", "cifar100", "fake"}
)

# Per-channel statistics of the training sets (the usual published values).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _tensor_splits(
    name: str,
    x_trainval: torch.Tensor,
    y_trainval: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    val_fraction: float,
    seed: int,
) -> Splits:
    train_idx, val_idx = stratified_split(y_trainval.numpy(), val_fraction, seed)
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return Splits(
        name=name,
        train=TensorDataset(x_trainval[tr], y_trainval[tr]),
        val=TensorDataset(x_trainval[va], y_trainval[va]),
        test=TensorDataset(x_test, y_test),
        num_classes=num_classes,
        in_channels=x_test.shape[1],
        input_shape=tuple(x_test.shape[1:]),  # type: ignore[arg-type]
        seed=seed,
    )


def _candidate_roots(root: str | os.PathLike[str] | None) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root).expanduser())
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser())
    return roots


def _download_root(root: str | os.PathLike[str] | None) -> Path:
    roots = _candidate_roots(root)
    return roots[0] if roots else Path.home() / ".cache" / "prune_env" / "data"


# ------------------------------------------------------------------------------------------------ digits


def _load_digits(seed: int, val_fraction: float, test_fraction: float = 0.2) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), integer values 0..16
    y = bunch.target.astype(np.int64)
    trainval_idx, test_idx = stratified_split(y, test_fraction, seed)
    # Normalise with the statistics of the non-test part only, so nothing about `test` leaks in.
    mean, std = x[trainval_idx].mean(), x[trainval_idx].std()
    x = torch.from_numpy((x - mean) / std).unsqueeze(1)
    yt = torch.from_numpy(y)
    tv, te = torch.from_numpy(trainval_idx), torch.from_numpy(test_idx)
    return _tensor_splits("digits", x[tv], yt[tv], x[te], yt[te], 10, val_fraction, seed)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST

_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_dir(root: str | os.PathLike[str] | None) -> Path | None:
    """The first directory holding all four IDX files, in plain or torchvision layout, gzipped or not."""
    bases = [*_candidate_roots(root), FASHION_SYSTEM_DIR]
    for base in bases:
        for directory in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
            if all(_find_idx(directory, stem) for stem in _FASHION_FILES.values()):
                return directory
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not, as a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:  # 0x08: unsigned byte
        raise DatasetError(f"{path} is not an unsigned-byte IDX file; reinstall the dataset")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise DatasetError(
            f"{path} is truncated (reinstall the dataset): expected {int(np.prod(shape))} values, found {array.size}"
        )
    return array.reshape(shape)


def _fashion_missing_message(root: str | os.PathLike[str] | None) -> str:
    looked = [str(p) for p in [*_candidate_roots(root), FASHION_SYSTEM_DIR]]
    return (
        "Fashion-MNIST files not found (looked in: " + ", ".join(looked) + "). Get them with one of:\n"
        "  * sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)\n"
        "  * put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and\n"
        f"    t10k-labels-idx1-ubyte.gz in a directory and pass root=DIR or set {DATA_ENV}=DIR\n"
        "  * prune_env.data.load('fashion-mnist', root=DIR, download=True) on a machine with internet access"
    )


def _load_fashion(
    root: str | os.PathLike[str] | None, seed: int, val_fraction: float, download: bool
) -> Splits:
    directory = _fashion_dir(root)
    if directory is None and download:
        from torchvision.datasets import FashionMNIST

        target = _download_root(root)
        FashionMNIST(str(target), train=True, download=True)  # torchvision's layout: target/FashionMNIST/raw
        FashionMNIST(str(target), train=False, download=True)
        directory = _fashion_dir(target)
    if directory is None:
        raise DatasetNotFoundError(_fashion_missing_message(root))
    arrays = {key: read_idx(_find_idx(directory, stem)) for key, stem in _FASHION_FILES.items()}  # type: ignore[arg-type]

    def images(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.astype(np.float32)) / 255.0 - FASHION_MEAN) / FASHION_STD).unsqueeze(1)

    return _tensor_splits(
        "fashion-mnist",
        images(arrays["train_x"]),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        images(arrays["test_x"]),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        10,
        val_fraction,
        seed,
    )


# ------------------------------------------------------------------------------------------------ CIFAR


def _load_cifar(
    name: str, root: str | os.PathLike[str] | None, seed: int, val_fraction: float, download: bool
) -> Splits:
    from torchvision import datasets, transforms

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    mean, std = CIFAR_STATS[name]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *normalize]
    )
    plain = transforms.Compose(normalize)
    found = None
    for base in _candidate_roots(root):
        for directory in (base, base / name):
            try:
                train_aug = cls(str(directory), train=True, transform=augment, download=False)
            except RuntimeError:  # torchvision: "Dataset not found or corrupted"
                continue
            found = directory
            break
        if found is not None:
            break
    if found is None and download:
        found = _download_root(root)
        cls(str(found), train=True, download=True)
        cls(str(found), train=False, download=True)
    if found is None:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DatasetNotFoundError(
            f"{name} not found (looked in: {', '.join(map(str, _candidate_roots(root))) or 'nowhere: no root given'}). "
            f"Get it with one of:\n"
            f"  * prune_env.data.load({name!r}, root=DIR, download=True) on a machine with internet access\n"
            f"  * extract the python version of the archive so that DIR/{folder} exists, then pass root=DIR "
            f"or set {DATA_ENV}=DIR"
        )
    train_aug = cls(str(found), train=True, transform=augment, download=False)
    train_plain = cls(str(found), train=True, transform=plain, download=False)
    test = cls(str(found), train=False, transform=plain, download=False)
    labels = np.asarray(train_plain.targets)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    # Training images are augmented; validation images come from a second, unaugmented view of the same
    # files so that rewards are deterministic.
    return Splits(
        name=name,
        train=Subset(train_aug, train_idx.tolist()),
        val=Subset(train_plain, val_idx.tolist()),
        test=test,
        num_classes=len(train_plain.classes),
        in_channels=3,
        input_shape=(3, 32, 32),
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------ fake


def _load_fake(
    seed: int,
    sizes: Sequence[int] = (256, 64, 64),
    image_shape: tuple[int, int, int] = (3, 16, 16),
    num_classes: int = 10,
) -> Splits:
    """torchvision's FakeData (random images, random labels), materialised: for smoke tests only."""
    from torchvision import datasets, transforms

    def materialise(n: int, offset: int) -> TensorDataset:
        fake = datasets.FakeData(n, image_shape, num_classes, transforms.ToTensor(), random_offset=offset)
        xs, ys = zip(*(fake[i] for i in range(n)), strict=True)
        return TensorDataset(torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64))

    # Disjoint random offsets per split; `seed` shifts all of them.
    base = 1_000_003 * seed
    n_train, n_val, n_test = sizes
    return Splits(
        name="fake",
        train=materialise(n_train, base),
        val=materialise(n_val, base + n_train),
        test=materialise(n_test, base + n_train + n_val),
        num_classes=num_classes,
        in_channels=image_shape[0],
        input_shape=image_shape,
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------ public


def load(
    name: str,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    download: bool = False,
    val_fraction: float | None = None,
    image_size: int = 32,
) -> Splits:
    """Load dataset ``name`` as seeded :class:`Splits`.

    Names: ``"digits"`` (scikit-learn's 8x8 digits, embedded, the default), ``"fashion-mnist"``,
    ``"cifar10"``, ``"cifar100"``, ``"imagefolder:PATH"`` and ``"fake"``. ``val_fraction`` is the part
    of the training data held out as ``val`` (default 0.15 for digits, 0.1 otherwise). ``image_size``
    applies to image folders only. Files are looked for in ``root``, then ``$PRUNE_ENV_DATA``, then the
    dataset's system location; a missing dataset raises :class:`DatasetNotFoundError` saying how to get it.
    """
    if not isinstance(name, str):
        raise InvalidSettingError(
            f"dataset must be a name or a prune_env.data.Splits, got {type(name).__name__}"
        )
    if val_fraction is not None:
        val_fraction = check_fraction("val_fraction", val_fraction)
    image_size = check_settings({"image_size": image_size})["image_size"]
    key = name.strip().lower()
    if key == "digits":
        return _load_digits(seed, 0.15 if val_fraction is None else val_fraction)
    frac = 0.1 if val_fraction is None else val_fraction
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _load_fashion(root, seed, frac, download)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, root, seed, frac, download)
    if key.startswith("imagefolder:"):
        from prune_env.image_folder import load_imagefolder  # imports data: loaded on use

        return load_imagefolder(name.strip()[len("imagefolder:") :], seed, frac, image_size)
    if key == "fake":
        return _load_fake(seed)
    check_dataset_name(name)
    raise AssertionError(f"dataset {name!r} passed the name check but has no loader")


def check_dataset_name(name: str) -> None:
    """Raise :class:`UnknownNameError` listing the known names unless :func:`load` knows ``name`` (whether
    its files are present is checked when it loads)."""
    key = name.strip().lower()
    if key in _NAMED_DATASETS or key.startswith("imagefolder:"):
        return
    raise UnknownNameError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


DataSource = Any
"""What ``dataset=`` accepts: a name, :class:`Splits`, a torch ``Dataset`` or ``DataLoader`` of
``(input, label)`` samples, or a tuple ``(train, test)`` / ``(train, val, test)`` of them."""


def as_splits(dataset: DataSource, seed: int = 0) -> Splits:
    """A :class:`Splits` passes through; a name is loaded with ``seed``; datasets and data loaders (one,
    ``(train, test)`` or ``(train, val, test)``) become splits with :func:`prune_env.user_data.from_datasets`."""
    if isinstance(dataset, Splits):
        return dataset
    if isinstance(dataset, str):
        return load(dataset, seed=seed)
    from prune_env.user_data import from_datasets, is_data  # builds on this module's helpers

    if isinstance(dataset, tuple) and len(dataset) in (2, 3) and all(is_data(d) for d in dataset):
        if len(dataset) == 2:
            return from_datasets(dataset[0], dataset[1], seed=seed)
        return from_datasets(dataset[0], dataset[2], val=dataset[1], seed=seed)
    if is_data(dataset):
        return from_datasets(dataset, None, seed=seed)
    raise InvalidSettingError(
        f"dataset must be a name, a prune_env.data.Splits, a torch Dataset or DataLoader, or a tuple (train, "
        f"test) or (train, val, test) of them; got {type(dataset).__name__}"
    )


__all__ = [
    "DATA_ENV",
    "FASHION_SYSTEM_DIR",
    "DataSource",
    "Splits",
    "as_splits",
    "check_dataset_name",
    "load",
    "minimum_samples",
    "read_idx",
]
