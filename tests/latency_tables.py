"""Latency tables made by hand for the tests: nothing is timed. Every width of a model's real timed layers
is a grid point, so predictions are the table's numbers exactly; ``ragged`` is not monotone in the widths
(off a multiple of 8 output channels runs slower than the next aligned width, as real kernels can)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from prune_env import build_graph
from prune_env.latency import LatencySettings, LatencyTable, LayerTable, Timing, table_meta
from prune_env.latency.layers import LayerSpec, timed_layers

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
