"""Propagation: run the traced graph and, next to every value, its channel ids (see ``elements``).

An fx interpreter executes each node — on meta tensors (shapes only) unless the model has a black-box
layer, whose output may depend on its input's values — and hands the node to the rule the op tables name
for it. What the rules learn accumulates in a :class:`~prune_env.graph.elements.State`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prune_env.graph.capture import CAPTURED_VALUE
from prune_env.graph.context import Call, Context, Mapped
from prune_env.graph.elements import Ids, State, poison_like
from prune_env.graph.layers import layer_spec
from prune_env.graph.meta import NOT_COVERED, meta_call, same_as_input, to_meta
from prune_env.graph.ops import FUNCTION_OPS, module_op
from prune_env.graph.rules_functions import pack
from prune_env.graph.rules_modules import channelwise_leaf
from prune_env.graph.tracing import TENSOR_CONSTANT


class NeedsRealValues(Exception):
    """Raised on the meta pass by a node whose output depends on its input's values."""


def is_black_box(m: nn.Module) -> bool:
    """A leaf layer no table or declaration describes: its output may depend on its input's values."""
    spec = layer_spec(type(m))
    return module_op(type(m)) is None and not (spec is not None and spec.is_leaf)


def calls_black_box(graph: torch.fx.Graph, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``graph`` calls a black-box layer (then only real values propagate faithfully)."""
    return any(n.op == "call_module" and is_black_box(modules[str(n.target)]) for n in graph.nodes)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


class Propagator(torch.fx.Interpreter):
    """Runs ``graph`` (traced from ``model``) and propagates channel ids into ``state``."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, state: State, meta: bool) -> None:
        super().__init__(model, garbage_collect_values=True, graph=graph)
        self.ctx = Context(model, state, self.submodules)
        self.state = state
        self.meta = meta
        self.ids: dict[torch.fx.Node, Ids] = {}
        self.flops = FlopCounterMode(display=False)
        # Tensors traced code uses that the model does not hold as parameters or buffers.
        self.constants = {n.target: n.meta[TENSOR_CONSTANT] for n in graph.nodes if TENSOR_CONSTANT in n.meta}

    def fetch_attr(self, target: str) -> Any:
        # The owner by name instead of fx's walk along the path: traced-through norm layers fetch their
        # parameters one node each, hundreds per model.
        if target in self.constants:
            return self.constants[target]
        owner, _, attr = target.rpartition(".")
        module = self.submodules.get(owner) if owner else self.module
        if module is None or not hasattr(module, attr):
            return super().fetch_attr(target)  # fx's own error for a missing attribute
        return getattr(module, attr)

    # -- execution on meta tensors: shapes without data or arithmetic ----------------------------------
    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().placeholder(target, args, kwargs)
        return to_meta(value) if self.meta else value

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return to_meta(value) if self.meta else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = self._shape_rule(target, args, kwargs)
        return super().call_function(target, args, kwargs) if value is NOT_COVERED else value

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = self._shape_rule(target, args, kwargs)
        return super().call_method(target, args, kwargs) if value is NOT_COVERED else value

    def _shape_rule(self, target: Any, args: Any, kwargs: Any) -> Any:
        """On the meta pass, the op's output from its table entry's shape rule, else NOT_COVERED."""
        op = FUNCTION_OPS.get(target) if self.meta else None
        if op is None or op.on_meta is None:
            return NOT_COVERED
        return op.on_meta(args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not self.meta:
            return super().call_module(target, args, kwargs)
        m = self.ctx.submodule(target)
        spec = layer_spec(type(m))
        if spec is not None and spec.is_leaf:
            # Declared: its channels follow the declaration whatever its values, so shapes suffice. A
            # layer like a BatchNorm keeps its input's shape, which running it on meta tensors (Python
            # reference kernels for the norm and any fused activation) would only confirm, slowly.
            if spec.like is not None and issubclass(spec.like, nn.modules.batchnorm._BatchNorm):
                value = same_as_input(args, kwargs)
                if value is not NOT_COVERED:
                    return value
            return meta_call(m, args, kwargs)
        op = module_op(type(m))
        if op is None:
            # A black-box leaf may branch on its input's values (and its MACs with it): only real data is
            # faithful, so the whole pass is redone with real tensors.
            raise NeedsRealValues(target)
        if op.on_meta is not None:
            value = op.on_meta(m, args, kwargs)
            if value is not NOT_COVERED:
                return value
        return m(*args, **kwargs)  # stateless library layers run on meta tensors as they are

    # The interpreter frees values it no longer needs; free ids alongside them.
    def run_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self.state.record_costs and self._may_hide_macs(n) and _holds_tensor((args, kwargs)):
            # Only ops we do not model, on tensors, are run under the FLOP counter: it routes every op
            # through Python dispatch, which makes convolutions an order of magnitude slower (and entering
            # it costs more than the Python arithmetic on sizes that makes up many unmodelled nodes).
            self.flops.flop_counts.clear()
            with self.flops:
                value = getattr(self, n.op)(n.target, args, kwargs)
            macs = self.flops.get_total_flops() // 2
        elif not self.meta and CAPTURED_VALUE in n.meta:
            value = n.meta[CAPTURED_VALUE]  # a captured graph: the recorded run's value, not a second run
            macs = 0
        else:
            value = getattr(self, n.op)(n.target, args, kwargs)
            macs = 0
        ids = self.ids
        id_args = torch.fx.node.map_arg(n.args, ids.get)
        id_kwargs = torch.fx.node.map_arg(n.kwargs, ids.get)
        self.ctx.measured_macs = macs
        ids[n] = self.propagate(Call(n, value, args, kwargs, id_args, id_kwargs), macs)
        for dead in self.user_to_last_uses.get(n, ()):
            ids.pop(dead, None)
            self.ctx.size_src.pop(dead, None)
        return value

    def _may_hide_macs(self, n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return module_op(type(self.ctx.submodule(n.target))) is None
        if n.op in ("call_function", "call_method"):
            t = n.target
            return not (t in FUNCTION_OPS or (isinstance(t, type) and issubclass(t, tuple)))
        return False

    # ---------------------------------------------------------------------------------------------
    def propagate(self, c: Call, macs: int) -> Ids:
        st, n, value = self.state, c.node, c.value
        if n.op == "placeholder":
            return poison_like(value)
        if n.op == "output":
            st.poison(c.id_args)
            return None
        if n.op == "get_attr":
            return self._parameter(n, value)
        mapped = self._map(c)
        if mapped is None:
            st.poison((c.id_args, c.id_kwargs), n, self.ctx.describe(n))
            mapped = Mapped(poison_like(value))
        if n.op == "call_module":
            self._record_whole_tensors(str(n.target))
        layer = str(n.target) if n.op == "call_module" else ""
        if macs and not mapped.macs and st.record_costs:
            # A multiply-accumulate op we do not model: its inputs are frozen, so its cost is constant.
            st.poison((c.id_args, c.id_kwargs), n, f"{self.ctx.describe(n)} (unmodelled MACs)")
            st.macs_terms.append((macs, ()))
            st.macs_term_layers.append(layer)
        elif mapped.macs and st.record_costs:
            st.macs_terms.extend(mapped.macs)
            st.macs_term_layers.extend([layer] * len(mapped.macs))
        return mapped.ids

    def _map(self, c: Call) -> Mapped | None:
        """The rule the op tables name for this node; None when it cannot be mapped."""
        n = c.node
        if n.op == "call_module":
            m = self.ctx.submodule(n.target)
            spec = layer_spec(type(m))
            if spec is not None and spec.channelwise:
                return channelwise_leaf(self.ctx, c, m, spec)
            module_rule = module_op(type(m))
            return module_rule.rule(self.ctx, c, m) if module_rule is not None else None
        op = FUNCTION_OPS.get(n.target)
        if op is not None and op.any_value:
            return op.rule(self.ctx, c)
        if not isinstance(c.value, (torch.Tensor, tuple, list)):
            self.ctx.record_size(n, c.args, c.first)  # python arithmetic on sizes: C // 2 counts C's channels
            return Mapped(None)
        if isinstance(n.target, type) and issubclass(n.target, tuple):
            return pack(self.ctx, c)  # namedtuple outputs
        return op.rule(self.ctx, c) if op is not None else None

    def _parameter(self, n: torch.fx.Node, value: Any) -> Ids:
        """A tensor fetched by traced code: a raw parameter whose every element is its own element."""
        st = self.state
        key = (str(n.target), "param")
        if key in st.slot_index:  # the same parameter fetched again
            return torch.from_numpy(st.slots[st.slot_index[key]].ids)
        if TENSOR_CONSTANT in n.meta:
            return poison_like(value)  # not the model's: nothing surgery could slice
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0:
            ids = st.fresh(value.numel(), producer=False).reshape(value.shape)
            slot = st.slot(str(n.target), "Parameter", "param", 0, ids)
            st.slots[slot].param_shape = tuple(value.shape)
            st.slots[slot].ids = ids.numpy().copy()  # keep the full shape for raw parameters
            # The model's own tensor (``value`` is a stand-in on the meta pass), to tie it to the
            # layers that also read it.
            st.use_tensor(f"get_attr {n.target}", self.fetch_attr(str(n.target)), {}, raw_slot=slot)
            return ids
        return poison_like(value)

    def _record_whole_tensors(self, name: str) -> None:
        """Every tensor a layer holds that its rule did not index by channels is used whole: if the tensor
        is tied to another layer, that layer's channels along it must then stay whole too."""
        m = self.ctx.submodule(name)
        # The registries directly: a library layer has no children, and this runs for every call.
        for prefix, sub in m.named_modules(prefix=name) if m._modules else ((name, m),):
            for registry in (sub._parameters, sub._buffers):
                for pname, t in registry.items():
                    if t is not None:
                        self.state.use_tensor(f"{prefix}.{pname}", t, {})
