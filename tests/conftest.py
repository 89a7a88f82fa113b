"""Shared fixtures: the digits splits and one trained resnet20 per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from quick import QUICK_SCORING
from torch import nn

from prune_env.data import Splits, load
from prune_env.train import train_base

if TYPE_CHECKING:
    from prune_env.problem import PruningProblem

# pytest runs with -n 2 on 2 cores: more than one intra-op thread per worker oversubscribes the CPU and
# makes small convolutions tens of times slower (OpenMP threads spin waiting for each other).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> Splits:
    return load("digits", seed=0)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the xdist workers of this run (their base temp dirs share a parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "prune_env_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def digits_base(digits: Splits, shared_cache: Path) -> Iterator[tuple[nn.Module, dict[str, float]]]:
    """resnet20 trained on digits with the default recipe; trained once per run, then a cache hit."""
    try:
        import fcntl
    except ImportError:  # not POSIX: each worker may train its own copy, which is only slower
        yield train_base("resnet20", digits, cache=shared_cache, progress=False)
        return
    with open(shared_cache / "train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits, then loads the checkpoint
        result = train_base("resnet20", digits, cache=shared_cache, progress=False)
    yield result


@pytest.fixture
def cached(
    digits_base: tuple[nn.Module, dict[str, float]], shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point the base-model cache at the session cache, where ``digits_base`` trained resnet20, so a
    search or grid that names "resnet20" on digits loads it instead of training."""
    monkeypatch.setenv("PRUNE_ENV_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture(scope="session")
def untrained_resnet20(digits: Splits) -> nn.Module:
    """A seeded, untrained resnet20 for digits: what tests of checkers, determinism, budgets and settings
    need (shapes and costs, not accuracy), without waiting for the trained base model."""
    from prune_env.models import get_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_model("resnet20", digits.num_classes, digits.in_channels).eval()


@pytest.fixture(scope="module")
def problem(untrained_resnet20: nn.Module, digits: Splits) -> PruningProblem:
    """An untrained resnet20 on digits at half its MACs, scored quickly: the problem of tests of agents,
    settings, resume and Ray, which need shapes and costs, not accuracy. A module may define its own."""
    from prune_env.problem import PruningProblem

    return PruningProblem(untrained_resnet20, digits, target_macs=0.5, **QUICK_SCORING)
