"""A dataset as three disjoint splits (:class:`Splits`), and the seeded, stratified hold-outs that make
them, checked before any splitting (every source of data builds on these: the named datasets in
:mod:`prune_env.data`, image folders, the user's own datasets)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from prune_env.errors import DatasetError, InvalidSettingError
from prune_env.validation import as_real

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


def required_splits(splits: Splits | None, reader: str) -> Splits:
    """``splits``, or :class:`InvalidSettingError` naming ``reader`` (what asked for the data) when a problem
    was built without a dataset (``dataset=None``: a trained model scored by the user's own metric)."""
    if splits is None:
        raise InvalidSettingError(
            f"{reader} reads the dataset, and the problem was built without a dataset (dataset=None): pass "
            "dataset= (a name or a Splits), or score with your own metric (proxy=MetricProxy(...))"
        )
    return splits


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


__all__ = [
    "IMAGENET_STATS",
    "Splits",
    "check_fraction",
    "check_split_sizes",
    "minimum_samples",
    "required_splits",
    "stratified_split",
]
