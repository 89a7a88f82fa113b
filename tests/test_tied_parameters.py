"""Tied parameters: one tensor read by several layers (``b.weight = a.weight``), by a layer and traced code,
or one module under two names. Layers sharing a tensor must keep the same indices of it, so pruning
couples their channels, predicts MACs exactly, slices the tensor once and keeps it shared.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_env
import prune_env.surgery


class TiedBranches(nn.Module):
    """Two towers whose middle convs (and biases) are one tensor, concatenated into a head: the tie joins
    the towers' stems (input dim) and puts each kept filter at two positions of the head's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem1, self.stem2 = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.a, self.b = nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.b.bias = self.a.bias
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = torch.relu(self.bn_a(self.a(torch.relu(self.stem1(x)))))
        yb = torch.relu(self.bn_b(self.b(torch.relu(self.stem2(x)))))
        return self.head(torch.cat([ya, yb], 1))


class TiedChain(nn.Module):
    """The same weight in two consecutive convs: their inputs and outputs become one channel space."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.a, self.b = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(self.stem(x)))))


class TiedLinearTowers(nn.Module):
    """A shared Linear weight applied to two towers' pooled features, concatenated into a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 10, 3, padding=1), nn.Conv2d(3, 10, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(10, 12), nn.Linear(10, 12)
        self.fc2.weight = self.fc1.weight
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = torch.relu(self.c1(x)).mean((2, 3))
        f2 = torch.relu(self.c2(x)).mean((2, 3))
        return self.out(torch.cat([torch.relu(self.fc1(f1)), torch.relu(self.fc2(f2))], 1))


class GammaReused(nn.Module):
    """A BatchNorm scale also fetched by the forward code: the fetch indexes the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.c1(x)))
        return self.c2(y * self.bn.weight.view(1, -1, 1, 1))


class AliasedModule(nn.Module):
    """One module registered under two names and called through both (sharing by module reuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = self.a
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(self.stem(x)))))


class DenseAndGroupedTie(nn.Module):
    """A dense and a grouped conv of equal weight shape share the weight: the grouped one reads its input
    dim whole (it removes whole groups), so the dense conv's input channels cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem2 = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 12, 1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.g = nn.Conv2d(12, 6, 3, padding=1, groups=2)
        self.g.weight = self.a.weight
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(torch.relu(self.stem(x))) + self.g(torch.relu(self.stem2(x)))
        return self.head(torch.relu(y))


class FunctionalReuse(nn.Module):
    """A conv weight reused through F.conv2d, which the engine does not map: every channel along that
    weight must stay, while the rest of the network is still pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(self.stem(x)))
        y = F.conv2d(y, self.a.weight, padding=1)
        return self.c2(torch.relu(self.c1(y)))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _build(model: nn.Module) -> prune_env.DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tie that can be coupled needs no warning
        return prune_env.build_graph(model, X[:1])


def _randomised(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)
    return model.double().eval()


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        torch.testing.assert_close(a(X), b(X), rtol=0, atol=0)


TIED = [
    (TiedBranches, [("a", "b", "weight"), ("a", "b", "bias")]),
    (TiedChain, [("a", "b", "weight")]),
    (TiedLinearTowers, [("fc1", "fc2", "weight")]),
    (GammaReused, []),
    (AliasedModule, []),
]


@pytest.mark.parametrize(("factory", "ties"), TIED, ids=[f.__name__ for f, _ in TIED])
def test_tied_layers_prune_with_exact_costs_and_dead_channels_go_first(factory: type, ties: list) -> None:
    model = _randomised(factory())
    graph = _build(model)
    assert graph.groups, "a tie must not freeze channels it can couple"
    rng = np.random.default_rng(0)
    dead = {g.index: np.sort(rng.choice(g.units, int(rng.integers(1, g.units)), replace=False))
            for g in graph.groups}  # fmt: skip
    prune_env.surgery.zero_units(model, graph, dead)
    with torch.no_grad():
        reference = model(X)

    ratios = [len(dead[g.index]) / g.units for g in graph.groups]
    pruned = prune_env.prune(model, X[:1], ratios, graph=graph)
    kept = [np.setdiff1d(np.arange(g.units), dead[g.index]) for g in graph.groups]
    explicit = prune_env.prune_channels(model, graph, kept)
    _assert_same_model(pruned, explicit)  # L1 ranked exactly the zeroed units last
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), reference, rtol=1e-9, atol=1e-9)
    assert prune_env.count_macs(pruned, X[:1]) == graph.macs(ratios) < graph.base_macs
    assert prune_env.count_params(pruned) == graph.params(ratios) < graph.base_params
    for first, second, attr in ties:  # still one tensor in the pruned model
        assert getattr(pruned.get_submodule(first), attr) is getattr(pruned.get_submodule(second), attr)
    if factory is AliasedModule:
        assert pruned.a is pruned.b

    rebuilder = prune_env.surgery.ModelRebuilder(model, graph)
    for units in (kept, [np.arange(0, g.units, 2) for g in graph.groups], kept):
        rebuilt = rebuilder.rebuild(units)
        _assert_same_model(rebuilt, prune_env.prune_channels(model, graph, units))
        for first, second, attr in ties:
            assert getattr(rebuilt.get_submodule(first), attr) is getattr(rebuilt.get_submodule(second), attr)


def test_tie_couples_the_channel_spaces_along_each_dimension() -> None:
    graph = _build(TiedBranches().double())
    by_producers = {tuple(sorted(m.layer for m in g.producers)): g for g in graph.groups}
    # Input dim of the shared weight: the two stems feed it, so they are one group.
    assert set(by_producers) == {("stem1", "stem2"), ("a", "b")}
    outputs = by_producers[("a", "b")]
    head = next(m for m in outputs.members if m.layer == "head")
    assert head.multiplicity == 2 and sorted(head.positions) == list(range(16))  # filter i at i and 8 + i
    assert len(_build(TiedChain().double()).groups) == 1  # stem out = a in = b in = a out = b out


@pytest.mark.parametrize(
    ("factory", "frozen_producer", "warned"),
    [(DenseAndGroupedTie, "stem", "a.weight"), (FunctionalReuse, "stem", "a.weight")],
    ids=["dense-and-grouped", "functional-reuse"],
)
def test_a_tie_that_cannot_be_coupled_freezes_its_channels_with_one_warning(
    factory: type, frozen_producer: str, warned: str
) -> None:
    model = factory().double().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = prune_env.build_graph(model, X[:1])
    ours = [str(w.message) for w in caught if str(w.message).startswith("prune_env")]
    assert len(ours) == 1 and warned in ours[0], ours
    assert warned in graph.frozen
    assert frozen_producer not in {m.layer for g in graph.groups for m in g.producers}
    ratios = 0.5
    pruned = prune_env.prune(model, X[:1], ratios, graph=graph)
    assert getattr(pruned, frozen_producer).out_channels == getattr(model, frozen_producer).out_channels
    assert prune_env.count_macs(pruned, X[:1]) == graph.macs(ratios)
    assert prune_env.count_params(pruned) == graph.params(ratios)
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
    if factory is DenseAndGroupedTie:
        assert pruned.a.weight is pruned.g.weight
    units = [np.arange(0, g.units, 2) for g in graph.groups]
    _assert_same_model(prune_env.surgery.ModelRebuilder(model, graph).rebuild(units),
                       prune_env.prune_channels(model, graph, units))  # fmt: skip


def test_a_graph_without_the_tie_is_rejected_for_the_tied_model() -> None:
    """Ties are part of the architecture: a graph of the untied twin would slice the shared tensor two
    ways."""
    untied = TiedChain()
    untied.b.weight = nn.Parameter(untied.a.weight.detach().clone())
    graph = prune_env.build_graph(untied, X[:1].float())
    with pytest.raises(prune_env.PruneEnvError, match=r"(?s)tied to a\.weight.*build_graph\(model, x\)"):
        prune_env.prune(TiedChain(), X[:1].float(), 0.5, graph=graph)
    # A deep copy keeps the tie, so it may use the original's graph.
    tied = TiedChain()
    graph = prune_env.build_graph(tied, X[:1].float())
    twin = copy.deepcopy(tied)
    assert prune_env.prune(twin, X[:1].float(), 0.5, graph=graph).a.out_channels == 3
