"""Resolution: from the propagated elements and their unions to units, groups, members and costs.

In order: tied tensors couple the channel spaces of their uses (:func:`tie_shared_tensors`); union-find
over the elements gives *units* — sets of channels that must disappear together — and units joined to the
same producers form a group, while raw parameters learn the axis they are sliced along (:func:`find_units`,
repeated until no parameter or tie changes anything); each slot's indices are labelled with their units
(:func:`label_slots`); units are numbered within their group (:func:`number_units`); groups become
:class:`ChannelGroup` values with one member per layer dimension, split where their units sit in different
layers (:func:`form_groups`); costs follow from the members (``cost_terms``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prune_env.graph.cost_terms import OpCount, cost_model
from prune_env.graph.dependency_graph import DependencyGraph
from prune_env.graph.elements import POISON, State
from prune_env.graph.values import ChannelGroup, Member, Slot


@dataclass
class Tie:
    """A tensor with several uses: one element per index of each of its dimensions (``dim_ids``), joined
    with every slot that runs along that dimension, so all uses of dim ``d`` are one channel space."""

    name: str
    dim_ids: list[np.ndarray]
    mapped: set[int]  # dims some layer indexes by channels
    whole: set[int]  # dims some layer reads whole


def tie_shared_tensors(st: State) -> tuple[dict[int, Tie], dict[str, str]]:
    """Couple the channel spaces of every tensor used by more than one site (tied weights).

    Layers reading the same tensor must keep the same indices of it, or surgery would have to slice one
    tensor two ways: index ``i`` of dim ``d`` is joined across all uses, and a use that needs dim ``d``
    whole (a grouped conv's input dim, a black-box module) poisons it for all. Returns, per fetched
    (raw) parameter slot, its tie — such a use finds its dimension only at resolution — and the
    conflicts to warn about, by tensor name."""
    raw_ties: dict[int, Tie] = {}
    conflicts: dict[str, str] = {}
    for key, uses in st.tensor_uses.items():
        if len(uses) < 2:
            continue
        shape = next(iter(uses.values())).shape
        name = st.tensor_names.get(key, next(iter(uses)))
        layer_uses = [u for u in uses.values() if u.raw_slot is None]
        mapped = {d for u in layer_uses for d in u.dims}
        whole = {d for u in layer_uses for d in range(len(shape)) if d not in u.dims}
        tie = Tie(name, [st.fresh(size, producer=False).numpy() for size in shape], mapped, whole)
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


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The connected component of each of ``n`` nodes joined by the edges ``a[i] — b[i]``, numbered
    0, 1, ... in the order of each component's smallest node.

    Union-find in whole-array steps: every edge hooks the larger of its two roots under the smaller, then
    pointers jump until every node points at its root, until no edge joins two roots. Each node's parent
    is never above it, so a root is its component's smallest node. (scipy's connected_components does
    the same in a few milliseconds, but importing scipy.sparse.csgraph costs a quarter of a second: most
    of a first build.)"""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return np.unique(parent, return_inverse=True)[1].reshape(-1)


@dataclass
class Units:
    """Union-find's answer: the unit of every element and the group (component) of every unit."""

    of_element: np.ndarray
    group_of_unit: np.ndarray
    has_producer: np.ndarray  # per unit: it holds a producer's element (else it founds no group)
    poison_unit: int
    poisoned_group: int


def find_units(st: State, raw_ties: dict[int, Tie], warn: dict[str, str]) -> Units:
    """Units and their groups; sets every raw parameter slot's ``dim`` (-1: never sliced).

    A raw parameter that cannot be sliced along one axis poisons its channels, and a tied one couples (or
    poisons) the other uses of its tensor: resolve again until nothing changes. A pass either poisons a
    raw parameter for the first time, ties a (slot, dim) pair for the first time, or stops: both finite."""
    n_el = st.next_id
    a = np.concatenate(st.edges_a) if st.edges_a else np.zeros(0, dtype=np.int64)
    b = np.concatenate(st.edges_b) if st.edges_b else np.zeros(0, dtype=np.int64)
    space_of = np.full(n_el, -1, dtype=np.int64)
    for start, length, space in st.allocations:
        space_of[start : start + length] = space
    is_producer = space_of >= 0
    tied: set[tuple[int, int | None]] = set()  # (raw slot, its dim) already tied
    while True:
        unit = _components(n_el, a, b)
        n_units = int(unit.max()) + 1
        # Groups: components of the bipartite graph units — producer spaces. Concat keeps producers apart
        # (no unit spans them); a residual add joins them (its units contain elements of both).
        linked = _components(n_units + st.n_spaces, unit[is_producer], n_units + space_of[is_producer])
        unit_group = linked[:n_units]
        units_per_group = np.bincount(unit_group, minlength=int(unit_group.max()) + 1)
        producer_unit = np.zeros(n_units, dtype=bool)
        producer_unit[unit[is_producer]] = True
        extra_a, extra_b = [], []
        for s, slot in enumerate(st.slots):
            if slot.kind != "param":
                continue
            units = unit[slot.ids]
            single = units.size > 0 and bool((units == units.flat[0]).all())
            # Most fetched tensors are vectors (norm scales and shifts), whose axis needs no search.
            dim = (0 if units.size and not single else None) if units.ndim == 1 else param_dim(units)
            if (single and units_per_group[unit_group[units.flat[0]]] < 2) or not bool(
                producer_unit[units].any()
            ):
                # One unit in a group of one, or units no channel reaches (a constant mask paired with
                # nothing prunable): never pruned, nothing to slice.
                dim = None
            elif dim is None and units.size and np.any(units != unit[POISON]):
                extra_a.append(slot.ids.reshape(-1))
                extra_b.append(np.zeros(slot.ids.size, dtype=np.int64))
                warn.setdefault(slot.layer, "a parameter whose channels cannot be sliced along one axis")
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
                    warn.setdefault(tie.name, "a layer's tensor that traced code also reads whole")
                elif dim is not None and (dim in tie.whole or tie.mapped - {dim}):
                    warn.setdefault(
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
    poison_unit = int(unit[POISON])
    return Units(unit, unit_group, has_producer, poison_unit, int(unit_group[poison_unit]))


def param_dim(units: np.ndarray) -> int | None:
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


def label_slots(st: State, units: Units) -> list[np.ndarray]:
    """Per slot: the unit of every index along its dim (a raw parameter never sliced: one index)."""
    labels: list[np.ndarray] = []
    for slot in st.slots:
        ids = slot.ids
        if slot.kind == "param":
            if slot.dim >= 0:
                index: list[int | slice] = [0] * ids.ndim
                index[slot.dim] = slice(None)
                ids = ids[tuple(index)]
            else:
                ids = np.zeros(1, dtype=np.int64)
        labels.append(units.of_element[ids])
    return labels


def number_units(
    st: State, units: Units, slot_units: list[np.ndarray]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Each prunable unit's rank within its group, and each group's units in rank order.

    Units are numbered by first appearance in a producer ("out") slot, so unit i is the producer's
    channel i wherever possible."""
    out_units = [u for slot, u in zip(st.slots, slot_units, strict=True) if slot.kind == "out"]
    seen = np.concatenate([*out_units, *slot_units]) if slot_units else np.zeros(0, dtype=np.int64)
    _, first = np.unique(seen, return_index=True)
    ordered = seen[np.sort(first)]
    ordered = ordered[(ordered != units.poison_unit) & units.has_producer[ordered]]
    # Split the ordered units by group in one stable sort (order within each group is kept).
    by_group = ordered[np.argsort(units.group_of_unit[ordered], kind="stable")]
    groups_sorted = units.group_of_unit[by_group]
    rank = np.full(len(units.has_producer), -1, dtype=np.int64)
    group_units: dict[int, np.ndarray] = {}
    for start, stop in _runs(groups_sorted):
        members_of = by_group[start:stop]
        rank[members_of] = np.arange(len(members_of))
        group_units[int(groups_sorted[start])] = members_of
    return rank, group_units


def _runs(sorted_keys: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of every run of equal values in ``sorted_keys``."""
    bounds = [0, *(np.flatnonzero(np.diff(sorted_keys)) + 1).tolist(), len(sorted_keys)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _positions_by_group(
    units: Units, slot_units: list[np.ndarray]
) -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Per group, in slot order: each slot holding some of its (prunable) units, the positions there (in
    ascending order) and the unit at each. One sort over all slots' indices at once."""
    if not slot_units:
        return {}
    sizes = np.array([len(labels) for labels in slot_units], dtype=np.int64)
    labels = np.concatenate(slot_units)
    slot_of = np.repeat(np.arange(len(slot_units)), sizes)
    position = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    prunable = (labels != units.poison_unit) & units.has_producer[labels]
    labels, slot_of, position = labels[prunable], slot_of[prunable], position[prunable]
    groups = units.group_of_unit[labels]
    if not len(groups):
        return {}
    order = np.lexsort((slot_of, groups))  # stable: positions stay ascending within a slot
    labels, slot_of, position, groups = labels[order], slot_of[order], position[order], groups[order]
    starts = np.flatnonzero((np.diff(groups) != 0) | (np.diff(slot_of) != 0)) + 1
    bounds = [0, *starts.tolist(), len(groups)]
    found: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for (a, b), g, s in zip(
        itertools.pairwise(bounds), groups[bounds[:-1]].tolist(), slot_of[bounds[:-1]].tolist(), strict=True
    ):
        found.setdefault(g, []).append((s, position[a:b], labels[a:b]))
    return found


def _distinct_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(matrix, axis=0, return_inverse=True)`` (rows in lexicographic order) for small integer
    matrices, where hashing rows beats numpy's sort of a structured view."""
    rows = [tuple(r) for r in matrix.tolist()]
    distinct = sorted(set(rows))
    index = {row: k for k, row in enumerate(distinct)}
    which = np.fromiter((index[r] for r in rows), dtype=np.int64, count=len(rows))
    return np.array(distinct, dtype=matrix.dtype).reshape(len(distinct), matrix.shape[1]), which


def _members(
    st: State,
    slots: list[int],
    multiplicities: list[int],
    ordered: list[int],
    bounds: list[int],
    slot_units: list[np.ndarray],
) -> tuple[list[Member], list[int], list[OpCount]]:
    """One sub-group's members (the layer slots it touches, with its positions there: ``ordered`` split at
    ``bounds``), their slots, and its positions counted in operation slots (costs only: nothing to slice)."""
    members: list[Member] = []
    member_slots: list[int] = []
    counted: list[OpCount] = []
    for c, (s, multiplicity) in enumerate(zip(slots, multiplicities, strict=True)):
        slot = st.slots[s]
        begin = bounds[c - 1] if c else 0
        if slot.kind == "op":
            counted.append(OpCount(s, multiplicity, int(bounds[c] - begin)))
            continue
        members.append(
            Member(
                layer=slot.layer,
                layer_type=slot.layer_type,
                kind=slot.kind,
                dim=slot.dim,
                positions=tuple(ordered[begin : bounds[c]]),
                multiplicity=multiplicity,
                size=len(slot_units[s]),
            )
        )
        member_slots.append(s)
    return members, member_slots, counted


def form_groups(
    st: State,
    units: Units,
    slot_units: list[np.ndarray],
    rank: np.ndarray,
    group_units: dict[int, np.ndarray],
) -> tuple[list[ChannelGroup], list[tuple[int, ...]], list[tuple[OpCount, ...]]]:
    """The channel groups in topological order, the slot of each of their members, and the positions each
    group holds in operation slots (counted for costs, never members)."""
    has_producer = units.has_producer
    positions_by_group = _positions_by_group(units, slot_units)
    groups: list[ChannelGroup] = []
    member_slots: list[tuple[int, ...]] = []
    op_counts: list[tuple[OpCount, ...]] = []
    first_slot: list[int] = []
    taken_names: set[str] = set()
    for gl, units_of_group in group_units.items():
        if gl == units.poisoned_group:
            continue
        touching = positions_by_group.get(gl, [])
        slots_of = [s for s, _, _ in touching]
        positions_of = [positions for _, positions, _ in touching]
        units_at = [at for _, _, at in touching]  # the unit at each position
        # How often each unit of the group occurs in each touching slot. Units with different rows sit in
        # different layers (a concat's producers joined by a residual add): they become separate groups,
        # so that every group is uniform in every layer and costs depend only on how many units it keeps.
        counts = np.zeros((len(units_of_group), len(slots_of)), dtype=np.int64)
        for j, at in enumerate(units_at):
            counts[:, j] = np.bincount(rank[at], minlength=len(units_of_group))
        uniform = counts.size > 0 and bool((counts == counts[:1]).all())  # the usual case: one sub-group
        if uniform:
            signatures, which = counts[:1], np.zeros(len(units_of_group), dtype=np.int64)
        else:
            signatures, which = _distinct_rows(counts)
        for k in range(len(signatures)):
            sub_units = units_of_group[which.reshape(-1) == k]
            if len(sub_units) < 2:
                continue
            if uniform:
                sub_rank = rank  # the group's own numbering, which no other group's positions use
            else:
                sub_rank = np.full(len(has_producer), -1, dtype=np.int64)
                sub_rank[sub_units] = np.arange(len(sub_units))
            columns = [j for j in range(len(slots_of)) if signatures[k, j]]
            # Every member's positions in unit order, with one stable sort for the whole sub-group: by
            # member, then by the unit each position belongs to.
            positions = np.concatenate([positions_of[j] for j in columns])
            ranks = sub_rank[np.concatenate([units_at[j] for j in columns])]
            member = np.repeat(np.arange(len(columns)), [len(positions_of[j]) for j in columns])
            ours = ranks >= 0
            positions, ranks, member = positions[ours], ranks[ours], member[ours]
            by_unit = np.lexsort((ranks, member))
            ordered = positions[by_unit].tolist()
            bounds = np.cumsum(np.bincount(member, minlength=len(columns))).tolist()
            members, slots, counted = _members(
                st, [slots_of[j] for j in columns], [int(signatures[k, j]) for j in columns], ordered, bounds,
                slot_units,
            )  # fmt: skip
            producers = [s for s, m in zip(slots, members, strict=True) if m.kind == "out"]
            if not producers:
                continue
            name = st.slots[producers[0]].layer
            if name in taken_names:  # two sub-groups share their first producer: number them
                name = f"{name}#{sum(n.split('#')[0] == name for n in taken_names)}"
            taken_names.add(name)
            groups.append(ChannelGroup(name=name, units=len(sub_units), members=tuple(members)))
            member_slots.append(tuple(slots))
            op_counts.append(tuple(counted))
            first_slot.append(min(producers))
    # Slots are registered in execution order, so this is topological order of the groups' producers.
    order = sorted(range(len(groups)), key=lambda i: first_slot[i])
    groups = [
        ChannelGroup(name=groups[i].name, units=groups[i].units, members=groups[i].members, index=k)
        for k, i in enumerate(order)
    ]
    return groups, [member_slots[i] for i in order], [op_counts[i] for i in order]


def _grouped_reasons(frozen: Sequence[tuple[str, str]]) -> list[str]:
    """One entry per distinct reason, in first-seen order: ``"node: why"``, or for a reason several nodes
    share (a detector's box decoding reshapes to a literal size at every pyramid level) ``"why at N nodes
    (a, b, c, ...)"``, so a repeated pattern reads once instead of crowding out the rest."""
    nodes_of: dict[str, list[str]] = {}
    for node, why in frozen:
        nodes_of.setdefault(why, []).append(node)
    return [
        f"{nodes[0]}: {why}"
        if len(nodes) == 1
        else f"{why} at {len(nodes)} nodes ({', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})"
        for why, nodes in nodes_of.items()
    ]


def resolve(model: nn.Module, st: State) -> DependencyGraph:
    """The dependency graph of ``model`` from what propagation recorded in ``st``."""
    raw_ties, warn = tie_shared_tensors(st)  # parameter -> why its channels stay whole
    units = find_units(st, raw_ties, warn)
    slot_units = label_slots(st, units)
    rank, group_units = number_units(st, units, slot_units)
    groups, member_slots, op_counts = form_groups(st, units, slot_units, rank, group_units)
    costs = cost_model(model, st, slot_units, groups, member_slots, op_counts)
    if st.unmapped or warn:
        reasons = _grouped_reasons([*st.unmapped.items(), *warn.items()])
        warnings.warn(
            "prune_env: some channels cannot be mapped and will not be pruned — "
            + "; ".join(reasons[:12])
            + (f"; and {len(reasons) - 12} more" if len(reasons) > 12 else ""),
            stacklevel=3,  # the caller of build_graph
        )
    frozen = dict(st.unmapped)  # a node's reason wins over a parameter's of the same name
    for name, why in warn.items():
        frozen.setdefault(name, why)
    slots = tuple(
        Slot(r.layer, r.layer_type, r.kind, r.dim, len(labels))
        for r, labels in zip(st.slots, slot_units, strict=True)
    )
    return DependencyGraph(model, groups, frozen, costs, member_slots, slots)
