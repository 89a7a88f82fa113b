"""Your own data as :class:`~prune_env.data.Splits`: torch Datasets or DataLoaders of ``(input, label)``
samples, with a stratified, seeded validation split carved out of the training data when none is given.

Every split is checked before any training, each sample read at most once, with a
:class:`~prune_env.errors.DatasetError` naming the split, the sample and the fix:

* data held in memory (a ``TensorDataset`` of inputs and labels, or a ``Subset`` of one) is checked whole:
  floating-point inputs of one shape, without NaN or inf, one integer label per sample;
* a dataset read sample by sample has every sample checked as its label is read (the labels are needed
  anyway, for the stratified split and the number of classes): an ``(input tensor, label)`` pair, one
  input shape, finite inputs, an integer label;
* a dataset with a ``targets`` list (torchvision's) has its labels checked from the list and only its first
  sample read, since decoding every image would cost as much as an epoch; every later sample is checked
  when it is read (an ``(input tensor, label)`` pair, the first sample's input shape, finite inputs), so a
  sample of another shape is refused by index before a batch of it reaches ``torch.stack``;
* across splits: one input shape (the costs are computed for it), labels in ``0..num_classes-1``, and
  enough samples per class for the stratified splits (:func:`prune_env.data.check_split_sizes`).

Float labels are refused even when they hold whole numbers: cross-entropy reads a float target as class
probabilities, so accepting them would mean converting the user's data silently; ``labels.long()`` is the
one-word fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from prune_env.batches import in_memory_tensors
from prune_env.errors import DatasetError, InvalidSettingError
from prune_env.splits import Splits, check_fraction, check_split_sizes, stratified_split
from prune_env.validation import as_int


def is_data(obj: Any) -> bool:
    return isinstance(obj, (Dataset, DataLoader))


def _dataset_of(data: Dataset[Any] | DataLoader[Any], role: str) -> Dataset[Any]:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise InvalidSettingError(f"the {role} data must be a torch Dataset with a length (map-style)")
    if len(dataset) == 0:
        raise InvalidSettingError(f"the {role} data is empty")
    return dataset


# ------------------------------------------------------------------------------------------------ labels


def _label_problem(role: str, index: int, value: Any) -> DatasetError:
    if isinstance(value, (float, np.floating)) and not (np.isfinite(value) and float(value).is_integer()):
        return DatasetError(
            f"the {role} data's sample {index} has the label {value!r}; labels are integer class indices "
            "0..num_classes-1 (soft or regression targets are not supported)"
        )
    if isinstance(value, (float, np.floating)):
        return DatasetError(
            f"the {role} labels are floating-point numbers (sample {index}: {value!r}); class indices must be "
            "integers: convert them (labels.long(), or int(label) in __getitem__)"
        )
    if isinstance(value, (bool, np.bool_)):
        return DatasetError(
            f"the {role} labels are booleans (sample {index}: {value!r}); give integer class indices (labels.long())"
        )
    if isinstance(value, (int, np.integer)):
        return DatasetError(
            f"the {role} data's sample {index} has the label {value}; labels are class indices "
            "0..num_classes-1, never negative"
        )
    return DatasetError(
        f"the {role} data's sample {index} has a label of type {type(value).__name__} ({value!r:.60}); labels "
        "are integer class indices 0..num_classes-1 (map class names to indices)"
    )


def _label_shape_problem(role: str, shape: tuple[int, ...]) -> DatasetError:
    hint = (
        "one-hot or probability vectors? give class indices (labels.argmax(dim=1))"
        if len(shape) == 1 and shape[0] > 1
        else "give one class index per sample (a 1-D tensor of integers)"
    )
    return DatasetError(f"the {role} labels have the shape {shape} per sample: {hint}")


def _class_indices(labels: np.ndarray, role: str) -> np.ndarray:
    """``labels`` (one per sample) as int64 class indices, refused unless they are non-negative integers."""
    if labels.ndim != 1:
        raise _label_shape_problem(role, tuple(labels.shape[1:]))
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
            index = int(bad[0]) if bad.size else 0
        else:
            index = next((i for i, v in enumerate(labels) if not isinstance(v, (int, np.integer))), 0)
        raise _label_problem(role, index, labels[index].item() if labels.dtype.kind != "O" else labels[index])
    if labels.size and labels.min() < 0:
        index = int(np.argmin(labels))
        raise _label_problem(role, index, int(labels[index]))
    return labels.astype(np.int64)


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.double() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


# ------------------------------------------------------------------------------------------------ inputs


def _pair(sample: Any, role: str, index: int) -> tuple[Any, Any]:
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        kind = f"a {len(sample)}-tuple" if isinstance(sample, (tuple, list)) else f"a {type(sample).__name__}"
        raise DatasetError(
            f"the {role} data's sample {index} is {kind}; samples must be (input tensor, integer label) pairs "
            "(return them from __getitem__)"
        )
    return sample[0], sample[1]


def _input_shape(x: Any, role: str, index: int) -> tuple[int, ...]:
    """The shape of one sample's input, refused unless it is a floating-point tensor of at least one dim."""
    if not isinstance(x, torch.Tensor):
        raise DatasetError(
            f"samples must be (input tensor, label) pairs; the {role} data's sample {index} has an input of type "
            f"{type(x).__name__} (add a transform such as torchvision.transforms.ToTensor())"
        )
    if not x.is_floating_point():
        raise DatasetError(
            f"the {role} inputs are {x.dtype}; models take floating-point inputs: convert them (x.float(), or "
            "torchvision.transforms.ToTensor() for images)"
        )
    if x.ndim == 0:
        raise DatasetError(
            f"the {role} data's sample {index} has a scalar input; inputs need a channel dimension, e.g. (C, H, W)"
        )
    return tuple(int(d) for d in x.shape)


def _nonfinite(role: str, index: int) -> DatasetError:
    return DatasetError(
        f"the {role} data has NaN or inf in the input of sample {index}; clean or drop that sample"
    )


def _mixed_shapes(role: str, index: int, shape: tuple[int, ...], first: tuple[int, ...]) -> DatasetError:
    return DatasetError(
        f"the {role} data's sample {index} has the input shape {shape} but sample 0 has {first}; every input "
        "must have one shape (resize them, e.g. transforms.Resize(S) and transforms.CenterCrop(S))"
    )


# ------------------------------------------------------------------------------------------------ one split


def _targets(dataset: Dataset[Any]) -> Any | None:
    if isinstance(dataset, Subset) and hasattr(dataset.dataset, "targets"):
        return _as_array(dataset.dataset.targets)[np.asarray(dataset.indices, dtype=np.int64)]
    return getattr(dataset, "targets", None)


def _in_memory(x: torch.Tensor, y: torch.Tensor, role: str) -> tuple[np.ndarray, tuple[int, ...]]:
    if x.ndim < 2 or len(x) != len(y):
        raise DatasetError(
            f"the {role} data holds {len(x)} inputs of shape {tuple(x.shape[1:])} and {len(y)} labels; give one "
            "input tensor of at least one dim and one label per sample"
        )
    shape = _input_shape(x[0], role, 0)
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if not bool(finite.all()):
        raise _nonfinite(role, int(torch.nonzero(~finite)[0, 0]))
    return _class_indices(_as_array(y), role), shape


def _read_each(dataset: Dataset[Any], role: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Every sample read once: its label kept, its input checked."""
    first: tuple[int, ...] | None = None
    labels: list[Any] = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        x, label = _pair(dataset[index], role, index)
        shape = _input_shape(x, role, index)
        if first is None:
            first = shape
        elif shape != first:
            raise _mixed_shapes(role, index, shape, first)
        if not bool(torch.isfinite(x).all()):
            raise _nonfinite(role, index)
        value = _as_array(label)
        if value.ndim != 0:
            raise _label_shape_problem(role, tuple(value.shape))
        labels.append(value.item())  # a Python number (or whatever else the label is, refused below)
    assert first is not None  # the dataset is not empty (checked by _dataset_of)
    numbers = all(isinstance(v, (int, float)) for v in labels)
    return _class_indices(np.array(labels) if numbers else np.array(labels, dtype=object), role), first


class CheckedOnRead(Dataset[Any]):
    """A dataset whose samples are checked as they are read, against the input shape of its first sample;
    other attributes (``targets``, ``classes``) are the wrapped dataset's. For datasets too costly to read
    whole up front: the check costs one comparison per sample, the read is the dataset's own."""

    def __init__(self, dataset: Dataset[Any], role: str, shape: tuple[int, ...]) -> None:
        self.dataset, self.role, self.shape = dataset, role, shape

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        x, _ = _pair(sample, self.role, index)
        shape = _input_shape(x, self.role, index)
        if shape != self.shape:
            raise _mixed_shapes(self.role, index, shape, self.shape)
        if not bool(torch.isfinite(x).all()):
            raise _nonfinite(self.role, index)
        return sample

    def __getattr__(self, name: str) -> Any:
        # Only called for what the wrapper lacks; "dataset" itself is missing while unpickling.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _checked_on_read(dataset: Dataset[Any], role: str, shape: tuple[int, ...]) -> Dataset[Any]:
    """``dataset`` itself when :func:`_inspect` read all of it, else checked sample by sample as read."""
    if in_memory_tensors(dataset) is not None or _targets(dataset) is None:
        return dataset
    return CheckedOnRead(dataset, role, shape)


def _inspect(dataset: Dataset[Any], role: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(every sample's class index, the input shape) of one split, checked as the module says."""
    tensors = in_memory_tensors(dataset)
    if tensors is not None:
        return _in_memory(*tensors, role)
    targets = _targets(dataset)
    if targets is None:
        return _read_each(dataset, role)
    x, _ = _pair(dataset[0], role, 0)
    shape = _input_shape(x, role, 0)
    if not bool(torch.isfinite(x).all()):
        raise _nonfinite(role, 0)
    return _class_indices(_as_array(targets), role), shape


def dataset_labels(dataset: Dataset[Any]) -> np.ndarray:
    """Every sample's integer label (in-memory tensors and ``.targets`` are read directly), checked."""
    return _inspect(dataset, "given")[0]


# ------------------------------------------------------------------------------------------------ splits


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
    of validation samples, so different data never share a cached model. What is checked, before any
    training, is listed in this module's documentation.
    """
    val_fraction = check_fraction("val_fraction", val_fraction)
    test_fraction = check_fraction("test_fraction", test_fraction)
    full = _dataset_of(train, "training")
    given: list[tuple[str, Dataset[Any]]] = [("training", full)]
    if test is not None:
        given.append(("test", _dataset_of(test, "test")))
    if val is not None:
        given.append(("validation", _dataset_of(val, "validation")))
    inspected = {role: _inspect(dataset, role) for role, dataset in given}
    labels, shape = inspected["training"]
    for role, (_, other) in inspected.items():
        if other != shape:
            raise DatasetError(
                f"the {role} inputs have the shape {other} but the training inputs have {shape}; every split "
                f"must have one input shape (the model's costs are computed for it): resize the {role} data"
            )
    classes = _number_of_classes(inspected, num_classes)
    name = name or f"custom:{type(full).__name__}"
    given = [(role, _checked_on_read(dataset, role, inspected[role][1])) for role, dataset in given]
    full = given[0][1]
    fractions = [f for f, given_split in ((test_fraction, test), (val_fraction, val)) if given_split is None]
    check_split_sizes(labels, fractions, "the training data")
    if test is None:
        keep, held = stratified_split(labels, test_fraction, seed)
        test_set: Dataset[Any] = Subset(full, held.tolist())
        train_idx: np.ndarray | None = keep
    else:
        test_set = dict(given)["test"]
        train_idx = None
    if val is None:
        kept, held_val = stratified_split(labels, val_fraction, seed, indices=train_idx)
        train_set: Dataset[Any] = Subset(full, kept.tolist())
        val_set: Dataset[Any] = Subset(full, held_val.tolist())
    else:
        train_set = full if train_idx is None else Subset(full, train_idx.tolist())
        val_set = dict(given)["validation"]
    return Splits(
        name=name,
        train=train_set,
        val=val_set,
        test=test_set,
        num_classes=classes,
        in_channels=shape[0],
        input_shape=shape,  # type: ignore[arg-type]
        seed=seed,
    )


def _number_of_classes(inspected: Mapping[str, tuple[np.ndarray, Sequence[int]]], num_classes: Any) -> int:
    """``num_classes``, or the largest label + 1; every split's labels must lie below it."""
    largest = max(int(labels.max()) for labels, _ in inspected.values())
    classes = largest + 1 if num_classes is None else as_int("num_classes", num_classes)
    if classes < 2:
        raise InvalidSettingError(
            f"labels must be integers in 0..num_classes-1 with at least two classes; got labels up to {largest} "
            f"for num_classes={classes}"
        )
    trained = np.unique(inspected["training"][0])
    for role, (labels, _) in inspected.items():
        index = int(np.argmax(labels))
        if labels[index] >= classes:
            raise DatasetError(
                f"the {role} data's sample {index} has the label {labels[index]}, but num_classes={classes}; "
                f"labels must lie in 0..{classes - 1} (pass num_classes= the number of classes)"
            )
        unseen = np.flatnonzero(~np.isin(labels, trained))
        if unseen.size:
            # A class the model never trains on makes its scores meaningless; most often the splits'
            # labels were encoded differently.
            raise DatasetError(
                f"the {role} data's sample {unseen[0]} has the label {labels[unseen[0]]}, which no training "
                "sample has; give every split the same classes, encoded the same way"
            )
    return classes
