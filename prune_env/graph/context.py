"""What an op's rule sees: the node being propagated (:class:`Call`) and the propagation so far (:class:`Context`).

Rules map one op's channels (``rules_functions``, ``rules_modules``); the context gives them the state they
record into and the bookkeeping several rules share: sizes read from tensors, fibres joined along an axis,
and whether a node runs inside a layer whose literal sizes surgery recomputes.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from prune_env.graph.elements import Ids, State, axis_ids, flat_channels, flat_sources
from prune_env.graph.layers import LayerSpec, layer_spec

# Modelled MACs of one op: terms (coef, slots) meaning coef × Π kept(slot), or None when it has none.
Macs = list[tuple[int, tuple[int, ...]]] | None


@dataclass
class Mapped:
    """An op whose channels a rule could map: its output ids and its modelled MACs."""

    ids: Ids
    macs: Macs = None


@dataclass
class Call:
    """One traced node at propagation: its (meta or real) output and arguments, and the ids of those."""

    node: torch.fx.Node
    value: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    id_args: tuple[Any, ...]
    id_kwargs: dict[str, Any]

    @property
    def first(self) -> Ids:
        """Ids of the first argument (the tensor most ops act on)."""
        return self.id_args[0] if self.id_args else None


def nodes_in(args: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, found.append)
    return found


class Context:
    """The propagation's state plus the bookkeeping shared by rules."""

    def __init__(self, model: nn.Module, state: State, modules: Mapping[str, nn.Module]) -> None:
        self.model = model
        self.state = state
        # Sizes read from tensors: per integer node, the channel ids of every axis it counts (a torch.Size
        # node: one such list per axis). An axis whose ids are constant counts nothing prunable.
        self.size_src: dict[torch.fx.Node, Any] = {}
        self.measured_macs = 0  # what the FLOP counter measured for the current node (unmodelled ops)
        self._modules = modules  # by qualified name (get_submodule walks the path on every call)

    def submodule(self, target: Any) -> nn.Module:
        return self._modules[target]

    def describe(self, n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return f"{type(self.submodule(n.target)).__name__} module {n.target!r}"
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        return f"{n.op} {name!r}"

    # -- sizes read from tensors ----------------------------------------------------------------------
    def record_size(self, n: torch.fx.Node, args: tuple[Any, ...], first: Any) -> None:
        """Remember which channels the integer(s) ``n`` computes count (see ``size_src``)."""
        target = n.target
        if target == "size" or (target is getattr and len(args) > 1 and args[1] == "shape"):
            if not isinstance(first, torch.Tensor):
                return
            axes = [axis_ids(first, k) for k in range(first.ndim)]
            dim = args[1] if target == "size" and len(args) > 1 else n.kwargs.get("dim")
            self.size_src[n] = axes[dim] if isinstance(dim, int) else tuple(axes)
            return
        if target is operator.getitem and n.args and n.args[0] in self.size_src:
            whole = self.size_src[n.args[0]]  # type: ignore[index]
            if isinstance(whole, tuple) and isinstance(args[1], int):
                self.size_src[n] = whole[args[1]]
            elif isinstance(whole, tuple):  # a slice of the shape: every axis it keeps
                self.size_src[n] = [v for axis in whole[args[1]] for v in axis]
            return
        sources = [v for a in nodes_in((n.args, n.kwargs)) for v in flat_sources(self.size_src.get(a))]
        if sources:
            self.size_src[n] = sources

    def couple_sizes(
        self, n: torch.fx.Node, size_args: Iterable[Any], x: torch.Tensor, shape: Sequence[int]
    ) -> bool:
        """A size computed from channels (``C`` of ``b, c, h, w = y.shape``) shapes ``x``: after pruning it
        counts the kept channels it was read from, so those and ``x``'s channels must keep the same number.
        Couple them position by position; False (and poison) when their counts differ."""
        channels = flat_channels(x, shape)
        ok = True
        for arg in size_args:
            sources: list[np.ndarray] = (
                flat_sources(self.size_src.get(arg)) if isinstance(arg, torch.fx.Node) else []
            )
            for src in sources:
                src_t = torch.from_numpy(src)
                if channels.numel() in (1, src_t.numel()):
                    self.state.union(src_t, channels)
                else:
                    self.state.poison((src_t, x), n, f"{self.describe(n)} sizes channels by another tensor's")
                    ok = False
        return ok

    def adapts(self, arg: Any) -> bool:
        """A size argument that follows a pruned tensor: -1, or computed from channel counts (a size
        computed only from batch or spatial extents is as literal as a number)."""
        if isinstance(arg, torch.fx.Node):
            return bool(flat_sources(self.size_src.get(arg)))
        return bool(arg == -1)

    # -- coupling -------------------------------------------------------------------------------------
    def join_along(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Make every fibre of ``x`` along ``axis`` one unit, and return its first slice (keepdim).

        A reduction or softmax along an axis stays exact when pruning removes whole fibres: the elements
        a fibre combines then vanish together with the output they produce. Along a plain channel axis
        this makes all channels one unit (never pruned); along an axis whose positions a reshape already
        bound together (split-attention radix, selective-kernel paths) it changes nothing."""
        axis = axis % x.ndim
        if x.shape[axis] > 1:
            first = x.narrow(axis, 0, 1)
            self.state.union(x, first)
            return first
        return x

    def resized(self, n: torch.fx.Node) -> bool:
        """Whether ``n`` runs directly in a module whose literal channel sizes surgery recomputes."""
        spec = self.resize_spec(n)
        return spec is not None and spec.resize is not None

    def enclosing_spec(self, n: torch.fx.Node) -> LayerSpec | None:
        """The declaration of the module a layer's call (a ``call_module`` node) is made in: the layer
        itself is its stack's innermost entry, the module calling it the next."""
        return self._stack_spec(n, 2)

    def resize_spec(self, n: torch.fx.Node) -> LayerSpec | None:
        """The declaration of the module ``n`` runs directly in, when it has one."""
        return self._stack_spec(n, 1)

    def _stack_spec(self, n: torch.fx.Node, depth: int) -> LayerSpec | None:
        """The declaration of the ``depth``-th innermost module on ``n``'s module stack; beyond the stack
        (a node of the model's own forward has none) the owner is the model."""
        stack = n.meta.get("nn_module_stack")
        entry = next(itertools.islice(reversed(stack.values()), depth - 1, None), None) if stack else None
        owner = entry[1] if entry is not None else type(self.model)
        return layer_spec(owner) if isinstance(owner, type) else None


Rule = Callable[[Context, Call], Mapped | None]
"""Maps one function or method call's channels; None when it cannot (its channels are then frozen)."""
ModuleRule = Callable[[Context, Call, nn.Module], Mapped | None]
"""Maps one layer call's channels (the layer is passed in); None when it cannot."""
