"""Channel importance: one score per unit of a group, aggregated over every coupled layer.

A group's units are scored together because they are removed together: a residual channel's importance
is the sum over every convolution that writes or reads it, not the score of one layer (DepGraph's point).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from prune_env.errors import InvalidSettingError, UnknownNameError
from prune_env.graph import ChannelGroup, Member

Importance = Callable[[ChannelGroup, nn.Module], np.ndarray]
"""A callable ``(group, model) -> scores`` with one score per unit; lower scores are pruned first."""

_NORM_TYPES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm"}


def member_tensor(model: nn.Module, member: Member) -> tuple[torch.Tensor, int] | None:
    """The weight tensor a member's channels index, and the axis they run along (None if weightless).

    Raises :class:`InvalidSettingError` when ``model`` has no such layer or the tensor's extent along the
    axis is not the member's: the group comes from a graph built on another model, whose positions would
    index the wrong weights (or out of range)."""
    found = _member_tensor(model, member)
    if found is not None and found[0].shape[found[1]] != member.size:
        raise InvalidSettingError(
            f"group member {member.layer!r} ({member.kind}) has {member.size} indices along dim "
            f"{found[1]} in the graph but {found[0].shape[found[1]]} in this model: the graph was built from "
            "a different model; build the graph from this model: build_graph(model, x)"
        )
    return found


def _member_tensor(model: nn.Module, member: Member) -> tuple[torch.Tensor, int] | None:
    try:
        if member.kind == "param":
            if _is_buffer(model, member.layer):
                return None  # running statistics (a traced norm-act layer's), not weights: not scored
            return layer_tensor(model, member.layer).detach(), member.dim
        module = model.get_submodule(member.layer)
    except AttributeError:
        raise InvalidSettingError(
            f"this model has no {member.layer!r} ({member.layer_type}), which the graph's group names: the "
            "graph was built from a different model; build the graph from this model: build_graph(model, x)"
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if member.kind == "in":
        if getattr(module, "groups", 1) > 1:
            return None  # grouped: a group's inputs and outputs are one unit, scored by the outputs
        return weight.detach(), 1
    return weight.detach(), 0


def _is_buffer(model: nn.Module, qualified_name: str) -> bool:
    owner_name, _, attr = qualified_name.rpartition(".")
    return attr in model.get_submodule(owner_name)._buffers


def layer_tensor(model: nn.Module, qualified_name: str) -> torch.Tensor:
    """The tensor a raw-parameter member names: a parameter, a buffer or a plain tensor attribute (traced
    code may fetch any of them). AttributeError if there is none."""
    owner_name, _, attr = qualified_name.rpartition(".")
    tensor = getattr(model.get_submodule(owner_name), attr)
    if not isinstance(tensor, torch.Tensor):
        raise AttributeError(f"{qualified_name!r} is not a tensor")
    return tensor


def _per_position(weight: torch.Tensor, axis: int, power: int) -> np.ndarray:
    other = [d for d in range(weight.ndim) if d != axis]
    w = weight.float()
    magnitude = w.abs() if power == 1 else w * w
    return (magnitude.sum(dim=other) if other else magnitude).cpu().numpy().astype(np.float64)


def _norm_scores(
    group: ChannelGroup,
    model: nn.Module,
    power: int,
    norms_only: bool,
    cache: dict[tuple[str, str, int], np.ndarray] | None = None,
) -> np.ndarray:
    scores = np.zeros(group.units, dtype=np.float64)
    for member in group.members:
        if norms_only and member.layer_type not in _NORM_TYPES:
            continue
        key = (member.layer, member.kind, power)
        per_pos = cache.get(key) if cache is not None else None
        if per_pos is None:
            found = member_tensor(model, member)
            if found is None:
                continue
            per_pos = _per_position(*found, power)
            if cache is not None:
                cache[key] = per_pos
        pos = np.asarray(member.positions).reshape(group.units, member.multiplicity)
        scores += per_pos[pos].sum(axis=1)
    return scores


class MagnitudeImportance:
    """Sum of |w| (``power=1``) or w² (``power=2``) over every coupled slice of a unit: conv filters and
    input columns, linear rows and columns, normalisation scales. ``norms_only`` scores by BN/LN/GN scales
    alone (Network Slimming); groups without a normalisation layer then fall back to all weights.

    Per-layer scores are cached for the lifetime of the object, so a layer shared by many groups (a
    DenseNet concat consumer) is scored once: create a fresh object for a changed model.
    """

    def __init__(self, power: int = 1, norms_only: bool = False) -> None:
        self.power = power
        self.norms_only = norms_only
        self._cache: dict[tuple[str, str, int], np.ndarray] = {}

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        norms_only = self.norms_only and any(m.layer_type in _NORM_TYPES for m in group.members)
        return _norm_scores(group, model, self.power, norms_only, self._cache)


def l1_importance(group: ChannelGroup, model: nn.Module) -> np.ndarray:
    """Sum of absolute weights of every coupled slice (conv filters and input columns, BN scales, ...)."""
    return _norm_scores(group, model, power=1, norms_only=False)


def l2_importance(group: ChannelGroup, model: nn.Module) -> np.ndarray:
    """Sum of squared weights of every coupled slice."""
    return _norm_scores(group, model, power=2, norms_only=False)


def bn_scale_importance(group: ChannelGroup, model: nn.Module) -> np.ndarray:
    """|γ| of the normalisation layers in the group (Network Slimming); groups without one fall back to L1."""
    return MagnitudeImportance(power=1, norms_only=True)(group, model)


class RandomImportance:
    """Uniformly random scores from a seeded generator (a baseline)."""

    def __init__(self, seed: int | np.random.Generator | None = None) -> None:
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray:
        return self.rng.random(group.units)


IMPORTANCE: dict[str, Callable[[], Importance]] = {
    "l1": lambda: MagnitudeImportance(power=1),
    "l2": lambda: MagnitudeImportance(power=2),
    "bn_scale": lambda: MagnitudeImportance(power=1, norms_only=True),
    "random": RandomImportance,
}


def get_importance(importance: str | Importance, seed: int | np.random.Generator | None = None) -> Importance:
    """Resolve a name ("l1", "l2", "bn_scale", "random") or pass a callable through."""
    if callable(importance):
        return importance
    if not isinstance(importance, str):
        raise InvalidSettingError(
            f"importance must be a name ({', '.join(sorted(IMPORTANCE))}) or a callable (group, model) -> "
            f"scores, got {type(importance).__name__}"
        )
    if importance == "random":
        return RandomImportance(seed)
    if importance not in IMPORTANCE:
        raise UnknownNameError(
            f"unknown importance {importance!r}; choose one of {sorted(IMPORTANCE)} or a callable"
        )
    return IMPORTANCE[importance]()
