"""Image folders (``imagefolder:PATH``) as splits: ``DIR/CLASS/*.jpg``, or ``DIR/train`` with ``DIR/test``
(or ``DIR/val``). Every class folder and every image header is checked before anything trains, so a bad
file is named in one :class:`~prune_env.errors.DatasetError` line instead of failing an epoch later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from prune_env.errors import DatasetError, DatasetNotFoundError
from prune_env.splits import IMAGENET_STATS, Splits, check_split_sizes, stratified_split


def _unreadable(path: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"imagefolder: {path} is not a readable image ({exc}); replace or remove it")


def read_image(path: str) -> Any:
    """torchvision's image loader (RGB), with a file that fails to decode named in a :class:`DatasetError`:
    files are checked before loading as far as that is cheap, the pixels only here, while loading."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, ImportError, Image.DecompressionBombError) as exc:  # see _check_image_file
        raise _unreadable(path, exc) from None


def _check_image_file(path: str) -> None:
    """The file is an image of at least one pixel, intact as far as PIL's ``verify`` sees without decoding
    (a PNG's chunks and checksums; a JPEG's header only): a tenth of a decode's cost."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except (OSError, ValueError, ImportError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError is an OSError. ImportError: another library may patch Image.open
        # process-wide to load a plugin for a file PIL cannot identify (Ultralytics imports pi_heif then);
        # a missing plugin still means this file is unreadable.
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


def load_imagefolder(path: str, seed: int, val_fraction: float, image_size: int) -> Splits:
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
