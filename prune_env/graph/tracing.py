"""Tracing: the model as a torch.fx graph, standard ``torch.nn`` layers and declared layers as leaves."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any, NoReturn

import torch
import torch.fx
from torch import nn
from torch.fx.proxy import ParameterProxy

from prune_env.errors import UntraceableModelError
from prune_env.graph.layers import OPAQUE_TYPES, layer_spec

TENSOR_CONSTANT = "prune_env_tensor_constant"  # node.meta key: the tensor a constant get_attr node fetches


class _ModuleStack(collections.OrderedDict[str, Any]):
    """fx's stack of the modules being traced, copied into every node's ``nn_module_stack``: a C-level copy
    instead of ``copy.copy``'s generic reduce protocol, which costs a tenth of the whole trace."""

    def __copy__(self) -> _ModuleStack:
        return _ModuleStack(self)


class _PathTracer(torch.fx.Tracer):
    """fx tracer that remembers which module it is inside, so a failure can name it."""

    def __init__(
        self,
        leaf_modules: Sequence[type[nn.Module] | str] = (),
        exact_leaf_types: Collection[type[nn.Module]] = (),
    ) -> None:
        super().__init__()
        self.exact_leaf_types = frozenset(exact_leaf_types)
        self.module_stack = _ModuleStack()
        self.extra_leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.extra_leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.path: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed
        self._tensor_names: dict[str, dict[int, str]] = {}  # "parameters"/"buffers": id -> first name
        self.constant_count = 0

    # torch.fx names a tensor that traced code fetches (``self.weight`` in a layer it traces through) by
    # walking all the model's parameters or buffers, for every fetch: quadratic in the model's size, and
    # most of the trace for a model whose norm layers are traced (timm's fused norm + activation). The
    # same first-found names, from one walk each.
    def _names(self, kind: str) -> dict[int, str]:
        names = self._tensor_names.get(kind)
        if names is None:
            found = self.root.named_parameters() if kind == "parameters" else self.root.named_buffers()
            names = self._tensor_names[kind] = {}
            for name, t in found:
                names.setdefault(id(t), name)
        return names

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._names("parameters").get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = self._names("buffers").get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            factory = None
            if self.param_shapes_constant and isinstance(attr_val, nn.Parameter):  # never set here
                factory = functools.partial(ParameterProxy, self, name=name, param=attr_val)
            parameter_proxy_cache[name] = self.create_proxy(
                "get_attr", name, (), {}, proxy_factory_fn=factory
            )
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, nn.Parameter):
            name = self._names("parameters").get(id(a))
            if name is None:
                raise NameError("parameter is not a member of this module")
            return self.create_node("get_attr", name, (), {})
        if isinstance(a, torch.Tensor):
            name = self._names("buffers").get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
            # A tensor that is neither a parameter nor a buffer (a mask kept as a plain attribute, a
            # tensor built at trace time). torch.fx would store it on the traced model as a new attribute
            # — on the user's model, since no GraphModule is built here — so the node carries it instead.
            node = self.create_node("get_attr", f"_tensor_constant{self.constant_count}", (), {})
            self.constant_count += 1
            node.meta[TENSOR_CONSTANT] = a
            return node
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.extra_leaf_types) or module_qualified_name in self.extra_leaf_names:
            return True
        if type(m) in self.exact_leaf_types:
            return True
        spec = layer_spec(type(m))
        if spec is not None:
            return spec.is_leaf
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        spec = layer_spec(type(m))
        if spec is not None and spec.trace_as is not None:
            forward = functools.partial(spec.trace_as, m)  # a declared traceable twin of its forward
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path[-1]
            raise
        finally:
            self.path.pop()


def leaf_predicate(
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    exact_leaf_types: Collection[type[nn.Module]] = (),
) -> Callable[[nn.Module, str], bool]:
    """Whether a module (by its qualified name) is kept whole, as :func:`trace` decides it: the standard
    ``torch.nn`` layers, declared layers, and the ones passed in."""
    return _PathTracer(leaf_modules, exact_leaf_types).is_leaf_module


def trace(
    model: nn.Module,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    exact_leaf_types: Collection[type[nn.Module]] = (),
) -> torch.fx.Graph:
    """Trace ``model`` with torch.fx; raise :class:`UntraceableModelError` naming the failing module.

    ``leaf_modules`` (types, with their subclasses, or qualified names) and ``exact_leaf_types`` (these
    types only) are kept whole.

    A failing module of a type declared with :func:`register_opaque` becomes a black box instead. The graph's
    module and attribute targets are qualified names in ``model`` itself: no ``GraphModule`` is built, as
    nothing runs the generated code (its compilation would cost as much as the trace)."""
    leaves = list(leaf_modules)
    while True:
        tracer = _PathTracer(leaves, exact_leaf_types)
        try:
            return tracer.trace(model)
        except Exception as exc:
            where = tracer.failed_in or ""
            module = model.get_submodule(where) if where else model
            if where and isinstance(module, tuple(OPAQUE_TYPES)) and type(module) not in leaves:
                # The library says this layer does not trace: a black box, as if passed in leaf_modules.
                leaves.append(type(module))
                continue
            _raise_untraceable(model, where, exc)


def _raise_untraceable(model: nn.Module, where: str, exc: Exception) -> NoReturn:
    module = model.get_submodule(where) if where else model
    label = f"module {where!r} ({type(module).__name__})" if where else f"model {type(model).__name__}"
    raise UntraceableModelError(
        f"torch.fx cannot trace {label}: {type(exc).__name__}: {exc}\n"
        f"Mark it as a leaf so it is treated as a black box (its channels then stay unpruned): "
        f"build_graph(model, example_inputs, leaf_modules=[{type(module).__name__}]) "
        f"or leaf_modules=[{where!r}]."
    ) from exc
