"""The surgery plan: every tensor slice and size attribute that keeping some units of a graph's groups needs,
computed from the original model (read only) by each layer's own conventions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import UnsupportedLayerError
from prune_env.graph import DependencyGraph, layer_spec, spec_sizes, spec_tensors
from prune_env.surgery.keep import KeepSpec, normalise_keep, slot_masks


def resized_modules(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> list[tuple[nn.Module, nn.Module, Any]]:
    """(pruned, original, resize) for every module whose declaration recomputes its literal sizes after
    surgery (``LayerSpec.resize``), children first so a parent reads its children's final sizes."""
    found = []
    for original, pruned in reversed(list(pairs)):
        spec = layer_spec(type(original))
        if spec is not None and spec.resize is not None:
            found.append((pruned, original, spec.resize))
    return found


def resize(modules: Sequence[tuple[nn.Module, nn.Module, Any]]) -> None:
    for pruned, original, resize in modules:
        resize(pruned, original)


def fresh(original: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as the same kind of tensor as ``original`` (a Parameter stays a Parameter)."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(value, requires_grad=original.requires_grad)
    return value


def make_plan(
    model: nn.Module, graph: DependencyGraph, keep: KeepSpec, modules: Mapping[str, nn.Module] | None = None
) -> Plan:
    """Every slice and size attribute that keeping ``keep`` needs, computed from ``model`` (read only).

    ``modules``: ``dict(model.named_modules())`` when the caller has it (saves the lookups)."""
    modules = modules if modules is not None else dict(model.named_modules(remove_duplicate=False))
    masks = slot_masks(graph, normalise_keep(graph, keep))
    by_layer: dict[str, dict[str, tuple[int, torch.Tensor]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for s, mask in masks.items():
        slot = graph.slots[s]
        by_layer.setdefault(slot.layer, {})[slot.kind] = (slot.dim, torch.from_numpy(np.flatnonzero(mask)))
        sizes.setdefault(slot.layer, {})[slot.kind] = len(mask)
    plan = Plan()
    for layer, kinds in by_layer.items():
        plan_layer(plan, modules, layer, kinds, sizes[layer])
    return plan


def plan_layer(
    plan: Plan,
    modules: Mapping[str, nn.Module],
    layer: str,
    kinds: dict[str, tuple[int, Any]],
    sizes: Mapping[str, int],
) -> None:
    """Plan one layer's slices and size attributes; ``kinds``: pruned dimension kind -> (dim, kept indices),
    ``sizes``: each pruned dimension's unpruned extent."""
    if "param" in kinds:
        _plan_raw_parameter(plan, modules, layer, *kinds["param"])
        return
    m = modules[layer]
    spec = layer_spec(type(m))
    if spec is not None and spec.channelwise:
        _plan_channelwise(plan, m, layer, spec, kinds, sizes)
        return
    _plan_module(plan, m, layer, kinds, sizes)
    if spec is not None and spec.like is not None and "out" in kinds:
        # Extra per-output-channel tensors of a layer declared like a torch layer (a filter gain).
        for path, _, dim in spec_tensors(m, spec, sizes["out"]):
            owner_path, _, attr = path.rpartition(".")
            owner_name = f"{layer}.{owner_path}" if owner_path else layer
            plan.slice(modules[owner_name], owner_name, attr, dim, kinds["out"][1])


def _plan_channelwise(
    plan: Plan,
    m: nn.Module,
    layer: str,
    spec: Any,
    kinds: dict[str, tuple[int, Any]],
    sizes: Mapping[str, int],
) -> None:
    """A declared channel-wise layer: slice its per-channel tensors, set its channel-count attributes."""
    if set(kinds) != {"channel"}:
        raise UnsupportedLayerError(f"channel-wise layer {layer!r} with members {sorted(kinds)}")
    idx, size = kinds["channel"][1], sizes["channel"]
    for path, _, dim in spec_tensors(m, spec, size):
        owner_path, _, attr = path.rpartition(".")
        owner_name = f"{layer}.{owner_path}" if owner_path else layer
        plan.slice(m.get_submodule(owner_path) if owner_path else m, owner_name, attr, dim, idx)
    for path in spec_sizes(m, spec, size):
        owner_path, _, attr = path.rpartition(".")
        plan.set(f"{layer}.{owner_path}" if owner_path else layer, attr, len(idx))


class Plan:
    """Slices computed from the original model (read only) and size attributes to set on the copy.

    With ``slicing=False`` it only records what it would slice (``slices``) and which attributes it sets:
    how :class:`ModelRebuilder` compiles a plan, with any sized object (a ``range``) as the indices."""

    def __init__(self, slicing: bool = True) -> None:
        self.slicing = slicing
        # id(original) -> (original, its slice so far, kept indices per dim sliced so far)
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor, dict[int, Any]]] = {}
        self.attributes: list[tuple[str, str, Any]] = []
        # (module name, attribute, dim, indices, original tensor) of every slice, recorded when not slicing
        self.slices: list[tuple[str, str, int, Any, torch.Tensor]] = []

    def slice(self, module: nn.Module, module_name: str, attr: str, dim: int, idx: torch.Tensor) -> None:
        """Keep the indices ``idx`` of ``module.attr`` along ``dim`` (a no-op when there is no such tensor)."""
        # The registries first: Module.__getattr__ is the slow path for parameters and buffers.
        t: Any = module._parameters.get(attr)
        if t is None:
            t = module._buffers.get(attr)
        if t is None:
            t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor):
            return
        if not self.slicing:
            self.slices.append((module_name, attr, dim, idx, t))
            return
        entry = self.tensors.get(id(t))
        current, sliced = (entry[1], entry[2]) if entry is not None else (t.detach(), {})
        if dim in sliced:
            # A tied tensor, reached again through another layer that reads it: the graph coupled their
            # channels, so the kept indices agree and the tensor is sliced once.
            if not torch.equal(sliced[dim].cpu(), torch.as_tensor(idx).cpu()):
                raise UnsupportedLayerError(
                    f"{module_name}.{attr}: a tensor shared with another layer would be sliced two ways "
                    f"along dim {dim}; the graph does not describe this model's ties — build it from this "
                    "model: build_graph(model, x)"
                )
            return
        sliced = {**sliced, dim: idx}
        if idx.device != t.device:
            idx = idx.to(t.device)
        self.tensors[id(t)] = (t, current.index_select(dim, idx), sliced)

    def set(self, module_name: str, attr: str, value: Any) -> None:
        self.attributes.append((module_name, attr, value))

    def memo(self) -> dict[int, Any]:
        return {key: fresh(original, new) for key, (original, new, _) in self.tensors.items()}


def _plan_raw_parameter(
    plan: Plan, modules: Mapping[str, nn.Module], qualname: str, dim: int, idx: torch.Tensor
) -> None:
    owner_name, _, attr = qualname.rpartition(".")
    owner = modules[owner_name]
    plan.slice(owner, owner_name, attr, dim, idx)
    # A norm layer traced through to its functional form (ConvNeXt's LayerNorm2d calls F.layer_norm with
    # self.normalized_shape): its size attributes must follow its parameters.
    kept = len(idx)
    if isinstance(owner, nn.LayerNorm) and attr in ("weight", "bias"):
        plan.set(owner_name, "normalized_shape", (kept,))
    elif isinstance(owner, nn.modules.batchnorm._NormBase):
        plan.set(owner_name, "num_features", kept)


def _plan_conv(
    plan: Plan, m: nn.Conv1d | nn.Conv2d | nn.Conv3d, name: str, out: Any, inp: Any, sizes: Mapping[str, int]
) -> None:
    """A convolution's kept output and input channels (grouped ones: by group, or the same positions of
    every group)."""
    if out is not None:
        plan.slice(m, name, "weight", 0, out)
        plan.slice(m, name, "bias", 0, out)
    if m.groups > 1 and sizes.get("in", 0) != m.in_channels:
        # The same positions of every group go (the graph's input slot then indexes the positions
        # within a group, and it is pruned apart from the outputs): the group count stays.
        if inp is not None:
            plan.slice(m, name, "weight", 1, inp)
            plan.set(name, "in_channels", m.groups * len(inp))
        if out is not None:
            plan.set(name, "out_channels", len(out))
        return
    if m.groups > 1:
        # Whole groups go: keep the per-group width, shrink the group count.
        kept_out = len(out) if out is not None else m.out_channels
        new_groups = kept_out // (m.out_channels // m.groups)
        in_per_group = m.in_channels // m.groups
        if inp is not None and len(inp) != new_groups * in_per_group:
            raise UnsupportedLayerError(f"grouped conv {name!r}: inconsistent group removal")
        plan.set(name, "in_channels", new_groups * in_per_group)
        plan.set(name, "out_channels", kept_out)
        plan.set(name, "groups", new_groups)
        return
    if out is not None:
        plan.set(name, "out_channels", len(out))
    if inp is not None:
        plan.slice(m, name, "weight", 1, inp)
        plan.set(name, "in_channels", len(inp))


def _plan_dense(
    plan: Plan,
    m: nn.Module,
    name: str,
    out: Any,
    inp: Any,
    out_axis: tuple[int, str],
    in_axis: tuple[int, str],
) -> None:
    """A layer whose weight has one output and one input axis (``(axis, size attribute)`` each) and a
    bias along its outputs: a linear layer, an ungrouped transposed convolution."""
    if out is not None:
        plan.slice(m, name, "weight", out_axis[0], out)
        plan.slice(m, name, "bias", 0, out)
        plan.set(name, out_axis[1], len(out))
    if inp is not None:
        plan.slice(m, name, "weight", in_axis[0], inp)
        plan.set(name, in_axis[1], len(inp))


def _plan_module(
    plan: Plan, m: nn.Module, name: str, kinds: dict[str, tuple[int, Any]], sizes: Mapping[str, int]
) -> None:
    # Index tensors of the kept positions along each of the layer's pruned dimensions (None: untouched);
    # only their lengths are read here, besides handing them to plan.slice.
    out = kinds.get("out", (0, None))[1]
    inp = kinds.get("in", (1, None))[1]
    ch = kinds.get("channel", (0, None))[1]
    if isinstance(m, nn.MultiheadAttention):
        # Whole heads go (the graph unites a head's positions): head_dim stays, the head count and the
        # embedding width follow the kept rows and input channels.
        if out is not None:
            plan.slice(m, name, "in_proj_weight", 0, out)
            plan.slice(m, name, "in_proj_bias", 0, out)
            plan.set(name, "num_heads", len(out) // (3 * m.head_dim))
        if inp is not None:
            plan.slice(m, name, "in_proj_weight", 1, inp)
            for attr in ("embed_dim", "kdim", "vdim"):
                plan.set(name, attr, len(inp))
        return
    if ch is not None and "num_heads" in vars(m):
        # Window attention kept whole by the graph (torchvision's Swin): its per-head tensors lose the
        # pruned heads and the head count follows (its linear layers are sliced as layers of their own).
        plan.slice(m, name, "relative_position_bias_table", 1, ch)
        plan.slice(m, name, "logit_scale", 0, ch)
        plan.set(name, "num_heads", len(ch))
        return
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        _plan_conv(plan, m, name, out, inp, sizes)
        return
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # Ungrouped only (the graph keeps grouped ones whole); the weight is (in, out, *kernel).
        _plan_dense(plan, m, name, out, inp, (1, "out_channels"), (0, "in_channels"))
        return
    if isinstance(m, nn.Linear):
        _plan_dense(plan, m, name, out, inp, (0, "out_features"), (1, "in_features"))
        return
    if ch is None:
        raise UnsupportedLayerError(
            f"no surgery for {type(m).__name__} {name!r} with members {sorted(kinds)}"
        )
    kept = len(ch)
    if isinstance(m, nn.GroupNorm):
        plan.set(name, "num_groups", m.num_groups * kept // m.num_channels)
        plan.set(name, "num_channels", kept)
    elif isinstance(m, nn.LayerNorm):
        plan.set(name, "normalized_shape", (kept,))
    elif isinstance(m, nn.PReLU):
        plan.set(name, "num_parameters", kept)
    elif hasattr(m, "num_features"):
        plan.set(name, "num_features", kept)
    else:
        raise UnsupportedLayerError(f"no surgery for {type(m).__name__} {name!r}")
    for attr in ("weight", "bias", "running_mean", "running_var"):
        plan.slice(m, name, attr, 0, ch)
