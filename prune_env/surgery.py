"""Physical surgery: a new, smaller model with the chosen channels removed.

The user's model is deep-copied and the copy's layers are sliced in place (their classes, hooks and
forward code are kept), so the result is a standalone ``nn.Module`` of the same type that runs the same
code — including branches only taken in training mode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidRatiosError, UnsupportedLayerError
from prune_env.graph import DependencyGraph, build_graph
from prune_env.importance import Importance, get_importance

KeepSpec = Mapping[str, Sequence[int]] | Mapping[int, Sequence[int]] | Sequence[Sequence[int]]


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ratios: float | Sequence[float] | Mapping[str, float] | np.ndarray,
    *,
    importance: str | Importance = "l1",
    graph: DependencyGraph | None = None,
    round_to: int = 1,
    seed: int | np.random.Generator | None = None,
) -> nn.Module:
    """Return a new, physically smaller copy of ``model`` with ``ratios`` of each group's channels removed.

    ``ratios``: one float for every group, a sequence with one per ``graph.groups`` entry, or a mapping
    from group name to ratio (missing groups are not pruned). A ratio is the fraction of the group's
    channels removed; at least one channel always stays and ratio 0 keeps the group whole.
    ``importance``: "l1", "l2", "bn_scale", "random" (seeded by ``seed``) or a callable
    ``(group, model) -> scores``; the lowest-scoring channels go first. ``graph``: a graph already built
    for this architecture (saves the trace). ``round_to``: kept counts are rounded to this multiple.
    """
    if graph is None:
        graph = build_graph(model, example_inputs)
    keep_counts = graph.keep_counts(ratios, round_to)
    score = get_importance(importance, seed)
    keep: list[np.ndarray] = []
    for group, k in zip(graph.groups, keep_counts, strict=True):
        if k == group.channels:
            keep.append(np.arange(group.channels))
            continue
        scores = np.asarray(score(group, model), dtype=np.float64).reshape(-1)
        if scores.shape != (group.channels,) or not np.all(np.isfinite(scores)):
            raise ValueError(
                f"importance returned {scores.shape} scores for group {group.name!r}; "
                f"expected {group.channels} finite values"
            )
        # Stable sort: ties keep the lowest indices, so the result is deterministic.
        order = np.argsort(-scores, kind="stable")
        keep.append(np.sort(order[:k]))
    return prune_channels(model, graph, keep)


def prune_channels(model: nn.Module, graph: DependencyGraph, keep: KeepSpec) -> nn.Module:
    """Return a pruned copy of ``model`` keeping exactly the given units of each group.

    ``keep``: per group (by index, by name, or as a sequence in ``graph.groups`` order) the unit indices to
    keep; groups not mentioned are kept whole.
    """
    masks = _slot_masks(graph, _normalise_keep(graph, keep))
    by_layer: dict[str, dict[str, tuple[int, np.ndarray]]] = {}
    for s, mask in masks.items():
        slot = graph._slots[s]
        by_layer.setdefault(slot.layer, {})[slot.kind] = (slot.dim, mask)
    plan = _Plan()
    for layer, kinds in by_layer.items():
        if "param" in kinds:
            _plan_raw_parameter(plan, model, layer, *kinds["param"])
        else:
            _plan_module(plan, model.get_submodule(layer), layer, kinds)
    # Sliced tensors enter the copy through deepcopy's memo, so every weight is copied exactly once.
    new = copy.deepcopy(model, plan.memo())
    for module_name, attr, value in plan.attributes:
        setattr(new.get_submodule(module_name), attr, value)
    return new


class _Plan:
    """Slices computed from the original model (read only) and size attributes to set on the copy."""

    def __init__(self) -> None:
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(original) -> (original, new)
        self.attributes: list[tuple[str, str, Any]] = []

    def slice(self, module: nn.Module, attr: str, dim: int, mask: np.ndarray) -> None:
        t = getattr(module, attr, None)
        if not isinstance(t, torch.Tensor):
            return
        current = self.tensors[id(t)][1] if id(t) in self.tensors else t.detach()
        idx = torch.as_tensor(np.nonzero(mask)[0], device=t.device)
        self.tensors[id(t)] = (t, current.index_select(dim, idx))

    def set(self, module_name: str, attr: str, value: Any) -> None:
        self.attributes.append((module_name, attr, value))

    def memo(self) -> dict[int, Any]:
        memo: dict[int, Any] = {}
        for key, (original, new) in self.tensors.items():
            if isinstance(original, nn.Parameter):
                memo[key] = nn.Parameter(new, requires_grad=original.requires_grad)
            else:
                memo[key] = new
        return memo


def _normalise_keep(graph: DependencyGraph, keep: KeepSpec) -> list[np.ndarray]:
    """Kept unit indices for every group (groups not mentioned keep all units)."""
    result = [np.arange(g.channels) for g in graph.groups]
    for g, arr in _select_units(graph, keep).items():
        if arr.size == 0:
            raise InvalidRatiosError(f"group {graph.groups[g].name!r} must keep at least one channel")
        result[g] = arr
    return result


def _select_units(graph: DependencyGraph, spec: KeepSpec) -> dict[int, np.ndarray]:
    """Validated, sorted unit indices per mentioned group (by index, by name, or one list per group)."""
    if isinstance(spec, Mapping):
        items: list[tuple[int, Any]] = []
        for key, idx in spec.items():
            if isinstance(key, str):
                try:
                    items.append((graph.groups.index(graph.group(key)), idx))
                except KeyError as exc:
                    raise InvalidRatiosError(f"unknown group name {key!r}") from exc
            else:
                items.append((int(key), idx))
    else:
        if len(spec) != len(graph.groups):
            raise InvalidRatiosError(
                f"expected {len(graph.groups)} unit lists (one per group), got {len(spec)}"
            )
        items = list(enumerate(spec))
    selected: dict[int, np.ndarray] = {}
    for g, idx in items:
        if not 0 <= g < len(graph.groups):
            raise InvalidRatiosError(
                f"group index {g} out of range (the graph has {len(graph.groups)} groups)"
            )
        arr = np.unique(np.asarray(idx, dtype=np.int64).reshape(-1))
        n = graph.groups[g].channels
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise InvalidRatiosError(f"group {graph.groups[g].name!r} has {n} units; got index {arr.max()}")
        selected[g] = arr
    return selected


def _slot_masks(graph: DependencyGraph, keep: list[np.ndarray]) -> dict[int, np.ndarray]:
    masks: dict[int, np.ndarray] = {}
    for group, kept, pairs in zip(graph.groups, keep, graph._group_slots, strict=True):
        if len(kept) == group.channels:
            continue
        dropped = np.setdiff1d(np.arange(group.channels), kept)
        for (s, _), member in zip(pairs, group.members, strict=True):
            if s not in masks:
                masks[s] = np.ones(member.size, dtype=bool)
            pos = np.asarray(member.positions).reshape(group.channels, member.multiplicity)
            masks[s][pos[dropped].reshape(-1)] = False
    return masks


def _plan_raw_parameter(plan: _Plan, model: nn.Module, qualname: str, dim: int, mask: np.ndarray) -> None:
    owner_name, _, attr = qualname.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    plan.slice(owner, attr, dim, mask)
    # A norm layer traced through to its functional form (ConvNeXt's LayerNorm2d calls F.layer_norm with
    # self.normalized_shape): its size attributes must follow its parameters.
    kept = int(mask.sum())
    if isinstance(owner, nn.LayerNorm) and attr in ("weight", "bias"):
        plan.set(owner_name, "normalized_shape", (kept,))
    elif isinstance(owner, nn.modules.batchnorm._NormBase):
        plan.set(owner_name, "num_features", kept)


def _plan_module(plan: _Plan, m: nn.Module, name: str, kinds: dict[str, tuple[int, np.ndarray]]) -> None:
    out = kinds.get("out", (0, None))[1]
    inp = kinds.get("in", (1, None))[1]
    ch = kinds.get("channel", (0, None))[1]
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if out is not None:
            plan.slice(m, "weight", 0, out)
            plan.slice(m, "bias", 0, out)
        if m.groups > 1:
            # Whole groups go: keep the per-group width, shrink the group count.
            kept_out = int(out.sum()) if out is not None else m.out_channels
            new_groups = kept_out // (m.out_channels // m.groups)
            in_per_group = m.in_channels // m.groups
            if inp is not None and int(inp.sum()) != new_groups * in_per_group:
                raise UnsupportedLayerError(f"grouped conv {name!r}: inconsistent group removal")
            plan.set(name, "in_channels", new_groups * in_per_group)
            plan.set(name, "out_channels", kept_out)
            plan.set(name, "groups", new_groups)
            return
        if out is not None:
            plan.set(name, "out_channels", int(out.sum()))
        if inp is not None:
            plan.slice(m, "weight", 1, inp)
            plan.set(name, "in_channels", int(inp.sum()))
        return
    if isinstance(m, nn.Linear):
        if out is not None:
            plan.slice(m, "weight", 0, out)
            plan.slice(m, "bias", 0, out)
            plan.set(name, "out_features", int(out.sum()))
        if inp is not None:
            plan.slice(m, "weight", 1, inp)
            plan.set(name, "in_features", int(inp.sum()))
        return
    if ch is None:
        raise UnsupportedLayerError(
            f"no surgery for {type(m).__name__} {name!r} with members {sorted(kinds)}"
        )
    kept = int(ch.sum())
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
        plan.slice(m, attr, 0, ch)


def zero_units(model: nn.Module, graph: DependencyGraph, units: KeepSpec) -> None:
    """Zero, in place, every weight slice of the given units (the masked twin of pruning them).

    ``units``: per group (index, name, or one list per group) the unit indices to zero. Producers' filters
    and biases, normalisation scales and shifts, raw parameters and consumers' input columns are zeroed, so
    those channels contribute nothing: pruning them afterwards leaves the outputs unchanged in eval mode
    (unless a LayerNorm/GroupNorm normalises over them), which is how the tests prove surgery correct.
    """
    with torch.no_grad():
        for g, chosen in _select_units(graph, units).items():
            group = graph.groups[g]
            for member in group.members:
                pos = np.asarray(member.positions).reshape(group.channels, member.multiplicity)
                idx = torch.as_tensor(pos[chosen].reshape(-1), dtype=torch.long)
                if member.kind == "param":
                    model.get_parameter(member.layer).index_fill_(member.dim, idx, 0.0)
                    continue
                module = model.get_submodule(member.layer)
                if member.kind == "in":
                    # Grouped/depthwise convs: a group's inputs and outputs are one unit, zeroed via "out".
                    if getattr(module, "groups", 1) == 1:
                        module.weight.index_fill_(1, idx, 0.0)
                    continue
                for attr in ("weight", "bias"):
                    t = getattr(module, attr, None)
                    if isinstance(t, torch.Tensor):
                        t.index_fill_(0, idx, 0.0)
