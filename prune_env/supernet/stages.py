"""Stage boundaries of a model, found on its traced graph: where Stage-wise Pruning cuts the supernet.

A boundary is a module whose output is the only value that later computation reads (a *cut* of the data
flow: a residual stage's last block, not a block whose input a shortcut still carries past it), and whose
channels the dependency graph can follow back to a prunable layer dimension through channel-preserving
operations (activations, additions, normalisation). Stage-wise training feeds each stage the unpruned
model's output of the previous boundary — restricted to the channels a sub-network keeps — and distils
the stage's output towards the unpruned model's.

By default the stages end where the spatial resolution changes (the last cut before each change), and
the last stage runs to the logits: a ResNet for CIFAR gets its three stages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from prune_env.errors import InvalidSettingError
from prune_env.graph import DependencyGraph
from prune_env.graph.tracing import trace

# Operations whose output channel c is computed from input channel c alone (or from channel c of every
# tensor input, for the element-wise binary ones): a boundary's channels are those of their input.
_CHANNEL_PRESERVING_FUNCTIONS = {
    "add",
    "iadd",
    "mul",
    "imul",
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "gelu",
    "silu",
    "sigmoid",
    "hardswish",
    "hardsigmoid",
    "leaky_relu",
    "elu",
    "dropout",
    "identity",
    "contiguous",
}
_CHANNEL_PRESERVING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
)


@dataclass(frozen=True)
class StageBoundary:
    """The output of module ``module`` ends a stage; its channels (dim 1) are the indices of slot
    ``slot`` of the dependency graph, so a sub-network keeps ``rebuilder.kept_positions(slot)`` of them."""

    module: str
    slot: int
    shape: tuple[int, ...]


def find_boundaries(
    model: nn.Module,
    graph: DependencyGraph,
    example_inputs: torch.Tensor,
    modules: Sequence[str] | None = None,
) -> list[StageBoundary]:
    """The stage boundaries of ``model``: the named ``modules`` (checked), or by default the last cut
    before each change of spatial resolution. The model is run once on ``example_inputs`` (eval mode,
    no gradient) to read shapes; it is not modified."""
    fx_graph = trace(model)
    nodes = [n for n in fx_graph.nodes if n.op != "get_attr"]
    position = {n: i for i, n in enumerate(nodes)}
    cut = _cuts(nodes, position)
    slot_of_layer: dict[str, int] = {}
    for index, dim in enumerate(graph.slots):
        if dim.kind in ("out", "channel") and dim.dim in (0, 1):
            slot_of_layer.setdefault(dim.layer, index)
    named = dict(model.named_modules())
    last_node: dict[str, torch.fx.Node] = {}
    calls: dict[str, int] = {}
    for n in nodes:
        for key in n.meta.get("nn_module_stack", {}):
            name, _, repeat = key.partition("@")
            if repeat:
                calls[name] = max(calls.get(name, 1), int(repeat) + 1)
            last_node[name] = n
    candidates: dict[torch.fx.Node, str] = {}  # boundary node -> outermost module ending there
    for name, node in last_node.items():
        if name not in named or calls.get(name, 1) != 1 or not cut[position[node]]:
            continue
        if node in candidates and len(candidates[node]) <= len(name):
            continue
        candidates[node] = name
    shapes = _output_shapes(model, example_inputs, set(candidates.values()))
    found: list[StageBoundary] = []
    for node, name in sorted(candidates.items(), key=lambda item: position[item[0]]):
        channels = _channel_slot(node, named, slot_of_layer)
        shape = shapes.get(name)
        if channels is None or shape is None or len(shape) < 3:
            continue
        if shape[1] == graph.slots[channels].size:
            found.append(StageBoundary(name, channels, shape))
    if modules is not None:
        by_name = {b.module: b for b in found}
        missing = [m for m in modules if m not in by_name]
        if missing:
            raise InvalidSettingError(
                f"stage boundaries {missing} are not usable: a boundary must be a module called once whose "
                "output is the only value later layers read and whose channels belong to a prunable layer; "
                f"usable here: {list(by_name)[:12]}"
            )
        return [by_name[m] for m in modules]
    # The last cut before each change of spatial size; the final resolution's stage runs to the logits.
    chosen = [b for b, after in itertools.pairwise(found) if b.shape[2:] != after.shape[2:]]
    return chosen


def _cuts(nodes: list[torch.fx.Node], position: dict[torch.fx.Node, int]) -> list[bool]:
    """``cut[i]``: no value computed before node ``i`` is read after it (its output is all that flows on)."""
    reach = 0  # the furthest reader of any node so far
    cut = []
    for i, n in enumerate(nodes):
        cut.append(reach <= i and n.op not in ("placeholder", "output"))
        last = max((position[u] for u in n.users if u in position), default=i)
        reach = max(reach, last)
    return cut


def _channel_slot(
    node: torch.fx.Node, named: dict[str, nn.Module], slot_of_layer: dict[str, int]
) -> int | None:
    """The graph slot whose indices are ``node``'s channels, followed back through channel-preserving ops."""
    while True:
        if node.op == "call_module":
            target = str(node.target)
            if target in slot_of_layer:
                return slot_of_layer[target]
            if not isinstance(named.get(target), _CHANNEL_PRESERVING_MODULES):
                return None
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if name not in _CHANNEL_PRESERVING_FUNCTIONS:
                return None
        else:
            return None
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if not inputs:
            return None
        node = inputs[0]


@torch.no_grad()
def _output_shapes(
    model: nn.Module, example_inputs: torch.Tensor, names: set[str]
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if name in names:

            def record(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
                if isinstance(out, torch.Tensor):
                    shapes[name] = tuple(out.shape)

            handles.append(m.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes
