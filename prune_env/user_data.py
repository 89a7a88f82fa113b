"""Your own data as :class:`~prune_env.data.Splits`: torch Datasets or DataLoaders of ``(input, label)``
samples, with a stratified, seeded validation split carved out of the training data when none is given."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from prune_env.data import Splits, in_memory_tensors, stratified_split
from prune_env.errors import InvalidSettingError


def is_data(obj: Any) -> bool:
    return isinstance(obj, (Dataset, DataLoader))


def _dataset_of(data: Dataset[Any] | DataLoader[Any], role: str) -> Dataset[Any]:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise InvalidSettingError(f"the {role} data must be a torch Dataset with a length (map-style)")
    if len(dataset) == 0:
        raise InvalidSettingError(f"the {role} data is empty")
    return dataset


def dataset_labels(dataset: Dataset[Any]) -> np.ndarray:
    """Every sample's integer label (in-memory tensors and ``.targets`` are read directly)."""
    tensors = in_memory_tensors(dataset)
    if tensors is not None:
        return tensors[1].numpy().astype(np.int64)
    if isinstance(dataset, Subset) and hasattr(dataset.dataset, "targets"):
        return np.asarray(dataset.dataset.targets, dtype=np.int64)[np.asarray(dataset.indices)]
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def from_datasets(
    train: Dataset[Any] | DataLoader[Any],
    test: Dataset[Any] | DataLoader[Any] | None,
    *,
    val: Dataset[Any] | DataLoader[Any] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    num_classes: int | None = None,
    name: str | None = None,
) -> Splits:
    """:class:`Splits` from your own data: map-style ``Dataset`` objects (or ``DataLoader`` objects, whose
    datasets are used — batching is the library's) of ``(input tensor, integer label)`` samples.

    Without ``val``, a stratified, seeded ``val_fraction`` of ``train`` is held out as the validation split
    (the only data a search scores policies on); without ``test`` either, a stratified ``test_fraction`` of
    the data is held out first. ``num_classes`` defaults to the largest label + 1; ``name`` (default
    ``"custom:<type of the training dataset>"``) labels the data — the base-model cache also keys on a hash
    of validation samples, so different data never share a cached model.
    """
    for fraction, label in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if not (isinstance(fraction, float | int) and 0 < fraction < 1):
            raise InvalidSettingError(f"{label} must be a fraction in (0, 1), got {fraction!r}")
    full = _dataset_of(train, "training")
    labels = dataset_labels(full)
    if test is None:
        keep, held = stratified_split(labels, test_fraction, seed)
        test_set: Dataset[Any] = Subset(full, held.tolist())
        train_idx: np.ndarray | None = keep
    else:
        test_set = _dataset_of(test, "test")
        train_idx = None
    if val is None:
        kept, held_val = stratified_split(labels, val_fraction, seed, indices=train_idx)
        train_set: Dataset[Any] = Subset(full, kept.tolist())
        val_set: Dataset[Any] = Subset(full, held_val.tolist())
    else:
        train_set = full if train_idx is None else Subset(full, train_idx.tolist())
        val_set = _dataset_of(val, "validation")
    sample = full[0][0]
    if not isinstance(sample, torch.Tensor):
        raise InvalidSettingError(
            f"samples must be (input tensor, label) pairs; the first input is a {type(sample).__name__} (add a "
            "transform such as torchvision.transforms.ToTensor())"
        )
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if classes < 2 or labels.min() < 0 or labels.max() >= classes:
        raise InvalidSettingError(
            f"labels must be integers in 0..num_classes-1 with at least two classes; got {labels.min()}.."
            f"{labels.max()} for num_classes={classes}"
        )
    shape = tuple(int(d) for d in sample.shape)
    return Splits(
        name=name or f"custom:{type(full).__name__}",
        train=train_set,
        val=val_set,
        test=test_set,
        num_classes=classes,
        in_channels=shape[0],
        input_shape=shape,  # type: ignore[arg-type]
        seed=seed,
    )
