"""Capture: the graph of a model torch.fx cannot trace, recorded from one run on the example inputs.

A detector's outer forward takes a list of images, branches on their sizes, loops over pyramid levels and
runs post-processing whose shapes depend on the data (anchor generation, box decoding, NMS, RoI
sampling): symbolic tracing stops at the first of these. Running the model once instead resolves every
branch and loop for the example input, and the ops that ran are the graph, in the form tracing gives
(the same node kinds, the same leaf layers), so propagation and its rules apply unchanged:

* every torch function, tensor method and operator called outside a leaf layer that returns a tensor is a
  node (a ``TorchFunctionMode`` sees them at the level torch.fx would: ``F.interpolate``, not what it
  calls);
* a leaf layer (a standard ``torch.nn`` layer or a declared one, as for tracing) is one ``call_module``
  node; what runs inside it is not recorded;
* the model's parameters and buffers are ``get_attr`` nodes; other tensors an op reads (built from
  constants, converted from Python numbers) are constants of their node.

A run resolves branches for this input only, so a capture is refused where that could matter: where a
module's forward reads a value computed from the input or the weights (``if x.sum() > 0``, ``.item()``,
``.tolist()``) and then runs a layer with weights, the other branch might run other layers or couple other
channels (:class:`~prune_env.errors.UntraceableModelError` names the module; declaring it a leaf keeps it
whole). Reads after a module's last layer — post-processing's thresholds, NMS, box decoding — and reads of
values computed from sizes alone (a resize's scale) decide nothing about channels, and are allowed.

Python arithmetic on sizes is not seen (sizes are plain numbers here), so a literal channel size in such
code freezes the channels it touches, as it does in traced code without a size read. The graph is the
example input's: data-dependent steps (how many boxes survive NMS) are whatever that input gave, which
changes no channel's coupling.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from prune_env.graph.tracing import TENSOR_CONSTANT, leaf_predicate

# Tensor dunder methods as the operator functions torch.fx records for them; reflected ones swap operands.
_OPERATORS: dict[str, Callable[..., Any]] = {
    f"__{name.rstrip('_')}__": getattr(operator, name)
    for name in (
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "matmul",
        "neg",
        "and_",
        "or_",
        "xor",
        "invert",
        "lt",
        "le",
        "gt",
        "ge",
        "eq",
        "ne",
        "getitem",
        "setitem",
        "iadd",
        "isub",
        "imul",
        "itruediv",
    )
}
_REFLECTED: dict[str, Callable[..., Any]] = {
    f"__r{name}__": getattr(operator, name) for name in ("add", "sub", "mul", "truediv", "pow", "matmul")
}


# node.meta key: what the node's op returned in the recorded run. Propagation replays these values instead
# of running the model a second time (the ops that ran, on the same inputs, give the same shapes).
CAPTURED_VALUE = "prune_env_captured_value"

# Calls that turn a tensor's values into Python values a forward can branch on.
_READS = frozenset(
    {
        "__bool__",
        "item",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
        "tolist",
        "is_nonzero",
        "equal",
        "allclose",
    }
)


class BranchOnValuesError(Exception):
    """A module read a data-dependent value, then ran a layer with weights: the run's graph may not hold
    on other inputs."""

    def __init__(self, module: str, module_type: str, read: str, layer: str) -> None:
        super().__init__(module, module_type, read, layer)
        self.module, self.module_type, self.read, self.layer = module, module_type, read, layer


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value`` (nested in tuples, lists and dicts); a flat tuple or list, the common case of
    an op's arguments, without a pytree walk."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and not any(isinstance(v, (tuple, list, dict)) for v in value):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _holds_tensor(value: Any) -> bool:
    return bool(_tensors(value))


class _Recorder(TorchFunctionMode):
    """Records the ops of one eager run into ``graph`` (see the module's docstring)."""

    def __init__(
        self, model: nn.Module, graph: torch.fx.Graph, leaf: Callable[[nn.Module, str], bool]
    ) -> None:
        super().__init__()
        self.graph = graph
        self.leaf = leaf
        self.modules = dict(model.named_modules())
        self.names = {id(m): name for name, m in self.modules.items()}
        parameters = list(model.named_parameters())
        # The modules that hold a parameter, themselves or below: a layer "with weights".
        self.weighted = {""}
        for pname, _ in parameters:
            parts = pname.split(".")[:-1]
            self.weighted.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        self.tensor_names: dict[int, str] = {}
        for name, t in [*parameters, *model.named_buffers()]:
            self.tensor_names.setdefault(id(t), name)
        # id(tensor) -> (tensor, node): the tensor is kept so its id is not reused while recording.
        self.nodes: dict[int, tuple[torch.Tensor, torch.fx.Node]] = {}
        self.attrs: dict[str, torch.fx.Node] = {}
        self.constants = 0
        self.in_leaf = 0
        # Tensors computed from the inputs or the weights (others come from sizes and constants).
        self.data: set[int] = set(self.tensor_names)
        # The modules whose forward is running, outermost first, each with the first data-dependent read
        # its own code made in this call (None until then).
        self.stack: list[list[Any]] = []
        self.branch: BranchOnValuesError | None = None
        self.clock = 0  # counts the calls of layers with weights
        self.last_run: dict[str, int] = {}  # layer -> the clock when it last ran

    # -- tensors to nodes ------------------------------------------------------------------------------
    def bind(self, value: Any, node: torch.fx.Node) -> None:
        """``value`` (the output of ``node``) and the tensors inside it, each to the node that yields it."""
        node.meta[CAPTURED_VALUE] = value
        if isinstance(value, torch.Tensor):
            self.nodes[id(value)] = (value, node)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if _holds_tensor(item):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, i)))
        elif isinstance(value, dict):
            for key, item in value.items():
                if _holds_tensor(item):
                    self.bind(item, self.graph.call_function(operator.getitem, (node, key)))

    def arg(self, value: Any) -> Any:
        """``value`` with every tensor replaced by the node that yields it."""
        if isinstance(value, torch.Tensor):
            found = self.nodes.get(id(value))
            if found is not None and found[0] is value:
                return found[1]
            return self._attribute(value)
        if isinstance(value, (tuple, list)):
            items = [self.arg(v) for v in value]
            return (
                tuple(items)
                if isinstance(value, tuple) and not hasattr(value, "_fields")
                else (type(value)(*items) if isinstance(value, tuple) else items)
            )
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self.arg(value.start), self.arg(value.stop), self.arg(value.step))
        return value

    def _attribute(self, t: torch.Tensor) -> torch.fx.Node:
        name = self.tensor_names.get(id(t))
        if name is None:
            node = self.graph.get_attr(f"_tensor_constant{self.constants}")
            self.constants += 1
            node.meta[TENSOR_CONSTANT] = t
        else:
            node = self.attrs.get(name) or self.graph.get_attr(name)
            self.attrs[name] = node
        self.nodes[id(t)] = (t, node)
        return node

    # -- recording -------------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        value = func(*args, **kwargs)
        if self.in_leaf:
            return value
        from_data = any(
            id(t) in self.data
            for t in (_tensors(args) + _tensors(list(kwargs.values())) if kwargs else _tensors(args))
        )
        name = getattr(func, "__name__", "")
        if from_data and name in _READS and self.stack and self.stack[-1][1] is None:
            self.stack[-1][1] = (f"{name}()", self.clock)
        if not (_holds_tensor(value) or name == "__setitem__"):
            return value
        if from_data:
            self.data.update(id(t) for t in _tensors(value))
        kind, target, args = _node_kind(func, args)
        node = self.graph.create_node(kind, target, self.arg(tuple(args)), self.arg(kwargs))
        if value is not None:
            self.bind(value, node)
        return value

    def _check_branch(self, name: str, read: tuple[str, int], start: int) -> None:
        """``name``'s call (from clock ``start``) read a data-dependent value at clock ``read[1]``: every
        layer with weights under it must have run in this call, and before the read."""
        what, at = read
        inside_leaf: tuple[str, ...] = ()
        for sub, m in self.modules[name].named_modules(prefix=name):
            if sub == name or (inside_leaf and sub.startswith(inside_leaf)) or not self.leaf(m, sub):
                continue
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
                continue  # a container is never called: its layers are
            inside_leaf = (f"{sub}.",)
            if sub not in self.weighted:
                continue
            ran = self.last_run.get(sub)
            if ran is None or not start < ran <= at:
                self.branch = BranchOnValuesError(name, type(self.modules[name]).__name__, what, sub)
                return

    def call_module(self, module: nn.Module, call: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        name = self.names.get(id(module))
        if self.in_leaf or name is None:
            return call(*args, **kwargs)
        if not self.leaf(module, name):
            self.stack.append([name, None, self.clock])
            try:
                return call(*args, **kwargs)
            finally:
                _, read, start = self.stack.pop()
                if read is not None and self.branch is None:
                    self._check_branch(name, read, start)
        if name in self.weighted:
            self.clock += 1
            self.last_run[name] = self.clock
        self.in_leaf += 1
        try:
            value = call(*args, **kwargs)
        finally:
            self.in_leaf -= 1
        node = self.graph.call_module(name, self.arg(tuple(args)), self.arg(kwargs))
        self.bind(value, node)
        self.data.update(id(t) for t in _tensors(value))
        return value


def _node_kind(func: Any, args: Sequence[Any]) -> tuple[str, Any, Sequence[Any]]:
    """How torch.fx would record a call of ``func``: an operator, a tensor method or a function."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a tensor property: x.T, x.mT
        return "call_function", getattr, (args[0], func.__self__.__name__)
    if name in _OPERATORS and getattr(torch.Tensor, name, None) is func:
        return "call_function", _OPERATORS[name], args
    if name in _REFLECTED and getattr(torch.Tensor, name, None) is func:
        return "call_function", _REFLECTED[name], (args[1], args[0], *args[2:])
    if getattr(torch.Tensor, name, None) is func:
        return "call_method", name, args
    return "call_function", func, args


def capture(
    model: nn.Module,
    inputs: Sequence[Any],
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    exact_leaf_types: Collection[type[nn.Module]] = (),
) -> tuple[torch.fx.Graph, list[torch.Tensor]]:
    """The graph of one run of ``model(*inputs)``, and the tensors its placeholders stand for (the tensors
    of ``inputs``, flattened: a list of images is one placeholder per image).

    Raises :class:`BranchOnValuesError` if a module branches on values before running a layer (see the
    module's docstring)."""
    graph = torch.fx.Graph()
    recorder = _Recorder(model, graph, leaf_predicate(leaf_modules, exact_leaf_types))
    flat, spec = pytree.tree_flatten(tuple(inputs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    for i, t in enumerate(tensors):
        recorder.nodes[id(t)] = (t, graph.placeholder(f"input_{i}"))
        recorder.data.add(id(t))
    original_call = nn.Module.__call__

    def call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return recorder.call_module(module, lambda *a, **k: original_call(module, *a, **k), args, kwargs)

    nn.Module.__call__ = call  # type: ignore[method-assign]
    try:
        with torch.no_grad(), recorder:
            output = model(*pytree.tree_unflatten(flat, spec))
    finally:
        nn.Module.__call__ = original_call  # type: ignore[method-assign]
    if recorder.branch is not None:
        raise recorder.branch
    graph.output(recorder.arg(output))
    return graph, tensors
