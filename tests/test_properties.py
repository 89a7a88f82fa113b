"""Property tests: random CNNs, random ratios — always a valid, smaller model with exactly predicted costs.

The networks come from ``tests/random_cnn.py``: DAGs mixing residual adds, concats, depthwise and grouped
convs, squeeze-excite gates, chunk + channel shuffle, raw per-channel parameters, flatten→linear heads and,
sometimes, an op the engine cannot map (which must freeze channels, warn once, and still prune validly).

Examples are derandomized so CI is stable. To hunt for bugs, run many more with fresh randomness:

    PRUNE_ENV_HYPOTHESIS_EXAMPLES=300 pytest tests/test_properties.py -p no:xdist -o addopts=""
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_cnn import BLOCK_KINDS, NetSpec, build_model, example_input, net_specs
from torch import nn

import prune_env
import prune_env.surgery
from prune_env import ChannelGroup, DependencyGraph, Member
from prune_env.graph import unit_count_to_keep, units_to_keep

WARNING_PREFIX = "prune_env: some channels cannot be mapped"
# Statistics of these norms are taken over all of a group's channels, so zeroed channels still change
# the others' outputs: the dead-channel equivalence does not hold for them.
CROSS_CHANNEL_NORMS = ("LayerNorm", "GroupNorm")

_HUNT_EXAMPLES = int(os.environ.get("PRUNE_ENV_HYPOTHESIS_EXAMPLES", "0"))


def _settings(default_examples: int) -> settings:
    """Derandomized (stable in CI) unless PRUNE_ENV_HYPOTHESIS_EXAMPLES asks for a random bug hunt."""
    return settings(
        max_examples=_HUNT_EXAMPLES or default_examples,
        derandomize=not _HUNT_EXAMPLES,
        deadline=None,
        database=None,
        # Building a model and its graph takes tens of milliseconds: slow by hypothesis' standards.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,  # a random hunt's failure then prints how to replay it (@reproduce_failure)
    )


# --------------------------------------------------------------------------------------------------------
# Building and pruning, with the warning contract checked every time
# --------------------------------------------------------------------------------------------------------

Key = tuple[str, str]  # (layer or parameter qualname, member kind)
Masks = dict[Key, tuple[int, np.ndarray]]  # key -> (dim, True where the index is kept)


@contextmanager
def expect_engine_warning(spec: NetSpec) -> Iterator[None]:
    """One "cannot be mapped" warning naming the cumsum when the spec has one; otherwise none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in caught if str(w.message).startswith("prune_env")]
    assert len(ours) <= 1, f"the engine must warn at most once: {ours}"
    reasons = _reasons(ours[0]) if ours else []
    if spec.has_unsupported_op:
        assert ours and ours[0].startswith(WARNING_PREFIX), ours
        assert any("cumsum" in r for r in reasons), reasons
    unexpected = [r for r in reasons if "cumsum" not in r]
    assert unexpected == [], f"supported ops must map without warnings: {unexpected}"


def _reasons(message: str) -> list[str]:
    """The per-node reasons of the engine's warning: "<prefix> — reason; reason; ..."."""
    assert message.startswith(WARNING_PREFIX), message
    return message.split(" — ", 1)[1].split("; ")


def build(spec: NetSpec) -> tuple[nn.Module, torch.Tensor, DependencyGraph]:
    model = build_model(spec)
    x = example_input(spec)
    with expect_engine_warning(spec):
        graph = prune_env.build_graph(model, x)
    frozen = dict(graph.frozen)
    if spec.has_unsupported_op:
        assert any("cumsum" in why for why in frozen.values()), "an unmappable op must be in graph.frozen"
        frozen = {k: why for k, why in frozen.items() if "cumsum" not in why}
    # Everything else is supported: nothing may be frozen, let alone silently.
    assert frozen == {}, frozen
    return model, x, graph


def ratio_strategy(graph: DependencyGraph) -> st.SearchStrategy[float | list[float] | dict[str, float]]:
    """One float for all groups, one per group, or a mapping naming some groups (the rest unpruned)."""
    ratio = st.floats(0.0, 1.0)
    n = len(graph.groups)
    names = [g.name for g in graph.groups]
    return st.one_of(
        ratio,
        st.lists(ratio, min_size=n, max_size=n),
        st.dictionaries(st.sampled_from(names), ratio) if names else st.just({}),
    )


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


# --------------------------------------------------------------------------------------------------------
# An independent oracle of what surgery must do, from the public Member contract alone
# --------------------------------------------------------------------------------------------------------


def unit_positions(member: Member, units: Sequence[int]) -> np.ndarray:
    """Indices along ``member.dim`` owned by ``units`` (unit u owns positions[u*mult:(u+1)*mult])."""
    pos = np.asarray(member.positions, dtype=np.int64).reshape(-1, member.multiplicity)
    return pos[np.asarray(units, dtype=np.int64)].reshape(-1)


def keep_masks(graph: DependencyGraph, dropped: Sequence[Sequence[int]]) -> Masks:
    """Per layer dimension, which indices survive dropping ``dropped[g]`` units of each group.

    A dimension can hold several groups (the input of a conv after a concat) and frozen indices that
    belong to none, hence one mask per dimension rather than per member.
    """
    masks: Masks = {}
    for group, units in zip(graph.groups, dropped, strict=True):
        for member in group.members:
            key = (member.layer, member.kind)
            dim, mask = masks.setdefault(key, (member.dim, np.ones(member.size, dtype=bool)))
            assert dim == member.dim and len(mask) == member.size, f"{key} disagrees between groups"
            mask[unit_positions(member, units)] = False
    return masks


def _take(t: torch.Tensor, dim: int, mask: np.ndarray | None) -> torch.Tensor:
    if mask is None:
        return t
    assert t.shape[dim] == len(mask)
    return t.index_select(dim, torch.as_tensor(np.flatnonzero(mask)))


def expected_state(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with the dropped indices removed, layer type by layer type."""
    state = dict(model.state_dict())

    def mask(layer: str, kind: str) -> np.ndarray | None:
        return masks[(layer, kind)][1] if (layer, kind) in masks else None

    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out, inp = mask(name, "out"), mask(name, "in")
            grouped = getattr(m, "groups", 1) > 1  # a grouped conv's weight dim 1 is per group: unchanged
            state[prefix + "weight"] = _take(_take(m.weight, 0, out), 1, None if grouped else inp)
            if m.bias is not None:
                state[prefix + "bias"] = _take(m.bias, 0, out)
        elif isinstance(m, nn.BatchNorm2d):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                state[prefix + attr] = _take(getattr(m, attr), 0, mask(name, "channel"))
    for (layer, kind), (dim, keep) in masks.items():
        if kind == "param":
            state[layer] = _take(model.get_parameter(layer), dim, keep)
    return {k: v.detach() for k, v in state.items()}


def layer_size(model: nn.Module, member: Member) -> int:
    """The width the pruned model actually has along ``member``'s dimension."""
    if member.kind == "param":
        return model.get_parameter(member.layer).shape[member.dim]
    m = model.get_submodule(member.layer)
    if isinstance(m, nn.Conv2d):
        return m.out_channels if member.kind == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if member.kind == "out" else m.in_features
    assert isinstance(m, nn.BatchNorm2d), f"unexpected member layer {type(m).__name__}"
    return m.num_features


def expected_sizes(graph: DependencyGraph, keep_counts: np.ndarray) -> dict[Key, tuple[Member, int]]:
    """Width of every member's dimension after keeping ``keep_counts[g]`` units of each group."""
    sizes: dict[Key, tuple[Member, int]] = {}
    for group, kept in zip(graph.groups, keep_counts, strict=True):
        for member in group.members:
            key = (member.layer, member.kind)
            first, size = sizes.get(key, (member, member.size))
            sizes[key] = (first, size - (group.units - int(kept)) * member.multiplicity)
    return sizes


def assert_consistent_layers(model: nn.Module) -> None:
    """Layer attributes agree with the sliced tensors (repr, re-instantiation and groups rely on them)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), name
            assert m.bias is None or m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
            assert m.bias is None or m.bias.shape == (m.out_features,), name
        elif isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t.shape == (m.num_features,), name


def zero_units(model: nn.Module, groups: Sequence[ChannelGroup], chosen: Sequence[Sequence[int]]) -> None:
    """Zero every slice of the chosen units, in place, so they contribute exactly nothing downstream."""
    with torch.no_grad():
        for group, units in zip(groups, chosen, strict=True):
            if not len(units):
                continue
            for member in group.members:
                idx = torch.as_tensor(unit_positions(member, units))
                if member.kind == "param":
                    model.get_parameter(member.layer).index_fill_(member.dim, idx, 0.0)
                    continue
                layer = model.get_submodule(member.layer)
                if member.kind == "in":
                    # A grouped/depthwise conv's unit is a whole group, already silenced by its "out" rows.
                    if getattr(layer, "groups", 1) == 1:
                        layer.weight.index_fill_(1, idx, 0.0)
                    continue
                # "out" of conv/linear: filters and bias; "channel" of BN: scale and shift, making its
                # output exactly 0 whatever the statistics.
                for t in (layer.weight, layer.bias):
                    if t is not None:
                        t.index_fill_(0, idx, 0.0)


def run_training_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward + backward + SGD step in train mode; every parameter must receive a gradient of its shape."""
    model.train()
    out = model(x)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return out


# --------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------


@_settings(default_examples=80)
@given(spec=net_specs(), data=st.data())
def test_random_ratios_give_a_valid_model_with_exact_costs(spec: NetSpec, data: st.DataObject) -> None:
    model, x, graph = build(spec)
    ratios: Any = data.draw(ratio_strategy(graph), label="ratios")
    round_to = data.draw(st.sampled_from([1, 1, 2, 4]), label="round_to")
    # Which units go must not matter to validity or costs.
    importance = data.draw(st.sampled_from(["l1", "l2", "bn_scale", "random"]), label="importance")
    x2 = example_input(spec, batch=2, seed=1)
    before = state_of(model)
    reference = model(x2)

    pruned = prune_env.prune(model, x, ratios, graph=graph, round_to=round_to, importance=importance, seed=0)

    # 4. A new model; the original is untouched (checked again below, after the pruned one is trained).
    assert pruned is not model
    assert_same_state(model, before)

    # 2. Exact predicted costs, and the unpruned prediction matches the measured original.
    assert graph.base_macs == prune_env.count_macs(model, x)
    assert graph.params(0.0) == prune_env.count_params(model)
    assert graph.macs(ratios, round_to) == prune_env.count_macs(pruned, x)
    assert graph.params(ratios, round_to) == prune_env.count_params(pruned)
    # The action wall's shortcut: with the other groups fixed, the cost is an exact quadratic in one
    # group's count (checked against the full evaluation, in both the int64 and the Python-int paths).
    g = data.draw(st.integers(0, max(len(graph.groups) - 1, 0)), label="wall group")
    for metric, full_cost in (("macs", graph.costs.macs), ("params", graph.costs.params))[
        : len(graph.groups) and 2
    ]:
        a, b, q = graph.costs.along_group(graph.keep_counts(ratios, round_to), g, metric)
        for c in range(1, graph.groups[g].units + 1):
            moved = graph.keep_counts(ratios, round_to)
            moved[g] = c
            assert a + b * c + q * c * c == full_cost(moved), (metric, c)

    # 3. Every group keeps at least one unit, and the pruned layers have exactly the predicted widths.
    keep = graph.keep_counts(ratios, round_to)
    channels = np.array([g.units for g in graph.groups], dtype=np.int64)
    assert np.all(keep >= 1) and np.all(keep <= channels)
    # round_to: a multiple of it, unless capped at the whole group or floored at one unit.
    assert np.all((keep % round_to == 0) | (keep == channels) | (keep == 1))
    assert graph.macs(ratios, round_to) <= graph.base_macs
    for member, size in expected_sizes(graph, keep).values():
        assert layer_size(pruned, member) == size, member
    assert_consistent_layers(pruned)
    if np.any(keep < channels):
        assert prune_env.count_params(pruned) < prune_env.count_params(model)
    else:
        assert prune_env.count_params(pruned) == prune_env.count_params(model)

    # 1. It runs on a batch of 2 in eval mode and in train mode (including backward), same output shape.
    pruned.eval()
    with torch.no_grad():
        assert pruned(x2).shape == reference.shape
    assert run_training_step(pruned, x2).shape == reference.shape
    assert_same_state(model, before)  # training the copy did not write through to the original


@_settings(default_examples=30)
@given(spec=net_specs())
def test_zero_ratios_keep_the_model_function(spec: NetSpec) -> None:
    model = build_model(spec)
    x, x2 = example_input(spec), example_input(spec, batch=2, seed=1)
    with expect_engine_warning(spec):  # graph=None: prune traces the model itself
        pruned = prune_env.prune(model, x, 0.0)
    assert pruned is not model
    assert_same_state(pruned, state_of(model))
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x2), model(x2), rtol=0, atol=0)


@_settings(default_examples=80)
@given(spec=net_specs(), data=st.data())
def test_zeroed_units_are_exactly_the_ones_pruned(spec: NetSpec, data: st.DataObject) -> None:
    model, x, graph = build(spec)
    chosen: list[list[int]] = []
    for g, group in enumerate(graph.groups):
        if any(m.layer_type in CROSS_CHANNEL_NORMS for m in group.members):
            chosen.append([])
            continue
        units = data.draw(st.sets(st.integers(0, group.units - 1), max_size=group.units - 1), label=f"g{g}")
        chosen.append(sorted(units))
    zeroed = copy.deepcopy(model)
    zero_units(zeroed, graph.groups, chosen)
    ratios = [len(units) / group.units for group, units in zip(graph.groups, chosen, strict=True)]

    pruned = prune_env.prune(zeroed, x, ratios, graph=graph, importance="l1")

    # l1 scores the zeroed units exactly 0 and every other unit > 0: exactly they must go.
    keep = graph.keep_counts(ratios)
    assert keep.tolist() == [g.units - len(u) for g, u in zip(graph.groups, chosen, strict=True)]
    expected = expected_state(zeroed, keep_masks(graph, chosen))
    actual = pruned.state_dict()
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert actual[k].shape == v.shape and torch.equal(actual[k], v), k
    assert_consistent_layers(pruned)
    assert graph.macs(ratios) == prune_env.count_macs(pruned, x)

    # Removing channels that contribute nothing changes nothing — in eval mode, and in train mode too
    # (a BN channel with zero scale and shift outputs 0 whatever its batch statistics).
    x2 = example_input(spec, batch=2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x2), zeroed.eval()(x2), rtol=0, atol=1e-8)
        torch.testing.assert_close(pruned.train()(x2), zeroed.train()(x2), rtol=0, atol=1e-8)


@_settings(default_examples=40)
@given(spec=net_specs(), data=st.data())
def test_rebuilding_into_one_module_tree_equals_fresh_surgery(spec: NetSpec, data: st.DataObject) -> None:
    """ModelRebuilder (the proxy's hot path) gives exactly prune_channels' model, build after build, even
    when the previous build was trained in place, and on a revisit of an earlier policy — and never writes
    through to the base model."""
    model, _, graph = build(spec)
    before = state_of(model)
    rebuilder = prune_env.surgery.ModelRebuilder(model, graph)
    x2 = example_input(spec, batch=2, seed=1)
    drawn = []
    for step in range(4):
        if step < 3:
            ratios = data.draw(
                st.lists(st.floats(0.0, 1.0), min_size=len(graph.groups), max_size=len(graph.groups))
            )
            keep = graph.keep_counts(ratios)
            rng = np.random.default_rng(step)
            units = [np.sort(rng.permutation(g.units)[:k]) for g, k in zip(graph.groups, keep, strict=True)]
            drawn.append(units)
        else:  # a revisit: served from the rebuilder's caches (index tensors, size attributes)
            units = drawn[0]
        reference = prune_env.prune_channels(model, graph, units)
        rebuilt = rebuilder.rebuild(units)
        assert rebuilt is rebuilder.module
        assert repr(rebuilt) == repr(reference)  # size attributes (channels, groups, features) included
        assert_same_state(rebuilt, state_of(reference))
        assert rebuilt.training == reference.training
        assert {n: p.requires_grad for n, p in rebuilt.named_parameters()} == {
            n: p.requires_grad for n, p in reference.named_parameters()
        }
        rebuilt.eval()
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x2), reference(x2), rtol=0, atol=0)
        run_training_step(rebuilt, x2)  # what a KD proxy does to it; the next rebuild must not see it
        assert_same_state(model, before)


@_settings(default_examples=500)
@given(
    channels=st.integers(1, 4096),
    ratio=st.one_of(
        st.floats(-0.5, 1.5, allow_nan=False),
        st.sampled_from([0.0, 0.5, 0.8, 1.0, 0.25, 0.125, 1 / 3, 2 / 3]),
    ),
    round_to=st.sampled_from([1, 2, 3, 4, 8, 16]),
)
def test_scalar_keep_count_equals_the_vectorised_rule(channels: int, ratio: float, round_to: int) -> None:
    """The action wall's scalar twin of units_to_keep must agree with it everywhere (ties included)."""
    expected = int(units_to_keep(np.array([channels]), np.array([ratio]), round_to)[0])
    assert unit_count_to_keep(channels, ratio, round_to) == expected


def test_generator_covers_every_block_kind() -> None:
    """Guard against a strategy that silently stops producing some block kinds or head."""
    seen: set[type] = set()
    heads: set[bool] = set()

    @settings(max_examples=150, derandomize=True, database=None, deadline=None)
    @given(spec=net_specs())
    def collect(spec: NetSpec) -> None:
        seen.update(type(b) for b in spec.blocks)
        heads.add(spec.head_hidden > 0)

    collect()
    assert seen == set(BLOCK_KINDS)
    assert heads == {False, True}


# --------------------------------------------------------------------------------------------------------
# Engine bugs found by the properties, reduced to minimal reproductions
# --------------------------------------------------------------------------------------------------------


class _ScaledChannels(nn.Module):
    """conv → per-channel scale; ``bind`` chunks the two channels and adds the halves (one unit)."""

    def __init__(self, width: int, bind: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(width, 1, 1))
        self.bind = bind
        self.fc = nn.Linear(width // 2 if bind else width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale * self.conv(x)
        if self.bind:
            a, b = y.chunk(2, dim=1)
            y = a + b
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(("width", "bind"), [(1, False), (2, True)], ids=["one-channel", "chunk-bound"])
def test_per_channel_parameter_of_one_unit_maps_without_warning(width: int, bind: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = prune_env.build_graph(_ScaledChannels(width, bind), torch.randn(1, 3, 8, 8))
    assert [str(w.message) for w in caught if str(w.message).startswith("prune_env")] == []
    assert graph.groups == []  # one unit: nothing to prune, and nothing that needed a warning


def test_zero_ratio_keeps_groups_whole_with_round_to() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 3))
    x = torch.randn(1, 3, 8, 8)
    graph = prune_env.build_graph(model, x)
    assert [g.units for g in graph.groups] == [5]
    assert graph.keep_counts(0.0, round_to=4).tolist() == [5]
    assert prune_env.prune(model, x, 0.0, graph=graph, round_to=4)[0].out_channels == 5


class _CatThenCouple(nn.Module):
    """cat(a(x), b(x)), then coupled to a third producer: GhostNet's residual add, or an SE gate."""

    def __init__(self, coupling: str) -> None:
        super().__init__()
        self.coupling = coupling
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(3, 8, 1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.coupling == "add":
            y = y + self.shortcut(x)
        else:
            y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.head(y)


@pytest.mark.parametrize("coupling", ["add", "gate"])
def test_concat_followed_by_a_coupling_stays_prunable(coupling: str) -> None:
    model = _CatThenCouple(coupling)
    x = torch.randn(1, 3, 8, 8)
    graph = prune_env.build_graph(model, x)
    assert graph.frozen == {}
    producers = {m.layer for g in graph.groups for m in g.producers}
    assert {"a", "b"} <= producers
    pruned = prune_env.prune(model, x, 0.5, graph=graph)
    assert prune_env.count_macs(pruned, x) == graph.macs(0.5) < graph.base_macs


@_settings(default_examples=40)
@given(spec=net_specs(), data=st.data())
def test_joint_pruning_and_quantization_never_exceed_the_budget(spec: NetSpec, data: st.DataObject) -> None:
    from prune_env.quantization import (
        BIT_CHOICES,
        count_bitops,
        count_size_bits,
        group_layers,
        quantizable_layers,
    )
    from prune_env.quantization.budget import JointProjector

    model, x, graph = build(spec)
    if not graph.groups:
        return
    n = len(graph.groups)
    metric = data.draw(st.sampled_from(["bitops", "size"]), label="metric")
    projector = JointProjector(
        graph.costs,
        [g.units for g in graph.groups],
        group_layers(graph, model),
        quantizable_layers(model),
        metric=metric,
        max_ratio=data.draw(st.sampled_from([0.5, 0.9]), label="max_ratio"),
        other_bits=data.draw(st.sampled_from([8, 32]), label="other_bits"),
    )
    target = data.draw(st.floats(min(projector.min_cost_ratio * 1.001, 1.0), 1.0), label="target")
    ratios = np.array(data.draw(st.lists(st.floats(-0.5, 1.5), min_size=n, max_size=n), label="ratios"))
    w_bits = data.draw(st.lists(st.sampled_from(BIT_CHOICES), min_size=n, max_size=n), label="weight bits")
    a_bits = data.draw(
        st.lists(st.sampled_from(BIT_CHOICES), min_size=n, max_size=n), label="activation bits"
    )
    fill = data.draw(st.booleans(), label="fill")

    keep, w, a = projector.project(ratios, w_bits, a_bits, target, fill=fill)

    assert np.all(keep >= 1) and np.all(keep <= [g.units for g in graph.groups])
    assert np.all(w <= w_bits) and np.all(a <= a_bits)  # bits are only ever lowered
    # Measured on the pruned model itself: never over the budget.
    pruned = prune_env.surgery.prune_channels(model, graph, [np.arange(k) for k in keep]).eval()
    plan = projector.plan(w, a)
    full = projector.base_cost
    measured = count_bitops(pruned, (x,), plan) if metric == "bitops" else count_size_bits(pruned, plan)
    assert measured == round(projector.cost_ratio(keep, w, a) * full)
    assert measured <= target * full * (1 + 1e-9)
