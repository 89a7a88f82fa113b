"""Layers the engine does not know, declared once per type: :class:`LayerSpec` and :func:`register_opaque`.

Declarations live in one registry per process; libraries whose layers prune_env declares itself (timm) are
imported the first time a model uses one of their modules.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prune_env.errors import InvalidSettingError


@dataclass(frozen=True)
class LayerSpec:
    """How the channels of a module type the engine does not know map, declared once per type.

    Exactly one of these behaviours:

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

      ``split_axis`` (with ``resize`` only) says the module's literal sizes on channel axes are *all*
      recomputed by ``fn`` — attention's heads: a reshape of a channel axis to one literal size adapts, a
      reshape that splits it into several literal sizes shrinks the split axis at position ``split_axis``
      among them (``-2``: the heads of ``(3, heads, head_dim)`` or ``(heads, head_dim)``, whose other axes'
      positions then go together), and ``expand`` of a channel-free tensor to a literal size makes that axis
      follow whatever channels it is later paired with (a mask expanded to ``num_heads``).
    - ``groups="alike"`` (with or without ``resize``): the module is traced through, and a grouped
      convolution called directly inside it prunes the same positions of every group — the group count
      stays and each group narrows — instead of removing whole groups. For modules that bind their groups
      together, as split attention sums its radix groups position by position.
    - ``trace_as=fn`` (with or without the two above): the module's forward cannot be traced (Python
      arithmetic on sizes), so the engine traces ``fn(module, *args, **kwargs)`` instead: the same
      computation with the size-dependent steps in functions wrapped by ``torch.fx.wrap`` and mapped by
      op rules. Only the graph uses it; the pruned model runs the module's own forward.

    Register with :func:`register_layer`; the engine refuses a spec that declares none or several.
    """

    like: type[nn.Module] | None = None
    channelwise: bool = False
    tensors: Mapping[str, int] = field(default_factory=dict)
    sizes: tuple[str, ...] = ()
    channel_axis: int = 1
    resize: Callable[[nn.Module, nn.Module], None] | None = None
    split_axis: int | None = None
    groups: str = "whole"
    trace_as: Callable[..., Any] | None = None

    @property
    def is_leaf(self) -> bool:
        return self.like is not None or self.channelwise


_LAYER_SPECS: dict[type[nn.Module], LayerSpec] = {}
# Libraries whose layers prune_env declares itself, imported on first sight of one of their modules.
_SPEC_PROVIDERS = {
    "timm": "prune_env.models.timm_adapter:register_timm_layers",
    "torchvision": "prune_env.models.torchvision_adapter:register_torchvision_layers",
}
_LIKE_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def register_layer(layer_type: type[nn.Module], spec: LayerSpec) -> None:
    """Declare how ``layer_type``'s channels map (see :class:`LayerSpec`); later registrations replace
    earlier ones, and subclasses inherit the declaration unless they have their own."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise InvalidSettingError(f"register_layer needs an nn.Module subclass, got {layer_type!r}")
    if not isinstance(spec, LayerSpec):
        raise InvalidSettingError(f"register_layer needs a LayerSpec, got {type(spec).__name__}")
    if spec.groups not in ("whole", "alike"):
        raise InvalidSettingError(
            f"LayerSpec for {layer_type.__name__}: groups must be 'whole' or 'alike', got {spec.groups!r}"
        )
    traced = spec.resize is not None or spec.groups == "alike" or spec.trace_as is not None
    behaviours = [spec.like is not None, spec.channelwise, traced]
    if sum(behaviours) != 1:
        raise InvalidSettingError(
            f"LayerSpec for {layer_type.__name__} must declare exactly one of like=, channelwise=True or "
            "resize= / groups='alike' / trace_as= (a black box like a torch layer, a channel-wise black box, "
            "or a traced module)"
        )
    if spec.split_axis is not None and (spec.resize is None or not isinstance(spec.split_axis, int)):
        raise InvalidSettingError(
            f"LayerSpec for {layer_type.__name__}: split_axis must be an int and needs resize= (the function "
            "that recomputes the split sizes after surgery)"
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


def load_spec_providers(modules: Iterable[nn.Module]) -> None:
    """Import the declarations prune_env ships for a library when a model uses one of its layers."""
    if not _SPEC_PROVIDERS:
        return
    for m in modules:
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


def attribute_owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, attr = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), attr


def spec_tensors(module: nn.Module, spec: LayerSpec, size: int) -> list[tuple[str, torch.Tensor, int]]:
    """(path, tensor, dim) of each declared tensor of ``module`` whose extent along its dim is ``size``
    (a tensor declared per channel but built broadcast, such as an unsized blur filter, is left whole)."""
    found = []
    for path, dim in spec.tensors.items():
        owner, attr = attribute_owner(module, path)
        t = getattr(owner, attr, None)
        if isinstance(t, torch.Tensor) and t.ndim > dim and t.shape[dim] == size:
            found.append((path, t, dim))
    return found


def spec_sizes(module: nn.Module, spec: LayerSpec, size: int) -> list[str]:
    """Paths of the declared size attributes of ``module`` that currently hold ``size``."""
    found = []
    for path in spec.sizes:
        owner, attr = attribute_owner(module, path)
        if getattr(owner, attr, None) == size:
            found.append(path)
    return found


def shrink_channelwise(module: nn.Module, spec: LayerSpec, size: int, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` of a channel-wise declared ``module`` (``size`` channels), in place."""
    for path, t, dim in spec_tensors(module, spec, size):
        owner, attr = attribute_owner(module, path)
        new = t.detach().index_select(dim, keep.to(t.device))
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        setattr(owner, attr, new)
    for path in spec_sizes(module, spec, size):
        owner, attr = attribute_owner(module, path)
        setattr(owner, attr, len(keep))


OPAQUE_TYPES: set[type[nn.Module]] = set()


def register_opaque(layer_type: type[nn.Module]) -> None:
    """Declare ``layer_type`` a module torch.fx may be unable to trace (its forward branches on sizes):
    where tracing it fails, :func:`build_graph` treats it as a black box — its channels stay unpruned,
    with a warning — instead of raising :class:`UntraceableModelError`. For library layers known not to
    trace (timm's own list); a model's own modules are better marked with ``leaf_modules``."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise InvalidSettingError(f"register_opaque needs an nn.Module subclass, got {layer_type!r}")
    OPAQUE_TYPES.add(layer_type)
