"""Datasets as fixed train / validation / test splits.

``val`` is held out of the training data by a seeded, stratified split and is what rewards are computed
on; ``test`` is touched only for final reports. Small datasets (digits, Fashion-MNIST, fake) are decoded
once into in-memory tensors, because per-sample ``__getitem__`` calls would dominate a CPU epoch.

Where files are looked for, in order: the ``root`` argument, the ``PRUNE_ENV_DATA`` environment
variable, then each dataset's usual system location (``/usr/share/datasets/fashion-mnist`` from the
Debian package ``dataset-fashion-mnist``). Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from prune_env.errors import DatasetError, DatasetNotFoundError, InvalidSettingError, UnknownNameError
from prune_env.validation import as_real, check_settings

DATA_ENV = "PRUNE_ENV_DATA"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAMES = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "fake")

# Per-channel statistics of the training sets (the usual published values).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Splits:
    """A dataset as three disjoint splits plus what a model needs to know about its inputs and outputs.

    ``name`` and ``seed`` identify the splits (they key the base-model cache); ``val`` is held out of
    the training data by a seeded split and is the only split rewards may use.
    """

    name: str
    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    in_channels: int
    input_shape: tuple[int, int, int]
    seed: int = 0

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor:
        """A zero batch of the input shape, for tracing and MACs counting."""
        return torch.zeros(batch_size, *self.input_shape)

    def with_training_subset(self, samples: int | None, seed: int = 0) -> Splits:
        """These splits with ``train`` cut to a fixed, seeded random subset of ``samples`` examples (the
        same subset for every call with the same arguments); ``None`` or at least the whole split: as is."""
        n = len(self.train)  # type: ignore[arg-type]
        if samples is None or samples >= n:
            return self
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
        return dataclasses.replace(self, train=Subset(self.train, idx.tolist()))


# ------------------------------------------------------------------------------------------------ helpers


def check_fraction(name: str, value: Any) -> float:
    """A part of the data held out (``val_fraction``, ``test_fraction``): a number in (0, 1)."""
    result = as_real(name, value)
    if not 0.0 < result < 1.0:
        raise InvalidSettingError(f"{name} must be a fraction in (0, 1), got {value!r}")
    return result


def _held_out(n: int, fraction: float) -> int:
    return math.ceil(fraction * n)  # scikit-learn's count for a float test_size


def _chain_fits(n: int, classes: int, fractions: Sequence[float]) -> bool:
    for fraction in fractions:
        held = _held_out(n, fraction)
        if held < classes or n - held < classes:
            return False
        n -= held
    return True


def minimum_samples(classes: int, fractions: Sequence[float]) -> int:
    """The fewest samples that stratified hold-outs of ``fractions`` (each taken from what the previous one
    kept) can split with a place for every class on both sides of every split."""
    high = max(classes, 1)
    while not _chain_fits(high, classes, fractions):
        high *= 2
    low = high // 2
    while low + 1 < high:  # invariant: high fits, low does not (or is below any size that could)
        mid = (low + high) // 2
        low, high = (low, mid) if _chain_fits(mid, classes, fractions) else (mid, high)
    return high


def check_split_sizes(
    labels: np.ndarray,
    fractions: Sequence[float],
    what: str,
    class_names: Sequence[str] | None = None,
    remedy: str = "add samples or give the validation and test data yourself",
) -> None:
    """Refuse, before any splitting, data that the stratified hold-outs ``fractions`` cannot split: a class
    with fewer samples than there are splits, or fewer samples than :func:`minimum_samples`. ``what`` names
    the data in the message, ``class_names`` the classes (else their labels do), ``remedy`` the fix."""
    if not fractions:
        return
    classes, counts = np.unique(labels, return_counts=True)
    needed = minimum_samples(len(classes), fractions)
    per_class = len(fractions) + 1
    plan = ", then ".join(f"{f:.0%}" for f in fractions) + (" of the rest" if len(fractions) > 1 else "")
    rule = (
        f"the stratified split (holding out {plan}) needs at least {per_class} samples per class "
        f"and {needed} in all for {len(classes)} classes"
    )
    few = np.flatnonzero(counts < per_class)
    if few.size:
        label = classes[few[0]]
        name = repr(class_names[int(label)]) if class_names is not None else str(label)
        raise DatasetError(
            f"{what}: class {name} has {counts[few[0]]} sample(s); {rule}: {remedy}, or remove the class"
        )
    if len(labels) < needed:
        raise DatasetError(
            f"{what}: {len(labels)} samples are too few; {rule} (about {math.ceil(needed / len(classes))} per "
            f"class): {remedy}"
        )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) positions into ``labels``: ``fraction`` held out, class proportions preserved.

    Data that cannot be split so raises :class:`DatasetError` (:func:`check_split_sizes` says why earlier
    and with the numbers needed; this is the last word for class proportions it cannot foresee)."""
    idx = np.arange(len(labels)) if indices is None else indices
    from sklearn.model_selection import train_test_split  # scikit-learn loads in ~0.6 s: only when used

    try:
        kept, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=labels[idx])
    except ValueError as exc:
        raise DatasetError(
            f"{len(idx)} samples cannot be split holding out {fraction:.0%} with every class on both sides "
            f"({exc}); add samples of the smallest classes"
        ) from None
    return np.sort(kept), np.sort(held)


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


# ------------------------------------------------------------------------------------------------ ImageFolder


def _unreadable(path: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"imagefolder: {path} is not a readable image ({exc}); replace or remove it")


def read_image(path: str) -> Any:
    """torchvision's image loader (RGB), with a file that fails to decode named in a :class:`DatasetError`:
    files are checked before loading as far as that is cheap, the pixels only here, while loading."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise _unreadable(path, exc) from None


def _check_image_file(path: str) -> None:
    """The file is an image of at least one pixel, intact as far as PIL's ``verify`` sees without decoding
    (a PNG's chunks and checksums; a JPEG's header only): a tenth of a decode's cost."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None
    if width < 1 or height < 1:
        raise DatasetError(f"imagefolder: {path} is {width}x{height} pixels; replace or remove it")


def _image_folder(directory: Path, transform: Any) -> Any:
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(directory), transform=transform, loader=read_image, allow_empty=True)
    except FileNotFoundError:  # torchvision: no class folder at all
        raise DatasetError(
            f"imagefolder: {directory} has no class folders; expected {directory}/CLASS/*.jpg (or *.png)"
        ) from None


def _checked_image_folder(directory: Path, transform: Any) -> Any:
    """An ImageFolder whose every class folder holds images and whose every image header is readable."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = _image_folder(directory, transform)
    counts = np.bincount(np.asarray(folder.targets, dtype=np.int64), minlength=len(folder.classes))
    for name, count in zip(folder.classes, counts, strict=True):
        if count == 0:
            raise DatasetError(
                f"imagefolder: class folder {directory / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
    for path, _ in folder.samples:
        _check_image_file(path)
    return folder


def _load_imagefolder(path: str, seed: int, val_fraction: float, image_size: int) -> Splits:
    """Every image is resized (shorter side) and centre-cropped to ``image_size`` and converted to RGB, so
    images of any size and mode become inputs of one shape, (3, image_size, image_size), the shape the
    costs are computed for."""
    from torchvision import transforms

    base = Path(path).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder: {base} is not a directory. Expected DIR/CLASS/*.jpg (or *.png), optionally split as "
            f"DIR/train/CLASS/... and DIR/test/CLASS/... (or DIR/val/CLASS/...)"
        )
    mean, std = IMAGENET_STATS
    resize = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    plain = transforms.Compose([*resize, *normalize])
    augment = transforms.Compose([*resize, transforms.RandomHorizontalFlip(), *normalize])
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if (base / "train").is_dir() and test_dir is not None:
        train_plain = _checked_image_folder(base / "train", plain)
        test_folder = _checked_image_folder(test_dir, plain)
        if test_folder.classes != train_plain.classes:
            raise DatasetError(
                f"imagefolder: {test_dir} has the classes {test_folder.classes} but {base / 'train'} has "
                f"{train_plain.classes}; labels follow the sorted folder names, so give both the same class folders"
            )
        test: Dataset[Any] = test_folder
        train_aug = _image_folder(base / "train", augment)
        labels = np.asarray(train_plain.targets)
        check_split_sizes(
            labels, [val_fraction], f"imagefolder {base / 'train'}", train_plain.classes, "add images"
        )
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    else:
        # One folder of classes: carve test out first (20%), then val from the rest, both seeded.
        train_plain = _checked_image_folder(base, plain)
        train_aug = _image_folder(base, augment)
        labels = np.asarray(train_plain.targets)
        check_split_sizes(
            labels, [0.2, val_fraction], f"imagefolder {base}", train_plain.classes,
            "add images, or give a test split of your own as DIR/train/CLASS/... and DIR/test/CLASS/...",
        )  # fmt: skip
        trainval_idx, test_idx = stratified_split(labels, 0.2, seed)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed, indices=trainval_idx)
        test = Subset(train_plain, test_idx.tolist())
    return Splits(
        name=f"imagefolder:{base.resolve()}",
        train=Subset(train_aug, train_idx.tolist()),
        val=Subset(train_plain, val_idx.tolist()),
        test=test,
        num_classes=len(train_plain.classes),
        in_channels=3,
        input_shape=(3, image_size, image_size),
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
        return _load_imagefolder(name.strip()[len("imagefolder:") :], seed, frac, image_size)
    if key == "fake":
        return _load_fake(seed)
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


# ------------------------------------------------------------------------------------------------ model and data


def _layer_mismatch(name: str, layer: torch.nn.Module, shape: torch.Size) -> str | None:
    if isinstance(layer, torch.nn.modules.conv._ConvNd) and len(shape) >= 2 and shape[1] != layer.in_channels:
        return f"the model's layer {name!r} takes {layer.in_channels} input channels but receives {shape[1]}"
    if isinstance(layer, torch.nn.Linear) and len(shape) >= 1 and shape[-1] != layer.in_features:
        return f"the model's layer {name!r} takes {layer.in_features} input features but receives {shape[-1]}"
    return None


def model_output(
    model: torch.nn.Module, x: torch.Tensor, on_mismatch: Callable[[str], Exception]
) -> torch.Tensor:
    """``model(x)``. When a convolution or linear layer cannot take what reaches it, the exception
    ``on_mismatch`` makes of a sentence naming the layer, what it takes and what it receives is raised instead
    of torch's shape error (which stays attached as the cause); any other failure propagates as it is."""
    entered: list[tuple[str, torch.nn.Module, torch.Size]] = []

    def recorder(name: str) -> Callable[..., None]:
        def record(layer: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                entered.append((name, layer, args[0].shape))

        return record

    handles = [
        layer.register_forward_pre_hook(recorder(name))
        for name, layer in model.named_modules()
        if isinstance(layer, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
    ]
    try:
        return model(x)
    except RuntimeError as exc:
        problem = _layer_mismatch(*entered[-1]) if entered else None
        if problem is None:
            raise
        raise on_mismatch(problem) from exc
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ batching


def in_memory_tensors(dataset: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, labels) when ``dataset`` is an in-memory TensorDataset (or a Subset of one), else None."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = in_memory_tensors(dataset.dataset)
        if inner is not None:
            idx = torch.as_tensor(dataset.indices, dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


def iterate_batches(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches; in-memory tensors are sliced directly (much faster than a DataLoader)."""
    tensors = in_memory_tensors(dataset)
    if tensors is None:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
        )
        yield from loader
        return
    x, y = tensors
    n = len(y)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    end = n - n % batch_size if drop_last else n
    for start in range(0, end, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def take(dataset: Dataset[Any], indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples at ``indices`` stacked into (inputs, labels) tensors."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    tensors = in_memory_tensors(dataset)
    if tensors is not None:
        return tensors[0][idx], tensors[1][idx]
    xs, ys = zip(*(dataset[int(i)] for i in idx), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
