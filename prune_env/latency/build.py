"""Measuring a latency table: every timed layer alone on its width grid, and the whole model.

Layers that share a configuration (type, hyper-parameters, input shape and memory format, full widths:
the repeated blocks of a ResNet) are measured once. Each grid point builds a fresh layer at those widths on
a random input of the layer's real shape and memory format (from forward hooks) at the settings' batch, and
times it by the protocol of :mod:`prune_env.latency.measure`. The whole model is then measured unpruned and
pruned uniformly at :data:`RESIDUAL_FIT_RATIOS`, to fit how the residual shrinks with the kept activations
(:mod:`prune_env.latency.table`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from prune_env.graph import DependencyGraph
from prune_env.latency.grid import axis_widths
from prune_env.latency.layers import LayerAxis, LayerSpec, instantiate, timed_layers
from prune_env.latency.measure import NoiseEstimate, Timing, estimate_noise, measure_callable, module_forward
from prune_env.latency.settings import LatencySettings, device_name
from prune_env.latency.table import LatencyTable, LayerTable, TableMeta, model_hash
from prune_env.surgery import prune

# Repeated whole-model measurements behind the table's noise estimate.
NOISE_ROUNDS = 3
# Uniform pruning ratios at which the whole model is measured again to fit the residual's slope.
RESIDUAL_FIT_RATIOS = (0.3, 0.6, 0.9)


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def table_meta(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    settings: LatencySettings,
    architecture: str | None = None,
) -> TableMeta:
    """What a table for ``model`` on ``example_inputs`` under ``settings`` is measured for, on this machine."""
    shapes = tuple(tuple(int(d) for d in x.shape[1:]) for x in _as_tuple(example_inputs))
    return TableMeta(
        model=architecture,
        model_hash=model_hash(model, shapes),
        input_shape=shapes,
        batch=settings.batch,
        device=settings.device,
        device_name=device_name(settings.device),
        threads=settings.threads,
        torch=torch.__version__,
    )


def _axis_grid(axis: LayerAxis, settings: LatencySettings) -> tuple[int, ...]:
    if not axis.varies:
        return (axis.full,)
    return axis_widths(axis.full, axis.low, settings.grid_points)


def _key(spec: LayerSpec, width_in: int, width_out: int) -> tuple[object, ...]:
    """What one measurement is of: the layer's configuration at two widths."""
    return (*spec.config(), width_in, width_out)


def build_table(
    model: nn.Module,
    graph: DependencyGraph,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    settings: LatencySettings,
    architecture: str | None = None,
) -> LatencyTable:
    """Measure the latency table of ``model`` (whose graph is ``graph``) on ``example_inputs``.

    ``example_inputs`` may have any batch size: its first sample, repeated to ``settings.batch``, is what
    is timed. ``architecture``: a name recorded in the table for people (the structure hash identifies it).
    """
    from tqdm.auto import tqdm

    graph.check_model(model, "build_table")
    meta = table_meta(model, example_inputs, settings, architecture)
    one_sample = tuple(x[:1] for x in _as_tuple(example_inputs))
    specs, untimed = timed_layers(model, graph, one_sample)
    labels = graph.costs.macs_labels
    device = settings.torch_device
    grids = {s.term: (_axis_grid(s.inputs, settings), _axis_grid(s.outputs, settings)) for s in specs}
    # One measurement per distinct (configuration, widths): repeated blocks cost nothing more.
    todo: dict[tuple[object, ...], tuple[LayerSpec, int, int]] = {}
    for s in specs:
        ins, outs = grids[s.term]
        for w_in in ins:
            for w_out in outs:
                todo.setdefault(_key(s, w_in, w_out), (s, w_in, w_out))
    measured: dict[tuple[object, ...], Timing] = {}
    total = len(todo) + NOISE_ROUNDS + len(RESIDUAL_FIT_RATIOS)
    with tqdm(total=total, desc="latency table", disable=not settings.progress) as bar:
        for key, (spec, w_in, w_out) in todo.items():
            layer, x = instantiate(model, spec, w_in, w_out, settings.batch, device)
            measured[key] = measure_callable(functools.partial(layer, x), settings)
            bar.update()
        forward = module_forward(model, one_sample, settings)
        noise = _quietest_noise(forward, settings)
        bar.update(NOISE_ROUNDS)
        whole = measure_callable(forward, settings)
        pruned_ms = []
        for ratio in RESIDUAL_FIT_RATIOS:
            keep = graph.keep_counts(ratio)
            pruned = prune(model, one_sample, ratio, graph=graph)
            pruned_ms.append((keep, measure_callable(module_forward(pruned, one_sample, settings), settings)))
            bar.update()
    layers = _layer_tables(specs, grids, measured)
    protocol = {
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "min_sample_ms": settings.min_sample_ms,
        "noise_bound": settings.noise_bound,
        "max_attempts": settings.max_attempts,
    }
    table = LatencyTable(
        meta=meta,
        layers=tuple(layers),
        untimed=tuple(labels[t] or "<function call>" for t in untimed),
        whole=whole,
        noise=noise.relative_spread,
        protocol=protocol,
    )
    return fit_residual(table, [(graph.costs.kept(keep), timing.median_ms) for keep, timing in pruned_ms])


def _quietest_noise(forward: Callable[[], object], settings: LatencySettings) -> NoiseEstimate:
    """The protocol's noise on the whole model, estimated again (up to ``settings.max_attempts`` times) while
    it exceeds ``settings.noise_bound``: a spread that large means other work shared the cores, and the
    quietest estimate is the one that describes the table."""
    best = estimate_noise(forward, settings, rounds=NOISE_ROUNDS)
    for _ in range(settings.max_attempts - 1):
        if best.relative_spread <= settings.noise_bound:
            break
        again = estimate_noise(forward, settings, rounds=NOISE_ROUNDS)
        best = min(best, again, key=lambda n: n.relative_spread)
    return best


def _layer_tables(
    specs: Sequence[LayerSpec],
    grids: dict[int, tuple[tuple[int, ...], tuple[int, ...]]],
    measured: dict[tuple[object, ...], Timing],
) -> list[LayerTable]:
    """Each timed layer's grid of measured milliseconds (and noisy flags)."""
    layers = []
    for s in specs:
        ins, outs = grids[s.term]
        cells = [[measured[_key(s, w_in, w_out)] for w_out in outs] for w_in in ins]
        layers.append(
            LayerTable(
                term=s.term,
                label=s.label,
                kind=s.kind,
                module_type=s.module_type,
                input_shape=s.input_shape,
                in_slot=s.inputs.slot,
                out_slot=s.outputs.slot,
                in_widths=ins,
                out_widths=outs,
                ms=tuple(tuple(c.median_ms for c in row) for row in cells),
                noisy=tuple(tuple(c.noisy for c in row) for row in cells),
                out_spatial=s.out_spatial,
            )
        )
    return layers


def fit_residual(table: LatencyTable, measured: Sequence[tuple[np.ndarray, float]]) -> LatencyTable:
    """``table`` with its residual's slope fitted to whole-model measurements of pruned models: pairs of
    (kept count per slot, measured ms). Least squares through the full-width point (which stays exact),
    slope never below zero (a residual that grew with pruning would be noise, not work)."""
    points = []
    for kept, ms in measured:
        w_in, w_out = table.layer_widths(kept)
        residual = ms - float(table.layer_ms(w_in, w_out).sum())
        points.append((float(table.activations(w_out)[0]), residual))
    removed = np.array([1.0 - a for a, _ in points])
    saved = np.array([table.residual_ms - r for _, r in points])
    denominator = float(removed @ removed)
    slope = max(0.0, float(removed @ saved) / denominator) if denominator > 0 else 0.0
    return dataclasses.replace(table, residual_slope_ms=slope, residual_points=tuple(points))


__all__ = ["build_table", "fit_residual", "table_meta"]
