"""The standard importance criteria rank a constructed redundant or dead channel last, behind one interface."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import prune_env
from prune_env.graph import ChannelGroup
from prune_env.importance import get_importance


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()


def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        yield torch.randn(8, 3, 10, 10, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def first_group_scores(model: nn.Module, importance: str, **kwargs: Any) -> np.ndarray:
    graph = prune_env.build_graph(model, torch.randn(1, 3, 10, 10))
    group = graph.groups[0]
    assert group.name == "0" and group.units == 8
    return np.asarray(get_importance(importance, 0, **kwargs)(group, model))


def kill_channel(model: nn.Sequential, c: int) -> None:
    """Channel ``c`` of the first conv outputs nothing: zero filter and bias, zero BN scale and shift."""
    with torch.no_grad():
        model[0].weight[c] = 0
        model[0].bias[c] = 0
        model[1].weight[c] = 0
        model[1].bias[c] = 0


def test_fpgm_ranks_the_filter_at_the_centre_of_its_layer_last() -> None:
    model = small_net()
    with torch.no_grad():
        others = torch.cat([model[0].weight[:5], model[0].weight[6:]])
        model[0].weight[5] = others.mean(dim=0)  # the filter the others replace best
    scores = first_group_scores(model, "fpgm")
    assert int(np.argmin(scores)) == 5


@pytest.mark.parametrize("importance", ["taylor", "hrank"])
def test_data_driven_criteria_rank_a_dead_channel_last(importance: str) -> None:
    model = small_net()
    kill_channel(model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = first_group_scores(model, importance, batches=batches)
    assert scores[3] == 0.0 and np.all(np.delete(scores, 3) > 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # scored on a copy
    assert all(p.grad is None for p in model.parameters())


def test_prune_with_data_driven_importance_removes_the_dead_channel() -> None:
    model = small_net()
    kill_channel(model, 3)
    x = torch.randn(1, 3, 10, 10)
    with pytest.raises(prune_env.InvalidSettingError, match="batches="):
        prune_env.prune(model, x, 0.5, importance="taylor")
    graph = prune_env.build_graph(model, x)
    pruned = prune_env.prune(model, x, {"0": 0.125}, importance="taylor", batches=batches, graph=graph)
    kept = pruned[0].weight.detach()
    assert kept.shape[0] == 7
    assert all(bool(kept[i].abs().sum() > 0) for i in range(7))  # the zero filter is the one removed


def test_an_importance_callable_asking_for_batches_receives_them() -> None:
    seen: list[int] = []

    def by_activation(group: ChannelGroup, model: nn.Module, batches: Any) -> np.ndarray:
        seen.append(sum(1 for _ in batches()))
        return np.arange(group.units, dtype=np.float64)

    model = small_net()
    x = torch.randn(1, 3, 10, 10)
    prune_env.prune(model, x, 0.5, importance=by_activation, batches=batches)
    assert seen and all(n == 3 for n in seen)
    with pytest.raises(prune_env.InvalidSettingError, match="asks for batches"):
        prune_env.prune(model, x, 0.5, importance=by_activation)


def test_unknown_importance_names_every_criterion() -> None:
    with pytest.raises(prune_env.UnknownNameError, match=r"fpgm.*hrank.*taylor"):
        get_importance("magnitude")


def test_problem_ranks_with_training_batches(
    digits_base: tuple[nn.Module, dict[str, float]], digits: Any
) -> None:
    """A PruningProblem hands data-driven criteria its own seeded training batches."""
    model = digits_base[0]
    common = {"eval_samples": 60, "bn_recalib_batches": 1, "progress": False}
    taylor = prune_env.PruningProblem(model, digits, importance="taylor", **common)
    again = prune_env.PruningProblem(model, digits, importance="taylor", **common)
    l1 = prune_env.PruningProblem(model, digits, importance="l1", **common)
    assert all(np.array_equal(a, b) for a, b in zip(taylor.rankings, again.rankings, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(taylor.rankings, l1.rankings, strict=True))


def test_global_ranking_removes_the_weakest_units_of_the_whole_network() -> None:
    """One ratio over all units: a group whose units are weak relative to its own mean loses more."""
    model = small_net()
    with torch.no_grad():
        model[0].weight[:4] *= 1e-3  # half of the first group's filters are nearly dead
    x = torch.randn(1, 3, 10, 10)
    graph = prune_env.build_graph(model, x)
    assert [g.units for g in graph.groups] == [8, 6]
    pruned = prune_env.prune(model, x, 0.3, graph=graph, global_ranking=True)
    kept = [pruned[0].out_channels, pruned[3].out_channels]
    assert sum(kept) == 14 - int(0.3 * 14)  # 4 of 14 units removed overall
    assert kept[0] == 4  # all of them the near-dead filters of the first group
    assert bool(pruned[0].weight.flatten(1).norm(dim=1).min() > 1e-2)  # the strong filters stayed
    assert prune_env.count_macs(pruned, x) < graph.base_macs
    every = prune_env.prune(model, x, 0.99, graph=graph, global_ranking=True, round_to=2)
    assert [every[0].out_channels, every[3].out_channels] == [2, 2]  # never below round_to
    with pytest.raises(prune_env.InvalidSettingError, match="global_ranking takes one ratio"):
        prune_env.prune(model, x, [0.3, 0.3], graph=graph, global_ranking=True)
