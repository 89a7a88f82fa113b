"""The exact cost model of a resolved graph: kept indices per slot as affine functions of the units each
group keeps, MACs and parameter counts as sums of bilinear terms over slots (see ``prune_env.costs``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from prune_env.costs import CostModel, CostTerm
from prune_env.graph.elements import State
from prune_env.graph.values import ChannelGroup


@dataclass(frozen=True)
class OpCount:
    """A group's share of an operation slot: ``positions`` indices, ``multiplicity`` per unit it keeps."""

    slot: int
    multiplicity: int
    positions: int


def cost_model(
    model: nn.Module,
    st: State,
    slot_units: Sequence[np.ndarray],
    groups: Sequence[ChannelGroup],
    member_slots: Sequence[Sequence[int]],
    op_counts: Sequence[Sequence[OpCount]] = (),
) -> CostModel:
    """``slot_units``: the unit of every index of every slot; ``member_slots``: per group, each member's slot;
    ``op_counts``: per group, its positions in operation slots (see :class:`OpCount`)."""
    mult = np.zeros((len(st.slots), len(groups)), dtype=np.int64)
    fixed = np.array([len(u) for u in slot_units], dtype=np.int64)
    for g, (group, slots) in enumerate(zip(groups, member_slots, strict=True)):
        for s, member in zip(slots, group.members, strict=True):
            mult[s, g] = member.multiplicity
            fixed[s] -= len(member.positions)
    for g, counts in enumerate(op_counts):
        for count in counts:
            mult[count.slot, g] = count.multiplicity
            fixed[count.slot] -= count.positions
    macs_terms = [
        CostTerm(coef, slots, layer)
        for (coef, slots), layer in zip(st.macs_terms, st.macs_term_layers, strict=True)
    ]
    params_terms = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params_terms.append(_param_term(st, name, p))
    return CostModel(
        mult=mult,
        fixed=fixed,
        macs_terms=macs_terms,
        params_terms=params_terms,
        full=[g.units for g in groups],
    )


def _param_term(st: State, name: str, p: nn.Parameter) -> CostTerm:
    """The numel of parameter ``name`` as a cost term (labelled with the parameter's name)."""
    use = st.param_uses.get(name)
    raw = st.slot_index.get((name, "param"))
    if use is not None:
        return CostTerm(use.coef, use.slots, name)
    if raw is not None and st.slots[raw].dim >= 0:
        shape = st.slots[raw].param_shape
        assert shape is not None  # raw parameter slots record their shape
        coef = int(np.prod(shape)) // shape[st.slots[raw].dim]
        return CostTerm(coef, (raw,), name)
    return CostTerm(p.numel(), (), name)
