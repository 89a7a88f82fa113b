"""Which units to keep: the accepted forms of a keep specification, validated, and the slot positions that
dropping the other units removes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prune_env.errors import InvalidRatiosError
from prune_env.graph import DependencyGraph

UnitIndices = Sequence[int] | np.ndarray
"""Unit indices of one group: a sequence of ints or a 1-D integer array."""
KeepSpec = Mapping[str, UnitIndices] | Mapping[int, UnitIndices] | Sequence[UnitIndices]
"""Per group — by name, by index, or one entry per group in ``graph.groups`` order — the units to keep."""


def normalise_keep(graph: DependencyGraph, keep: KeepSpec) -> list[np.ndarray]:
    """Kept unit indices for every group (groups not mentioned keep all units)."""
    result = [np.arange(g.units) for g in graph.groups]
    for g, arr in select_units(graph, keep).items():
        if arr.size == 0:
            raise InvalidRatiosError(
                f"group {graph.groups[g].name!r} must keep at least one unit, got an empty list; keep one "
                "or more of its units, or leave the group out to keep it whole"
            )
        result[g] = arr
    return result


def select_units(graph: DependencyGraph, spec: KeepSpec) -> dict[int, np.ndarray]:
    """Validated, sorted unit indices per mentioned group (by index, by name, or one list per group)."""
    n_groups = len(graph.groups)
    if isinstance(spec, Mapping):
        items: list[tuple[int, Any]] = []
        for key, idx in spec.items():
            if isinstance(key, str):
                try:
                    items.append((graph.groups.index(graph.group(key)), idx))
                except KeyError:
                    raise InvalidRatiosError(
                        f"unknown group name {key!r}; valid names are graph.groups[i].name, e.g. "
                        f"{[g.name for g in graph.groups[:5]]}"
                    ) from None
            elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
                items.append((int(key), idx))
            else:
                raise InvalidRatiosError(
                    f"groups are named by name (str) or index (int), got key {key!r}; use "
                    "graph.groups[i].name or i"
                )
        seen: set[int] = set()
        for g, _ in items:
            if g in seen:
                raise InvalidRatiosError(
                    f"group {graph.groups[g].name!r} is given twice (by name and by index); give it once"
                )
            seen.add(g)
    else:
        if isinstance(spec, (str, bytes)) or not hasattr(spec, "__len__"):
            raise InvalidRatiosError(
                f"units must be a mapping from group name or index to unit indices, or one list per group; "
                f"got {type(spec).__name__}"
            )
        if len(spec) != n_groups:
            raise InvalidRatiosError(f"expected {n_groups} unit lists (one per group), got {len(spec)}")
        items = list(enumerate(spec))
    selected: dict[int, np.ndarray] = {}
    for g, idx in items:
        if not 0 <= g < n_groups:
            raise InvalidRatiosError(
                f"group index {g} out of range: the graph has {n_groups} groups (valid indices 0 to "
                f"{n_groups - 1})"
            )
        selected[g] = unit_indices(graph, g, idx)
    return selected


def unit_indices(graph: DependencyGraph, g: int, idx: Any) -> np.ndarray:
    """Group ``g``'s unit indices ``idx`` as a sorted int64 array, or :class:`InvalidRatiosError` naming the
    group, the offending index and the valid range: integers only (numpy would truncate 1.7 to 1 and read
    ``True`` as 1), each once, within ``range(channels)`` (numpy would read -1 as the last unit)."""
    group = graph.groups[g]
    n = group.units
    if isinstance(idx, (bool, np.bool_)) or (
        isinstance(idx, (list, tuple)) and any(isinstance(i, (bool, np.bool_)) for i in idx)
    ):
        raise InvalidRatiosError(
            f"unit indices of group {group.name!r} must be integers, got booleans; for a mask pass "
            "np.flatnonzero(mask)"
        )
    try:
        arr = np.asarray(idx)
    except (TypeError, ValueError) as exc:
        raise InvalidRatiosError(f"unit indices of group {group.name!r} must be integers ({exc})") from None
    if arr.ndim > 1:
        raise InvalidRatiosError(
            f"unit indices of group {group.name!r} must be a flat list of integers, got shape {arr.shape}"
        )
    arr = arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)  # an empty list: what it means depends on the caller
    if arr.dtype.kind not in "iu":
        what = (
            "booleans (for a mask pass np.flatnonzero(mask))"
            if arr.dtype.kind == "b"
            else (f"{arr.dtype} values such as {arr[:3].tolist()}")
        )
        raise InvalidRatiosError(
            f"unit indices of group {group.name!r} must be integers, got {what}; pass int indices in 0 "
            f"to {n - 1}"
        )
    arr = arr.astype(np.int64, copy=False)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise InvalidRatiosError(
            f"group {group.name!r} has {n} units (valid indices 0 to {n - 1}); got index {int(bad[0])}"
        )
    unique, counts = np.unique(arr, return_counts=True)
    if unique.size != arr.size:
        raise InvalidRatiosError(
            f"group {group.name!r}: unit index {int(unique[counts > 1][0])} is given more than once; "
            "give each unit once"
        )
    return unique


def slot_masks(graph: DependencyGraph, keep: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Per layer dimension (slot) touched by pruning: a boolean mask of the indices that stay."""
    masks: dict[int, np.ndarray] = {}
    for g, kept in enumerate(keep):
        for s, positions in (dropped_positions(graph, g, kept) or {}).items():
            if s not in masks:
                masks[s] = np.ones(graph.slots[s].size, dtype=bool)
            masks[s][positions] = False
    return masks


def dropped_positions(graph: DependencyGraph, g: int, kept: np.ndarray) -> dict[int, np.ndarray] | None:
    """The indices of each slot that group ``g`` loses when it keeps the (validated, sorted) units ``kept``;
    ``None`` when it keeps them all."""
    group = graph.groups[g]
    if len(kept) == group.units:
        return None
    dropped = np.ones(group.units, dtype=bool)
    dropped[kept] = False
    positions: dict[int, list[np.ndarray]] = {}
    for member in graph.unit_positions[g]:
        positions.setdefault(member.slot, []).append(member.positions[dropped[member.units]])
    return {s: np.concatenate(p) for s, p in positions.items()}
