from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import prune_env
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError
from prune_env.train import checkpoint_path, evaluate, finetune, train_base

ONE_EPOCH = {"epochs": 1, "progress": False}  # a tiny model for one epoch: tests of caching, not of accuracy


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_resnet20_reaches_95_percent_quickly(digits_base: tuple[nn.Module, dict]) -> None:
    model, metrics = digits_base
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["val_accuracy"] >= 0.93
    assert not model.training


def test_cache_hit_gives_identical_numbers(digits: Splits, digits_base, shared_cache: Path) -> None:
    first_model, first = digits_base
    # A hit is the cached flag and the same weights and numbers; how long it takes is a benchmark's question.
    model, metrics = train_base("resnet20", digits, cache=shared_cache, progress=False)
    assert metrics["cached"] == 1.0
    assert {k: v for k, v in metrics.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"
    }
    assert _states_equal(model, first_model)
    assert evaluate(model, digits.test)["accuracy"] == metrics["test_accuracy"]


def test_truncated_or_corrupt_checkpoint_is_rebuilt(digits: Splits, tmp_path: Path) -> None:
    model, metrics = train_base("tiny", digits, cache=tmp_path, **ONE_EPOCH)
    path = checkpoint_path("tiny", digits, cache=tmp_path, epochs=1)
    assert path.is_file()
    assert metrics["cached"] == 0.0
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # a partial write, e.g. a killed process without atomic rename
    with pytest.warns(UserWarning, match="unusable cached checkpoint"):
        rebuilt, rebuilt_metrics = train_base("tiny", digits, cache=tmp_path, **ONE_EPOCH)
    assert rebuilt_metrics["cached"] == 0.0
    assert _states_equal(rebuilt, model)  # training is deterministic for a seed

    corrupt = bytearray(path.read_bytes())
    middle = len(corrupt) // 2
    corrupt[middle : middle + 64] = bytes(64)  # flipped bytes inside the tensor data
    path.write_bytes(bytes(corrupt))
    with pytest.warns(UserWarning, match="unusable cached checkpoint"):
        _, again = train_base("tiny", digits, cache=tmp_path, **ONE_EPOCH)
    assert again["cached"] == 0.0

    _, hit = train_base("tiny", digits, cache=tmp_path, **ONE_EPOCH)  # the rebuilt file is good
    assert hit["cached"] == 1.0


def test_cache_key_covers_what_determines_the_weights(digits: Splits, tmp_path: Path) -> None:
    base = checkpoint_path("tiny", digits, cache=tmp_path, epochs=1)
    assert base == checkpoint_path("tiny", digits, cache=tmp_path, epochs=1)
    assert base != checkpoint_path("tiny", digits, cache=tmp_path, epochs=2)
    assert base != checkpoint_path("tiny", digits, cache=tmp_path, epochs=1, lr=0.05)
    assert base != checkpoint_path("tiny", digits, seed=1, cache=tmp_path, epochs=1)
    assert base != checkpoint_path("resnet20", digits, cache=tmp_path, epochs=1)
    assert base.parent.parent == tmp_path


def test_train_base_never_modifies_the_given_module(digits: Splits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mine = prune_env.models.get_model("tiny", 10, 1)
    before = copy.deepcopy(mine)
    trained, _ = train_base(mine, digits, cache=tmp_path, **ONE_EPOCH)
    assert trained is not mine
    assert _states_equal(mine, before)
    assert not _states_equal(trained, before)


def test_training_is_deterministic_for_a_seed(digits: Splits) -> None:
    a, ma = train_base("tiny", digits, use_cache=False, **ONE_EPOCH)
    b, mb = train_base("tiny", digits, use_cache=False, **ONE_EPOCH)
    c, _ = train_base("tiny", digits, seed=1, use_cache=False, **ONE_EPOCH)
    assert _states_equal(a, b)
    assert ma["test_accuracy"] == mb["test_accuracy"]
    assert not _states_equal(a, c)


def test_unknown_training_option(digits: Splits, tmp_path: Path) -> None:
    with pytest.raises(InvalidSettingError, match="unknown training options"):
        checkpoint_path("tiny", digits, cache=tmp_path, epoch=3)


def test_kd_finetune_raises_pruned_accuracy(digits: Splits, digits_base) -> None:
    base, _ = digits_base
    example = digits.example_inputs()
    pruned = prune_env.prune(base, example, 0.6)
    assert prune_env.count_macs(pruned, example) < 0.3 * prune_env.count_macs(base, example)
    before = evaluate(pruned, digits.test)["accuracy"]
    snapshot = copy.deepcopy(pruned)
    tuned, metrics = finetune(pruned, base, digits, epochs=3, progress=False)
    assert metrics["test_accuracy"] >= max(before + 0.05, 0.9)
    assert metrics["val_accuracy"] >= 0.9
    assert metrics["test_accuracy"] == evaluate(tuned, digits.test)["accuracy"]
    assert _states_equal(pruned, snapshot)  # finetune works on a copy
