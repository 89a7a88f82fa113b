"""Dependency graph: which channels of a network must be pruned together.

How it works (the *why* matters more than the how here):

1. ``torch.fx`` traces the model; standard ``torch.nn`` layers are leaves.
2. An interpreter runs the traced graph on the example inputs and, next to every real value, propagates a
   *channel-id tensor*: an int64 tensor broadcastable to the value whose entries name "channel elements".
   Layers that create channels (conv/linear outputs, parameters) allocate fresh elements; element 0 is
   *poison* (model inputs and outputs, anything we cannot map).
3. Elementwise ops (residual add, squeeze-excite multiply, norms) *union* the elements they pair up.
   Data-movement ops (view, permute, flatten, cat, chunk, channel shuffle, ...) are executed on the id
   tensors themselves, so their index mapping is exact rather than hand-written.
4. Union-find over the elements gives *units*: sets of channels that must disappear together. Units born in
   the same layer, or joined by a union, form a *group* (one pruning ratio), as in DepGraph; concat keeps its
   producers in separate groups. A unit touching poison is never pruned.

Ops whose behaviour depends on the channel count at run time are handled so that the pruned model's own
code still computes the same thing: ``chunk`` and a ``view`` that splits the channel axis (channel shuffle)
union corresponding positions, so every part keeps the same channels; a literal size that cannot adapt
(``x[:, :64]``, ``view(n, 64, -1)``) poisons the channels it touches, with one warning naming the nodes.
A size read from a tensor (``b, c, h, w = x.shape``) remembers the channels it counts: a reshape that uses it
for another tensor's channels couples the two, so both keep the same number (a block that rebuilds its
input's shape from the attention output's channels stays consistent).

Layers the engine does not know are declared once with :func:`register_layer` (a :class:`LayerSpec`): a
module that behaves like a torch layer but computes differently (timm's ``Conv2dSame``), a black box whose
output channel ``c`` depends only on input channel ``c`` (anti-aliasing blur, ECA attention), or a traced
module whose literal channel sizes are recomputed after surgery (selective-kernel input splits).
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prune_env.costs import CostModel, CostTerm
from prune_env.errors import (
    InvalidRatiosError,
    InvalidSettingError,
    PruneEnvError,
    UnsupportedLayerError,
    UntraceableModelError,
)

MemberKind = Literal["out", "in", "channel", "param"]

# --------------------------------------------------------------------------------------------------------
# Public values
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One dimension of one layer (or raw parameter) that a group's channels run along.

    ``positions`` lists, unit by unit, the indices along ``dim`` that the group owns: unit ``u`` owns
    ``positions[u * multiplicity:(u + 1) * multiplicity]`` (a flatten→linear member owns a block of
    ``H*W`` features per channel, for instance).
    """

    layer: str
    layer_type: str
    kind: MemberKind
    dim: int
    positions: tuple[int, ...]
    multiplicity: int
    size: int

    @property
    def offset(self) -> int | None:
        """First index when the member's positions are one contiguous run, else None."""
        lo = min(self.positions)
        contiguous = sorted(self.positions) == list(range(lo, lo + len(self.positions)))
        return lo if contiguous else None

    def unit_positions(self, unit: int) -> tuple[int, ...]:
        m = self.multiplicity
        return self.positions[unit * m : (unit + 1) * m]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of the network that must be pruned together: the unit of importance and removal.

    ``channels`` counts the independently removable units (for almost every group one unit is one
    channel; channel shuffles and chunking bind several channels into one unit).
    """

    name: str
    channels: int
    members: tuple[Member, ...]
    index: int = 0

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "out")

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "in")

    def details(self) -> str:
        lines = [f"group {self.index} {self.name!r}: {self.channels} prunable units"]
        for m in self.members:
            where = f"offset {m.offset}" if m.offset is not None else "scattered"
            per = f", {m.multiplicity} per unit" if m.multiplicity != 1 else ""
            lines.append(
                f"  {m.kind:<7} {m.layer} ({m.layer_type}) dim {m.dim}: "
                f"{len(m.positions)} of {m.size} ({where}{per})"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Declared layers
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """How the channels of a module type the engine does not know map, declared once per type.

    Exactly one of three behaviours:

    - ``like=nn.Conv2d`` (or ``nn.Linear``, a BatchNorm, ...): a black box whose channels follow that torch
      base class exactly — same weight layout, same size attributes — though its forward computes
      differently (input-size-dependent padding, weight standardisation). ``tensors`` names extra tensors
      and the dim along which they follow the *output* channels (a per-filter gain: ``{"gain": 0}``).
    - ``channelwise=True``: a black box whose output channel ``c`` is computed from input channel ``c``
      alone (on ``channel_axis`` of input and output), which runs for any channel count. ``tensors`` maps
      each tensor holding per-channel values (an attribute path such as ``"filt"`` or
      ``"fc.weight"``) to the dim along which it follows the channels; ``sizes`` names the integer
      attributes equal to the channel count (set to the kept count by surgery). The engine checks the
      declaration when it builds the graph, by running a copy of the module shrunk by one channel, and
      models its MACs exactly as ``a + b × channels`` from the measured costs.
    - ``resize=fn``: the module is traced through as usual, but its forward uses literal channel sizes
      taken from its own attributes (``torch.split(x, self.in_channels // 2, 1)``). Literal splits and
      whole-axis slices inside it then adapt (an integer split size keeps every part the same width, a
      list of sizes lets each part shrink on its own), and surgery calls ``fn(pruned, original)`` on each
      pruned copy (children first) to recompute those attributes from the pruned sub-layers.

    Register with :func:`register_layer`; the engine refuses a spec that declares none or several.
    """

    like: type[nn.Module] | None = None
    channelwise: bool = False
    tensors: Mapping[str, int] = field(default_factory=dict)
    sizes: tuple[str, ...] = ()
    channel_axis: int = 1
    resize: Callable[[nn.Module, nn.Module], None] | None = None

    @property
    def is_leaf(self) -> bool:
        return self.like is not None or self.channelwise


_LAYER_SPECS: dict[type[nn.Module], LayerSpec] = {}
# Libraries whose layers prune_env declares itself, imported on first sight of one of their modules.
_SPEC_PROVIDERS = {"timm": "prune_env.models.timm_adapter:register_timm_layers"}
_LIKE_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def register_layer(layer_type: type[nn.Module], spec: LayerSpec) -> None:
    """Declare how ``layer_type``'s channels map (see :class:`LayerSpec`); later registrations replace
    earlier ones, and subclasses inherit the declaration unless they have their own."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise InvalidSettingError(f"register_layer needs an nn.Module subclass, got {layer_type!r}")
    if not isinstance(spec, LayerSpec):
        raise InvalidSettingError(f"register_layer needs a LayerSpec, got {type(spec).__name__}")
    behaviours = [spec.like is not None, spec.channelwise, spec.resize is not None]
    if sum(behaviours) != 1:
        raise InvalidSettingError(
            f"LayerSpec for {layer_type.__name__} must declare exactly one of like=, channelwise=True or "
            "resize= (a black box like a torch layer, a channel-wise black box, or a traced module with "
            "recomputed sizes)"
        )
    if spec.like is not None and not (
        issubclass(layer_type, spec.like) and issubclass(spec.like, _LIKE_BASES)
    ):
        raise InvalidSettingError(
            f"LayerSpec(like={getattr(spec.like, '__name__', spec.like)}) for {layer_type.__name__}: like= "
            f"must be a base class of it among {', '.join(t.__name__ for t in _LIKE_BASES)}; declare other "
            "layers channelwise=True or trace them"
        )
    _LAYER_SPECS[layer_type] = spec


def layer_spec(layer_type: type) -> LayerSpec | None:
    """The declaration that applies to ``layer_type`` (its own or its nearest declared base class)."""
    for cls in layer_type.__mro__:
        spec = _LAYER_SPECS.get(cls)
        if spec is not None:
            return spec
    return None


def _load_spec_providers(model: nn.Module) -> None:
    """Import the declarations prune_env ships for a library when the model uses one of its layers."""
    if not _SPEC_PROVIDERS:
        return
    for m in model.modules():
        package = type(m).__module__.partition(".")[0]
        provider = _SPEC_PROVIDERS.get(package)
        if provider is not None:
            module, _, function = provider.partition(":")
            del _SPEC_PROVIDERS[package]  # once, even if it fails: a missing declaration only freezes
            try:
                getattr(importlib.import_module(module), function)()
            except (ImportError, AttributeError) as exc:
                warnings.warn(
                    f"prune_env: cannot declare {package}'s layers ({type(exc).__name__}: {exc}); they are "
                    "traced as plain code, or frozen where that fails",
                    stacklevel=3,
                )
            if not _SPEC_PROVIDERS:
                return


def _attribute_owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), attr


def spec_tensors(module: nn.Module, spec: LayerSpec, size: int) -> list[tuple[str, torch.Tensor, int]]:
    """(path, tensor, dim) of each declared tensor of ``module`` whose extent along its dim is ``size``
    (a tensor declared per channel but built broadcast, such as an unsized blur filter, is left whole)."""
    found = []
    for path, dim in spec.tensors.items():
        owner, attr = _attribute_owner(module, path)
        t = getattr(owner, attr, None)
        if isinstance(t, torch.Tensor) and t.ndim > dim and t.shape[dim] == size:
            found.append((path, t, dim))
    return found


def spec_sizes(module: nn.Module, spec: LayerSpec, size: int) -> list[str]:
    """Paths of the declared size attributes of ``module`` that currently hold ``size``."""
    found = []
    for path in spec.sizes:
        owner, attr = _attribute_owner(module, path)
        if getattr(owner, attr, None) == size:
            found.append(path)
    return found


def shrink_channelwise(module: nn.Module, spec: LayerSpec, size: int, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` of a channel-wise declared ``module`` (``size`` channels), in place."""
    for path, t, dim in spec_tensors(module, spec, size):
        owner, attr = _attribute_owner(module, path)
        new = t.detach().index_select(dim, keep.to(t.device))
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        setattr(owner, attr, new)
    for path in spec_sizes(module, spec, size):
        owner, attr = _attribute_owner(module, path)
        setattr(owner, attr, len(keep))


def _meta_call(m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run ``m`` on meta stand-ins of its tensors (shapes only)."""
    state = {k: _to_meta(t) for k, t in (*m.named_parameters(), *m.named_buffers())}
    return torch.func.functional_call(m, state, args, kwargs)


# --------------------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------------------


class _PathTracer(torch.fx.Tracer):
    """fx tracer that remembers which module it is inside, so a failure can name it."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        self.extra_leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.extra_leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.path: list[str] = []
        self.failed_in: str | None = None  # innermost module being traced when tracing failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.extra_leaf_types) or module_qualified_name in self.extra_leaf_names:
            return True
        spec = layer_spec(type(m))
        if spec is not None:
            return spec.is_leaf
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path[-1]
            raise
        finally:
            self.path.pop()


_OPAQUE_TYPES: set[type[nn.Module]] = set()


def register_opaque(layer_type: type[nn.Module]) -> None:
    """Declare ``layer_type`` a module torch.fx may be unable to trace (its forward branches on sizes):
    where tracing it fails, :func:`build_graph` treats it as a black box — its channels stay unpruned,
    with a warning — instead of raising :class:`UntraceableModelError`. For library layers known not to
    trace (timm's own list); a model's own modules are better marked with ``leaf_modules``."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise InvalidSettingError(f"register_opaque needs an nn.Module subclass, got {layer_type!r}")
    _OPAQUE_TYPES.add(layer_type)


def trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module] | str] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` with torch.fx; raise :class:`UntraceableModelError` naming the failing module.

    A failing module of a type declared with :func:`register_opaque` becomes a black box instead."""
    leaves = list(leaf_modules)
    while True:
        tracer = _PathTracer(leaves)
        try:
            graph = tracer.trace(model)
            return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        except Exception as exc:
            where = tracer.failed_in or ""
            module = model.get_submodule(where) if where else model
            if where and isinstance(module, tuple(_OPAQUE_TYPES)) and type(module) not in leaves:
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


# --------------------------------------------------------------------------------------------------------
# Channel-id propagation
# --------------------------------------------------------------------------------------------------------

POISON = 0
_Ids = Any  # torch.Tensor | tuple | list | None — nested like the value it describes

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold, nn.LogSigmoid,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)  # fmt: skip

_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "maximum", "minimum",
}  # fmt: skip
_UNARY = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid,
    torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, torch.exp,
    torch.abs, torch.neg, operator.neg, torch.square, torch.sqrt, torch.rsqrt, torch.erf,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip", "exp", "abs", "neg",
    "float", "double", "half", "to", "type_as", "clone", "detach", "contiguous", "square", "sqrt", "pow",
    "hardtanh_", "hardswish_",
}  # fmt: skip
_SPATIAL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.interpolate, F.upsample,
}  # fmt: skip
_UNARY.add(torchvision.ops.stochastic_depth)  # a per-sample mask: channels pass through unchanged
_RESHAPE = {"view", "reshape", torch.reshape}
_MOVE = {
    "permute", torch.permute, "transpose", torch.transpose, "unsqueeze", torch.unsqueeze, "squeeze",
    torch.squeeze, "flatten", torch.flatten, "movedim", torch.movedim, "expand", "t", "unflatten",
}  # fmt: skip
_REDUCE = {"mean", torch.mean, "sum", torch.sum, "amax", torch.amax, "amin", torch.amin}
_SIZE = {"size", "dim", "numel", getattr, "ndimension", torch.numel}


_NO_MACS_MODULES = (
    *_CONV, nn.Linear, *_NORM_CHANNEL, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.Flatten, nn.Unflatten,
    nn.ChannelShuffle, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, *_ELEMENTWISE_MODULES, *_SPATIAL_MODULES,
)  # fmt: skip
_NO_MACS_FUNCTIONS = (
    _BINARY | _UNARY | _SPATIAL_FUNCTIONS | _RESHAPE | _MOVE | _REDUCE | _SIZE
    | {torch.cat, torch.concat, torch.concatenate, torch.stack, "chunk", torch.chunk, "split", torch.split}
    | {operator.getitem, F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax", F.layer_norm}
    | {F.batch_norm, F.pad, "pad"}
)  # fmt: skip


def _varying_axes(ids: torch.Tensor) -> list[int]:
    return [a for a, s in enumerate(ids.shape) if s > 1]


def _compress(ids: torch.Tensor) -> torch.Tensor:
    """Shrink every axis along which the ids are constant to size 1 (keeps broadcasting valid)."""
    for axis in range(ids.ndim):
        if ids.shape[axis] > 1:
            first = ids.narrow(axis, 0, 1)
            if bool((ids == first).all()):
                ids = first
    return ids.contiguous()


def _channel_vector(ids: torch.Tensor, axis: int) -> torch.Tensor | None:
    """Ids along ``axis`` when the ids vary along no other axis (a "channel-pure" tensor), else None."""
    axis = axis % ids.ndim
    if any(s > 1 for a, s in enumerate(ids.shape) if a != axis):
        return None
    return ids.reshape(-1)


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return vector.reshape(shape)


@dataclass
class _Slot:
    """A layer dimension whose indices map to channel elements (internal; becomes a Member)."""

    layer: str
    layer_type: str
    kind: MemberKind
    dim: int
    ids: np.ndarray  # element id per index along ``dim`` (for raw params: per element, full shape)
    param_shape: tuple[int, ...] | None = None  # raw parameters only


@dataclass
class _ParamUse:
    """How one parameter's numel depends on slots: numel = coef * prod(kept(slot) for slot in slots)."""

    name: str
    coef: int
    slots: tuple[int, ...]


@dataclass
class _TensorUse:
    """How one use of a tensor indexes it: a layer reading its weight, or traced code fetching it.

    ``dims`` maps a dimension of the tensor to the slot whose indices run along it; a dimension not in
    ``dims`` is used whole. A fetched parameter (``raw_slot``) learns its dimension only at resolution.
    """

    shape: tuple[int, ...]
    dims: dict[int, int]
    raw_slot: int | None = None


@dataclass
class _State:
    next_id: int = 1
    # Allocations (start, length, space): a space is one producer's channels (conv/linear outputs); derived
    # elements (grouped-conv outputs, raw parameters) have space -1 and join groups only through unions.
    allocations: list[tuple[int, int, int]] = field(default_factory=lambda: [(0, 1, 0)])  # 0 = poison
    n_spaces: int = 1
    edges_a: list[np.ndarray] = field(default_factory=list)
    edges_b: list[np.ndarray] = field(default_factory=list)
    slots: list[_Slot] = field(default_factory=list)
    slot_index: dict[tuple[str, str], int] = field(default_factory=dict)
    macs_terms: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    param_uses: dict[str, _ParamUse] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    record_costs: bool = True
    # Tied tensors: one tensor may be read by several layers (``b.weight = a.weight``) or by a layer and
    # traced code. Keyed by id(tensor), the first qualified name of each tensor and every use of it.
    tensor_names: dict[int, str] = field(default_factory=dict)
    tensor_uses: dict[int, dict[str, _TensorUse]] = field(default_factory=dict)

    # -- elements -------------------------------------------------------------------------------------
    def fresh(self, n: int, producer: bool = True) -> torch.Tensor:
        start = self.next_id
        self.next_id += n
        space = -1
        if producer:
            space, self.n_spaces = self.n_spaces, self.n_spaces + 1
        self.allocations.append((start, n, space))
        return torch.arange(start, start + n, dtype=torch.int64)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        self.edges_a.append(a.reshape(-1).numpy().copy())
        self.edges_b.append(b.reshape(-1).numpy().copy())

    def poison(self, ids: _Ids, node: torch.fx.Node | None = None, reason: str = "") -> None:
        for t in _tensors_in(ids):
            if bool((t != POISON).any()):
                self.union(t.reshape(-1), torch.zeros(1, dtype=torch.int64))
                if node is not None and reason:
                    self.unmapped.setdefault(node.name, reason)

    # -- slots ----------------------------------------------------------------------------------------
    def slot(self, layer: str, layer_type: str, kind: MemberKind, dim: int, ids: torch.Tensor) -> int:
        """Register (or, for a module called twice, re-unify) the slot ``(layer, kind)``."""
        key = (layer, kind)
        if key in self.slot_index:
            idx = self.slot_index[key]
            self.union(torch.from_numpy(self.slots[idx].ids), ids.reshape(-1))
            return idx
        self.slot_index[key] = len(self.slots)
        self.slots.append(_Slot(layer, layer_type, kind, dim, ids.reshape(-1).numpy().copy()))
        return len(self.slots) - 1

    def out_slot(
        self, layer: str, layer_type: str, n: int, dim: int = 0, producer: bool = True
    ) -> tuple[int, torch.Tensor]:
        key = (layer, "out")
        if key in self.slot_index:
            idx = self.slot_index[key]
            return idx, torch.from_numpy(self.slots[idx].ids)
        ids = self.fresh(n, producer)
        return self.slot(layer, layer_type, "out", dim, ids), ids

    def use_tensor(
        self, site: str, tensor: torch.Tensor, dims: Mapping[int, int], raw_slot: int | None = None
    ) -> None:
        """Record that ``site`` indexes ``tensor``'s dim ``d`` by slot ``dims[d]`` (other dims whole).

        A site (a layer's attribute, a fetched parameter) keeps its first record: a layer called twice
        indexes its tensors the same way each time."""
        uses = self.tensor_uses.setdefault(id(tensor), {})
        if site not in uses:
            uses[site] = _TensorUse(tuple(tensor.shape), dict(dims), raw_slot)

    def use_param(self, name: str, tensor: torch.Tensor, slots: Mapping[int, int]) -> None:
        """Record that parameter ``name`` has dim ``d`` pruned along slot ``slots[d]``."""
        self.use_tensor(name, tensor, slots)
        # A tied tensor is one parameter under its first name, whichever layer records it.
        name = self.tensor_names.get(id(tensor), name)
        if name in self.param_uses:
            return
        coef = 1
        for d, s in enumerate(tensor.shape):
            if d not in slots:
                coef *= s
        self.param_uses[name] = _ParamUse(name, coef, tuple(slots[d] for d in sorted(slots)))


def _tensors_in(ids: _Ids) -> Iterable[torch.Tensor]:
    if isinstance(ids, torch.Tensor):
        yield ids
    elif isinstance(ids, (tuple, list)):
        for x in ids:
            yield from _tensors_in(x)
    elif isinstance(ids, dict):
        for x in ids.values():
            yield from _tensors_in(x)


def _poison_like(value: Any) -> _Ids:
    if isinstance(value, torch.Tensor):
        return torch.zeros([1] * value.ndim, dtype=torch.int64)
    if isinstance(value, (tuple, list)):
        return (
            type(value)(_poison_like(v) for v in value)
            if not hasattr(value, "_fields")
            else tuple(_poison_like(v) for v in value)
        )
    if isinstance(value, dict):
        return {k: _poison_like(v) for k, v in value.items()}
    return None


def _to_meta(value: Any) -> Any:
    """A data-less stand-in with the same shape and dtype (cheap: nothing is copied)."""
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_to_meta(v) for v in value)
    return value


def _calibrate_channelwise(
    m: nn.Module, spec: LayerSpec, args: tuple, macs: int, size: int, axis: int
) -> tuple[int, int]:
    """``(a, b)`` with MACs ``a + b × channels`` for a channel-wise declared layer measured at ``macs`` with
    ``size`` channels. Copies shrunk to ``size - 1`` and ``size // 2`` channels must run, keep the other
    output dims and cost exactly that: a declaration that misses a per-channel tensor, or a layer whose
    cost is not linear in its channels, is refused here rather than producing a wrong model."""
    x = args[0]
    measured = {size: macs}
    expected_shape: list[int] | None = None
    for width in sorted({size - 1, max(1, size // 2)}):
        shrunk = copy.deepcopy(m)
        shrink_channelwise(shrunk, spec, size, torch.arange(width))
        shape = list(x.shape)
        shape[axis] = width
        small = torch.empty(shape, dtype=x.dtype, device="meta")
        rest = tuple(_to_meta(a) for a in args[1:])
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                out = _meta_call(shrunk, (small, *rest), {})
        except Exception as exc:
            raise UnsupportedLayerError(
                f"{type(m).__name__} is declared channel-wise but a copy with {width} of its {size} channels "
                f"fails ({type(exc).__name__}: {str(exc)[:160]}); list every per-channel tensor in "
                "LayerSpec.tensors and every channel-count attribute in LayerSpec.sizes"
            ) from exc
        out_shape = list(out.shape) if isinstance(out, torch.Tensor) else None
        if expected_shape is None:
            expected_shape = out_shape
        if out_shape is None or out_shape[axis] != width:
            raise UnsupportedLayerError(
                f"{type(m).__name__} is declared channel-wise but a copy with {width} channels returns "
                f"{out_shape}; declare it only if output channel c depends on input channel c alone"
            )
        measured[width] = counter.get_total_flops() // 2
    b = measured[size] - measured[size - 1]
    a = measured[size] - b * size
    if any(a + b * w != cost for w, cost in measured.items()):
        raise UnsupportedLayerError(
            f"{type(m).__name__} is declared channel-wise but its MACs are not linear in its channels "
            f"({measured}); trace it instead (no LayerSpec) or freeze it with leaf_modules=[...]"
        )
    return a, b


class _NeedsRealValues(Exception):
    """Raised during the meta-tensor pass when a node needs real data."""


def _axis_ids(ids: torch.Tensor, axis: int) -> list[np.ndarray]:
    """The channel ids a size of ``axis`` counts: none when the ids are constant along it."""
    if ids.shape[axis] == 1:
        return []
    return [ids.movedim(axis, 0).reshape(ids.shape[axis], -1)[:, 0].numpy().copy()]


def _flat_sources(src: Any) -> list[np.ndarray]:
    if src is None:
        return []
    if isinstance(src, tuple):
        return [v for axis in src for v in axis]
    return list(src)


def _nodes_in(args: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, found.append)
    return found


def _flat_channels(ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """One id per channel position of a tensor: its varying axes, flattened in memory order."""
    varying = _varying_axes(ids)
    if not varying:
        return ids.reshape(-1)[:1]
    index = [slice(None) if a in varying else slice(0, 1) for a in range(ids.ndim)]
    full = ids.expand(*[shape[a] if a in varying else 1 for a in range(ids.ndim)])
    return full[tuple(index)].reshape(-1)


class _Propagator(torch.fx.Interpreter):
    """Runs the traced graph for real values and, alongside, propagates channel ids."""

    def __init__(self, gm: torch.fx.GraphModule, state: _State, meta: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.state = state
        self.meta = meta
        self.ids: dict[torch.fx.Node, _Ids] = {}
        # Sizes read from tensors: per integer node, the channel ids of every axis it counts (a torch.Size
        # node: one such list per axis). An axis whose ids are constant counts nothing prunable.
        self.size_src: dict[torch.fx.Node, Any] = {}
        self.measured_macs = 0
        self.flops = FlopCounterMode(display=False)

    # -- execution on meta tensors: shapes without data or arithmetic ----------------------------------
    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().placeholder(target, args, kwargs)
        return _to_meta(value) if self.meta else value

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return _to_meta(value) if self.meta else value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not self.meta:
            return super().call_module(target, args, kwargs)
        m = self.fetch_attr(target)
        x = args[0] if args else None
        spec = layer_spec(type(m))
        if spec is not None and spec.is_leaf:
            # Declared: its channels follow the declaration whatever its values, so shapes suffice.
            return _meta_call(m, args, kwargs)
        if isinstance(m, _CONV):
            return m._conv_forward(x, _to_meta(m.weight), _to_meta(m.bias))
        if isinstance(m, nn.Linear):
            return F.linear(x, _to_meta(m.weight), _to_meta(m.bias))
        if isinstance(m, (*_NORM_CHANNEL, nn.GroupNorm, nn.LayerNorm, nn.PReLU)):
            return torch.empty_like(x)  # normalisation and PReLU keep the shape
        if isinstance(
            m, (*_ELEMENTWISE_MODULES, *_SPATIAL_MODULES, nn.Flatten, nn.Unflatten, nn.ChannelShuffle)
        ):
            return m(*args, **kwargs)  # stateless library layers run on meta tensors as they are
        # A black-box leaf may branch on its input's values (and its MACs with it): only real data is
        # faithful, so the whole pass is redone with real tensors.
        raise _NeedsRealValues(target)

    # The interpreter frees values it no longer needs; free ids alongside them.
    def run_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self.state.record_costs and self._may_hide_macs(n):
            # Only ops we do not model are run under the FLOP counter: it routes every op through Python
            # dispatch, which makes convolutions an order of magnitude slower.
            self.flops.flop_counts.clear()
            with self.flops:
                value = getattr(self, n.op)(n.target, args, kwargs)
            macs = self.flops.get_total_flops() // 2
        else:
            value = getattr(self, n.op)(n.target, args, kwargs)
            macs = 0
        id_args = torch.fx.node.map_arg(n.args, lambda a: self.ids.get(a))
        id_kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: self.ids.get(a))
        self.measured_macs = macs
        self.ids[n] = self.propagate(n, value, args, kwargs, id_args, id_kwargs, macs)
        for dead in self.user_to_last_uses.get(n, ()):
            self.ids.pop(dead, None)
            self.size_src.pop(dead, None)
        return value

    def _may_hide_macs(self, n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            return not isinstance(m, _NO_MACS_MODULES)
        if n.op in ("call_function", "call_method"):
            t = n.target
            return not (t in _NO_MACS_FUNCTIONS or (isinstance(t, type) and issubclass(t, tuple)))
        return False

    # ---------------------------------------------------------------------------------------------
    def propagate(
        self,
        n: torch.fx.Node,
        value: Any,
        args: tuple,
        kwargs: dict,
        id_args: tuple,
        id_kwargs: dict,
        macs: int,
    ) -> _Ids:
        st = self.state
        if n.op == "placeholder":
            return _poison_like(value)
        if n.op == "output":
            st.poison(id_args)
            return None
        if n.op == "get_attr":
            key = (n.target, "param")
            if key in st.slot_index:  # the same parameter fetched again
                return torch.from_numpy(st.slots[st.slot_index[key]].ids)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0:
                ids = st.fresh(value.numel(), producer=False).reshape(value.shape)
                slot = st.slot(n.target, "Parameter", "param", 0, ids)
                st.slots[slot].param_shape = tuple(value.shape)
                st.slots[slot].ids = ids.numpy().copy()  # keep the full shape for raw parameters
                # The model's own tensor (``value`` is a stand-in on the meta pass), to tie it to the
                # layers that also read it.
                st.use_tensor(f"get_attr {n.target}", self.fetch_attr(n.target), {}, raw_slot=slot)
                return ids
            return _poison_like(value)

        handled, out, modeled_macs = self._dispatch(n, value, args, kwargs, id_args, id_kwargs)
        if not handled:
            st.poison((id_args, id_kwargs), n, self._describe(n))
            out = _poison_like(value)
        if n.op == "call_module":
            # Every tensor a layer holds that its handler did not index by channels is used whole: if the
            # tensor is tied to another layer, that layer's channels along it must then stay whole too.
            m = self.module.get_submodule(n.target)
            # The registries directly: a library layer has no children, and this runs for every call.
            for prefix, sub in m.named_modules(prefix=n.target) if m._modules else ((n.target, m),):
                for registry in (sub._parameters, sub._buffers):
                    for pname, t in registry.items():
                        if t is not None:
                            st.use_tensor(f"{prefix}.{pname}", t, {})
        if macs and not modeled_macs and st.record_costs:
            # A multiply-accumulate op we do not model: its inputs are frozen, so its cost is constant.
            st.poison((id_args, id_kwargs), n, f"{self._describe(n)} (unmodelled MACs)")
            st.macs_terms.append((macs, ()))
        elif modeled_macs and st.record_costs:
            if isinstance(modeled_macs, list):  # terms (coef, slots) already
                st.macs_terms.extend(modeled_macs)
            else:
                total, divisor, slots = modeled_macs
                st.macs_terms.append((total // divisor, slots))
        return out

    def _record_size(self, n: torch.fx.Node, args: tuple, first: Any) -> None:
        """Remember which channels the integer(s) ``n`` computes count (see ``size_src``)."""
        target = n.target
        if target == "size" or (target is getattr and len(args) > 1 and args[1] == "shape"):
            if not isinstance(first, torch.Tensor):
                return
            axes = [_axis_ids(first, k) for k in range(first.ndim)]
            dim = args[1] if target == "size" and len(args) > 1 else n.kwargs.get("dim")
            self.size_src[n] = axes[dim] if isinstance(dim, int) else tuple(axes)
            return
        if target is operator.getitem and n.args and n.args[0] in self.size_src:
            whole = self.size_src[n.args[0]]
            if isinstance(whole, tuple) and isinstance(args[1], int):
                self.size_src[n] = whole[args[1]]
            elif isinstance(whole, tuple):  # a slice of the shape: every axis it keeps
                self.size_src[n] = [v for axis in whole[args[1]] for v in axis]
            return
        sources = [v for a in _nodes_in((n.args, n.kwargs)) for v in _flat_sources(self.size_src.get(a))]
        if sources:
            self.size_src[n] = sources

    def _couple_sizes(self, n: torch.fx.Node, size_args: Iterable[Any], x: torch.Tensor, shape) -> bool:
        """A size computed from channels (``C`` of ``b, c, h, w = y.shape``) shapes ``x``: after pruning it
        counts the kept channels it was read from, so those and ``x``'s channels must keep the same number.
        Couple them position by position; False (and poison) when their counts differ."""
        channels = _flat_channels(x, shape)
        ok = True
        for arg in size_args:
            for src in _flat_sources(self.size_src.get(arg)) if isinstance(arg, torch.fx.Node) else ():
                src_t = torch.from_numpy(src)
                if channels.numel() in (1, src_t.numel()):
                    self.state.union(src_t, channels)
                else:
                    self.state.poison(
                        (src_t, x), n, f"{self._describe(n)} sizes channels by another tensor's"
                    )
                    ok = False
        return ok

    def _describe(self, n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return f"{type(self.module.get_submodule(n.target)).__name__} module {n.target!r}"
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        return f"{n.op} {name!r}"

    # ---------------------------------------------------------------------------------------------
    def _dispatch(self, n, value, args, kwargs, id_args, id_kwargs):
        """Return (handled, output ids, modeled_macs): modeled_macs is None, (total, divisor, slots) for
        ``total // divisor × Π kept(slots)``, or a list of (coef, slots) terms."""
        if n.op == "call_module":
            return self._module(n, value, args, id_args)
        target = n.target
        first = id_args[0] if id_args else None
        if target in _SIZE or (target is operator.getitem and not isinstance(first, torch.Tensor)):
            if target is operator.getitem and isinstance(first, (tuple, list)):
                return True, first[args[1]], None
            self._record_size(n, args, first)
            return True, None, None
        if not isinstance(value, (torch.Tensor, tuple, list)):
            self._record_size(n, args, first)  # python arithmetic on sizes: C // 2 counts C's channels
            return True, None, None
        if isinstance(target, type) and issubclass(target, tuple):
            return True, tuple(id_args) + tuple(id_kwargs.values()), None  # namedtuple outputs
        if target in _BINARY:
            return True, self._binary(n, value, args, id_args), None
        if target in _UNARY:
            if not isinstance(first, torch.Tensor):
                return False, None, None
            return True, first, None
        if target in _SPATIAL_FUNCTIONS:
            return True, self._spatial(n, value, first), None
        if target in (torch.cat, torch.concat, torch.concatenate):
            return True, self._cat(n, value, args, kwargs, id_args), None
        if target is torch.stack:
            return True, self._stack(n, value, args, id_args), None
        if target in ("chunk", torch.chunk, "split", torch.split):
            return True, self._chunk(n, value, args, kwargs, id_args), None
        if target is operator.getitem:
            return True, self._getitem(n, value, args, first), None
        if target in _RESHAPE or target in _MOVE:
            return True, self._reshape(n, value, args, kwargs, first), None
        if target in _REDUCE:
            return True, self._reduce(n, value, args, kwargs, first), None
        if target in (F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(first, torch.Tensor) and dim is not None:
                self._join_along(first, dim)
            return True, first if isinstance(first, torch.Tensor) else _poison_like(value), None
        if target is F.layer_norm:
            return True, self._functional_norm(n, value, args, kwargs, id_args, id_kwargs, axis=-1), None
        if target is F.batch_norm:
            return True, self._functional_norm(n, value, args, kwargs, id_args, id_kwargs, axis=1), None
        if target in (F.pad, "pad"):
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            touched = (
                {first.ndim - 1 - i // 2 for i, p in enumerate(pad) if p} if first is not None else set()
            )
            if isinstance(first, torch.Tensor) and touched & set(_varying_axes(first)):
                return False, None, None
            return True, first, None
        return False, None, None

    # -- layers -------------------------------------------------------------------------------------
    def _module(self, n, value, args, id_args):
        st = self.state
        name: str = n.target
        m = self.module.get_submodule(name)
        x = id_args[0] if id_args else None
        tname = type(m).__name__
        if isinstance(m, _ELEMENTWISE_MODULES):
            return True, x, None
        if isinstance(m, _SPATIAL_MODULES):
            return True, self._spatial(n, value, x), None
        if not isinstance(x, torch.Tensor):
            return False, None, None
        spec = layer_spec(type(m))
        if spec is not None and spec.channelwise:
            return self._channelwise_leaf(n, m, spec, value, args, x)
        if isinstance(m, _CONV):
            vin = _channel_vector(x, 1)
            if vin is None:
                st.poison(x, n, f"{tname} {name!r} reads a tensor whose channels are not on axis 1")
                vin = torch.zeros(m.in_channels, dtype=torch.int64)
            in_slot = st.slot(name, tname, "in", 1, vin.expand(m.in_channels))
            g = m.groups
            # A grouped conv's outputs are derived from its inputs (whole groups go together), so they
            # belong to the input's producers' groups rather than founding one.
            out_slot, vout = st.out_slot(name, tname, m.out_channels, 0, producer=g == 1)
            if g > 1:
                # Grouped/depthwise: remove whole groups, so a group's inputs and outputs are one unit.
                vin_g = vin.expand(m.in_channels).reshape(g, -1)
                vout_g = vout.reshape(g, -1)
                st.union(vin_g, vout_g[:, :1])
                st.union(vout_g, vout_g[:, :1])
                st.use_param(f"{name}.weight", m.weight, {0: out_slot})
                divisor, slots = m.out_channels, (out_slot,)
            else:
                st.use_param(f"{name}.weight", m.weight, {0: out_slot, 1: in_slot})
                divisor, slots = m.out_channels * m.in_channels, (out_slot, in_slot)
            # FlopCounterMode's convolution formula: batch × output pixels × weight numel (bias not counted).
            total = value.shape[0] * m.weight.numel() * math.prod(value.shape[2:])
            macs = (total, divisor, slots)
            if m.bias is not None:
                st.use_param(f"{name}.bias", m.bias, {0: out_slot})
            self._declared_tensors(name, m, out_slot, m.out_channels)
            return True, _along(vout, 1, value.ndim), macs
        if isinstance(m, nn.Linear):
            vin = _channel_vector(x, -1)
            if vin is None:
                st.poison(x, n, f"Linear {name!r} reads a tensor whose features vary along several axes")
                vin = torch.zeros(m.in_features, dtype=torch.int64)
            in_slot = st.slot(name, tname, "in", 1, vin.expand(m.in_features))
            out_slot, vout = st.out_slot(name, tname, m.out_features, 0)
            st.use_param(f"{name}.weight", m.weight, {0: out_slot, 1: in_slot})
            if m.bias is not None:
                st.use_param(f"{name}.bias", m.bias, {0: out_slot})
            self._declared_tensors(name, m, out_slot, m.out_features)
            rows = math.prod(args[0].shape[:-1])
            size = m.out_features * m.in_features
            return True, _along(vout, -1, value.ndim), (rows * size, size, (out_slot, in_slot))
        if isinstance(m, (*_NORM_CHANNEL, nn.GroupNorm, nn.LayerNorm, nn.PReLU)):
            return self._norm_module(n, m, value, x)
        if isinstance(m, (nn.Flatten, nn.Unflatten)):
            return True, self._reshape(n, value, (args[0],), {}, x), None
        if isinstance(m, nn.ChannelShuffle):
            return True, self._shuffle(n, value, x, m.groups), None
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)):
            dim = getattr(m, "dim", 1 if value.ndim >= 3 else -1)
            self._join_along(x, dim if dim is not None else 1)
            return True, x, None
        return False, None, None

    def _declared_tensors(self, name: str, m: nn.Module, slot: int, size: int) -> None:
        """Extra tensors a ``like=`` declaration says follow the layer's output channels (slot ``slot``)."""
        spec = layer_spec(type(m))
        if spec is not None and spec.like is not None:
            for path, t, dim in spec_tensors(m, spec, size):
                self.state.use_param(f"{name}.{path}", t, {dim: slot})

    def _channelwise_leaf(self, n, m, spec: LayerSpec, value, args, x):
        """A declared channel-wise black box: one slot for its channels, MACs ``a + b × channels``."""
        st = self.state
        name, tname = n.target, type(m).__name__
        axis = spec.channel_axis
        v = _channel_vector(x, axis)
        if v is None or not isinstance(value, torch.Tensor) or value.ndim != args[0].ndim:
            st.poison(x, n, f"{tname} {name!r} (declared channel-wise) reads channels off axis {axis}")
            return True, _poison_like(value), None
        size = args[0].shape[axis]
        v = v.expand(size)
        slot = st.slot(name, tname, "channel", 0, v)
        for path, t, dim in spec_tensors(m, spec, size):
            st.use_param(f"{name}.{path}", t, {dim: slot})
        terms = None
        if st.record_costs and size > 1:
            a, b = _calibrate_channelwise(m, spec, args, self.measured_macs, size, axis)
            terms = [(b, (slot,)), (a, ())]
        return True, _along(v, axis, value.ndim), terms

    def _norm_module(self, n, m, value, x):
        st = self.state
        name, tname = n.target, type(m).__name__
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                return True, x, None
            axis, size = 1, m.num_parameters
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                st.poison(x, n, f"LayerNorm {name!r} normalises over several axes")
                return True, x, None
            axis, size = -1, m.normalized_shape[0]
        elif isinstance(m, nn.GroupNorm):
            axis, size = 1, m.num_channels
        else:
            axis, size = 1, m.num_features
        v = _channel_vector(x, axis)
        if v is None:
            st.poison(x, n, f"{tname} {name!r} reads a tensor whose channels are not on one axis")
            return True, x, None
        v = v.expand(size)
        if isinstance(m, nn.GroupNorm):
            # Remove whole normalisation groups: channels of one group form one unit.
            vg = v.reshape(m.num_groups, -1)
            st.union(vg, vg[:, :1])
        slot = st.slot(name, tname, "channel", 0, v)
        for pname, p in m.named_parameters(recurse=False):
            st.use_param(f"{name}.{pname}", p, {0: slot})
        for bname in ("running_mean", "running_var"):  # sliced by surgery along with the parameters
            buffer = m._buffers.get(bname)
            if buffer is not None:
                st.use_tensor(f"{name}.{bname}", buffer, {0: slot})
        return True, x, None

    def _functional_norm(self, n, value, args, kwargs, id_args, id_kwargs, axis: int):
        st = self.state
        x = id_args[0]
        v = _channel_vector(x, axis) if isinstance(x, torch.Tensor) else None
        params = [*id_args[1:], *id_kwargs.values()]
        if v is None:
            st.poison((x, params), n, f"{self._describe(n)} over several axes")
            return x
        if axis == -1 and len(args[1] if len(args) > 1 else kwargs["normalized_shape"]) != 1:
            st.poison((x, params), n, f"{self._describe(n)} over several axes")
            return x
        for p in params:
            if isinstance(p, torch.Tensor) and p.numel() == v.numel():
                st.union(p.reshape(-1), v)
        return x

    # -- elementwise ---------------------------------------------------------------------------------
    def _binary(self, n, value, args, id_args):
        st = self.state
        operands = [
            (ids, a.shape) for ids, a in zip(id_args, args, strict=False) if isinstance(a, torch.Tensor)
        ]
        operands = [(ids, shape) for ids, shape in operands if isinstance(ids, torch.Tensor)]
        if not isinstance(value, torch.Tensor):
            return None
        if not operands:
            return _poison_like(value)
        nd = value.ndim
        aligned = [(ids.reshape([1] * (nd - ids.ndim) + list(ids.shape)), (1,) * (nd - len(s)) + tuple(s))
                   for ids, s in operands]  # fmt: skip
        if len(aligned) == 1:
            return aligned[0][0]
        (ia, sa), (ib, sb) = aligned[:2]
        # An operand broadcast (extent 1) along an axis where the other's channels vary is a shared value
        # (a scalar gain, a stochastic-depth row mask): it does not couple the other's channels. Anything
        # else is paired position by position — including fully poisoned operands, whose ids are
        # compressed to size 1 but whose values are not broadcast.
        b_shared = any(sb[ax] == 1 for ax in _varying_axes(ia))
        a_shared = any(sa[ax] == 1 for ax in _varying_axes(ib))
        if b_shared and a_shared:
            st.poison((ia, ib), n, f"{self._describe(n)} broadcasts channels against each other")
            return _poison_like(value)
        if b_shared:
            return ia
        if a_shared:
            return ib
        st.union(ia, ib)
        return torch.broadcast_tensors(ia, ib)[0].contiguous()

    def _join_along(self, x: torch.Tensor, axis: int) -> torch.Tensor:
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

    def _spatial(self, n, value, x):
        """Pooling, interpolation, padding: channels stay on axis 1, one output channel per input one."""
        if not isinstance(x, torch.Tensor):
            return _poison_like(value)
        v = _channel_vector(x, 1)
        if v is None:
            self.state.poison(x, n, f"{self._describe(n)} on a tensor with channels off axis 1")
            return _poison_like(value)
        return _along(v, 1, value.ndim) if value.ndim > 1 else _poison_like(value)

    # -- data movement -------------------------------------------------------------------------------
    def _full(self, ids: torch.Tensor, value_shape: Sequence[int]) -> torch.Tensor:
        return ids.expand(*value_shape).contiguous()

    def _reshape(self, n, value, args, kwargs, x):
        st = self.state
        if not isinstance(x, torch.Tensor):
            return _poison_like(value)
        full = self._full(x, args[0].shape)
        fn = n.target
        if n.op == "call_module":
            out = self.module.get_submodule(fn)(full)
        elif isinstance(fn, str):
            out = getattr(full, fn)(*args[1:], **kwargs)
        else:
            out = fn(full, *args[1:], **kwargs)
        out = _compress(out)
        if fn in _RESHAPE or fn == "unflatten":
            varying = _varying_axes(out)
            shape_args = self._shape_args(n)
            if shape_args is not None and not self._couple_sizes(n, shape_args, x, args[0].shape):
                return _poison_like(value)
            if varying and shape_args is not None:
                dynamic = [ax for ax in varying if ax < len(shape_args) and self._adapts(shape_args[ax])]
                if len(dynamic) != 1:
                    st.poison(x, n, f"{self._describe(n)} with a literal channel size")
                    return _poison_like(value)
                # The channel axis was split: only the dynamic axis may shrink, so the others'
                # positions are pruned together (channel shuffle keeps its interleaving).
                keep_ax = dynamic[0]
                for ax in varying:
                    if ax != keep_ax:
                        st.union(out, out.narrow(ax, 0, 1))
        return out

    def _adapts(self, arg: Any) -> bool:
        """A size argument that follows a pruned tensor: -1, or computed from channel counts (a size
        computed only from batch or spatial extents is as literal as a number)."""
        if isinstance(arg, torch.fx.Node):
            return bool(_flat_sources(self.size_src.get(arg)))
        return arg == -1

    def _shape_args(self, n: torch.fx.Node) -> Sequence[Any] | None:
        if n.op == "call_module":
            return None
        if n.target == "unflatten":
            return None  # sizes of one axis only; unflatten of a channel axis is rare — be safe below
        rest = list(n.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = list(rest[0])
        if "shape" in n.kwargs:
            rest = list(n.kwargs["shape"])
        return rest

    def _shuffle(self, n, value, x, groups: int):
        v = _channel_vector(x, 1)
        if v is None:
            self.state.poison(x, n, "ChannelShuffle on a tensor with channels off axis 1")
            return _poison_like(value)
        grid = v.expand(value.shape[1]).reshape(groups, -1)
        self.state.union(grid, grid[:1])
        return _along(grid.t().reshape(-1), 1, value.ndim)

    def _cat(self, n, value, args, kwargs, id_args):
        st = self.state
        tensors = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        ids = list(id_args[0])
        if any(not isinstance(i, torch.Tensor) for i in ids):
            st.poison(ids, n, "cat of tensors without channel ids")
            return _poison_like(value)
        if all(i.shape[dim] == 1 for i in ids):
            # Concatenation along a non-channel axis (tokens, batch): channels are paired elementwise.
            for i in ids[1:]:
                st.union(ids[0], i)
            return ids[0]
        full = torch.cat([self._full(i, t.shape) for i, t in zip(ids, tensors, strict=True)], dim=dim)
        return _compress(full)

    def _stack(self, n, value, args, id_args):
        ids = [i for i in id_args[0] if isinstance(i, torch.Tensor)]
        if len(ids) != len(id_args[0]):
            self.state.poison(ids, n, "stack of tensors without channel ids")
            return _poison_like(value)
        for i in ids[1:]:
            self.state.union(ids[0], i)
        dim = args[1] if len(args) > 1 else 0
        return ids[0].unsqueeze(dim)

    def _chunk(self, n, value, args, kwargs, id_args):
        st = self.state
        x = id_args[0]
        if not isinstance(x, torch.Tensor):
            return _poison_like(value)
        tensor = args[0]
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % tensor.ndim
        full = self._full(x, tensor.shape)
        parts = list(torch.split(full, [p.shape[dim] for p in value], dim=dim))
        if dim in _varying_axes(x):
            size_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("split_size_or_sections")
            if isinstance(size_arg, torch.fx.Node) and not self._couple_sizes(n, [size_arg], x, tensor.shape):
                return _poison_like(value)
            adaptive = n.target in ("chunk", torch.chunk) or isinstance(size_arg, torch.fx.Node)
            if self._resized(n):
                if isinstance(size_arg, (list, tuple)):
                    # Sizes recomputed per part after surgery: each part keeps what its consumers keep.
                    return tuple(_compress(p) for p in parts)
                adaptive = True  # one size recomputed for every part: the parts stay equal below
            equal = len({p.shape[dim] for p in parts}) == 1
            if not (adaptive and equal):
                st.poison(x, n, f"{self._describe(n)} with literal sizes on a channel axis")
                return _poison_like(value)
            # Every part must keep the same number of channels: prune corresponding positions together.
            for p in parts[1:]:
                st.union(parts[0], p)
        return tuple(_compress(p) for p in parts)

    def _getitem(self, n, value, args, x):
        st = self.state
        tensor, index = args[0], args[1]
        full = self._full(x, tensor.shape)
        index_t = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) or i is None for i in index_t):
            st.poison(x, n, f"{self._describe(n)} with advanced indexing")
            return _poison_like(value)
        # Which input axes does the index restrict?
        axes: list[int] = []
        pos = 0
        for k, i in enumerate(index_t):
            if i is Ellipsis:
                pos = tensor.ndim - (len(index_t) - k - 1)
                continue
            if not (isinstance(i, slice) and i == slice(None)):
                axes.append(pos)
            pos += 1
        restricted = set(axes) & set(_varying_axes(x))
        if restricted and not (self._resized(n) and _covers(index_t, tensor.shape, restricted)):
            st.poison(x, n, f"{self._describe(n)} slices a channel axis with literal bounds")
            return _poison_like(value)
        return _compress(full[index])

    def _resized(self, n: torch.fx.Node) -> bool:
        """Whether ``n`` runs directly in a module whose literal channel sizes surgery recomputes."""
        stack = n.meta.get("nn_module_stack")
        if not stack:
            return False
        owner = next(reversed(stack.values()))[1]
        spec = layer_spec(owner) if isinstance(owner, type) else None
        return spec is not None and spec.resize is not None

    def _reduce(self, n, value, args, kwargs, x):
        st = self.state
        if not isinstance(x, torch.Tensor) or not isinstance(value, torch.Tensor):
            return _poison_like(value)
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dims is None:
            st.poison(x, n, f"{self._describe(n)} over all axes")
            return _poison_like(value)
        dims = {d % x.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        for d in dims:
            x = self._join_along(x, d)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if keepdim:
            return x
        return x.reshape([s for a, s in enumerate(x.shape) if a not in dims])


def _covers(index: tuple, shape: Sequence[int], axes: set[int]) -> bool:
    """Whether a basic index leaves every axis in ``axes`` whole (``x[:, :n]`` with ``n`` its extent)."""
    pos = 0
    for k, i in enumerate(index):
        if i is Ellipsis:
            pos = len(shape) - (len(index) - k - 1)
            continue
        if pos in axes:
            if not isinstance(i, slice) or i.step not in (None, 1):
                return False
            start, stop, _ = i.indices(shape[pos])
            if start != 0 or stop != shape[pos]:
                return False
        pos += 1
    return True


# --------------------------------------------------------------------------------------------------------
# Resolution: elements -> units -> groups
# --------------------------------------------------------------------------------------------------------


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(adj, directed=False)[1]


_Signature = tuple[str, tuple[tuple[str, int], ...], tuple[tuple[str, tuple[int, ...], str], ...]]

# Module attributes besides tensor shapes that decide how channels are grouped (a grouped conv's weight
# has the same shape for other group counts).
_STRUCTURAL_ATTRIBUTES = ("groups", "num_groups")


def _model_signature(model: nn.Module) -> dict[str, _Signature]:
    """Per module (by qualified name): type, structural attributes, and each tensor's shape and, if it is
    tied, the qualified name it first appears under (ties decide how surgery slices). Dtypes, devices and
    values are not part of it."""
    first_name: dict[int, str] = {}
    signature: dict[str, _Signature] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        tensors = []
        for registry in (m._parameters, m._buffers):
            for attr, t in registry.items():
                if t is not None:
                    qualified = f"{name}.{attr}" if name else attr
                    first = first_name.setdefault(id(t), qualified)
                    tensors.append((attr, tuple(t.shape), first if first != qualified else ""))
        attributes = tuple(
            (a, v) for a in _STRUCTURAL_ATTRIBUTES if isinstance(v := getattr(m, a, None), int)
        )
        signature[name] = (type(m).__name__, attributes, tuple(tensors))
    return signature


def _describe_signature(sig: _Signature) -> str:
    kind, attributes, tensors = sig
    parts = [f"{a}={v}" for a, v in attributes]
    for attr, shape, tied_to in tensors:
        parts.append(f"{attr} {shape}" + (f" tied to {tied_to}" if tied_to else ""))
    return f"{kind}({', '.join(parts)})"


def _real_ratios(value: Any, what: str) -> np.ndarray:
    """``value`` as a float array, or :class:`InvalidRatiosError` when it is not real numbers.

    numpy would turn ``True`` into 1.0 (prune everything), ``"0.5"`` into 0.5 and drop an imaginary part
    with only a warning: each of those is a caller's mistake, so it is rejected instead."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in value):
        raise InvalidRatiosError(f"{what} must be real numbers, not booleans; pass fractions in [0, 1]")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRatiosError(
            f"{what} must be real numbers in [0, 1], got {value!r:.80} ({exc})"
        ) from None
    if arr.dtype.kind not in "iuf":
        kind = {"b": "booleans", "c": "complex numbers", "U": "strings", "S": "bytes"}.get(
            arr.dtype.kind, f"{arr.dtype} values"
        )
        raise InvalidRatiosError(
            f"{what} must be real numbers in [0, 1], got {kind} ({value!r:.80}); pass the fraction of each "
            "group's channels to remove, e.g. 0.5"
        )
    return arr.astype(np.float64, copy=False)


def check_round_to(round_to: Any) -> None:
    """``round_to`` must be a positive integer (a width multiple), else :class:`InvalidSettingError`."""
    if isinstance(round_to, (bool, np.bool_)) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise InvalidSettingError(
            f"round_to must be a positive integer (kept widths are rounded to its multiples), got "
            f"{round_to!r}; pass e.g. round_to=1 (no rounding) or round_to=8"
        )


def units_to_keep(channels: Any, ratios: Any, round_to: int = 1) -> np.ndarray:
    """How many of each group's ``channels`` units survive pruning ``ratios`` of them (at least one).

    Vectorised (rows of ratios allowed). The kept count is rounded to the nearest multiple of
    ``round_to`` (hardware-friendly widths), never below one unit, never above the original. This is the one
    rule every caller uses — :func:`prune_env.prune`, ``graph.macs`` and the budget projection — so
    predicted and built models agree.
    """
    channels = np.asarray(channels, dtype=np.int64)
    ratios = np.asarray(ratios, dtype=np.float64)
    kept = channels * (1.0 - ratios)
    if round_to > 1:
        kept = np.round(kept / round_to) * round_to
    kept = np.where(ratios <= 0.0, channels, kept)  # ratio 0 is the identity, whatever the rounding
    return np.clip(np.round(kept), 1, channels).astype(np.int64)


def unit_count_to_keep(channels: int, ratio: float, round_to: int = 1) -> int:
    """:func:`units_to_keep` for one group, in Python scalars (the layer-wise environment's per-step path).

    The same arithmetic in the same order (IEEE doubles, round-half-even), so the two always agree."""
    if ratio <= 0.0:
        return channels
    kept = channels * (1.0 - ratio)
    if round_to > 1:
        kept = round(kept / round_to) * round_to
    return min(max(round(kept), 1), channels)


class DependencyGraph:
    """Channel groups of a model and the exact cost of any pruning of them.

    Build with :func:`build_graph`. ``groups`` holds the prunable groups in topological order;
    ``frozen`` names the channels that can never be pruned and why.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[ChannelGroup],
        frozen: dict[str, str],
        costs: CostModel,
        group_slots: list[list[tuple[int, np.ndarray]]],
        slots: list[_Slot],
    ) -> None:
        self.model = model
        self.groups = groups
        self.frozen = frozen
        self.costs = costs
        self._group_slots = group_slots  # per group: (slot, unit index of each position) pairs
        self._slots = slots
        self.base_macs = costs.macs(costs.full_keep())
        self.base_params = costs.params(costs.full_keep())
        self._name_index = {g.name: i for i, g in enumerate(groups)}
        self._signature = _model_signature(model)

    def __len__(self) -> int:
        return len(self.groups)

    def check_model(self, model: Any, where: str = "this function") -> None:
        """Raise :class:`InvalidSettingError` unless ``model`` has the architecture this graph describes.

        The check is structural, not identity: every module's qualified name and type, the shapes of its
        parameters and buffers, which of them are tied, and its group counts must equal those of the
        model the graph was built from. A deep copy, a reloaded state dict, ``.double()`` or ``.to()``, or
        another instance of the same architecture passes (that is how :class:`ModelRebuilder` and the
        environments use one graph for several copies); a model whose layers differ is rejected before
        anything is indexed with the graph's positions. Costs a walk over the modules, no forward pass.
        """
        check_module(model, where)
        ours = _model_signature(model)
        if ours == self._signature:
            return
        theirs = self._signature
        problem = ""
        for name in [*theirs, *(n for n in ours if n not in theirs)]:
            label = f"module {name!r}" if name else "the root module"
            if name not in ours:
                problem = f"{label} ({theirs[name][0]}) of the graph's model is missing here"
            elif name not in theirs:
                problem = f"this model has {label} ({ours[name][0]}), which the graph's model does not"
            elif ours[name] != theirs[name]:
                problem = (
                    f"{label} is {_describe_signature(ours[name])} here but "
                    f"{_describe_signature(theirs[name])} in the graph's model"
                )
            if problem:
                break
        raise InvalidSettingError(
            f"{where}: the graph was built from a different model ({type(self.model).__name__}): {problem}; "
            "build the graph from this model: build_graph(model, x)"
        )

    @functools.cached_property
    def _unit_positions(self) -> list[list[tuple[int, int, np.ndarray, np.ndarray]]]:
        """Per group, per member: (slot, slot size, positions along the slot, the unit owning each one).

        Surgery's lookup table, built once: which indices of which layer dimension a dropped unit takes."""
        table = []
        for group, pairs in zip(self.groups, self._group_slots, strict=True):
            rows = []
            for (s, _), member in zip(pairs, group.members, strict=True):
                positions = np.asarray(member.positions, dtype=np.int64).reshape(-1)
                units = np.repeat(np.arange(group.channels), member.multiplicity)
                rows.append((s, member.size, positions, units))
            table.append(rows)
        return table

    @functools.cached_property
    def _slot_sizes(self) -> dict[int, int]:
        """Size of every slot some group touches (the indices along that layer dimension)."""
        return {s: size for rows in self._unit_positions for s, size, _, _ in rows}

    def __repr__(self) -> str:
        return (
            f"DependencyGraph({type(self.model).__name__}: {len(self.groups)} prunable groups, "
            f"{self.base_macs:,} MACs, {self.base_params:,} params)"
        )

    # -- ratios ---------------------------------------------------------------------------------------
    def ratio_vector(self, ratios: float | Sequence[float] | Mapping[str, float] | np.ndarray) -> np.ndarray:
        """Normalise float / sequence / mapping ratios to one float per group, validating them."""
        n = len(self.groups)
        if isinstance(ratios, Mapping):
            unknown = sorted((k for k in ratios if k not in self._name_index), key=repr)
            if unknown:
                raise InvalidRatiosError(
                    f"unknown group name(s) {unknown[:5]}; valid names are graph.groups[i].name, e.g. "
                    f"{[g.name for g in self.groups[:5]]}"
                )
            vec = np.zeros(n)
            for k, r in ratios.items():
                value = _real_ratios(r, f"the ratio of group {k!r}")
                if value.ndim != 0:
                    raise InvalidRatiosError(
                        f"the ratio of group {k!r} must be one number, got shape {value.shape}"
                    )
                vec[self._name_index[k]] = float(value)
        elif isinstance(ratios, (int, float, np.floating, np.integer)) and not isinstance(ratios, bool):
            vec = np.full(n, float(ratios))
        else:
            vec = _real_ratios(ratios, "ratios").reshape(-1)
            if vec.shape != (n,):
                raise InvalidRatiosError(f"expected {n} ratios (one per group), got shape {np.shape(ratios)}")
        if not np.all(np.isfinite(vec)):
            raise InvalidRatiosError(f"ratios must be finite, got {vec[~np.isfinite(vec)][:5]}")
        if np.any(vec < 0) or np.any(vec > 1):
            raise InvalidRatiosError(f"ratios must lie in [0, 1], got min {vec.min():g}, max {vec.max():g}")
        return vec

    def keep_counts(self, ratios: Any, round_to: int = 1) -> np.ndarray:
        """Units kept per group for ``ratios``; the same rule :func:`prune_env.prune` applies."""
        check_round_to(round_to)
        return units_to_keep([g.channels for g in self.groups], self.ratio_vector(ratios), round_to)

    # -- costs ----------------------------------------------------------------------------------------
    def macs(self, ratios: Any = 0.0, round_to: int = 1) -> int:
        """Exact multiply-accumulates of the model pruned at ``ratios``, without a forward pass."""
        return self.costs.macs(self.keep_counts(ratios, round_to))

    def params(self, ratios: Any = 0.0, round_to: int = 1) -> int:
        """Exact parameter count of the model pruned at ``ratios``, without a forward pass."""
        return self.costs.params(self.keep_counts(ratios, round_to))

    # -- helpers for surgery / importance ------------------------------------------------------------
    def group(self, key: int | str) -> ChannelGroup:
        return self.groups[self._name_index[key] if isinstance(key, str) else key]

    def details(self) -> str:
        return "\n".join(g.details() for g in self.groups)

    def table(self) -> str:
        """One line per group: name, units, number of members, producers."""
        rows = [f"{'#':>3} {'group':<40} {'units':>6} {'members':>7}  producers"]
        for g in self.groups:
            prods = ", ".join(m.layer for m in g.producers[:3]) + (" …" if len(g.producers) > 3 else "")
            rows.append(f"{g.index:>3} {g.name[:40]:<40} {g.channels:>6} {len(g.members):>7}  {prods}")
        return "\n".join(rows)


def build_graph(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> DependencyGraph:
    """Trace ``model`` and find its channel groups (see the module docstring for how).

    ``example_inputs``: a tensor or a tuple of tensors the model accepts; a small spatial size keeps this
    fast, and costs are exact for that input size. ``leaf_modules``: module types or qualified names to
    treat as black boxes (for modules fx cannot trace); their channels are never pruned.
    The model is not modified (it is run once in eval mode, and once more in train mode with BatchNorm
    statistics frozen if some layers are only reached in training, as Inception's auxiliary heads are).
    """
    check_module(model, "build_graph")
    inputs = _example_tuple(example_inputs)
    leaf_modules = _leaf_list(leaf_modules)
    _load_spec_providers(model)
    state = _State()
    for name, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        state.tensor_names.setdefault(id(t), name)
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        gm = trace(model, leaf_modules)
        try:
            state = _run(gm, state, inputs)
        except Exception as exc:
            _raise_if_model_rejects(model, inputs, exc)
            raise
        reached = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        unreached = [
            name
            for name, m in model.named_modules()
            if name and any(True for _ in m.parameters(recurse=False)) and not _under(name, reached)
        ]
        if unreached:
            # Layers only reached in training mode (auxiliary heads): trace again in train mode with
            # normalisation layers kept in eval mode (no statistics update, batch size 1 works).
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
            gm_train = trace(model, leaf_modules)
            state.record_costs = False
            try:
                state = _run(gm_train, state, inputs)
            except Exception as exc:
                # The channels feeding training-only layers are unknown: the pruned model is then only
                # guaranteed in eval mode. Say so rather than fail: eval-mode pruning is still exact.
                warnings.warn(
                    f"prune_env: layers reached only in training mode ({', '.join(unreached[:4])}) could not "
                    f"be analysed with this example input ({type(exc).__name__}: {str(exc)[:120]}); the pruned "
                    "model is valid in eval mode only. Pass a larger example input to prune them too.",
                    stacklevel=2,
                )
    finally:
        for m, flag in was_training.items():
            m.training = flag
    return _resolve(model, state)


def check_module(model: Any, where: str) -> None:
    """``model`` must be an ``nn.Module``; a TypeError naming ``where`` and the fix otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{where}: model must be a torch.nn.Module, got {type(model).__name__}; pass the network itself "
            "(a function or a state dict cannot be traced or pruned)"
        )


def _example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The example inputs as a non-empty tuple of tensors, or :class:`InvalidSettingError` saying why not."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InvalidSettingError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}; pass an input batch the model accepts, e.g. "
            "torch.randn(1, 3, 32, 32)"
            + (
                " (torch.from_numpy(x).float() converts an array)"
                if isinstance(example_inputs, np.ndarray)
                else ""
            )
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InvalidSettingError(
                f"example_inputs[{i}] must be a tensor, got {type(x).__name__}; pass only tensors "
                "(torch.as_tensor(x) converts numbers and arrays)"
            )
    return tuple(example_inputs)


def _leaf_list(leaf_modules: Any) -> tuple[type[nn.Module] | str, ...]:
    if isinstance(leaf_modules, (str, type)):
        raise InvalidSettingError(
            f"leaf_modules must be a list of module types or qualified names, got the single "
            f"{leaf_modules!r}; wrap it in a list: leaf_modules=[{leaf_modules!r}]"
        )
    leaves = tuple(leaf_modules)
    for leaf in leaves:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise InvalidSettingError(
                f"leaf_modules entries must be nn.Module subclasses or qualified module names, got "
                f"{leaf!r}; pass e.g. leaf_modules=[MyBlock] or leaf_modules=['features.3']"
            )
    return leaves


def _raise_if_model_rejects(model: nn.Module, inputs: tuple[torch.Tensor, ...], exc: Exception) -> None:
    """Tell a bad example input apart from an engine failure: if the model itself cannot run on the
    input, that is what the caller must fix (this only runs after the analysis has failed)."""
    if isinstance(exc, PruneEnvError):
        return
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as direct:
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in inputs)
        raise InvalidSettingError(
            f"the model cannot run on the example input ({shapes}): {type(direct).__name__}: "
            f"{str(direct)[:200]}; pass an input of the shape and dtype the model accepts, e.g. "
            "torch.randn(1, 3, 32, 32) for an RGB image classifier"
        ) from exc


def _under(name: str, reached: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:k]) in reached for k in range(1, len(parts) + 1))


def _run(gm: torch.fx.GraphModule, state: _State, inputs: tuple[torch.Tensor, ...]) -> _State:
    """Propagate ids through ``gm``: on meta tensors (shapes only, fast), or for real if that fails.

    Returns the updated state; ``state`` itself is left as it was if the pass fails.
    """
    work = copy.deepcopy(state)
    try:
        with torch.no_grad():
            _Propagator(gm, work, meta=True).run(*inputs)
        return work
    except Exception:
        # Some op has no meta kernel or needs data (``.item()``): redo this pass with real tensors.
        work = copy.deepcopy(state)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            _Propagator(gm, work, meta=False).run(*inputs)
        return work


@dataclass
class _Tie:
    """A tensor with several uses: one element per index of each of its dimensions (``dim_ids``), joined
    with every slot that runs along that dimension, so all uses of dim ``d`` are one channel space."""

    name: str
    dim_ids: list[np.ndarray]
    mapped: set[int]  # dims some layer indexes by channels
    whole: set[int]  # dims some layer reads whole


def _tie_shared_tensors(st: _State) -> tuple[dict[int, _Tie], dict[str, str]]:
    """Couple the channel spaces of every tensor used by more than one site (tied weights).

    Layers reading the same tensor must keep the same indices of it, or surgery would have to slice one
    tensor two ways: index ``i`` of dim ``d`` is joined across all uses, and a use that needs dim ``d``
    whole (a grouped conv's input dim, a black-box module) poisons it for all. Returns, per fetched
    (raw) parameter slot, its tie — such a use finds its dimension only at resolution — and the
    conflicts to warn about, by tensor name."""
    raw_ties: dict[int, _Tie] = {}
    conflicts: dict[str, str] = {}
    for key, uses in st.tensor_uses.items():
        if len(uses) < 2:
            continue
        shape = next(iter(uses.values())).shape
        name = st.tensor_names.get(key, next(iter(uses)))
        layer_uses = [u for u in uses.values() if u.raw_slot is None]
        mapped = {d for u in layer_uses for d in u.dims}
        whole = {d for u in layer_uses for d in range(len(shape)) if d not in u.dims}
        tie = _Tie(name, [st.fresh(size, producer=False).numpy() for size in shape], mapped, whole)
        for u in uses.values():
            if u.raw_slot is not None:
                raw_ties[u.raw_slot] = tie
        for u in layer_uses:
            for d in range(len(shape)):
                dim_ids = torch.from_numpy(tie.dim_ids[d])
                s = u.dims.get(d)
                if s is not None and st.slots[s].ids.size == shape[d]:
                    st.union(dim_ids, torch.from_numpy(st.slots[s].ids))
                else:
                    # This use reads dim d whole, so no use of it may drop indices.
                    st.poison(dim_ids)
                    if s is not None:
                        st.poison(torch.from_numpy(st.slots[s].ids))
        if mapped & whole:
            conflicts[name] = (
                f"a tensor shared by several layers, some reading dim(s) {sorted(mapped & whole)} whole"
            )
    return raw_ties, conflicts


def _resolve(model: nn.Module, st: _State) -> DependencyGraph:
    raw_ties, tie_conflicts = _tie_shared_tensors(st)
    n_el = st.next_id
    a = np.concatenate(st.edges_a) if st.edges_a else np.zeros(0, dtype=np.int64)
    b = np.concatenate(st.edges_b) if st.edges_b else np.zeros(0, dtype=np.int64)
    space_of = np.full(n_el, -1, dtype=np.int64)
    for start, length, space in st.allocations:
        space_of[start : start + length] = space
    is_producer = space_of >= 0
    warn_extra: dict[str, str] = dict(tie_conflicts)  # parameter -> reason
    tied: set[tuple[int, int | None]] = set()  # (raw slot, its dim) already tied

    # A raw parameter that cannot be sliced poisons its channels, and a tied one couples (or poisons) the
    # other uses of its tensor: resolve again until nothing changes. A pass either poisons a raw parameter
    # for the first time, ties a (slot, dim) pair for the first time, or stops: both are finite.
    while True:
        unit = _components(n_el, a, b)
        n_units = int(unit.max()) + 1
        # Groups: components of the bipartite graph units — producer spaces. Concat keeps producers apart
        # (no unit spans them); a residual add joins them (its units contain elements of both).
        linked = _components(n_units + st.n_spaces, unit[is_producer], n_units + space_of[is_producer])
        unit_group = linked[:n_units]
        poisoned_groups = {int(unit_group[unit[POISON]])}
        units_per_group = np.bincount(unit_group, minlength=int(unit_group.max()) + 1)
        extra_a, extra_b = [], []
        for s, slot in enumerate(st.slots):
            if slot.kind != "param":
                continue
            units = unit[slot.ids]
            dim = _param_dim(units)
            single = units.size > 0 and bool(np.all(units == units.flat[0]))
            if single and units_per_group[unit_group[units.flat[0]]] < 2:
                dim = None  # one unit in a group of one: never pruned, nothing to slice
            elif dim is None and units.size and np.any(units != unit[POISON]):
                extra_a.append(slot.ids.reshape(-1))
                extra_b.append(np.zeros(slot.ids.size, dtype=np.int64))
                warn_extra.setdefault(
                    slot.layer, "a parameter whose channels cannot be sliced along one axis"
                )
            tie = raw_ties.get(s)
            if tie is not None and (s, dim) not in tied:
                tied.add((s, dim))
                # The fetched parameter is sliced along ``dim`` only: its slices there are the tensor's
                # indices along ``dim`` for every use, and every other dim stays whole for every use.
                for d, dim_ids in enumerate(tie.dim_ids):
                    if d == dim:
                        extra_a.append(np.moveaxis(slot.ids, d, 0).reshape(dim_ids.size, -1)[:, 0])
                        extra_b.append(dim_ids)
                    else:
                        extra_a.append(dim_ids)
                        extra_b.append(np.zeros(dim_ids.size, dtype=np.int64))
                if dim is None and tie.mapped:
                    warn_extra.setdefault(tie.name, "a layer's tensor that traced code also reads whole")
                elif dim is not None and (dim in tie.whole or tie.mapped - {dim}):
                    warn_extra.setdefault(
                        tie.name, f"a layer's tensor that traced code also slices along dim {dim} alone"
                    )
            slot.dim = dim if dim is not None else -1
        if not extra_a:
            break
        a = np.concatenate([a, *extra_a])
        b = np.concatenate([b, *extra_b])
    # Units with no producer element (a lone raw parameter) found no group: they stay as they are.
    has_producer = np.zeros(n_units, dtype=bool)
    has_producer[unit[is_producer]] = True

    # Per slot: the unit of every index along its dim.
    slot_units: list[np.ndarray] = []
    for slot in st.slots:
        if slot.kind == "param":
            ids = slot.ids
            if slot.dim >= 0:
                idx = [0] * ids.ndim
                idx[slot.dim] = slice(None)
                ids = ids[tuple(idx)]
            else:
                ids = np.zeros(1, dtype=np.int64)
        else:
            ids = slot.ids
        slot_units.append(unit[ids])

    poison_unit = unit[POISON]
    # Units are numbered within their group by first appearance in a producer ("out") slot, so unit i is
    # the producer's channel i wherever possible.
    out_units = [u for slot, u in zip(st.slots, slot_units, strict=True) if slot.kind == "out"]
    seen_units = np.concatenate([*out_units, *slot_units]) if slot_units else np.zeros(0, dtype=np.int64)
    _, first = np.unique(seen_units, return_index=True)
    ordered_units = seen_units[np.sort(first)]
    ordered_units = ordered_units[(ordered_units != poison_unit) & has_producer[ordered_units]]
    rank_in_group = np.full(n_units, -1, dtype=np.int64)
    group_units: dict[int, np.ndarray] = {}
    for gl in np.unique(unit_group[ordered_units]):
        members_of = ordered_units[unit_group[ordered_units] == gl]
        rank_in_group[members_of] = np.arange(len(members_of))
        group_units[int(gl)] = members_of

    # Which (slot, group) pairs exist.
    touching: dict[int, list[int]] = {}
    for s, units in enumerate(slot_units):
        for gl in np.unique(unit_group[units[(units != poison_unit) & has_producer[units]]]):
            touching.setdefault(int(gl), []).append(s)

    frozen: dict[str, str] = {}
    groups: list[ChannelGroup] = []
    group_slots: list[list[tuple[int, np.ndarray]]] = []
    first_slot: list[int] = []
    taken_names: set[str] = set()
    for gl, units_of_group in group_units.items():
        if gl in poisoned_groups:
            continue
        slots_of = touching.get(gl, [])
        # How often each unit of the group occurs in each touching slot. Units with different rows sit in
        # different layers (a concat's producers joined by a residual add): they become separate groups,
        # so that every group is uniform in every layer and costs depend only on how many units it keeps.
        counts = np.zeros((len(units_of_group), len(slots_of)), dtype=np.int64)
        positions_of: list[np.ndarray] = []
        for j, s in enumerate(slots_of):
            units = slot_units[s]
            positions = np.nonzero((unit_group[units] == gl) & (units != poison_unit) & has_producer[units])[
                0
            ]
            positions_of.append(positions)
            counts[:, j] = np.bincount(rank_in_group[units[positions]], minlength=len(units_of_group))
        signatures, which = np.unique(counts, axis=0, return_inverse=True)
        for k in range(len(signatures)):
            sub_units = units_of_group[which.reshape(-1) == k]
            if len(sub_units) < 2:
                continue
            sub_rank = np.full(n_units, -1, dtype=np.int64)
            sub_rank[sub_units] = np.arange(len(sub_units))
            members: list[Member] = []
            slots_for_group: list[tuple[int, np.ndarray]] = []
            for j, s in enumerate(slots_of):
                if signatures[k, j] == 0:
                    continue
                positions = positions_of[j]
                ranks = sub_rank[slot_units[s][positions]]
                positions, ranks = positions[ranks >= 0], ranks[ranks >= 0]
                order = np.argsort(ranks, kind="stable")
                positions, ranks = positions[order], ranks[order]
                slot = st.slots[s]
                size = len(slot_units[s]) if slot.kind != "param" else slot.param_shape[slot.dim]
                members.append(
                    Member(
                        layer=slot.layer,
                        layer_type=slot.layer_type,
                        kind=slot.kind,
                        dim=slot.dim,
                        positions=tuple(positions.tolist()),
                        multiplicity=int(signatures[k, j]),
                        size=int(size),
                    )
                )
                slots_for_group.append((s, ranks))
            producers = [m for m in members if m.kind == "out"]
            if not producers:
                continue
            name = producers[0].layer
            if name in taken_names:  # two sub-groups share their first producer: number them
                name = f"{name}#{sum(n.split('#')[0] == name for n in taken_names)}"
            taken_names.add(name)
            groups.append(ChannelGroup(name=name, channels=len(sub_units), members=tuple(members)))
            group_slots.append(slots_for_group)
            first_slot.append(
                min(s for (s, _), m in zip(slots_for_group, members, strict=True) if m.kind == "out")
            )

    # Slots are registered in execution order, so this is topological order of the groups' producers.
    order = sorted(range(len(groups)), key=lambda i: first_slot[i])
    groups = [groups[i] for i in order]
    group_slots = [group_slots[i] for i in order]
    groups = [
        ChannelGroup(name=g.name, channels=g.channels, members=g.members, index=i)
        for i, g in enumerate(groups)
    ]

    costs = _cost_model(model, st, slot_units, groups, group_slots)
    if st.unmapped or warn_extra:
        reasons = [f"{node}: {why}" for node, why in [*st.unmapped.items(), *warn_extra.items()]]
        warnings.warn(
            "prune_env: some channels cannot be mapped and will not be pruned — "
            + "; ".join(reasons[:12])
            + (f"; and {len(reasons) - 12} more" if len(reasons) > 12 else ""),
            stacklevel=3,
        )
    for node, why in st.unmapped.items():
        frozen.setdefault(node, why)
    for name, why in warn_extra.items():
        frozen.setdefault(name, why)
    return DependencyGraph(model, groups, frozen, costs, group_slots, st.slots)


def _param_dim(units: np.ndarray) -> int | None:
    """The single axis of a raw parameter along which its units vary (None if not exactly one)."""
    if units.size == 0:
        return None
    candidates = []
    for d in range(units.ndim):
        rows = np.moveaxis(units, d, 0).reshape(units.shape[d], -1)
        constant_within_slice = bool(np.all(rows == rows[:, :1]))
        varies_along_d = bool(np.any(rows[:, 0] != rows[0, 0]))
        if constant_within_slice and varies_along_d:
            candidates.append(d)
    return candidates[0] if len(candidates) == 1 else None


def _cost_model(
    model: nn.Module,
    st: _State,
    slot_units: list[np.ndarray],
    groups: list[ChannelGroup],
    group_slots: list[list[tuple[int, np.ndarray]]],
) -> CostModel:
    n_slots = len(st.slots)
    mult = np.zeros((n_slots, len(groups)), dtype=np.int64)
    fixed = np.array([len(u) for u in slot_units], dtype=np.int64)
    for g, (group, pairs) in enumerate(zip(groups, group_slots, strict=True)):
        for (s, _), member in zip(pairs, group.members, strict=True):
            mult[s, g] = member.multiplicity
            fixed[s] -= len(member.positions)
    macs_terms = [CostTerm(coef, slots) for coef, slots in st.macs_terms]
    params_terms = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        use = st.param_uses.get(name)
        raw = st.slot_index.get((name, "param"))
        if use is not None:
            params_terms.append(CostTerm(use.coef, use.slots))
        elif raw is not None and st.slots[raw].dim >= 0:
            shape = st.slots[raw].param_shape
            coef = int(np.prod(shape)) // shape[st.slots[raw].dim]
            params_terms.append(CostTerm(coef, (raw,)))
        else:
            params_terms.append(CostTerm(p.numel(), ()))
    return CostModel(
        mult=mult,
        fixed=fixed,
        macs_terms=macs_terms,
        params_terms=params_terms,
        full=[g.channels for g in groups],
    )
