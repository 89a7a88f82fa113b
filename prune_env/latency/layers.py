"""Which MACs terms of a graph are layers we can time alone, and how to rebuild one at other widths.

A MACs term of the :class:`~prune_env.costs.CostModel` is labelled with the module that computes it and
depends on the kept counts of at most two slots: the layer's kept inputs and kept outputs (a depthwise
convolution: its channels, one slot). A term whose module is a convolution or a ``Linear`` is a *timed
layer*: it is measured alone, as a fresh module of the same type and hyper-parameters at other widths, on
an input of its real shape (captured with forward hooks during one forward pass of the example input).
Every other term (function calls, attention, layers we do not rebuild) is timed only as part of the whole
model, in the table's residual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prune_env.graph import DependencyGraph

# Module types rebuilt at other widths (subclasses too: their forward is the parent's).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TIMED_TYPES = (*CONV_TYPES, nn.Linear)


@dataclass(frozen=True)
class LayerAxis:
    """One width axis of a timed layer: the graph's slot, its full width, the smallest width pruning can
    leave and whether pruning changes it at all."""

    slot: int | None  # None: the axis is not a slot of the term (fixed, e.g. a depthwise conv's input)
    full: int
    low: int
    varies: bool


@dataclass(frozen=True)
class LayerSpec:
    """A timed layer, as measured: what it is, its input's shape and its two width axes."""

    term: int  # index of the MACs term in graph.costs.compiled_terms("macs")
    label: str  # the module's qualified name
    kind: str  # "conv", "depthwise" or "linear"
    module_type: str  # e.g. "Conv2d"
    input_shape: tuple[int, ...]  # one sample's input (no batch dimension)
    inputs: LayerAxis
    outputs: LayerAxis
    # The layer ran on a channels-last input (the zoo's CNNs convert theirs): timed so too, since a
    # convolution's kernels, and so its speed, differ between memory formats.
    channels_last: bool = False
    out_spatial: int = 1  # output elements per channel per sample: what its activations cost per channel

    def config(self) -> tuple[object, ...]:
        """What decides its latency besides widths (layers sharing it are measured once)."""
        return (
            self.kind,
            self.module_type,
            self.input_shape,
            self.inputs.full,
            self.outputs.full,
            self.channels_last,
        )


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels-last, and not also contiguous (a 1x1 image or one channel is both)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@dataclass(frozen=True)
class LayerCall:
    """One call of a module, as seen by a forward hook."""

    input_shape: tuple[int, ...]  # its first input's shape, batch dimension included
    channels_last: bool  # that input was laid out channels-last
    out_spatial: int  # output elements per channel per sample (an image's pixels; 1 for a vector)


def capture_calls(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], names: Sequence[str]
) -> dict[str, list[LayerCall]]:
    """Per module named in ``names``: each of its calls (in call order), from one forward pass of
    ``example_inputs`` (in inference mode; hooks removed after)."""
    modules = dict(model.named_modules())
    calls: dict[str, list[LayerCall]] = {name: [] for name in names}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[object, ...], output: object, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                x = args[0]
                # Convolutions: channels at dim 1, the rest spatial; linear layers: features last.
                rest = output.shape[2:] if isinstance(module, CONV_TYPES) else output.shape[1:-1]
                calls[name].append(LayerCall(tuple(x.shape), is_channels_last(x), math.prod(rest)))

        handles.append(modules[name].register_forward_hook(hook))
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in was_training.items():
            m.training = flag
    return calls


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CONV_TYPES):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        return "conv" if module.groups == 1 else None  # grouped convs: channels come in groups, not timed
    return None


def timed_layers(
    model: nn.Module, graph: DependencyGraph, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[list[LayerSpec], list[int]]:
    """The timed layers of ``graph``'s MACs terms, and the indices of the terms that are not timed alone."""
    costs = graph.costs
    _, s1, s2 = costs.compiled_terms("macs")
    labels = costs.macs_labels
    one = len(costs.fixed)  # the constant slot
    full = costs.kept(costs.full_keep())
    low = costs.kept(np.ones(costs.n_groups, dtype=np.int64))
    varies = [bool(row.any()) for row in np.asarray(costs.mult)]  # pruning changes the slot
    modules = dict(model.named_modules())
    # "" labels a function call's MACs (and would name the root module): never a layer timed alone.
    kinds = {label: _kind(modules[label]) for label in set(labels) if label and label in modules}
    shapes = capture_calls(model, example_inputs, [label for label, k in kinds.items() if k])
    calls: dict[str, int] = {}
    layers: list[LayerSpec] = []
    untimed: list[int] = []
    for term, label in enumerate(labels):
        kind = kinds.get(label)
        seen = shapes.get(label, [])
        # The n-th term of a module is its n-th call (terms are recorded in execution order).
        call = calls.get(label, 0)
        calls[label] = call + 1
        slots = [int(s) for s in (s1[term], s2[term]) if s != one]
        by_kind = {graph.slots[s].kind: s for s in slots}
        if (
            kind is None
            or call >= len(seen)
            or len(by_kind) != len(slots)
            or not set(by_kind) <= {"in", "out"}
        ):
            untimed.append(term)
            continue
        module = modules[label]

        def axis(slot: int | None, width: int) -> LayerAxis:
            if slot is None:
                return LayerAxis(None, width, width, False)
            return LayerAxis(slot, int(full[slot]), max(1, int(low[slot])), varies[slot])

        shape = seen[call].input_shape[1:]
        if kind == "linear":
            assert isinstance(module, nn.Linear)
            axes = (
                axis(by_kind.get("in"), module.in_features),
                axis(by_kind.get("out"), module.out_features),
            )
        else:
            assert isinstance(module, CONV_TYPES)
            ins = axis(by_kind.get("in"), module.in_channels)
            outs = axis(by_kind.get("out"), module.out_channels)
            if kind == "depthwise":  # one width: its channels (the output slot; the input follows it)
                if "in" in by_kind or outs.slot is None:
                    untimed.append(term)
                    continue
                ins = LayerAxis(None, module.in_channels, module.in_channels, False)
            axes = (ins, outs)
        out_width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        if axes[1].full != out_width or (kind != "depthwise" and axes[0].full != _channels_in(kind, shape)):
            untimed.append(term)  # a slot that does not count the layer's channels: not rebuilt at widths
            continue
        layers.append(
            LayerSpec(
                term,
                label,
                kind,
                type(module).__name__,
                shape,
                *axes,
                channels_last=seen[call].channels_last,
                out_spatial=seen[call].out_spatial,
            )
        )
    return layers, untimed


def _channels_in(kind: str, shape: tuple[int, ...]) -> int:
    if not shape:
        return -1
    return shape[-1] if kind == "linear" else shape[0]


def instantiate(
    model: nn.Module, spec: LayerSpec, width_in: int, width_out: int, batch: int, device: torch.device
) -> tuple[nn.Module, torch.Tensor]:
    """A fresh module like ``spec``'s at ``width_in`` -> ``width_out`` (depthwise: ``width_out`` channels),
    with the original's hyper-parameters and dtype, and a random input for it at ``batch``."""
    original = model.get_submodule(spec.label)
    weight = getattr(original, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    has_bias = getattr(original, "bias", None) is not None
    layer: nn.Module
    if isinstance(original, nn.Linear):
        layer = nn.Linear(width_in, width_out, bias=has_bias)
        shape = (batch, *spec.input_shape[:-1], width_in)
    else:
        assert isinstance(original, CONV_TYPES)
        # The torch class itself, not a subclass: a subclass's constructor may take other arguments.
        base = next(t for t in CONV_TYPES if isinstance(original, t))
        if spec.kind == "depthwise":
            multiplier = original.out_channels // original.in_channels
            channels = max(1, width_out // multiplier)
            width_in, width_out, groups = channels, channels * multiplier, channels
        else:
            groups = 1
        layer = base(
            width_in,
            width_out,
            original.kernel_size,  # type: ignore[arg-type]
            stride=original.stride,  # type: ignore[arg-type]
            padding=original.padding,  # type: ignore[arg-type]
            dilation=original.dilation,  # type: ignore[arg-type]
            groups=groups,
            bias=has_bias,
            padding_mode=original.padding_mode,
        )
        shape = (batch, width_in, *spec.input_shape[1:])
    layer = layer.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    if spec.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if isinstance(weight, torch.Tensor) and is_channels_last(
        weight
    ):  # the weight's format as the model has it
        layer = layer.to(memory_format=torch.channels_last)
    return layer, x


__all__ = [
    "CONV_TYPES",
    "TIMED_TYPES",
    "LayerAxis",
    "LayerCall",
    "LayerSpec",
    "capture_calls",
    "instantiate",
    "is_channels_last",
    "timed_layers",
]
