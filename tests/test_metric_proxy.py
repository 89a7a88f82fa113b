"""A user's own metric as the proxy: scored as declared, recalibrated on the user's batches, refused when
it returns something other than a number in its range."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from prune_env import LayerPruneEnv, MetricError, MetricProxy, OneShotPruneEnv, PruningProblem
from prune_env.batches import take
from prune_env.data import Splits
from prune_env.errors import InvalidSettingError
from prune_env.proxy import recalibrate_batchnorm


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    ).eval()


def val_accuracy(splits: Splits, samples: int = 200) -> Any:
    x, y = take(splits.val, torch.arange(samples))

    def accuracy(model: nn.Module) -> float:
        return float((model(x).argmax(1) == y).float().mean())

    return accuracy


def test_the_score_is_mapped_from_the_declared_range() -> None:
    proxy = MetricProxy(lambda m: 0.25, worst=1.0, best=0.0)  # an error rate: lower is better
    result = proxy.evaluate(small_net())
    assert result.accuracy == pytest.approx(0.75) and result.loss == pytest.approx(0.25)
    assert MetricProxy(lambda m: torch.tensor(30.0), worst=0, best=40).evaluate(small_net()).accuracy == 0.75


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "returned nan"),
        ("0.5", "returned '0.5'"),
        (True, "returned True"),
        (1.5, "returned 1.5, outside its declared range"),
        (torch.ones(2), "returned tensor"),
        (None, "returned None"),
    ],
)
def test_a_bad_score_is_refused_naming_the_value(value: Any, message: str) -> None:
    def mean_ap(model: nn.Module) -> Any:
        return value

    with pytest.raises(MetricError, match=message) as err:
        MetricProxy(mean_ap).evaluate(small_net())
    assert "'mean_ap'" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": 0.9}, "metric must be a function"),
        ({"worst": 1.0, "best": 1.0}, "worst and best are both"),
        ({"best": math.inf}, "best must be a finite real number"),
        ({"worst": "0"}, "worst must be a finite real number"),
        ({"recalibration_batches": torch.zeros(4, 1, 8, 8)}, "wrap it in a list"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_refused_before_any_evaluation(kwargs: dict[str, Any], message: str) -> None:
    settings = {"metric": lambda m: 0.5, **kwargs}
    with pytest.raises(InvalidSettingError, match=message):
        MetricProxy(**settings)


def test_batchnorm_is_recalibrated_on_the_users_batches_and_the_model_is_left_alone() -> None:
    torch.manual_seed(1)
    batches = [torch.randn(16, 1, 8, 8) * 3 + 2 for _ in range(3)]
    seen: list[torch.Tensor] = []

    def metric(model: nn.Module) -> float:
        assert not model.training
        seen.append(model[1].running_mean.clone())
        return 0.5

    model = small_net()
    before = copy.deepcopy(model.state_dict())
    MetricProxy(metric, recalibration_batches=batches).evaluate(model)
    expected = recalibrate_batchnorm(copy.deepcopy(model), batches)[1].running_mean
    torch.testing.assert_close(seen[0], expected)
    assert not torch.equal(seen[0], before["1.running_mean"])  # the statistics did change
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_random_metric_scores_the_same_candidate_alike() -> None:
    proxy = MetricProxy(lambda m: float(torch.rand(())), seed=3)
    assert proxy.evaluate(small_net()).accuracy == proxy.evaluate(small_net()).accuracy


def test_a_search_optimises_the_users_metric(untrained_resnet20: nn.Module, digits: Splits) -> None:
    """The problem's proxy is the user's function end to end: base score, every step's reward."""
    calls: list[float] = []
    accuracy = val_accuracy(digits)

    def counted(model: nn.Module) -> float:
        calls.append(accuracy(model))
        return calls[-1]

    problem = PruningProblem(untrained_resnet20, digits, target_macs=0.5, proxy=MetricProxy(counted))
    assert problem.base_accuracy == pytest.approx(accuracy(untrained_resnet20.eval()))
    for env in (
        OneShotPruneEnv(problem=problem),
        LayerPruneEnv(untrained_resnet20, digits, target_macs=0.5, proxy=MetricProxy(counted)),
    ):
        env.reset(seed=0)
        done, before = False, len(calls)
        while not done:
            _, reward, done, _, info = env.step(np.full(env.action_space.shape, 0.5, dtype=np.float32))
        assert len(calls) == before + 1 and info["accuracy"] == calls[-1]  # the metric's own score
        assert math.isfinite(reward)
