"""Your own data: torch Datasets and DataLoaders accepted wherever a dataset name is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import prune_env
from agents import search
from prune_env.app import benchmark
from prune_env.data import Splits, as_splits
from prune_env.user_data import dataset_labels, from_datasets

SMALL_DATA_SCORING = {"eval_samples": 60, "bn_recalib_batches": 1, "progress": False}


class Samples(Dataset):
    """A plain map-style dataset (not a TensorDataset): labels are read sample by sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def user_data(digits: Splits) -> tuple[Samples, Samples]:
    train_x, train_y = digits.train.tensors  # type: ignore[attr-defined]
    test_x, test_y = digits.test.tensors  # type: ignore[attr-defined]
    return Samples(train_x, train_y), Samples(test_x, test_y)


def test_a_validation_split_is_carved_stratified_and_seeded(digits: Splits) -> None:
    train, test = user_data(digits)
    splits = from_datasets(train, test, seed=3)
    again = as_splits((train, test), seed=3)
    other = from_datasets(train, test, seed=4)
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8) and splits.test is test
    train_idx, val_idx = set(splits.train.indices), set(splits.val.indices)  # type: ignore[attr-defined]
    assert not train_idx & val_idx and len(train_idx | val_idx) == len(train)
    assert len(val_idx) == pytest.approx(0.1 * len(train), abs=1)
    assert val_idx == set(again.val.indices) != set(other.val.indices)  # type: ignore[attr-defined]
    # Stratified: every class keeps its share in the validation split.
    labels = dataset_labels(train)
    share = np.bincount(labels[sorted(val_idx)], minlength=10) / len(val_idx)
    assert np.abs(share - np.bincount(labels, minlength=10) / len(labels)).max() < 0.03


def test_one_dataset_is_split_three_ways_and_loaders_give_their_datasets(digits: Splits) -> None:
    train, test = user_data(digits)
    whole = as_splits(train, seed=0)
    parts = [set(whole.train.indices), set(whole.val.indices), set(whole.test.indices)]  # type: ignore[attr-defined]
    assert sum(len(p) for p in parts) == len(train) and not (parts[0] & parts[1] or parts[0] & parts[2])
    loaders = as_splits((DataLoader(train, batch_size=7), DataLoader(train), DataLoader(test)), seed=0)
    assert loaders.train is train and loaders.val is train and loaders.test is test


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (123, "dataset must be a name, a prune_env.data.Splits, a torch Dataset"),
        ((Samples(torch.zeros(0, 1, 2, 2), torch.zeros(0)), None), "dataset must be"),
        (Samples(torch.zeros(0, 1, 2, 2), torch.zeros(0)), "the training data is empty"),
        (Samples(torch.zeros(6, 1, 2, 2), torch.zeros(6)), "at least two classes"),
    ],
)
def test_bad_data_is_refused_with_the_fix(dataset: Any, message: str) -> None:
    with pytest.raises(prune_env.InvalidSettingError, match=message):
        as_splits(dataset)


def test_user_data_through_env_search_and_benchmark(
    digits_base: tuple[nn.Module, dict[str, float]], digits: Splits, tmp_path: Path
) -> None:
    model = digits_base[0]
    train, test = user_data(digits)
    loaders = (DataLoader(train, batch_size=32), DataLoader(test, batch_size=32))
    env = prune_env.OneShotPruneEnv(model=model, dataset=loaders, **SMALL_DATA_SCORING)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(env.action_space.sample())
    assert terminated and 0.0 <= info["accuracy"] <= 1.0 and info["macs_ratio"] <= 0.5 + 1e-9
    assert env.problem.splits.name == "custom:Samples"

    problem = prune_env.PruningProblem(model, (train, test), **SMALL_DATA_SCORING)
    result = search("random", problem, 2, seed=0)
    assert len(result.history) == 2

    res = benchmark.run(
        ["uniform"], models={"resnet20": model}, datasets={"mine": (train, test)}, evals=1,
        out=tmp_path / "bench", problem_kwargs=SMALL_DATA_SCORING,
    )  # fmt: skip
    assert [run["dataset"] for run in res.runs] == ["mine"]
