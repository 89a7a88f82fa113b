"""Latency as a budget: settings, the projector on predicted latency, the problem, the agents and the CLI.

Nothing here times anything: every latency model is built from a hand-made table over the model's real
timed layers (every width a grid point, so predictions are the table's numbers exactly), saved where the
cache looks for it, so a problem loads it instead of measuring. One of them is deliberately non-monotone:
widths off a multiple of 8 run slower than the next aligned width, as real kernels can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from prune_env import InvalidSettingError, build_graph
from prune_env.budget import BudgetProjector
from prune_env.data import Splits
from prune_env.graph import DependencyGraph
from prune_env.latency import (
    LatencyModel,
    LatencySettings,
    LatencyTable,
    LayerTable,
    Timing,
    table_meta,
)
from prune_env.latency.budget import LatencyCost
from prune_env.latency.layers import LayerSpec, timed_layers

torch.set_num_threads(1)

FAST: dict[str, Any] = {"eval_samples": 96, "bn_recalib_batches": 1, "progress": False}
LayerMs = Callable[[LayerSpec, int, int], float]


def smooth(spec: LayerSpec, w_in: int, w_out: int) -> float:
    """A convolution's time grows with its MACs: in x out channels, times the pixels it sees."""
    pixels = float(np.prod(spec.input_shape[1:])) if len(spec.input_shape) > 1 else 1.0
    return 1e-4 * pixels * w_in * w_out / max(spec.inputs.full, 1)


def ragged(spec: LayerSpec, w_in: int, w_out: int) -> float:
    """``smooth``, but 1.8x slower off a multiple of 8 output channels: not monotone in the widths."""
    return smooth(spec, w_in, w_out) * (1.0 if w_out % 8 == 0 else 1.8)


def handmade_table(model: nn.Module, x: torch.Tensor, ms: LayerMs, residual_ms: float) -> LatencyTable:
    """A table over ``model``'s timed layers with every width a grid point, ``ms`` per point and a constant
    ``residual_ms`` (the per-layer overhead), for the default latency settings on this machine."""
    graph = build_graph(model, x)
    specs, untimed = timed_layers(model, graph, x[:1])
    layers = []
    for s in specs:
        ins = tuple(range(s.inputs.low, s.inputs.full + 1)) if s.inputs.varies else (s.inputs.full,)
        outs = tuple(range(s.outputs.low, s.outputs.full + 1)) if s.outputs.varies else (s.outputs.full,)
        layers.append(
            LayerTable(
                term=s.term, label=s.label, kind=s.kind, module_type=s.module_type,
                input_shape=s.input_shape, in_slot=s.inputs.slot, out_slot=s.outputs.slot,
                in_widths=ins, out_widths=outs,
                ms=tuple(tuple(ms(s, i, o) for o in outs) for i in ins),
                noisy=tuple(tuple(False for _ in outs) for _ in ins),
            )
        )  # fmt: skip
    whole = sum(layer.full_ms for layer in layers) + residual_ms
    return LatencyTable(
        meta=table_meta(model, x, LatencySettings(progress=False)),
        layers=tuple(layers),
        untimed=tuple(graph.costs.macs_labels[t] for t in untimed),
        whole=Timing(median_ms=whole, min_ms=whole, iqr_ms=0.0, repeats=1),
        noise=0.0,
        protocol={},
    )


@pytest.fixture(scope="module")
def example(digits: Splits) -> torch.Tensor:
    return digits.example_inputs(1)


@pytest.fixture(scope="module")
def graph(untrained_resnet20: nn.Module, example: torch.Tensor) -> DependencyGraph:
    return build_graph(untrained_resnet20, example)


@pytest.fixture(scope="module")
def ragged_cost(untrained_resnet20: nn.Module, example: torch.Tensor, graph: DependencyGraph) -> LatencyCost:
    table = handmade_table(untrained_resnet20, example, ragged, residual_ms=0.05)
    return LatencyCost(LatencyModel(graph, table))


# ------------------------------------------------------------------------------------------------ projector


def test_the_ragged_table_is_not_monotone(ragged_cost: LatencyCost, graph: DependencyGraph) -> None:
    full = graph.costs.full_keep()
    aligned = np.minimum(full, 8)
    narrower = aligned.copy()
    narrower[0] = 7  # one channel fewer, off the multiple of 8: slower
    assert ragged_cost.predict(narrower) > ragged_cost.predict(aligned)


def test_projection_on_a_non_monotone_table_terminates_within_budget(
    ragged_cost: LatencyCost, graph: DependencyGraph
) -> None:
    units = [g.units for g in graph.groups]
    projector = BudgetProjector(graph.costs, units, metric="latency", predicted=ragged_cost, max_ratio=0.8)
    assert projector.base_cost == pytest.approx(ragged_cost.full_ms)
    rng = np.random.default_rng(0)
    for target in np.linspace(projector.min_cost_ratio, 1.0, 7):
        limit = float(target) * ragged_cost.full_ms
        for _ in range(6):
            ratios = rng.uniform(0.0, 0.8, len(units))
            for fill in (False, True):
                keep = projector.project(ratios, float(target), fill=fill)
                assert ragged_cost.predict(keep) <= limit  # the exact prediction, no tolerance
                assert np.all((keep >= projector.min_keep) & (keep <= np.array(units)))
            # The action wall, group by group as the layer-wise environment applies it.
            decided = np.array(units, dtype=np.int64)
            for g, r in enumerate(ratios):
                decided[g] = projector.wall(decided, g, float(r), float(target))
            assert ragged_cost.predict(decided) <= limit


def inverted(spec: LayerSpec, w_in: int, w_out: int) -> float:
    """``smooth``, but 6x slower below 30% of a layer's output channels: pruning hard is slower."""
    return smooth(spec, w_in, w_out) * (6.0 if w_out < 0.3 * spec.outputs.full else 1.0)


def test_when_pruning_hard_is_slower_the_fastest_uniform_pruning_is_the_floor(
    untrained_resnet20: nn.Module, example: torch.Tensor, graph: DependencyGraph
) -> None:
    cost = LatencyCost(LatencyModel(graph, handmade_table(untrained_resnet20, example, inverted, 0.05)))
    units = [g.units for g in graph.groups]
    projector = BudgetProjector(graph.costs, units, metric="latency", predicted=cost, max_ratio=0.8)
    at_max_ratio = cost.predict(projector.min_keep) / cost.full_ms
    assert projector.min_cost_ratio < at_max_ratio  # pruning by max_ratio is not the fastest
    assert cost.predict(projector.floor_keep) / cost.full_ms == projector.min_cost_ratio
    rng = np.random.default_rng(2)
    for target in np.linspace(projector.min_cost_ratio, at_max_ratio, 4):
        limit = float(target) * cost.full_ms
        for _ in range(4):
            ratios = rng.uniform(0.0, 0.8, len(units))
            assert cost.predict(projector.project(ratios, float(target), fill=True)) <= limit
            decided = np.array(units, dtype=np.int64)
            for g, r in enumerate(ratios):
                decided[g] = projector.wall(decided, g, float(r), float(target))
            assert cost.predict(decided) <= limit
    with pytest.raises(InvalidSettingError, match=r"max_ratio=0\.8 or any less, uniformly, still leaves"):
        projector.check_target(projector.min_cost_ratio * 0.99)


def test_the_wall_prices_candidates_in_one_batched_prediction(
    ragged_cost: LatencyCost, graph: DependencyGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    units = [g.units for g in graph.groups]
    calls: list[int] = []
    real = ragged_cost.predict

    def counted(keep: Any) -> Any:
        calls.append(np.ndim(keep))
        return real(keep)

    monkeypatch.setattr(ragged_cost, "predict", counted)
    projector = BudgetProjector(graph.costs, units, metric="latency", predicted=ragged_cost)
    calls.clear()
    keep = np.array(units, dtype=np.int64)
    projector.wall(keep, 3, 0.0, 0.9)
    assert calls.count(2) == 1  # one batch; the rest are the exact checks of single vectors


def test_a_latency_projector_needs_its_cost_and_only_it_does(
    ragged_cost: LatencyCost, graph: DependencyGraph
) -> None:
    units = [g.units for g in graph.groups]
    with pytest.raises(InvalidSettingError, match="pass predicted=LatencyCost"):
        BudgetProjector(graph.costs, units, metric="latency")
    with pytest.raises(InvalidSettingError, match="not macs: pass metric='latency'"):
        BudgetProjector(graph.costs, units, metric="macs", predicted=ragged_cost)
